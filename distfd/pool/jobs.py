"""A job (one image handed to the pool), what a rank reports about it, and how it can end.

A run is what one group makes in one pipeline call: one job, or with ``--max-batch`` several
queued jobs that can share a call.

Messages between rank 0's coordinator and every rank's worker are the small dataclasses below,
pickled over the control links (:mod:`distfd.pool.links`).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..runtime import CANCELLED, OUT_OF_MEMORY

_ids = itertools.count(1)


class Unavailable(RuntimeError):
    """The pool cannot take or finish this job (loading, stopping, a lost rank): HTTP 503."""


class QueueFull(Unavailable):
    """The queue is full: HTTP 503 with Retry-After."""


class Cancelled(RuntimeError):
    """The job was dropped before it ran, or stopped at a step boundary; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GenerationFailed(RuntimeError):
    """The image failed on its group (every rank left it together); ``code`` is FAILED or
    OUT_OF_MEMORY (:mod:`distfd.runtime`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def out_of_memory(self) -> bool:
        return self.code == OUT_OF_MEMORY


@dataclass(eq=False)  # compared by identity: a queue holds each job once
class Job:
    """One image in the pool. ``future`` ends with a :class:`Completed` or one of the errors above."""

    request: Any
    id: int = field(default_factory=lambda: next(_ids))
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    cancel_reason: str | None = None  # set by Coordinator.cancel


@dataclass(frozen=True)
class Completed:
    """A finished image as the group's first rank reported it.

    Args:
        png: The image as PNG bytes.
        seconds: The pipeline call's wall time on the group's first rank.
        key_steps: The key steps that ran; None for mode 'off'.
        stats: Passes, collectives and bytes the first rank sent.
        request: The request as run (``ImageRequest.to_dict()``: sizes filled in).
        ranks: The world ranks of the group that made it.
        started, finished: Wall-clock times (``time.time()`` on the group's first rank) of the call.
        batch: Images made by the same pipeline call (``--max-batch``; 1: this one alone).
    """

    png: bytes
    seconds: float
    key_steps: list[int] | None
    stats: dict[str, Any]
    request: dict[str, Any]
    ranks: tuple[int, ...]
    started: float
    finished: float
    batch: int = 1


# Messages: coordinator -> worker.


@dataclass(frozen=True)
class Run:
    """Make the images of ``requests`` (one pipeline call) on the group ``ranks``."""

    id: int  # this run's id (its first job's)
    ranks: tuple[int, ...]  # the group; its first rank reports the images
    requests: tuple[Any, ...]


@dataclass(frozen=True)
class Cancel:
    run: int


@dataclass(frozen=True)
class Tick:
    """Sent to idle ranks: both sides learn the other is alive."""


@dataclass(frozen=True)
class Stop:
    code: int  # the worker's exit code


# Messages: worker -> coordinator.


@dataclass(frozen=True)
class Done:
    """One rank finished its part of a run (every rank of the group sends one)."""

    run: int
    rank: int
    code: int  # GO_ON, CANCELLED, FAILED or OUT_OF_MEMORY
    error: str | None = None
    own: bool = False  # the error arose on this rank (not only agreed on with the others)
    pngs: tuple[bytes, ...] = ()  # the group's first rank: one per request, in order
    seconds: float = 0.0
    key_steps: list[int] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    requests: tuple[dict[str, Any], ...] = ()
    started: float = 0.0
    finished: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.code == CANCELLED


@dataclass(frozen=True)
class Tock:
    rank: int


@dataclass(frozen=True)
class WishStop:
    """This rank was asked to stop (SIGTERM/SIGINT): the pool stops cleanly."""

    rank: int


@dataclass(frozen=True)
class Lost:
    """A collective of this rank failed (a peer died or hung): the pool ends; this rank exits 1."""

    rank: int
    message: str


__all__ = [
    "Cancel",
    "Cancelled",
    "Completed",
    "Done",
    "GenerationFailed",
    "Job",
    "Lost",
    "QueueFull",
    "Run",
    "Stop",
    "Tick",
    "Tock",
    "Unavailable",
    "WishStop",
]
