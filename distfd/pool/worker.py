"""Every rank's side of the pool: wait on the control link, make the images it is handed, report.

The main thread of every rank runs :meth:`Worker.serve` (rank 0's coordinator is another thread of
rank 0). A :class:`Run` names the group; the rank makes its images (one pipeline call) with the other ranks
of that group (``session.run_many`` on the group's context), reading its link at every step boundary
for a :class:`Cancel`; then it sends :class:`Done` (the group's first rank with the PNGs). A failed image is
reported and the rank goes on (after freeing what it can); a failed collective (a lost peer) is
reported as :class:`Lost` and the rank exits 1. Rank 0 silent for ``timeout_s`` (or its link closed)
also ends the rank with 1; :class:`Stop` ends it with the code it carries.
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..runtime import CANCELLED, DistContext, DistributedError, StoppedTogether, failure_code
from .jobs import Cancel, Done, Lost, Run, Stop, Tick, Tock, WishStop

logger = logging.getLogger("distfd")

POLL_S = 0.1


class Worker:
    """One rank's loop (module docstring).

    Args:
        link: This rank's control link to rank 0's coordinator.
        rank: This rank's world rank.
        contexts: This rank's context in its group of each size (:func:`~distfd.pool.groups.group_contexts`).
        session: The loaded pipeline (:class:`~distfd.session.Session`).
        stop: True once this rank got SIGTERM/SIGINT (the coordinator is told; it decides).
        timeout_s: How long rank 0 may be silent before this rank gives up.
        encode: Turns a result's image into the bytes sent back (PNG).
    """

    def __init__(
        self,
        link: Connection,
        rank: int,
        contexts: dict[int, DistContext],
        session: Any,
        stop: Callable[[], Any],
        timeout_s: float,
        encode: Callable[[Any], bytes],
    ) -> None:
        self.link, self.rank, self.contexts, self.session = link, rank, contexts, session
        self.stop, self.timeout_s, self.encode = stop, timeout_s, encode
        self._later: collections.deque[Any] = collections.deque()  # read during an image, handled after
        self._wished = False

    def serve(self) -> int:
        """Until told to stop: the exit code (0 stopped, 1 a lost rank)."""
        heard = time.monotonic()
        while True:
            if self.stop() and not self._wished:
                self._wished = True
                self._send(WishStop(self.rank))
            try:
                message = self._next()
            except (EOFError, OSError):
                logger.error("lost a rank (rank 0: its control link closed); exiting")
                return 1
            if message is None:
                if time.monotonic() - heard > self.timeout_s:
                    logger.error("lost a rank (rank 0: silent for %.0fs, --timeout); exiting", self.timeout_s)
                    return 1
                continue
            heard = time.monotonic()
            if isinstance(message, Tick):
                self._send(Tock(self.rank))
            elif isinstance(message, Stop):
                return message.code
            elif isinstance(message, Run):
                try:
                    self._run(message)
                except DistributedError as e:
                    logger.error("lost a rank, ending: %s", e)
                    self._send(Lost(self.rank, str(e)))
                    return 1
                heard = time.monotonic()
            # A Cancel for an image already finished needs nothing.

    def _next(self) -> Any:
        if self._later:
            return self._later.popleft()
        if not self.link.poll(POLL_S):
            return None
        return self.link.recv()

    def _send(self, message: Any) -> None:
        try:
            self.link.send(message)
        except (OSError, ValueError):
            pass  # rank 0 is gone: the next read says so

    def _run(self, run: Run) -> None:
        ctx = self.contexts[len(run.ranks)]
        cancelled = False

        def check() -> bool:  # at every step boundary: a Cancel (or Stop) for this image?
            nonlocal cancelled
            while not cancelled and self.link.poll(0):
                message = self.link.recv()
                if isinstance(message, Cancel) and message.run == run.id:
                    cancelled = True
                elif isinstance(message, Stop):
                    cancelled = True
                    self._later.append(message)
                elif not isinstance(message, Cancel):
                    self._later.append(message)
            return cancelled

        first = self.rank == run.ranks[0]
        started = time.time()
        try:
            results = self.session.run_many(list(run.requests), ctx=ctx, cancelled=check)
        except DistributedError:
            raise
        except StoppedTogether as e:
            self._failed(run, e.code, str(e), own=e.__cause__ is not None)
            return
        except Exception as e:  # noqa: BLE001 - reported; the rank goes on
            logger.exception("an image failed on rank %d", self.rank)
            self._failed(run, failure_code(e), f"{type(e).__name__}: {e}", own=True)
            return
        finished = time.time()
        result = results[0]  # the call's time, key steps and counters are the same for each image
        report = Done(run.id, self.rank, 0, started=started, finished=finished, seconds=result.seconds)
        if first:
            report = Done(
                run.id,
                self.rank,
                0,
                pngs=tuple(self.encode(r.image) for r in results),
                seconds=result.seconds,
                key_steps=result.key_steps,
                stats=result.stats,
                requests=tuple(r.request.to_dict() for r in results),
                started=started,
                finished=finished,
            )
        self._send(report)

    def _failed(self, run: Run, code: int, message: str, own: bool) -> None:
        if code != CANCELLED:
            free_memory()
        self._send(Done(run.id, self.rank, code, error=message, own=own))


def free_memory() -> None:
    """After a failed image: drop what it left behind (Python garbage, the CUDA cache)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


__all__ = ["Worker", "free_memory"]
