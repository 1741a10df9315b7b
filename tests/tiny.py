"""Tiny seeded diffusers pipelines built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
}
SCHED_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# steps_offset=1 everywhere: diffusers' SD pipelines warn about (and rewrite) any other value; with the
# default "linspace" spacing of DPM-Solver and Euler it does not move a timestep.
EXTRA = {
    "ddim": dict(steps_offset=1, clip_sample=False, set_alpha_to_one=False),
    "dpm": dict(steps_offset=1),
    "euler": dict(steps_offset=1),
    "euler-a": dict(steps_offset=1),
    "pndm": dict(steps_offset=1, skip_prk_steps=True),
}


def tokenizer(max_len: int = 16) -> CLIPTokenizer:
    vocab = {}
    for c in (chr(i) for i in range(33, 127)):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def text_encoder(cls=CLIPTextModel, hidden: int = 32, projection: int = 32):
    cfg = CLIPTextConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        projection_dim=projection,
        bos_token_id=188,
        eos_token_id=189,
        pad_token_id=189,
    )
    return cls(cfg).eval()


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


# What every tiny UNet shares: 16x16 latents of 4 channels, two levels, one layer each.
UNET_KW = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32))


def scheduler(name: str = "ddim"):
    return SCHEDULERS[name](**SCHED_KW, **EXTRA.get(name, {}))


def sd(sched: str = "ddim", seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD-1.x pipeline: 16x16 latents, cross-attention down/mid/up blocks, 32x32 images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_KW,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        unet=unet,
        scheduler=scheduler(sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(sched: str = "ddim", seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline with both text encoders and the text_time added conditions."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_KW,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        text_encoder_2=text_encoder(CLIPTextModelWithProjection),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=unet,
        scheduler=scheduler(sched),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps: int = 10, seed: int = 0, **kw) -> torch.Tensor:
    """Final latents of one seeded call (output_type='latent')."""
    kw.setdefault("prompt", "a red circle")
    kw.setdefault("guidance_scale", 5.0)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(num_inference_steps=steps, generator=generator, output_type="latent", **kw)
    return out.images


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, msg: str | None = None) -> None:
    """allclose with rtol, the absolute floor taken relative to the reference's scale (random tiny
    models give latents of magnitude ~10, where float32 batching differences reach ~1e-5)."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()), msg=msg)
