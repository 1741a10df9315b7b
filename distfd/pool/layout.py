"""Which ranks share an image: W ranks as groups of K, and the size the next image gets (pure).

Groups are contiguous blocks of ranks, ``[0..K-1], [K..2K-1], ...``. Launchers number ranks node by
node, so with K dividing the GPUs per node every group stays on one node, where GPUs talk over
NVLink/PCIe instead of the network; that is the layout to choose.

Group sizes. A fixed ``--ranks-per-image K`` uses the K-blocks only. ``auto`` may use every divisor of
W; the next image's size comes from the number of images waiting (:meth:`SizePolicy.wanted`), and it
runs on the largest group no larger than that whose ranks are all idle (:meth:`SizePolicy.pick`).
A size changes only between images, never inside one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

AUTO = "auto"


def parse_ranks_per_image(value: str | int | None, world: int) -> int | None:
    """``--ranks-per-image``: None (all ranks) is W; 'auto' is None; else an int K dividing W."""
    if value is None:
        return world
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--ranks-per-image must be 'auto' or an integer >= 1; got {value!r}.")
    k = int(text)
    if k > world or world % k:
        fits = ", ".join(str(d) for d in divisors(world))
        raise ValueError(
            f"--ranks-per-image {k} does not divide the {world} rank(s) into equal groups; "
            f"use one of {fits} (or auto), or start a multiple of {k} ranks."
        )
    return k


def divisors(world: int) -> list[int]:
    """Every group size W ranks split into, largest first."""
    return [k for k in range(world, 0, -1) if world % k == 0]


def partition(world: int, k: int) -> list[tuple[int, ...]]:
    """The groups of size ``k``: contiguous blocks of ranks."""
    if k < 1 or world % k:
        raise ValueError(f"{k} does not divide {world} ranks.")
    return [tuple(range(start, start + k)) for start in range(0, world, k)]


@dataclass(frozen=True)
class SizePolicy:
    """How many ranks the next image gets.

    Args:
        world: W, the number of ranks.
        fixed: K for ``--ranks-per-image K``; None for ``auto``.
    """

    world: int
    fixed: int | None

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world must be >= 1; got {self.world}.")
        if self.fixed is not None and (self.fixed < 1 or self.world % self.fixed):
            raise ValueError(f"{self.fixed} ranks per image do not divide {self.world} ranks.")

    @property
    def label(self) -> str:
        return AUTO if self.fixed is None else str(self.fixed)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """The group sizes in use, largest first."""
        return (self.fixed,) if self.fixed is not None else tuple(divisors(self.world))

    def wanted(self, waiting: int) -> int:
        """The group size for the next image when ``waiting`` images (it included) wait.

        Fixed: K. Auto: all W ranks while at most one image waits (lowest latency); with more, the
        largest size that still gives every waiting image a group of its own (up to W groups of one:
        highest throughput).
        """
        if self.fixed is not None:
            return self.fixed
        if waiting <= 1:
            return self.world
        groups = min(waiting, self.world)
        return max(k for k in self.sizes if self.world // k >= groups)

    def pick(self, waiting: int, busy: set[int] | frozenset[int]) -> tuple[int, ...] | None:
        """The group for the next image: the largest one no larger than :meth:`wanted` whose ranks are
        all idle (lowest ranks first); None when there is none."""
        want = self.wanted(waiting)
        for k in self.sizes:
            if k > want:
                continue
            for group in partition(self.world, k):
                if busy.isdisjoint(group):
                    return group
        return None


__all__ = ["AUTO", "SizePolicy", "divisors", "parse_ranks_per_image", "partition"]
