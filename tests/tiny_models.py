"""Tiny seeded pipelines for the model-coverage tests (DiT, PixArt, ControlNet, IF, video), built from
configs: no download. Weights that diffusers zero-initialises (ControlNet outputs, adaLN-zero) are
randomised so that every part of each model shows in the result.
"""

from __future__ import annotations

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    IFPipeline,
    IFSuperResolutionPipeline,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from torch import nn

from . import tiny


def randomize(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Add seeded noise to every weight, so zero-initialised layers (ControlNet outputs) matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit(sched: str = "ddim", seed: int = 0, layers: int = 4) -> DiTPipeline:
    """DiT with learned sigma (8 output channels) on 8x8 latents, patch 2."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        norm_num_groups=8,
    )
    return _quiet(
        DiTPipeline(transformer=randomize(transformer), vae=tiny.vae(), scheduler=tiny.scheduler(sched))
    )


def pixart(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-alpha without a text encoder (prompt embeddings are passed in)."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=8,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny.vae(),
        transformer=randomize(transformer),
        scheduler=tiny.scheduler(),
    )
    return _quiet(pipe)


def controlnet(unet: UNet2DConditionModel, seed: int, **kw) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16), **kw)
    return randomize(net)


def sd_controlnet(sched: str = "ddim", seed: int = 0, nets: int = 1) -> StableDiffusionControlNetPipeline:
    base = tiny.sd(sched, seed)
    models = [controlnet(base.unet, seed + 1 + i) for i in range(nets)]
    net = models[0] if nets == 1 else MultiControlNetModel(models)
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"}, controlnet=net
    )
    return _quiet(pipe)


def sdxl_controlnet(sched: str = "ddim", seed: int = 0) -> StableDiffusionXLControlNetPipeline:
    base = tiny.sdxl(sched, seed)
    comps = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    return _quiet(StableDiffusionXLControlNetPipeline(**comps, controlnet=controlnet(base.unet, seed + 1)))


def control_image(seed: int = 1, size: int = 32, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _if_unet(in_channels: int, **kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=in_channels,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
        **kw,
    )


def _if_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        clip_sample=True,
    )


def _if_kw():
    return dict(
        tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None
    )


def if_stage1(seed: int = 0) -> IFPipeline:
    """DeepFloyd-IF stage I: pixel-space 16x16, learned variance, text aug embedding."""
    torch.manual_seed(seed)
    unet = randomize(_if_unet(3))
    return _quiet(IFPipeline(unet=unet, scheduler=_if_scheduler(), requires_safety_checker=False, **_if_kw()))


def if_stage2(seed: int = 0) -> IFSuperResolutionPipeline:
    """DeepFloyd-IF stage II: the noised low-res image is concatenated and its noise level is a class label."""
    torch.manual_seed(seed)
    unet = randomize(
        _if_unet(6, class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
    )
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    pipe = IFSuperResolutionPipeline(
        unet=unet,
        scheduler=_if_scheduler(),
        image_noising_scheduler=noising,
        requires_safety_checker=False,
        **_if_kw(),
    )
    return _quiet(pipe)


def prompt_embeds(seed: int = 2, batch: int = 1, length: int = 8, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, length, dim, generator=g),
        negative_prompt_embeds=torch.randn(batch, length, dim, generator=g),
    )


def upscaler(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """The x4 upscaler used as DeepFloyd-IF stage III: 7 input channels, noise level as class label."""
    base = tiny.sd("ddim", seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **{**tiny.UNET_KW, "in_channels": 7},
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        num_class_embeds=100,
    ).eval()
    vae = base.vae.register_to_config(scaling_factor=0.08333) or base.vae
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=DDIMScheduler(**tiny.SCHED_KW, **tiny.EXTRA["ddim"]),
        max_noise_level=99,
    )
    return _quiet(pipe)


def text2video(sched: str = "ddim", seed: int = 0) -> TextToVideoSDPipeline:
    """VideoFusion-style text-to-video: UNet3DConditionModel with temporal attention."""
    base = tiny.sd(sched, seed)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        **tiny.UNET_KW,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipe = TextToVideoSDPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=randomize(unet),
        scheduler=base.scheduler,
    )
    return _quiet(pipe)


# Runners with the signature of ``tiny.run`` (final latents or images of one seeded call), so the
# multi-rank worker can call these pipelines from a JSON spec.


def run_dit(pipe, steps: int = 10, seed: int = 0, labels=(3, 7), guidance_scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = pipe(
        class_labels=list(labels),
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        generator=g,
        output_type="pt",
    )
    return out.images


def run_controlnet(pipe, steps: int = 10, seed: int = 0, **kw) -> torch.Tensor:
    nets = getattr(pipe.controlnet, "nets", None)
    image = control_image() if nets is None else [control_image(1 + 2 * i) for i in range(len(nets))]
    return tiny.run(pipe, steps=steps, seed=seed, image=image, **kw)


def sd_multicontrolnet(sched: str = "ddim", seed: int = 0) -> StableDiffusionControlNetPipeline:
    return sd_controlnet(sched, seed, nets=2)
