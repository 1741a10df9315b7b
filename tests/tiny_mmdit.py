"""Tiny seeded FLUX.1 and SD3 pipelines (CLIP and T5 text encoders, offline tokenizers), from configs."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from . import tiny
from .tiny_models import randomize

T5_DIM = 32


def t5_tokenizer(max_len: int = 16) -> T5TokenizerFast:
    """A T5 tokenizer without sentencepiece: a unigram model over printable characters."""
    from benchmarks.embedded.train_mmdit import t5_tokenizer as build

    return build(max_len, words=())


def t5_encoder() -> T5EncoderModel:
    cfg = T5Config(vocab_size=100, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, levels: int = 2) -> AutoencoderKL:
    """``levels``: 2 gives a VAE factor of 2 (tiny images), 4 the real models' factor of 8."""
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:levels],
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        shift_factor=0.06,
        scaling_factor=0.6,
    ).eval()


def flux(sched: str = "flow-euler", seed: int = 0, double: int = 2, single: int = 2) -> FluxPipeline:
    """FLUX.1-dev's layout in miniature: guidance embedding, rotary positions, double and single
    blocks; 2x2-packed 4-channel latents (16 channels in), dynamic shift. ``sched``: only
    "flow-euler" (the rank workers name one)."""
    assert sched == "flow-euler", sched
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    pipe = FluxPipeline(
        scheduler=sched,
        vae=vae(),
        text_encoder=tiny.text_encoder(),
        tokenizer=tiny.tokenizer(),
        text_encoder_2=t5_encoder(),
        tokenizer_2=t5_tokenizer(),
        transformer=randomize(transformer),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3(sched: str = "flow-euler", seed: int = 0, layers: int = 4) -> StableDiffusion3Pipeline:
    """SD3's layout in miniature: patch 2, joint blocks (the last one context-pre-only), CFG, shift 3.
    ``sched`` as for :func:`flux`."""
    assert sched == "flow-euler", sched
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=tiny.text_encoder(CLIPTextModelWithProjection),
        tokenizer=tiny.tokenizer(),
        text_encoder_2=tiny.text_encoder(CLIPTextModelWithProjection),
        tokenizer_2=tiny.tokenizer(),
        text_encoder_3=t5_encoder(),
        tokenizer_3=t5_tokenizer(),
        transformer=randomize(transformer),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_flux(
    pipe, steps: int = 6, seed: int = 0, prompt="a red cube", size: int = 32, text_len: int = 8, **kw
) -> torch.Tensor:
    out = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=3.5,
        height=size,
        width=size,
        max_sequence_length=text_len,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    )
    return out.images


def run_sd3(pipe, steps: int = 6, seed: int = 0, prompt="a red cube", size: int = 32, **kw) -> torch.Tensor:
    out = pipe(
        prompt=prompt,
        negative_prompt="blurry",
        num_inference_steps=steps,
        guidance_scale=4.0,
        height=size,
        width=size,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    )
    return out.images
