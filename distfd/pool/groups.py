"""This rank's distributed context in every group it may work in (one per group size in use).

Every rank creates every group, in the same order (``torch.distributed.new_group`` is collective over
the world). A group of one rank needs no process group (its context is world size 1, the very path
of a single process); the group of all ranks is the world's own. NCCL groups get a gloo twin for the
host-side agreements at step boundaries (:meth:`DistContext.agree`).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ..runtime import DistContext
from .layout import partition


def group_contexts(world: DistContext, sizes: tuple[int, ...]) -> dict[int, DistContext]:
    """{group size: this rank's context in its group of that size} (collective on ``world``)."""
    out: dict[int, DistContext] = {}
    for k in sizes:
        if k == 1:
            out[k] = DistContext(0, 1, world.device, timeout_s=world.timeout_s)
        elif k == world.world_size:
            out[k] = world
        else:
            out[k] = _subgroup(world, k)
    return out


def _subgroup(world: DistContext, k: int) -> DistContext:
    timeout = timedelta(seconds=world.timeout_s)
    backend = dist.get_backend(world.group)
    mine = None
    for ranks in partition(world.world_size, k):
        group = dist.new_group(list(ranks), timeout=timeout)
        host = dist.new_group(list(ranks), timeout=timeout, backend="gloo") if backend != "gloo" else None
        if world.rank in ranks:
            mine = DistContext(
                ranks.index(world.rank), k, world.device, group, world.timeout_s, host_group=host
            )
    assert mine is not None
    return mine


__all__ = ["group_contexts"]
