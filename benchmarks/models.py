"""Random-weight pipelines built from published configs (no hub download).

Architectures: SD-1.5 (UNet2DConditionModel, 512x512), SDXL base (1024x1024, added
conditions) and DiT-XL/2 (256x256). Three sizes:

* ``full``: published architecture at its native resolution.
* ``reduced``: published architecture at a lower resolution (CPU-feasible), same step counts.
* ``tiny``: a toy architecture of the same family for smoke tests (seconds on CPU).

Prompts are turned into ``prompt_embeds`` by random-weight CLIP text encoders of the published
size (tiny ones for ``tiny``); token ids come from a deterministic hash of the words, so no
tokenizer files are needed. Text encoding is part of the timed pipeline call (see ``Bench.run``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ARCHS = ("sd15", "sdxl", "dit")
SIZES = ("tiny", "reduced", "full")
SCHEDULERS = ("ddim", "dpm")

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
    mid_block_scale_factor=1,
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    act_fn="silu",
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
TINY_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    cross_attention_dim=32,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
TINY_SDXL_UNET: dict[str, Any] = dict(
    TINY_UNET,
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
DIT_XL2: dict[str, Any] = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=1000,
    activation_fn="gelu-approximate",
)
TINY_DIT: dict[str, Any] = dict(
    DIT_XL2, num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8
)
SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_VAE: dict[str, Any] = dict(
    SD_VAE, layers_per_block=1, block_out_channels=(32, 32, 32, 32), sample_size=64
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
CLIP_TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=32,
)

# Native and reduced (CPU) image resolution per arch.
RESOLUTION = {
    ("sd15", "full"): 512,
    ("sd15", "reduced"): 128,
    ("sd15", "tiny"): 64,
    ("sdxl", "full"): 1024,
    ("sdxl", "reduced"): 256,
    ("sdxl", "tiny"): 64,
    ("dit", "full"): 256,
    ("dit", "reduced"): 128,
    ("dit", "tiny"): 64,
}
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_scheduler(name: str, arch: str):
    """DDIM or DPM-Solver++(2M) with the SD/SDXL training schedule (linear betas for DiT)."""
    betas = dict(num_train_timesteps=1000, beta_schedule="linear") if arch == "dit" else SD_BETAS
    if name == "ddim":
        extra = {} if arch == "dit" else dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return DDIMScheduler(**betas, **extra)
    if name == "dpm":
        extra = {} if arch == "dit" else dict(steps_offset=1)
        return DPMSolverMultistepScheduler(**betas, **extra, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


@dataclass
class Bench:
    """A pipeline plus what is needed to call it reproducibly with a given prompt."""

    arch: str
    size: str
    pipe: Any
    resolution: int
    encoders: list[Any] = field(default_factory=list)
    vocab: int = 49408
    guidance_scale: float = 7.5

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.arch == "dit" else self.pipe.unet

    def _ids(self, text: str) -> torch.Tensor:
        words = text.lower().split()[:75]
        ids = [self.vocab - 2] + [zlib.crc32(w.encode()) % (self.vocab - 2) for w in words]
        ids += [self.vocab - 1] * (77 - len(ids))  # EOS doubles as padding, as in CLIP
        return torch.tensor([ids], device=self.pipe.device)

    @torch.no_grad()
    def encode(self, text: str) -> dict[str, torch.Tensor]:
        ids = self._ids(text)
        if self.arch == "sd15":
            return {"prompt_embeds": self.encoders[0](ids).last_hidden_state}
        te1, te2 = self.encoders
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        return {"prompt_embeds": torch.cat([h1, out2.hidden_states[-2]], dim=-1), "pooled": out2.text_embeds}

    def call_kwargs(self, prompt: str, steps: int, seed: int) -> dict[str, Any]:
        """Everything but the pipeline itself; text encoding happens here (inside the timed region)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if self.arch == "dit":
            label = zlib.crc32(prompt.encode()) % 1000
            return dict(class_labels=[label], num_inference_steps=steps, generator=gen, guidance_scale=4.0)
        pos, neg = self.encode(prompt), self.encode("")
        kw: dict[str, Any] = dict(
            prompt_embeds=pos["prompt_embeds"],
            negative_prompt_embeds=neg["prompt_embeds"],
            num_inference_steps=steps,
            generator=gen,
            height=self.resolution,
            width=self.resolution,
            guidance_scale=self.guidance_scale,
        )
        if self.arch == "sdxl":
            kw.update(pooled_prompt_embeds=pos["pooled"], negative_pooled_prompt_embeds=neg["pooled"])
        return kw

    def run(self, prompt: str, steps: int, seed: int, output_type: str = "pil"):
        return self.pipe(**self.call_kwargs(prompt, steps, seed), output_type=output_type)


def _clip(cfg: dict[str, Any], projection: bool):
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(
        CLIPTextConfig(**cfg, bos_token_id=cfg["vocab_size"] - 2, eos_token_id=cfg["vocab_size"] - 1)
    ).eval()


def build(
    arch: str,
    size: str,
    scheduler: str,
    device: str | torch.device,
    dtype: torch.dtype,
    resolution: int | None = None,
    seed: int = 0,
) -> Bench:
    """Build a random-weight pipeline for ``arch``/``size`` on ``device``."""
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"arch must be one of {ARCHS}, size one of {SIZES}")
    torch.manual_seed(seed)
    tiny = size == "tiny"
    res = resolution or RESOLUTION[(arch, size)]
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    sched = make_scheduler(scheduler, arch)
    encoders: list[Any] = []
    clip_l = CLIP_TINY if tiny else CLIP_L
    if arch == "sd15":
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        encoders = [_clip(clip_l, False)]
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        guidance = 7.5
    elif arch == "sdxl":
        unet = UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET))
        clip_g = CLIP_TINY if tiny else CLIP_BIGG
        encoders = [_clip(clip_l, False), _clip(clip_g, True)]
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=sched,
        )
        pipe.watermark = None
        guidance = 5.0
    else:
        transformer = DiTTransformer2DModel(**{**(TINY_DIT if tiny else DIT_XL2), "sample_size": res // 8})
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=sched)
        guidance = 4.0
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for enc in encoders:
        enc.to(device, dtype)
    vocab = (CLIP_TINY if tiny else CLIP_L)["vocab_size"]
    return Bench(
        arch=arch,
        size=size,
        pipe=pipe,
        resolution=res,
        encoders=encoders,
        vocab=vocab,
        guidance_scale=guidance,
    )
