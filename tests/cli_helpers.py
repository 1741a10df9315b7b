"""Shared by the command-line tests: a tiny saved pipeline, subprocess environments, rank spawning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from . import tiny
from .multirank import port_taken, retry_on_taken_port

ROOT = Path(__file__).resolve().parents[1]
# What the tests allow past a bound the docs promise (a lost rank ends every rank within --timeout,
# say): a process's exit and the test's polling on a loaded 2-core machine; seconds, not a minute.
SLACK_S = 5.0
# Few steps on the tiny pipeline (32x32 images); key steps valid for every scheduler's loop.
TINY_RUN = ["--steps", "6", "--key-steps", "0,2", "--timeout", "60"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout's distfd, one thread per process, the test interpreter's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


@dataclass
class Exit:
    rank: int
    returncode: int | None  # None: still running at the deadline (then killed)
    elapsed_s: float
    output: str


def spawn_ranks(argvs: list[list[str]], port: int | None, wait_s: float, **env_extra: str) -> list[Exit]:
    """Start ``python -m distfd ARGV`` per rank the way an ``srun`` recipe does (RANK/WORLD_SIZE/
    MASTER_* in the environment, no launcher); each rank's exit code and time to exit. Rank 0 hosts
    the rendezvous on ``port``; None: a free one, and the ranks start again on another if a process
    took it first (:func:`multirank.retry_on_taken_port`)."""
    if port is not None:
        return _spawn(argvs, port, wait_s, False, env_extra)
    return retry_on_taken_port(
        lambda p: _spawn(argvs, p, wait_s, True, env_extra),
        lambda exits: any(port_taken(e.output) for e in exits),
    )


def _spawn(
    argvs: list[list[str]], port: int, wait_s: float, stop_if_taken: bool, env_extra: dict
) -> list[Exit]:
    world = len(argvs)
    procs = []
    start = time.monotonic()
    for rank, argv in enumerate(argvs):
        env = subprocess_env(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS=str(world),
            SLURM_LOCALID=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **env_extra,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distfd", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    exits: dict[int, Exit] = {}
    taken = False  # a rank found the port taken: the others are stopped at once, to start again
    while len(exits) < world:
        now = time.monotonic() - start
        for rank, proc in enumerate(procs):
            if rank in exits:
                continue
            if proc.poll() is not None or now > wait_s or taken:
                killed = proc.poll() is None
                if killed:
                    proc.kill()
                out = proc.communicate()[0]
                exits[rank] = Exit(rank, None if killed else proc.returncode, now, out)
                taken = taken or (stop_if_taken and port_taken(out))
        time.sleep(0.05)
    return [exits[r] for r in range(world)]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_image(got: Path, ref: Path, tol: int = 2) -> None:
    """Same size, and every channel within ``tol`` levels: N ranks batch the decoder rows differently
    from one process, so float rounding may move a pixel by a level."""
    a, b = pixels(got), pixels(ref)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = int(np.abs(a - b).max())
    assert diff <= tol, f"{got} differs from {ref} by up to {diff} levels"


def assert_resumed_batch(out_dir: Path, entries: list[dict], before: dict[str, int], lines: int) -> None:
    """After a rerun of an interrupted batch: every line listed once, no image made before redone
    (``before``: file -> mtime), no temporary file left, one PNG per line."""
    assert sorted(e["line"] for e in entries) == list(range(1, lines + 1))
    for name, mtime in before.items():
        assert (out_dir / name).stat().st_mtime_ns == mtime  # not redone
    assert not list(out_dir.glob(".*.tmp"))
    assert len(list(out_dir.glob("*.png"))) == lines
