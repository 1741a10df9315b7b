"""Rank 0's coordinator: a queue of images handed to free groups of ranks, one thread.

The front (the HTTP routes, or a batch job's writer) calls :meth:`Coordinator.submit` and waits on the
job's future; :meth:`Coordinator.run` is the coordinator's thread. It hands the next image to a free
group (:class:`~distfd.pool.layout.SizePolicy`) by sending :class:`Run` to each of its ranks; each
rank answers :class:`Done` when it has finished (the group's first rank with the PNGs), and the
jobs' futures are resolved once every rank of the group has answered, so a group is free exactly when
all of its ranks are. Groups work independently; the coordinator never waits on one.

Batching (``max_batch`` > 1): a run takes the first waiting job and up to ``max_batch - 1`` later ones
with the same ``batch_key`` (those that can share one pipeline call), in queue order; the jobs
between them keep their places. A run is cancelled only once every job in it is; a cancelled job's
image in a run that goes on is made and dropped.

Liveness. Idle ranks get a :class:`Tick` every ``tick_s`` and answer :class:`Tock`. A link that closes
(a killed rank), a rank that reports :class:`Lost` (a collective of its group failed), an idle rank
silent for ``timeout_s``, or a cancelled image not given up within ``timeout_s`` (a hung rank) ends
the pool: every waiting and later job gets :class:`Unavailable`, busy groups are told to stop their
image, every rank is told to exit 1, and :meth:`run` returns 1 after ``FAILED_LINGER_S``.

Stopping. A stop (rank 0's stop flag, a :class:`WishStop` from another rank, or :meth:`finish`) takes
no more jobs, answers the queued ones with :class:`Unavailable`, lets the images in flight finish (at
most ``grace_s``, then they are cancelled at the next step boundary), then tells every rank to exit 0.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from ..runtime import CANCELLED, GO_ON, OUT_OF_MEMORY
from .jobs import (
    Cancel,
    Cancelled,
    Completed,
    Done,
    GenerationFailed,
    Job,
    Lost,
    QueueFull,
    Run,
    Stop,
    Tick,
    Tock,
    Unavailable,
    WishStop,
)
from .layout import SizePolicy

logger = logging.getLogger("distfd")

POLL_S = 0.1  # the longest the coordinator sleeps without looking at its stop flag
MAX_TICK_S = 5.0
FAILED_LINGER_S = 2.0  # after a lost rank, keep answering 503 this long before exiting


def tick_seconds(timeout_s: float) -> float:
    """Heartbeat period: a quarter of the timeout, at most ``MAX_TICK_S``."""
    return max(0.05, min(MAX_TICK_S, timeout_s / 4))


class RankLost(RuntimeError):
    pass


class Hooks(Protocol):
    """What the coordinator reports (the service's metrics)."""

    def dispatched(self, size: int, images: int) -> None: ...

    def finished(self, seconds: float, bytes_sent: int) -> None: ...


@dataclass
class _Running:
    id: int
    jobs: tuple[Job, ...]
    ranks: tuple[int, ...]
    reports: dict[int, Done] = field(default_factory=dict)
    cancel_sent: float | None = None


class Coordinator:
    """Rank 0's queue and dispatcher over the control links (module docstring).

    Args:
        links: A connection to every rank's worker, by world rank.
        policy: Which group the next image gets.
        queue_size: Jobs waiting at most (:class:`QueueFull` beyond); None for no bound (a batch).
        timeout_s: How long a rank may be silent (idle) or ignore a cancel before it counts as lost.
        stop: Rank 0's stop flag (true once SIGTERM/SIGINT arrived).
        grace_s: How long images in flight may run on after a stop; None waits for them.
        hooks: Told of each dispatch and each finished image.
        max_batch: Jobs one run (one pipeline call) may take; 1 runs each alone.
        batch_key: Jobs whose requests have the same key may share a run (needed for ``max_batch`` > 1).
    """

    def __init__(
        self,
        links: dict[int, Connection],
        policy: SizePolicy,
        *,
        queue_size: int | None,
        timeout_s: float,
        stop: Callable[[], Any] = lambda: None,
        grace_s: float | None = None,
        hooks: Hooks | None = None,
        max_batch: int = 1,
        batch_key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        if queue_size is not None and queue_size < 1:
            raise ValueError(f"--queue-size must be >= 1; got {queue_size}.")
        if max_batch < 1 or (max_batch > 1 and batch_key is None):
            raise ValueError(f"--max-batch must be >= 1 (and > 1 needs a batch key); got {max_batch}.")
        if sorted(links) != list(range(policy.world)):
            raise ValueError(f"need a link to each of the {policy.world} ranks; got {sorted(links)}.")
        self.links, self.policy, self.queue_size = links, policy, queue_size
        self.timeout_s, self.tick_s, self.grace_s = timeout_s, tick_seconds(timeout_s), grace_s
        self.stop_flag, self.hooks = stop, hooks
        self.max_batch, self.batch_key = max_batch, batch_key
        self.state, self.reason = "loading", "the model is still loading"
        self.mean_seconds = 0.0  # running mean of generation time, for Retry-After
        self.last_size = policy.sizes[0]
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._running: dict[int, _Running] = {}  # by run id
        self._run_of: dict[int, int] = {}  # job id -> run id, while it runs
        self._busy: dict[int, int] = {}  # rank -> run id
        self._stop_why: str | None = None
        self._stop_at: float | None = None
        self._heard: dict[int, float] = {}
        self._told: dict[int, float] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def open(self) -> None:
        """Start taking jobs (the ranks are ready; :meth:`run` is about to start)."""
        with self._lock:
            if self.state == "loading":
                self.state, self.reason = "serving", ""

    # The front's side (any thread).

    def depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Images being made now."""
        return len(self._run_of)

    def submit(self, request: Any) -> Job:
        """Queue an image; :class:`Unavailable` unless serving, :class:`QueueFull` when full."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[Any]) -> list[Job]:
        """Queue several images at once (all or none), in order; errors as :meth:`submit`."""
        with self._lock:
            if self.state != "serving":
                raise Unavailable(self.reason)
            if self.queue_size is not None and len(self._queue) + len(requests) > self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later.")
            jobs = [Job(request) for request in requests]
            self._queue.extend(jobs)
        self._wake()
        return jobs

    def cancel(self, job: Job, reason: str) -> None:
        """Drop ``job`` if it waits, or stop it at its next step boundary if it runs."""
        with self._lock:
            if job.cancel_reason is None:
                job.cancel_reason = reason
                self._cancels.append(job)
        self._wake()

    def finish(self, why: str = "all jobs are done") -> None:
        """A clean stop (a batch job calls it once every image is answered)."""
        with self._lock:
            self._stop_why = self._stop_why or why
        self._wake()

    def retry_after_s(self) -> int:
        """A hint for Retry-After: the time to work through the present queue, at least 1 s."""
        groups = max(1, self.policy.world // self.policy.wanted(self.depth() + 1))
        return max(1, round((self.depth() + self.in_flight) * self.mean_seconds / groups))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):  # already awake (the buffer is full), or closed
            pass

    # The coordinator's thread.

    def run(self) -> int:
        """Serve until stopped (returns 0) or a rank is lost (returns 1)."""
        now = time.monotonic()
        self._heard = dict.fromkeys(self.links, now)
        self._told = dict.fromkeys(self.links, now)
        self.open()
        logger.info(
            "working on %d rank(s), %s rank(s) per image; heartbeat every %.1fs",
            self.policy.world,
            self.policy.label,
            self.tick_s,
        )
        try:
            while True:
                self._take_stop()
                self._apply_cancels()
                if self.state == "serving":
                    self._dispatch()
                elif self._stopped():
                    return 0
                self._tick()
                self._read(POLL_S)
        except RankLost as e:
            logger.error("lost a rank, ending: %s", e)
            self._fail("a rank was lost")  # the details are in the line above
            return 1
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _take_stop(self) -> None:
        if self.state != "serving":
            return
        flag = self.stop_flag()
        why = flag if isinstance(flag, str) else self._stop_why
        if not why:
            return
        with self._lock:
            self.state, self.reason = "stopping", f"shutting down ({why})"
            dropped = list(self._queue)
            self._queue.clear()
        for job in dropped:
            job.future.set_exception(Unavailable(self.reason))
        self._stop_at = time.monotonic()
        logger.info("stopping (%s); %d queued image(s) not started", why, len(dropped))

    def _stopped(self) -> bool:
        """While stopping: cancel what overran the grace period; once idle, tell every rank to exit."""
        if self._running:
            if self.grace_s is not None and time.monotonic() - self._stop_at > self.grace_s:
                for running in self._running.values():
                    for job in running.jobs:
                        if job.cancel_reason is None:
                            job.cancel_reason = self.reason
                    self._send_cancel(running)
            return False
        for rank in self.links:
            self._send(rank, Stop(0))
        return True

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, []
            waiting = [job for job in cancels if job in self._queue]
            for job in waiting:
                self._queue.remove(job)
        for job in waiting:
            job.future.set_exception(Cancelled(job.cancel_reason))
        for job in cancels:
            running = self._running.get(self._run_of.get(job.id, -1))
            if running is not None and all(j.cancel_reason is not None for j in running.jobs):
                self._send_cancel(running)

    def _send_cancel(self, running: _Running) -> None:
        if running.cancel_sent is None:
            running.cancel_sent = time.monotonic()
            for rank in running.ranks:
                if rank not in running.reports:
                    self._send(rank, Cancel(running.id))

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                ranks = self.policy.pick(len(self._queue), frozenset(self._busy))
                if ranks is None:
                    return
                jobs = self._take_batch()
            jobs = tuple(job for job in jobs if job.future.set_running_or_notify_cancel())
            if not jobs:
                continue
            running = _Running(jobs[0].id, jobs, ranks)
            self._running[running.id] = running
            for job in jobs:
                self._run_of[job.id] = running.id
            for rank in ranks:
                self._busy[rank] = running.id
            self.last_size = len(ranks)
            if self.hooks is not None:
                self.hooks.dispatched(len(ranks), len(jobs))
            for rank in ranks:
                self._send(rank, Run(running.id, ranks, tuple(job.request for job in jobs)))

    def _take_batch(self) -> list[Job]:
        """The first waiting job and up to ``max_batch - 1`` later ones with its batch key (lock held)."""
        first = self._queue.popleft()
        if self.max_batch == 1:
            return [first]
        key = self.batch_key(first.request)
        mates = []
        for job in self._queue:
            if len(mates) == self.max_batch - 1:
                break
            if self.batch_key(job.request) == key:
                mates.append(job)
        for job in mates:
            self._queue.remove(job)
        return [first, *mates]

    def _tick(self) -> None:
        now = time.monotonic()
        for rank in self.links:
            if rank in self._busy:
                continue
            if now - self._heard[rank] > self.timeout_s:
                raise RankLost(f"rank {rank} has not answered for {self.timeout_s:.0f}s (--timeout)")
            if now - self._told[rank] >= self.tick_s:
                self._send(rank, Tick())
        for running in self._running.values():
            if running.cancel_sent is not None and now - running.cancel_sent > self.timeout_s:
                silent = sorted(set(running.ranks) - set(running.reports))
                raise RankLost(
                    f"rank(s) {silent} did not stop a cancelled image within {self.timeout_s:.0f}s"
                )

    def _send(self, rank: int, message: Any) -> None:
        try:
            self.links[rank].send(message)
        except (OSError, ValueError) as e:
            raise RankLost(f"rank {rank}'s control link is closed ({e})") from e
        self._told[rank] = time.monotonic()

    def _read(self, timeout: float) -> None:
        by_conn = {conn: rank for rank, conn in self.links.items()}
        for conn in wait([*self.links.values(), self._wake_r], timeout):
            if conn is self._wake_r:
                self._wake_r.recv(4096)
                continue
            rank = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError) as e:
                raise RankLost(f"rank {rank}'s control link closed (the process ended?)") from e
            self._heard[rank] = time.monotonic()
            self._receive(rank, message)

    def _receive(self, rank: int, message: Any) -> None:
        if isinstance(message, Done):
            self._done(message)
        elif isinstance(message, WishStop):
            if rank != 0:
                self.finish("another rank was asked to stop")
        elif isinstance(message, Lost):
            raise RankLost(f"rank {rank}: {message.message}")
        elif not isinstance(message, Tock):
            logger.warning("rank %d sent an unexpected %s; ignored", rank, type(message).__name__)

    def _done(self, report: Done) -> None:
        running = self._running.get(report.run)
        if running is None or report.rank not in running.ranks:
            return
        running.reports[report.rank] = report
        self._busy.pop(report.rank, None)
        if len(running.reports) < len(running.ranks):
            return
        del self._running[report.run]
        for job in running.jobs:
            self._run_of.pop(job.id, None)
        self._resolve(running)

    def _resolve(self, running: _Running) -> None:
        first = running.reports[running.ranks[0]]
        if first.code == GO_ON:
            seconds = first.seconds
            self.mean_seconds = seconds if self.mean_seconds == 0 else 0.8 * self.mean_seconds + 0.2 * seconds
            if self.hooks is not None:
                self.hooks.finished(seconds, int(first.stats.get("bytes_sent", 0)))
            for job, png, request in zip(running.jobs, first.pngs, first.requests, strict=True):
                done = Completed(
                    png,
                    seconds,
                    first.key_steps,
                    first.stats,
                    request,
                    running.ranks,
                    first.started,
                    first.finished,
                    batch=len(running.jobs),
                )
                job.future.set_result(done)
            return
        if first.code == CANCELLED:
            for job in running.jobs:
                job.future.set_exception(Cancelled(job.cancel_reason or "cancelled"))
            return
        reports = sorted(running.reports.values(), key=lambda r: (not r.own, r.code != OUT_OF_MEMORY))
        worst = max(r.code for r in reports)
        for job in running.jobs:
            job.future.set_exception(GenerationFailed(worst, reports[0].error or "generation failed"))

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.state, self.reason = "failed", reason
            jobs = [*self._queue, *(job for r in self._running.values() for job in r.jobs)]
            self._queue.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(Unavailable(reason))
        for running in self._running.values():
            try:
                self._send_cancel(running)
            except RankLost:
                pass
        for rank in self.links:
            try:
                self._send(rank, Stop(1))
            except RankLost:
                pass
        time.sleep(FAILED_LINGER_S)  # keep answering 503 a moment, so clients see why


__all__ = ["Coordinator", "POLL_S", "RankLost", "tick_seconds"]
