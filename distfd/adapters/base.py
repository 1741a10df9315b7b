"""What distfd needs to know about a denoiser to split it into encoder and decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderModule:
    """One module of the encoder, in call order.

    ``keep``: its output is cached and replayed to the decoder (UNet skips). A module that is not
    kept is skipped at non-key steps and hands on the last module's cached output instead (DiT
    blocks inside the encoder: only the hidden states leaving the encoder matter).
    """

    name: str
    module: nn.Module
    keep: bool = True
    # A module that is not kept hands on the last module's cached output, or, where this is set, that
    # output's item ``part`` (MMDiT: the image embedding stands in with the image stream's tensor, so
    # the forward's code between the embeddings and the blocks sees a tensor of the right dtype).
    part: int | None = None


@dataclass
class Adapter:
    """How to split one denoiser class; subclasses fill in the model-specific parts."""

    name: str
    denoiser_attr: str = "unet"
    sample_arg: str = "sample"
    timestep_arg: str = "timestep"
    pipelines: tuple[str, ...] = field(default_factory=tuple)

    def configured(self, config) -> Adapter:
        """This adapter with the per-call options of ``config`` applied (none for a UNet)."""
        if getattr(config, "encoder_blocks", None) is not None:
            raise ValueError(
                f"encoder_blocks is set but the {self.name} adapter has no transformer blocks to split; "
                "it applies to DiT and PixArt only (and the MMDiTs: FLUX, SD3). Leave it None."
            )
        return self

    def encoder_modules(self, model: nn.Module) -> list[EncoderModule]:
        raise NotImplementedError

    def output_row_shape(self, model: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
        """Shape of one row of the denoiser's prediction for this input."""
        raise NotImplementedError

    def call_timesteps(self, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The scheduler's timesteps as the pipeline passes them to the denoiser (FLUX: ``t / 1000``)."""
        return timesteps

    def call_defaults(self, pipe: Any) -> dict[str, Any]:
        """Pipeline-call arguments the model's own folder implies beyond the pipeline's defaults
        (every distfd call of the pipeline passes them; a caller's value wins). None for most."""
        return {}

    def check_call(self, call: dict[str, Any]) -> None:
        """Refuse, by name, a denoiser call this adapter cannot split (SD3 skip-layer guidance)."""

    unbatched: tuple[str, ...] = ()  # call arguments without a batch dimension (FLUX's position ids)
    repeat_call_hint: str = ""  # why a pipeline may call the denoiser twice per step (for the error)

    def get_sample(self, output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output.sample

    def make_output(self, sample: torch.Tensor, return_dict: bool) -> Any:
        raise NotImplementedError

    def condition_tensor(self, call: dict[str, Any]) -> torch.Tensor | None:
        """The conditioning that identifies the prompt (checked to agree across ranks)."""
        return call.get("encoder_hidden_states")
