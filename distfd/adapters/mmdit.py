"""MMDiT transformers (FLUX.1, Stable Diffusion 3/3.5): encoder = the embeddings and the first blocks.

Both models embed the image (``x_embedder``/``pos_embed``) and the text (``context_embedder``), then
run joint blocks that each hand on both streams, ``(encoder_hidden_states, hidden_states)``; FLUX
follows its 19 double-stream blocks with 38 single-stream blocks of the same signature. The encoder
is the two embeddings plus the first ``N`` blocks of that sequence; only the last encoder block's
output (both streams) is cached. At non-key steps the embeddings hand on the cached streams without
computing (only their dtype is read before the blocks) and the encoder blocks hand on the cached
pair. The timestep (and FLUX's guidance) embedding, the rotary position embedding and the decoder
blocks run in the model's own forward for every decoder row, as for DiT.

The default ``N``: for SD3 the share measured on the embedded MMDiT (5 of its 6 joint blocks; 20 of
SD3.5-medium's 24), for FLUX the paper's DiT-XL/2 split (18 of 28 blocks, journal version Sec. 3.1)
scaled to its block count, 37 of 57 (no FLUX-layout model is trained here: FLUX's guidance embedding
is distilled from a guided teacher, and its true CFG calls the transformer twice a step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .base import Adapter, EncoderModule
from .dit import default_encoder_blocks

IMAGE, TEXT = 1, 0  # positions of the streams in a joint block's output


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks in call order, with their names (FLUX: double, then single)."""
    out = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
    single = getattr(model, "single_transformer_blocks", None) or []
    return out + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(single)]


def _refuse(cond: bool, what: str, why: str) -> None:
    if cond:
        raise ValueError(f"{what} is not supported by distfd: {why}.")


