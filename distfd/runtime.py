"""The distributed context: rank, world size, device and group, with counted, time-bounded collectives.

World size 1 goes through the same methods; they return at once without touching ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("distfd")

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the ranks disagree."""


# What a rank reports at an agreement point (:meth:`DistContext.agree`); the largest code wins.
GO_ON, CANCELLED, FAILED, OUT_OF_MEMORY = 0, 1, 2, 3


class StoppedTogether(RuntimeError):
    """Every rank of the group left the image at the same agreement point (no rank is left inside a
    collective). ``code`` is the agreed reason: CANCELLED, FAILED or OUT_OF_MEMORY."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def failure_code(err: BaseException | None) -> int:
    """GO_ON for no error, OUT_OF_MEMORY for an allocation that failed (CUDA or CPU), else FAILED."""
    if err is None:
        return GO_ON
    if isinstance(err, StoppedTogether):
        return err.code
    if is_out_of_memory(err):
        return OUT_OF_MEMORY
    return FAILED


def is_out_of_memory(err: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA), ``MemoryError``, or the CPU allocator's failure."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def peer_failed(code: int) -> StoppedTogether:
    """What a rank raises when the agreement says another rank failed or the image was cancelled."""
    what = {
        CANCELLED: "the image was cancelled",
        FAILED: "a rank of the group failed while generating",
        OUT_OF_MEMORY: "a rank of the group ran out of memory while generating",
    }.get(code, f"the ranks stopped (code {code})")
    return StoppedTogether(code, what)


@dataclass
class CommStats:
    """Bytes this rank handed to collectives, and how many collectives it joined.

    Bytes are payload bytes (the tensors passed in), not wire bytes, which depend on the backend's
    algorithm. ``per_key_step`` attributes them to the key step whose group caused them.
    """

    collectives: int = 0
    bytes_sent: int = 0
    per_key_step: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    tag: int | None = None

    def add(self, nbytes: int) -> None:
        self.collectives += 1
        self.bytes_sent += nbytes
        if self.tag is not None:
            self.per_key_step[self.tag] += nbytes

    def reset(self) -> None:
        self.collectives, self.bytes_sent, self.tag = 0, 0, None
        self.per_key_step = defaultdict(int)

    def as_dict(self) -> dict[str, Any]:
        return {
            "collectives": self.collectives,
            "bytes_sent": self.bytes_sent,
            "bytes_per_key_step": dict(sorted(self.per_key_step.items())),
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return None


class DistContext:
    """Who this process is among the ranks sharing one image, and how they talk.

    Build one with :meth:`single`, :meth:`from_env` (torchrun, Slurm ``srun``, ``accelerate launch``,
    the ``deepspeed`` launcher) or :meth:`from_process_group` (a group the caller initialised).
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        owns_group: bool = False,
        host_group: dist.ProcessGroup | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}.")
        if world_size > 1 and not dist.is_initialized():
            raise ValueError("world_size > 1 needs an initialised torch.distributed process group.")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout_s = timeout_s
        self.owns_group = owns_group
        # Host-side agreements (agree()) go over gloo: the group itself unless it is NCCL.
        self.host_group = host_group if host_group is not None else group
        self.stats = CommStats()

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> DistContext:
        return cls(0, 1, device)

    @classmethod
    def from_process_group(
        cls, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
    ) -> DistContext:
        """Use an already initialised process group (the default group when ``group`` is None)."""
        if not dist.is_initialized():
            return cls.single(device)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if device is None:
            device = _local_device()
        return cls(rank, world, device, group)

    @classmethod
    def from_env(
        cls, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None
    ) -> DistContext:
        """Join the ranks named by the launcher's environment; a lone process gets world size 1.

        Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, accelerate, deepspeed) or their Slurm
        equivalents, and ``MASTER_ADDR``/``MASTER_PORT``. NCCL on GPUs, gloo on CPU.
        """
        if dist.is_initialized():
            ctx = cls.from_process_group(device=device)
            ctx.timeout_s = timeout_s
            return ctx
        world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
        if world == 1:
            ctx = cls.single(device or _local_device())
            ctx.timeout_s = timeout_s  # the pool's heartbeat and waits follow --timeout with one rank too
            return ctx
        rank = _env_int("RANK", "SLURM_PROCID")
        if rank is None:
            raise ValueError(
                "WORLD_SIZE > 1 but no RANK (or SLURM_PROCID) is set; launch with torchrun or srun."
            )
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"{var} is not set; launch with torchrun, or export it in the Slurm script.")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        # A bare "cuda" means this rank's GPU (LOCAL_RANK), not GPU 0 for every rank.
        dev = _local_device() if device in (None, "cuda") else torch.device(device)
        if backend is None:
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError(f"backend 'nccl' needs CUDA devices but this rank runs on {dev}; use gloo.")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _rendezvous(backend, rank, world, dev, timeout_s)
        logger.info("joined %d ranks over %s (timeout %.0fs)", world, backend, timeout_s)
        host = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            if backend != "gloo"
            else None
        )
        return cls(rank, world, dev, None, timeout_s, owns_group=True, host_group=host)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # Collectives. Each one is counted and turns a backend failure into a DistributedError that
    # says what to look at; with world size 1 each returns its input.

    def _fail(self, what: str, err: Exception) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed ({type(err).__name__}: {err}). "
            f"A peer rank probably died or hung (collective timeout {self.timeout_s:.0f}s); "
            "check the other ranks' logs."
        )

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """In-place broadcast from ``src`` (a rank of this context); a work handle when ``async_op``."""
        if self.world_size == 1:
            return None
        self.stats.add(_nbytes(tensor) if self.rank == src else 0)
        try:
            return dist.broadcast(tensor, group=self.group, async_op=async_op, group_src=src)
        except Exception as e:  # noqa: BLE001 - every backend error means a lost peer here
            raise self._fail("broadcast", e) from e

    def wait(self, work) -> None:
        if work is None:
            return
        try:
            work.wait()
        except Exception as e:  # noqa: BLE001
            raise self._fail("broadcast (async)", e) from e

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        self.stats.add(0)
        try:
            dist.broadcast_object_list(box, group=self.group, device=self._object_device(), group_src=src)
        except Exception as e:  # noqa: BLE001
            raise self._fail("broadcast_object", e) from e
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self.stats.add(0)
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("all_gather_object", e) from e
        return out

    def agree(self, code: int) -> int:
        """The largest of every rank's ``code`` (GO_ON, CANCELLED, FAILED, OUT_OF_MEMORY): one small
        all-reduce on the host, so every rank takes the same decision at the same point."""
        if self.world_size == 1:
            return code
        # A process group the caller made may be NCCL only: then the flag travels on the device.
        on_device = self.host_group is self.group and dist.get_backend(self.group) == "nccl"
        flag = torch.tensor([code], dtype=torch.int64, device=self.device if on_device else "cpu")
        self.stats.add(0)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("agreement (all_reduce)", e) from e
        return int(flag[0])

    def all_gather_rows(self, local: torch.Tensor, shares: list[range]) -> torch.Tensor:
        """Concatenate every rank's rows (rank order), padding uneven shares for the collective."""
        if self.world_size == 1:
            return local
        most = max(len(s) for s in shares)
        if local.shape[0] < most:
            pad = local.new_zeros((most - local.shape[0], *local.shape[1:]))
            local = torch.cat([local, pad])
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self.stats.add(_nbytes(local))
        try:
            dist.all_gather(parts, local.contiguous(), group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("all_gather", e) from e
        return torch.cat([p[: len(s)] for p, s in zip(parts, shares, strict=True)])

    def _object_device(self) -> torch.device | None:
        backend = dist.get_backend(self.group)
        return self.device if backend == "nccl" else None


def _rendezvous(backend: str, rank: int, world: int, dev: torch.device, timeout_s: float) -> None:
    """``init_process_group`` from the environment, bounded by ``timeout_s`` on every rank.

    torch bounds the collectives but not every part of the rendezvous: a rank whose ``MASTER_PORT`` is
    held by another process can wait forever for the store's handshake. The call runs in a helper
    thread; if it has not returned within the timeout this rank gives up with an error naming the
    port. A thread that never returns is left behind (a daemon; the process exits with the error).
    """
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    outcome: dict[str, BaseException] = {}

    def join() -> None:
        # The backend's threads start here and inherit this thread's signal mask: with SIGTERM/SIGINT
        # blocked they never take a signal meant for the main thread (which runs the handlers and may
        # be inside a collective then), so a stop signal cannot interrupt their socket calls.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
        try:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
                # NCCL binds its communicator to this GPU; gloo (e.g. several ranks on one GPU) takes none.
                device_id=dev if dev.type == "cuda" and backend == "nccl" else None,
            )
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=join, name="distfd-rendezvous", daemon=True)
    worker.start()
    worker.join(timeout_s)
    where = f"{addr}:{port} (MASTER_ADDR:MASTER_PORT)"
    if worker.is_alive():
        raise DistributedError(
            f"rank {rank}/{world} could not start: no rendezvous at {where} within {timeout_s:.0f}s "
            "(--timeout). Rank 0 could not start its rendezvous server there, or another process holds "
            "the port, or a rank never started; check rank 0's log, and pick a free MASTER_PORT."
        )
    err = outcome.get("error")
    if err is None:
        return
    text = f"{type(err).__name__}: {err}"
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        raise DistributedError(
            f"rank {rank}/{world} could not start: port {port} on {addr} (MASTER_PORT) is already in use "
            "by another process, so this rank cannot host the rendezvous. Pick a free MASTER_PORT "
            "(or stop the process holding it); the other ranks end within --timeout."
        ) from err
    raise DistributedError(
        f"rank {rank}/{world} could not start: rendezvous at {where} failed ({text.splitlines()[0]})."
    ) from err


def _local_device() -> torch.device:
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")
