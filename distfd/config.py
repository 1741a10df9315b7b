"""Validated configuration for FasterDiffusion; constructing one has no side effects."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .schedule import check_spec

MODES = ("propagate", "parallel")
ENCODER_PLACEMENTS = ("rank0", "replicated")


@dataclass
class FasterDiffusionConfig:
    """How encoder propagation runs (FasterDiffusion, arXiv 2312.09608, Sec. 3.3).

    Args:
        key_steps: A preset name (``distfd.schedule.PRESETS``, or ``"uniform-K"``), the path of a
            preset JSON file, or a sequence of 0-based indices into the sampling loop at which the
            encoder runs. Index 0 must be a key step.
        mode: ``"propagate"`` runs each non-key step's decoder on its own, in loop order;
            ``"parallel"`` decodes a key step and all following non-key steps up to the next key step
            as one batch (spread over the ranks when several run).
        noise_alpha: Prior noise injection strength (Sec. 3.3): before the scheduler update of every
            step whose timestep value is below ``noise_below * num_train_timesteps`` the latents get
            ``+ noise_alpha * z_T``. ``0`` disables it.
        noise_below: Fraction of the training horizon under which noise injection applies.
        rescale_key_steps: Allow a preset built for N steps to be rescaled to another step count
            (otherwise a mismatch is an error).
        max_parallel_steps: In parallel mode, decode at most this many steps per batch (caps the
            extra memory of parallel decoding); ``None`` decodes a whole key-step group at once.
        encoder: Where the encoder runs when several ranks share an image: ``"rank0"`` runs it on
            rank 0 and broadcasts its features; ``"replicated"`` runs it on every rank from rank 0's
            latents, so only latents and noise predictions cross the network.
        encoder_blocks: For transformer denoisers (DiT, PixArt), how many leading transformer blocks
            form the encoder; ``None`` scales the paper's 18 of DiT-XL/2's 28 to the model's depth.
    """

    key_steps: str | Sequence[int] = "sd-ddim-50"
    mode: str = "parallel"
    noise_alpha: float = 0.003
    noise_below: float = 0.5
    rescale_key_steps: bool = False
    max_parallel_steps: int | None = None
    encoder: str = "rank0"
    encoder_blocks: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.key_steps, str):
            if not self.key_steps:
                raise ValueError("key_steps is an empty string; give a preset name such as 'sd-ddim-50'.")
        elif isinstance(self.key_steps, Sequence):
            steps = list(self.key_steps)
            if not steps:
                raise ValueError(
                    "key_steps is empty; give at least [0] or a preset name such as 'sd-ddim-50'."
                )
            for k in steps:
                if isinstance(k, bool) or not isinstance(k, int):
                    raise TypeError(f"key_steps must hold ints (0-based loop indices); got {k!r}.")
            if any(k < 0 for k in steps):
                raise ValueError(f"key_steps must be non-negative loop indices; got {steps}.")
            if len(set(steps)) != len(steps):
                dupes = sorted({k for k in steps if steps.count(k) > 1})
                raise ValueError(f"key_steps has duplicates {dupes}; list each loop index once.")
            if 0 not in steps:
                raise ValueError(
                    f"key_steps {steps} lacks index 0: the encoder must run at the first step. Add 0."
                )
            self.key_steps = tuple(sorted(steps))
        else:
            raise TypeError(
                f"key_steps must be a preset name or a sequence of ints; got {type(self.key_steps).__name__}."
            )
        if isinstance(self.key_steps, str) and not self.key_steps.endswith(".json"):
            check_spec(self.key_steps)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}.")
        if self.encoder not in ENCODER_PLACEMENTS:
            raise ValueError(f"encoder must be one of {ENCODER_PLACEMENTS}; got {self.encoder!r}.")
        if not isinstance(self.noise_alpha, int | float) or not math.isfinite(self.noise_alpha):
            raise TypeError(f"noise_alpha must be a finite number; got {self.noise_alpha!r}.")
        if self.noise_alpha < 0:
            raise ValueError(
                f"noise_alpha must be >= 0 (0 disables noise injection); got {self.noise_alpha}."
            )
        if not 0.0 <= float(self.noise_below) <= 1.0:
            raise ValueError(
                f"noise_below is a fraction of the training horizon in [0, 1]; got {self.noise_below}."
            )
        if self.max_parallel_steps is not None and (
            isinstance(self.max_parallel_steps, bool)
            or not isinstance(self.max_parallel_steps, int)
            or self.max_parallel_steps < 1
        ):
            raise ValueError(
                f"max_parallel_steps must be None or an int >= 1; got {self.max_parallel_steps!r}."
            )
        if self.encoder_blocks is not None and (
            isinstance(self.encoder_blocks, bool)
            or not isinstance(self.encoder_blocks, int)
            or self.encoder_blocks < 1
        ):
            raise ValueError(f"encoder_blocks must be None or an int >= 1; got {self.encoder_blocks!r}.")