@dataclass
class MMDiTAdapter(Adapter):
    """``FluxTransformer2DModel`` and ``SD3Transformer2DModel``.

    ``image_embedder``: the image embedding's attribute (``x_embedder`` for FLUX, ``pos_embed`` for
    SD3). ``timestep_divisor``: the pipeline passes ``t / timestep_divisor`` (FLUX: 1000).
    ``encoder_blocks``: leading blocks in the encoder; ``None``: :meth:`default_blocks`.
    ``encoder_fraction``: the family's measured default share of the blocks (None: the paper's DiT ratio).
    ``t5_tokenizer``: the pipeline's T5 tokenizer attribute (SD3: ``tokenizer_3``, FLUX: ``tokenizer_2``).
    """

    denoiser_attr: str = "transformer"
    sample_arg: str = "hidden_states"
    image_embedder: str = "x_embedder"
    timestep_divisor: float = 1.0
    encoder_blocks: int | None = None
    encoder_fraction: tuple[int, int] | None = None
    t5_tokenizer: str = "tokenizer_3"

    def default_blocks(self, depth: int) -> int:
        """The encoder's block count when ``encoder_blocks`` is None: ``encoder_fraction`` of the
        blocks (SD3: the measured 5 of 6), else the paper's 18 of 28, leaving the decoder one block."""
        if self.encoder_fraction is None:
            return default_encoder_blocks(depth)
        a, b = self.encoder_fraction
        return min(max(1, round(depth * a / b)), max(1, depth - 1))

    def configured(self, config) -> MMDiTAdapter:
        if config.encoder_blocks is None:
            return self
        return replace(self, encoder_blocks=config.encoder_blocks)

    def encoder_modules(self, model: nn.Module) -> list[EncoderModule]:
        named = blocks(model)
        n = self.default_blocks(len(named)) if self.encoder_blocks is None else self.encoder_blocks
        if not 1 <= n < len(named):
            raise ValueError(
                f"encoder_blocks={n} does not fit {type(model).__name__} with {len(named)} transformer "
                f"blocks: use 1..{len(named) - 1} (the decoder needs at least one block)."
            )
        _refuse(
            getattr(model, "encoder_hid_proj", None) is not None
            or getattr(model, "image_proj", None) is not None,
            f"{type(model).__name__} with an IP-Adapter",
            "its forward pops the image embeddings from joint_attention_kwargs in the first call of a "
            "step, so a decoder pass would run without them; unload it (pipe.unload_ip_adapter())",
        )
        mods = [
            EncoderModule(self.image_embedder, getattr(model, self.image_embedder), keep=False, part=IMAGE),
            EncoderModule("context_embedder", model.context_embedder, keep=False, part=TEXT),
        ]
        mods += [EncoderModule(name, b, keep=False) for name, b in named[: n - 1]]
        mods.append(EncoderModule(*named[n - 1]))  # (text (B, S, D), image (B, T, D)), cached
        return mods

    def call_defaults(self, pipe: Any) -> dict[str, Any]:
        """``max_sequence_length``: the T5 tokenizer's ``model_max_length`` where it is below the
        pipeline's default (SD3: 256, FLUX: 512), so prompts are not padded past what the model reads
        (the embedded MMDiT: 24). Real checkpoints' T5 tokenizers say 512: nothing is passed."""
        import inspect

        tokenizer = getattr(pipe, self.t5_tokenizer, None)
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        limit = getattr(tokenizer, "model_max_length", None)
        if param is None or not isinstance(param.default, int) or not isinstance(limit, int):
            return {}
        return {"max_sequence_length": limit} if 0 < limit < param.default else {}

    def call_timesteps(self, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.timestep_divisor == 1.0:
            return timesteps
        return timesteps.to(sample.dtype) / self.timestep_divisor  # as FluxPipeline computes it

    def check_call(self, call: dict[str, Any]) -> None:
        _refuse(
            call.get("skip_layers") is not None,
            "SD3 skip-layer guidance (skip_guidance_layers)",
            "the pipeline calls the transformer a second time per step with layers skipped, and the "
            "skipped layers may be encoder blocks whose cached output would stand in for them; "
            "leave skip_guidance_layers None",
        )
        _refuse(
            any(
                call.get(k) is not None
                for k in ("controlnet_block_samples", "block_controlnet_hidden_states")
            ),
            "An MMDiT ControlNet",
            "its residuals are added inside the encoder blocks, which do not run at non-key steps",
        )
        kwargs = call.get("joint_attention_kwargs") or {}
        _refuse("ip_adapter_image_embeds" in kwargs, "An MMDiT IP-Adapter", "see pipe.unload_ip_adapter()")

    def output_row_shape(self, model: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
        if sample.dim() == 3:  # FLUX: packed tokens (B, T, C)
            return (sample.shape[1], model.proj_out.out_features)
        return (model.out_channels, *sample.shape[2:])  # SD3: (B, C, H, W)

    def make_output(self, sample: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline",)
TRUE_CFG_HINT = (
    "; FluxPipeline calls it twice per step when true_cfg_scale > 1 with a negative prompt (true CFG), "
    "which distfd does not support: use guidance_scale (the distilled guidance) instead"
)


def flux_adapter() -> MMDiTAdapter:
    return MMDiTAdapter(
        "flux",
        image_embedder="x_embedder",
        timestep_divisor=1000.0,
        t5_tokenizer="tokenizer_2",
        pipelines=FLUX_PIPELINES,
        unbatched=("img_ids", "txt_ids"),
        repeat_call_hint=TRUE_CFG_HINT,
    )


def sd3_adapter() -> MMDiTAdapter:
    # Measured on the embedded MMDiT (an SD3-layout model with 6 joint blocks; docs/quality.md): with
    # the same key steps, N = 1..5 encoder blocks keep the image alike (PSNR and judge adherence
    # within each other's 95% intervals) while the denoiser-FLOP speed-up grows from 1.15x to 2.69x;
    # the per-block relative change grows with depth, with no knee. So: all but the last sixth.
    return MMDiTAdapter("sd3", image_embedder="pos_embed", encoder_fraction=(5, 6), pipelines=SD3_PIPELINES)
