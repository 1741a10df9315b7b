"""The service's rank loop: rank 0 hands queued requests to every rank, first in, first out.

Every rank loops on one collective, :meth:`DistContext.all_gather_object`. Rank 0 contributes a
message; every other rank contributes a flag saying whether it was asked to stop (SIGTERM/SIGINT):

* ``("run", request)``: every rank calls ``session.run(request)``, the call ``distfd generate`` makes;
* ``("tick", None)``: the heartbeat, nothing to do;
* ``("stop", None)``: leave the loop; every rank exits 0.

Heartbeat. A rank blocked in a collective gives up after the collective timeout (``--timeout``), so
ranks idling on an empty queue would end the service after ``--timeout`` seconds. Rank 0 therefore
sends a tick whenever no message has gone out for ``tick_s = min(5 s, timeout / 4)``: every rank is
back in a fresh collective well inside the timeout. The tick also finds a lost rank while the service
is idle: its collective fails (at once when the peer's socket closes, after the timeout when the peer
hangs), and rank 0 then answers every waiting and later request with 503 and exits non-zero, as the
other ranks do when their own collective fails.

Why gather rather than broadcast: it is the same single collective per message, and it lets a rank
other than rank 0 that alone got SIGTERM ask for the clean stop (finish the request in flight, answer
the queued ones with 503, exit 0) instead of dying and taking the service down with errors. torchrun
and ``srun``/``scancel`` signal every rank at once; each rank waits for rank 0's ``stop``.

An exception inside ``session.run`` other than :class:`DistributedError` (raised alike on every rank,
e.g. by a check) answers that request with 500 and the service goes on. Raised on one rank only, it
leaves the others inside a collective of the pipeline; they then fail within the timeout, and the
service ends as for a lost rank.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from .runtime import DistContext, DistributedError

logger = logging.getLogger("distfd")

POLL_S = 0.1  # how often rank 0 looks at the stop flag while the queue is empty
MAX_TICK_S = 5.0
FAILED_LINGER_S = 2.0  # after a lost rank, rank 0 keeps answering 503 this long before exiting


def tick_seconds(timeout_s: float) -> float:
    """Heartbeat period: a quarter of the collective timeout, at most ``MAX_TICK_S``."""
    return max(0.05, min(MAX_TICK_S, timeout_s / 4))


class SessionLike(Protocol):
    def run(self, request: Any) -> Any: ...


class Unavailable(RuntimeError):
    """The service cannot take or finish this request (stopping, a lost rank, still loading): HTTP 503."""


class QueueFull(Unavailable):
    """The queue holds ``--queue-size`` requests already: HTTP 503 with Retry-After."""


@dataclass
class Job:
    request: Any
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class StopFlag:
    """Set from a signal handler (only a plain attribute write, which is safe there)."""

    def __init__(self) -> None:
        self.set_by: str | None = None

    def __call__(self, signum, frame) -> None:  # signal handler signature
        self.set_by = self.set_by or f"signal {signum}"

    def __bool__(self) -> bool:
        return self.set_by is not None


class Dispatcher:
    """Rank 0's bounded FIFO between the HTTP thread and the rank loop, with the service's state.

    States: ``loading`` -> ``serving`` -> ``stopping`` (clean stop) or ``failed`` (a lost rank).
    """

    def __init__(self, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError(f"--queue-size must be >= 1; got {queue_size}.")
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self.state = "loading"
        self.reason = "the model is still loading"
        self.in_flight = 0
        self.mean_seconds = 0.0  # running mean of generation time, for Retry-After

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, request: Any) -> Job:
        """Queue a request; :class:`Unavailable` unless serving, :class:`QueueFull` when full."""
        with self._lock:
            if self.state != "serving":
                raise Unavailable(self.reason)
            job = Job(request)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(
                    f"the queue is full ({self._queue.maxsize} requests waiting); retry later."
                ) from None
            return job

    def retry_after_s(self) -> int:
        """A hint for Retry-After: the time to work through the present queue, at least 1 s."""
        return max(1, round((self.depth() + self.in_flight) * self.mean_seconds))

    def next_job(self, wait_s: float) -> Job | None:
        try:
            return self._queue.get(timeout=wait_s)
        except queue.Empty:
            return None

    def set_state(self, state: str, reason: str = "") -> None:
        with self._lock:
            self.state, self.reason = state, reason

    def drain(self, reason: str) -> int:
        """Answer every queued job with :class:`Unavailable`; how many there were."""
        n = 0
        while (job := self.next_job(0)) is not None:
            job.future.set_exception(Unavailable(reason))
            n += 1
        return n


class Hooks(Protocol):
    """What the loop reports to (the service's metrics)."""

    def sent(self, nbytes: int) -> None: ...

    def finished(self, seconds: float, bytes_sent: int) -> None: ...


class RankLoop:
    """One rank's side of the protocol above; :meth:`serve` returns the process exit code."""

    def __init__(
        self,
        ctx: DistContext,
        session: SessionLike,
        stop: StopFlag,
        dispatcher: Dispatcher | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        if ctx.is_main and dispatcher is None:
            raise ValueError("rank 0 needs the dispatcher that the HTTP server feeds.")
        self.ctx, self.session, self.stop, self.dispatcher, self.hooks = ctx, session, stop, dispatcher, hooks
        self.tick_s = tick_seconds(ctx.timeout_s)

    def serve(self) -> int:
        try:
            return self._lead() if self.ctx.is_main else self._follow()
        except DistributedError as e:
            logger.error("lost a rank, ending the service: %s", e)
            if self.dispatcher is not None:
                self._fail(f"a rank of the service was lost; the service is shutting down ({e})")
            return 1

    # rank 0

    def _exchange(self, message: tuple[str, Any]) -> bool:
        """Send ``message`` to every rank; True when some other rank asks to stop."""
        if self.hooks is not None and self.ctx.world_size > 1:
            self.hooks.sent(len(pickle.dumps(message)) * (self.ctx.world_size - 1))
        flags = self.ctx.all_gather_object(message)
        return any(flags[1:])

    def _lead(self) -> int:
        d = self.dispatcher
        assert d is not None
        # A first tick: every rank has loaded, warmed up and entered its loop before requests come in.
        peer_stop = self._exchange(("tick", None))
        last_sent = time.monotonic()
        d.set_state("serving")
        logger.info("serving on %d rank(s); heartbeat every %.1fs", self.ctx.world_size, self.tick_s)
        while not (self.stop or peer_stop):
            job = d.next_job(POLL_S)
            if job is None:
                if time.monotonic() - last_sent >= self.tick_s:
                    peer_stop = self._exchange(("tick", None))
                    last_sent = time.monotonic()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            d.in_flight = 1
            try:
                try:
                    peer_stop = self._exchange(("run", job.request))
                except DistributedError as e:
                    job.future.set_exception(Unavailable(f"a rank of the service was lost ({e})"))
                    raise
                self._run(job)
            finally:
                d.in_flight = 0
                last_sent = time.monotonic()
        why = self.stop.set_by or "another rank was asked to stop"
        d.set_state("stopping", f"the service is shutting down ({why})")
        dropped = d.drain(d.reason)
        logger.info("stopping (%s); answered %d queued request(s) with 503", why, dropped)
        self._exchange(("stop", None))
        return 0

    def _run(self, job: Job) -> None:
        d = self.dispatcher
        try:
            result = self.session.run(job.request)
        except DistributedError as e:
            job.future.set_exception(Unavailable(f"a rank of the service was lost ({e})"))
            raise
        except Exception as e:  # noqa: BLE001 - the client gets the message; the service goes on
            logger.exception("request failed")
            job.future.set_exception(e)
            return
        seconds = float(getattr(result, "seconds", 0.0))
        d.mean_seconds = seconds if d.mean_seconds == 0 else 0.8 * d.mean_seconds + 0.2 * seconds
        if self.hooks is not None:
            stats = getattr(result, "stats", None) or {}
            self.hooks.finished(seconds, int(stats.get("bytes_sent", 0)))
        job.future.set_result(result)

    def _fail(self, reason: str) -> None:
        d = self.dispatcher
        d.set_state("failed", reason)
        d.drain(reason)
        # Keep answering 503 a moment, so clients see why rather than a refused connection.
        time.sleep(FAILED_LINGER_S)

    # every other rank

    def _follow(self) -> int:
        while True:
            kind, payload = self.ctx.all_gather_object(bool(self.stop))[0]
            if kind == "stop":
                return 0
            if kind == "run":
                try:
                    self.session.run(payload)
                except DistributedError:
                    raise
                except Exception:  # noqa: BLE001 - rank 0 hit it too and answered the client
                    logger.exception("request failed on rank %d", self.ctx.rank)
