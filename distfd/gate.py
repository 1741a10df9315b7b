"""Stopping one image together: every rank of a group leaves the pipeline call at the same point.

A service has to stop an image part-way (its deadline passed, its client went away, the service is
shutting down) and has to survive a failure on one rank (out of memory) without leaving the other
ranks waiting in a collective. Both come down to the ranks agreeing, at the same point, whether to go
on: :meth:`DistContext.agree` (one host all-reduce; nothing with one rank).

- :class:`StepGate` is the pipeline's ``callback_on_step_end``: at every step boundary each rank brings
  CANCELLED if it was asked to stop, or its engine's failure code; if any rank brings one, every rank
  raises :class:`~distfd.runtime.StoppedTogether` there. Inside distfd's passes a failure on one rank
  is absorbed until that point (see :mod:`distfd.engine`).
- :func:`call_together` wraps the pipeline call: a rank whose call failed outside those passes joins
  the agreement the others wait in next, where that is known (before the sampling loop: the engine's
  fingerprint check; with the vanilla pipeline: the next step boundary), and then raises too.

What is not covered: a failure on one rank only inside the pipeline's own per-step code (not the
denoiser passes) while distfd runs. The other ranks then wait in their next collective until the
collective timeout and end with :class:`~distfd.runtime.DistributedError`, as for a lost rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .consistency import join_first_agreement
from .engine import Engine, stopped
from .runtime import CANCELLED, GO_ON, DistContext, DistributedError, StoppedTogether, failure_code


class StepGate:
    """``callback_on_step_end``: the ranks agree at each step boundary whether to go on.

    Args:
        ctx: The ranks of this image.
        cancelled: True once this rank was asked to stop the image (read at every step boundary).
        engine: distfd's engine on the pipeline (None for the vanilla pipeline): its failure code.
    """

    def __init__(self, ctx: DistContext, cancelled: Callable[[], bool], engine: Engine | None) -> None:
        self.ctx, self.cancelled, self.engine = ctx, cancelled, engine
        self.passed = 0  # step boundaries agreed on

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        failure = self.engine.run.failure if self.engine is not None and self.engine.run else None
        mine = max(failure_code(failure), CANCELLED if self.cancelled() else GO_ON)
        agreed = self.ctx.agree(mine)
        self.passed += 1
        if agreed:
            raise stopped(failure, agreed)
        return {}


def call_together(
    ctx: DistContext,
    call: Callable[[], Any],
    engine: Engine | None,
    gate: StepGate | None,
    boundaries: int,
) -> Any:
    """``call()`` (the pipeline call); if it fails on this rank only, the others are not left waiting
    where that can be known (module docstring). ``boundaries``: step boundaries the loop has."""
    runs = engine.runs if engine is not None else 0
    try:
        return call()
    except (StoppedTogether, DistributedError):
        raise
    except Exception as e:
        if ctx.world_size == 1:
            raise
        code = failure_code(e)
        if engine is not None and engine.runs == runs:  # failed before the loop's first denoiser call
            join_first_agreement(ctx, code)
        elif engine is None and gate is not None and gate.passed < boundaries:
            ctx.agree(code)  # the others are on their way to the next step boundary
        else:
            raise
        raise stopped(e, code) from e


__all__ = ["StepGate", "call_together"]
