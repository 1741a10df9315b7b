"""UNet3DConditionModel (VideoFusion / ModelScope text-to-video): encoder = conv_in, transformer_in,
down_blocks, mid_block.

The forward folds the frames into the batch before ``conv_in`` (``(B, C, F, H, W) -> (B*F, C, H, W)``),
so the cached features have ``B*F`` rows; the engine replays each input row's ``F`` consecutive rows
together. The temporal ``transformer_in`` runs on the frames right after ``conv_in`` and before the
first down block, so it belongs to the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from torch import nn

from .base import EncoderModule
from .unet import UNetAdapter


@dataclass
class UNet3DAdapter(UNetAdapter):
    def encoder_modules(self, model: nn.Module) -> list[EncoderModule]:
        mods = super().encoder_modules(model)
        mods.insert(1, EncoderModule("transformer_in", model.transformer_in))
        return mods

    def make_output(self, sample: torch.Tensor, return_dict: bool):
        return UNet3DConditionOutput(sample=sample) if return_dict else (sample,)


UNET3D_PIPELINES = ("TextToVideoSDPipeline",)
