"""UNet2DConditionModel (SD-1.x, SD-2.x, SDXL, DeepFloyd-IF): encoder = conv_in, down_blocks, mid_block.

The UNet's own forward keeps running: at non-key steps these modules return their cached outputs
(the skip tensors and the mid-block output), and everything else, the full time embedding of the
step (class, aug and ``time_embed_act`` included) and the up blocks, runs as usual. ControlNet
residuals are added by the forward after the down and mid blocks, from the call's arguments (see
``ControlNetHook`` in ``distfd/hooks.py`` for how the ControlNet itself is propagated).

img2img and inpainting run a suffix of ``scheduler.timesteps`` (``strength``): key step ``k`` is the
``k``-th denoiser call of the pipeline call, so index 0 is the first step that actually runs. A
preset keeps its indices on that shorter loop, and indices past its end are an error that names the
loop length (give a list of indices, or a preset that fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .base import Adapter, EncoderModule


@dataclass
class UNetAdapter(Adapter):
    def encoder_modules(self, model: nn.Module) -> list[EncoderModule]:
        mods = [EncoderModule("conv_in", model.conv_in)]
        mods += [EncoderModule(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
        if model.mid_block is not None:
            mods.append(EncoderModule("mid_block", model.mid_block))
        return mods

    def output_row_shape(self, model: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
        return (model.config.out_channels, *sample.shape[2:])

    def make_output(self, sample: torch.Tensor, return_dict: bool):
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


UNET_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
    "IFPipeline",
    "IFSuperResolutionPipeline",
    "StableDiffusionUpscalePipeline",
)
