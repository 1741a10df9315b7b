"""Validated configuration for FasterDiffusion; constructing one has no side effects beyond reading a
preset file named in it (once, here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .keysteps import KeySteps
from .validate import boolean, choice, number, optional_positive_int

MODES = ("propagate", "parallel")
ENCODER_PLACEMENTS = ("rank0", "replicated")


@dataclass(frozen=True)
class FasterDiffusionConfig:
    """How encoder propagation runs (FasterDiffusion, arXiv 2312.09608, Sec. 3.3).

    Args:
        key_steps: A preset name (``distfd.PRESETS``, or ``"uniform-K"``), the path of a preset JSON
            file, a string ``"0,1,5"``, or a sequence of 0-based indices into the sampling loop at which
            the encoder runs. Index 0 must be a key step. Parsed once into a :class:`KeySteps`.
        mode: ``"propagate"`` runs each non-key step's decoder on its own, in loop order;
            ``"parallel"`` decodes a key step and all following non-key steps up to the next key step
            as one batch (spread over the ranks when several run).
        noise_alpha: Prior noise injection strength (Sec. 3.3): before the scheduler update of every
            step whose timestep value is below ``noise_below * num_train_timesteps`` the latents get
            ``+ noise_alpha * z_T``. ``0`` disables it.
        noise_below: Fraction of the training horizon under which noise injection applies (the
            scheduler's timesteps; for flow matching, where they are ``sigma * horizon``, sigma below it).
        rescale_key_steps: Allow a preset built for N steps to be rescaled to another step count
            (otherwise a mismatch is an error).
        max_parallel_steps: In parallel mode, decode at most this many steps per batch (caps the
            extra memory of parallel decoding); ``None`` decodes a whole key-step group at once.
        encoder: Where the encoder runs when several ranks share an image: ``"rank0"`` runs it on
            rank 0 and broadcasts its features; ``"replicated"`` runs it on every rank from rank 0's
            latents, so only latents and noise predictions cross the network.
        encoder_blocks: For transformer denoisers (DiT, PixArt, FLUX, SD3), how many leading transformer
            blocks form the encoder; ``None`` scales the paper's 18 of DiT-XL/2's 28 to the model's depth.
    """

    key_steps: KeySteps | str | Sequence[int] = "sd-ddim-50"
    mode: str = "parallel"
    noise_alpha: float = 0.003
    noise_below: float = 0.5
    rescale_key_steps: bool = False
    max_parallel_steps: int | None = None
    encoder: str = "rank0"
    encoder_blocks: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_steps", KeySteps.parse(self.key_steps))
        choice("mode", self.mode, MODES)
        choice("encoder", self.encoder, ENCODER_PLACEMENTS)
        number("noise_alpha", self.noise_alpha, low=0.0)
        number("noise_below", self.noise_below, low=0.0, high=1.0)
        boolean("rescale_key_steps", self.rescale_key_steps)
        optional_positive_int("max_parallel_steps", self.max_parallel_steps)
        optional_positive_int("encoder_blocks", self.encoder_blocks)

    @property
    def decode_width(self) -> int | None:
        """Steps decoded per batch: one in propagation, else ``max_parallel_steps`` (``None``: a group)."""
        return 1 if self.mode == "propagate" else self.max_parallel_steps
