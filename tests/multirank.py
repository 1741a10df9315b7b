"""Spawn gloo ranks on CPU, like torchrun, with a bounded wait; the ports the ranks meet on are never
freed then re-bound (see :func:`rendezvous_store` and :func:`retry_on_taken_port`)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("rank_worker.py")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port for a process that binds it itself (a launcher, rank 0's rendezvous), below the
    kernel's ephemeral range. Freed before that process binds it, so another may take it in between:
    callers go through :func:`retry_on_taken_port`, or bind port 0 and publish what they got instead.

    A port the kernel picked (bind to 0), then freed, goes back to the ephemeral pool: any outgoing
    connection on the machine (another test's gloo ranks, say) may take it as its source port before
    the ranks bind it. Ports below the range are never handed out that way; a random one, checked
    free, collides only with another explicit bind.
    """
    low = _ephemeral_range()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# What a rank (distfd's rendezvous, or torch's store under a launcher) says when MASTER_PORT is taken.
PORT_TAKEN = ("(MASTER_PORT) is already in use", "EADDRINUSE")
PORT_ATTEMPTS = 3

T = TypeVar("T")


def port_taken(output: str) -> bool:
    return any(sign in output for sign in PORT_TAKEN)


def retry_on_taken_port(start: Callable[[int], T], taken: Callable[[T], bool]) -> T:
    """``start(port)`` with a fresh :func:`free_port`, again (at most :data:`PORT_ATTEMPTS` times)
    while ``taken`` says another process bound that port before the ranks did. For ranks that host
    their own rendezvous (rank 0, as under ``srun``), where the port cannot be bound by the test."""
    for _ in range(PORT_ATTEMPTS - 1):
        outcome = start(free_port())
        if not taken(outcome):
            return outcome
    return start(free_port())


@contextmanager
def rendezvous_store(world_size: int, timeout_s: float = 600) -> Iterator[dict[str, str]]:
    """A TCPStore this process hosts on a port the kernel picks and that stays bound until the ranks
    are done: the environment that makes every rank a client of it, as torchrun's agent does
    (``TORCHELASTIC_USE_AGENT_STORE``). No port is freed and re-bound, so no other process can take it."""
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    try:
        yield {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    finally:
        del store


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: still running when the wait ended (then killed)
    elapsed_s: float
    error: str
    log: str
    ended_at: float  # wall clock (time.time()) when its exit was seen (polled every 50 ms)


def launch(
    spec: dict, world_size: int, out_dir: Path, wait_s: float = 240, grace_s: float = 60
) -> list[RankResult]:
    """Run ``rank_worker.py`` on ``world_size`` ranks; each rank's exit code, time to exit, error and log.
    The ranks meet on a store this process hosts (:func:`rendezvous_store`), as under torchrun."""
    with rendezvous_store(world_size, wait_s + grace_s) as store_env:
        return _launch(spec, world_size, out_dir, wait_s, grace_s, store_env)


def _launch(
    spec: dict, world_size: int, out_dir: Path, wait_s: float, grace_s: float, store_env: dict[str, str]
) -> list[RankResult]:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    start = time.monotonic()
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            **store_env,
            "OMP_NUM_THREADS": "1",
        }
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(spec_path), str(out_dir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    ended: dict[int, tuple[int | None, float, float]] = {}
    first_failure = None
    while len(ended) < world_size:
        now = time.monotonic() - start
        for rank, (proc, _) in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = (proc.returncode, now, time.time())
                if proc.returncode != 0 and first_failure is None:
                    first_failure = now
        # Like torchrun: once a rank has failed, the others get a grace period, then are killed.
        overdue = now > wait_s or (first_failure is not None and now > first_failure + grace_s)
        if overdue:
            for rank, (proc, _) in enumerate(procs):
                if rank not in ended:
                    proc.kill()
                    proc.wait()
                    ended[rank] = (None, now, time.time())
        time.sleep(0.05)
    results = []
    for rank, (_, log) in enumerate(procs):
        log.close()
        err = out_dir / f"rank{rank}.err"
        code, elapsed, ended_at = ended[rank]
        results.append(
            RankResult(
                rank,
                code,
                elapsed,
                err.read_text() if err.exists() else "",
                (out_dir / f"rank{rank}.log").read_text(),
                ended_at,
            )
        )
    return results


def load(out_dir: Path, case: int, rank: int) -> dict:
    return torch.load(out_dir / f"case{case}_rank{rank}.pt")
