"""The ranks as a pool of groups: each image is made by one group of ranks, groups work at once.

``--ranks-per-image K`` splits the W ranks into W/K groups (:mod:`.layout`), each with its own process
group (:mod:`.groups`). Rank 0's coordinator (:mod:`.coordinator`, a thread) hands each image to a
free group over the control links (:mod:`.links`); every rank's main thread runs a worker
(:mod:`.worker`) that makes the images it is handed with the other ranks of the group, exactly as
``distfd generate`` makes one image on that many ranks. A batch job (``distfd generate
--prompts-file``) and the service (``distfd serve``) are fronts on it: they submit images to the
coordinator and take the results.

K = W (the default) is one group of every rank: each image has the lowest latency. K = 1 gives W
images at once, each made as by one process. ``auto`` picks the size per image from the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..runtime import DistContext
from .coordinator import FAILED_LINGER_S, Coordinator, Hooks
from .groups import group_contexts
from .jobs import Cancelled, Completed, GenerationFailed, Job, QueueFull, Unavailable
from .layout import AUTO, SizePolicy, parse_ranks_per_image
from .links import connect
from .stopflag import StopFlag
from .worker import Worker


@dataclass
class Pool:
    """This rank's part of the pool: its group contexts, its control link, rank 0's coordinator."""

    world: DistContext
    policy: SizePolicy
    contexts: dict[int, DistContext]
    link: Connection
    coordinator: Coordinator | None

    @classmethod
    def open(
        cls,
        world: DistContext,
        ranks_per_image: int | None,
        *,
        stop: StopFlag,
        queue_size: int | None = None,
        grace_s: float | None = None,
        hooks: Hooks | None = None,
        max_batch: int = 1,
        batch_key: Callable[[Any], Hashable] | None = None,
    ) -> Pool:
        """Collective: the groups and control links of every rank (``ranks_per_image`` None: auto).
        ``max_batch``/``batch_key``: jobs one pipeline call may take (:class:`Coordinator`)."""
        policy = SizePolicy(world.world_size, ranks_per_image)
        contexts = group_contexts(world, policy.sizes)
        links, link = connect(world)
        coordinator = None
        if links is not None:
            coordinator = Coordinator(
                links,
                policy,
                queue_size=queue_size,
                timeout_s=world.timeout_s,
                stop=lambda: stop.set_by,
                grace_s=grace_s,
                hooks=hooks,
                max_batch=max_batch,
                batch_key=batch_key,
            )
        return cls(world, policy, contexts, link, coordinator)

    def work(
        self,
        session: Any,
        stop: StopFlag,
        encode: Callable[[Any], bytes],
        front: Callable[[Coordinator], None] | None = None,
    ) -> int:
        """Every rank, once its pipeline is loaded: make images until the pool stops; the exit code.

        Rank 0 opens the coordinator (after every rank has arrived here), starts its thread, and
        runs ``front`` (which submits jobs, e.g. a batch's lines) in another thread."""
        self.world.all_gather_object("ready")
        result: list[int] = []
        thread = front_thread = None
        if self.coordinator is not None:
            self.coordinator.open()
            thread = threading.Thread(
                target=lambda: result.append(self.coordinator.run()), name="distfd-coordinator", daemon=True
            )
            thread.start()
            if front is not None:
                front_thread = threading.Thread(
                    target=front, args=(self.coordinator,), name="distfd-front", daemon=True
                )
                front_thread.start()
        worker = Worker(
            self.link,
            self.world.rank,
            self.contexts,
            session,
            lambda: bool(stop),
            self.world.timeout_s,
            encode,
        )
        code = worker.serve()
        if thread is not None:
            thread.join(self.world.timeout_s + FAILED_LINGER_S + 5)
            code = max(code, result[0] if result else 1)
        if front_thread is not None:  # every future is resolved by now: the front only finishes writing
            front_thread.join(self.world.timeout_s)
        return code


__all__ = [
    "AUTO",
    "Cancelled",
    "Completed",
    "Coordinator",
    "GenerationFailed",
    "Job",
    "Pool",
    "QueueFull",
    "SizePolicy",
    "StopFlag",
    "Unavailable",
    "parse_ranks_per_image",
]
