"""Grouping of non-key steps into parallel batches, and the split of decoder rows over ranks (pure)."""

from __future__ import annotations

from collections.abc import Sequence


def rescale(key_steps: Sequence[int], from_steps: int, to_steps: int) -> tuple[int, ...]:
    """Map key steps built for ``from_steps`` onto ``to_steps`` by relative position in the loop."""
    scaled = {min(to_steps - 1, round(k * to_steps / from_steps)) for k in key_steps}
    return tuple(sorted(scaled | {0}))


def chunk_after(step: int, key_steps: Sequence[int], loop_length: int, max_steps: int | None) -> range:
    """Steps decoded together starting at ``step``: up to the next key step, at most ``max_steps``."""
    next_key = next((k for k in key_steps if k > step), loop_length)
    stop = next_key if max_steps is None else min(next_key, step + max_steps)
    return range(step, stop)


def groups(key_steps: Sequence[int], loop_length: int) -> list[range]:
    """Each key step with the non-key steps that follow it (the paper's parallel batches, Fig. 4f)."""
    return [chunk_after(k, key_steps, loop_length, None) for k in key_steps]


def shard(rows: int, world_size: int) -> list[range]:
    """Split ``rows`` decoder rows into contiguous shares, as even as possible.

    The larger shares go to the highest ranks, so rank 0 (which also runs the encoder under the
    ``rank0`` placement) carries the smaller one.
    """
    base, extra = divmod(rows, world_size)
    sizes = [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def decoder_batches(key_steps: Sequence[int], loop_length: int, max_steps: int | None) -> list[range]:
    """The decoder passes of a whole run, in loop order (``max_steps=1``: propagation, one per step).

    Known before sampling, so the batch shapes of a run (``len(batch) * rows per step``) are too.
    """
    out, step = [], 0
    while step < loop_length:
        out.append(chunk_after(step, key_steps, loop_length, max_steps))
        step = out[-1].stop
    return out
