"""Checks, at the first step of every run, that all ranks are generating the same image."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import FasterDiffusionConfig
from .runtime import DistContext, DistributedError, peer_failed


def _checksum(t: torch.Tensor | None) -> tuple[float, float] | None:
    if t is None or not isinstance(t, torch.Tensor):
        return None
    x = t.detach().double()
    return (float(x.sum()), float(x.abs().sum()))


def fingerprint(
    config: FasterDiffusionConfig,
    key_steps: tuple[int, ...],
    timesteps: tuple[float, ...],
    sample: torch.Tensor,
    cond: torch.Tensor | None,
) -> dict[str, Any]:
    """What must be equal on every rank for their shares to belong to the same image."""
    return {
        "step count": len(timesteps),
        "timesteps": [timesteps[0], timesteps[-1], float(sum(timesteps))],
        "key steps": list(key_steps),
        "mode": config.mode,
        "encoder placement": config.encoder,
        "max_parallel_steps": config.max_parallel_steps,
        "latent shape (batch, size)": list(sample.shape),
        "dtype": str(sample.dtype),
        "prompt embedding checksum": _checksum(cond),
    }


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
    return a == b


def check_agreement(ctx: DistContext, mine: dict[str, Any]) -> None:
    """All-gather the fingerprints; every rank raises the same error if any rank differs from rank 0.

    A rank that failed before the sampling loop (see :func:`join_first_agreement`) sends a stop code
    instead of its fingerprint: then every rank raises :class:`~distfd.runtime.StoppedTogether`.
    """
    if ctx.world_size == 1:
        return
    prints = ctx.all_gather_object(mine)
    stops = [p["stopped"] for p in prints if "stopped" in p]
    if stops:
        raise peer_failed(max(stops))
    ref = prints[0]
    for rank, other in enumerate(prints[1:], start=1):
        for key in ref:
            if not _close(ref[key], other.get(key)):
                raise DistributedError(
                    f"ranks disagree on {key}: rank 0 has {ref[key]}, rank {rank} has {other.get(key)}. "
                    "Every rank must call the pipeline with the same prompt, seed-independent arguments "
                    "(steps, size, guidance) and distfd config."
                )


def join_first_agreement(ctx: DistContext, code: int) -> None:
    """For a rank that failed before its first denoiser call: take part in the fingerprint check the
    other ranks are waiting in, with ``code`` in place of a fingerprint, so none of them is left there."""
    if ctx.world_size > 1:
        ctx.all_gather_object({"stopped": code})
