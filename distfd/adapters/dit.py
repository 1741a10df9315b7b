"""Diffusion transformers (DiT, PixArt): encoder = ``pos_embed`` and the first transformer blocks.

The journal version of FasterDiffusion (Sec. 3.1) splits DiT-XL/2's 28 blocks into an encoder of the
first 18 and a decoder of the other 10 plus the final layer. Only the hidden states leaving the
encoder feed the decoder, so only the last encoder block's output is cached; at non-key steps the
patch embedding and the encoder blocks hand that on without computing. The timestep and class
embeddings (adaLN) are computed by the model's own forward for every decoder row, and the CFG rows
(class labels, or prompt embeddings for PixArt) are re-indexed with the rest of the call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .base import Adapter, EncoderModule

# DiT-XL/2 (28 blocks): 18 encoder blocks (journal version, Sec. 3.1).
PAPER_ENCODER_BLOCKS, PAPER_DEPTH = 18, 28


def default_encoder_blocks(depth: int) -> int:
    """The paper's 18-of-28 split scaled to ``depth`` blocks (at least one block on each side)."""
    return min(max(1, round(depth * PAPER_ENCODER_BLOCKS / PAPER_DEPTH)), max(1, depth - 1))


@dataclass
class DiTAdapter(Adapter):
    """``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` (same ``pos_embed`` + blocks layout).

    ``encoder_blocks``: how many leading transformer blocks form the encoder; ``None`` scales the
    paper's 18 of 28 to the model's depth (``FasterDiffusionConfig.encoder_blocks`` sets it per call).
    """

    denoiser_attr: str = "transformer"
    sample_arg: str = "hidden_states"
    encoder_blocks: int | None = None

    def configured(self, config) -> DiTAdapter:
        if config.encoder_blocks is None:
            return self
        return replace(self, encoder_blocks=config.encoder_blocks)

    def encoder_modules(self, model: nn.Module) -> list[EncoderModule]:
        blocks = model.transformer_blocks
        n = default_encoder_blocks(len(blocks)) if self.encoder_blocks is None else self.encoder_blocks
        if not 1 <= n < len(blocks):
            raise ValueError(
                f"encoder_blocks={n} does not fit {type(model).__name__} with {len(blocks)} transformer "
                f"blocks: use 1..{len(blocks) - 1} (the decoder needs at least one block)."
            )
        mods = [EncoderModule("pos_embed", model.pos_embed, keep=False)]
        mods += [EncoderModule(f"transformer_blocks.{i}", blocks[i], keep=False) for i in range(n - 1)]
        mods.append(EncoderModule(f"transformer_blocks.{n - 1}", blocks[n - 1]))  # (B, tokens, D), cached
        return mods

    def output_row_shape(self, model: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
        return (model.out_channels, *sample.shape[2:])

    def make_output(self, sample: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def condition_tensor(self, call: dict[str, Any]) -> torch.Tensor | None:
        cond = call.get("encoder_hidden_states")
        return cond if cond is not None else call.get("class_labels")


DIT_PIPELINES = ("DiTPipeline",)
PIXART_PIPELINES = ("PixArtAlphaPipeline",)
