"""Critical-path projection of FasterDiffusion parallel decoding on W devices.

Pure functions over measured single-device pieces:

* ``encoder_s``: encoder time (conv_in .. mid block) for one key step, all batch rows;
* ``decoder_points``: decoder time (up blocks .. conv_out) measured at a few row counts;
* ``broadcast_bytes``: bytes sent from rank 0 per key step (skip tensors + mid output);
* ``gather_bytes_per_row``: decoder output bytes per row (the noise prediction);
* a link bandwidth in Gbit/s (and optional per-collective latency).

Model, per key-step group g (a key step and the non-key steps up to the next key step)::

    rows_g  = len(g) * batch_rows
    share_g = ceil(rows_g / W)
    T_g     = encoder_s + bcast + decoder(share_g) + gather,   bcast = gather = 0 when W == 1
    bcast   = latency + broadcast_bytes / bw
    gather  = latency + (W - 1) * share_g * gather_bytes_per_row / bw

The gather term is what each rank receives in distfd's all-gather of the decoder rows (shares
padded to the largest one), on a link of ``bw`` per device.

and the projected time per image is the sum of T_g over groups. Scheduler arithmetic, the text
encoder and the VAE are outside this model (they are identical for every method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def key_step_groups(key_steps: Sequence[int], num_steps: int) -> list[list[int]]:
    """Split ``range(num_steps)`` into groups that each start at a key step."""
    keys = sorted(set(int(k) for k in key_steps))
    if num_steps <= 0:
        raise ValueError("num_steps must be positive")
    if not keys or keys[0] != 0:
        raise ValueError("step 0 must be a key step (the first step has no encoder features to reuse)")
    if keys[-1] >= num_steps:
        raise ValueError(f"key step {keys[-1]} out of range for {num_steps} steps")
    bounds = [*keys, num_steps]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation through measured (rows, seconds) points.

    Below the smallest measured row count the smallest measurement is returned (fewer rows never
    cost more; a conservative choice for a critical path); above the largest, the last segment is
    extended linearly (never below the last measurement).
    """
    pts = sorted((float(a), float(b)) for a, b in points)
    if not pts:
        raise ValueError("need at least one point")
    if x <= pts[0][0]:
        return pts[0][1]
    if len(pts) == 1:  # proportional scaling above the single measurement
        return pts[0][1] * x / pts[0][0]
    if x >= pts[-1][0]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return max(y1, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    i = next(i for i in range(1, len(pts)) if pts[i][0] >= x)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def transfer_s(nbytes: float, bandwidth_gbps: float, latency_s: float = 0.0) -> float:
    """Seconds to move ``nbytes`` over a link of ``bandwidth_gbps`` Gbit/s."""
    if bandwidth_gbps <= 0:
        raise ValueError("bandwidth must be positive")
    return latency_s + nbytes * 8 / (bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class Pieces:
    encoder_s: float
    decoder_points: tuple[tuple[int, float], ...]
    broadcast_bytes: int
    gather_bytes_per_row: int
    batch_rows: int

    def decoder_s(self, rows: int) -> float:
        return interpolate(self.decoder_points, rows)


def group_time(
    p: Pieces, group_len: int, world: int, bandwidth_gbps: float, latency_s: float = 0.0
) -> dict[str, float]:
    """Critical path of one key-step group on ``world`` devices, with its breakdown."""
    if world < 1:
        raise ValueError("world size must be >= 1")
    rows = group_len * p.batch_rows
    share = math.ceil(rows / world)
    comm = world > 1
    bcast = transfer_s(p.broadcast_bytes, bandwidth_gbps, latency_s) if comm else 0.0
    gather = (
        transfer_s((world - 1) * share * p.gather_bytes_per_row, bandwidth_gbps, latency_s) if comm else 0.0
    )
    dec = p.decoder_s(share)
    return {
        "rows": rows,
        "share": share,
        "encoder_s": p.encoder_s,
        "broadcast_s": bcast,
        "decoder_s": dec,
        "gather_s": gather,
        "total_s": p.encoder_s + bcast + dec + gather,
    }


def project(
    p: Pieces,
    key_steps: Sequence[int],
    num_steps: int,
    world: int,
    bandwidth_gbps: float,
    latency_s: float = 0.0,
) -> dict[str, object]:
    """Projected denoising seconds per image for parallel decoding on ``world`` devices."""
    groups = key_step_groups(key_steps, num_steps)
    per = [group_time(p, len(g), world, bandwidth_gbps, latency_s) for g in groups]
    keys = ("encoder_s", "broadcast_s", "decoder_s", "gather_s", "total_s")
    totals = {k: sum(g[k] for g in per) for k in keys}
    return {"world": world, "groups": [len(g) for g in groups], **totals}


def sequential_s(p: Pieces, num_steps: int) -> float:
    """Vanilla: encoder + decoder at ``batch_rows`` for every step."""
    return num_steps * (p.encoder_s + p.decoder_s(p.batch_rows))


def propagate_s(p: Pieces, key_steps: Sequence[int], num_steps: int) -> float:
    """Encoder propagation on one device: encoder at key steps only, one decoder call per step."""
    n_keys = len(key_step_groups(key_steps, num_steps))
    return n_keys * p.encoder_s + num_steps * p.decoder_s(p.batch_rows)


def projection_table(
    p: Pieces,
    key_steps: Sequence[int],
    num_steps: int,
    worlds: Sequence[int],
    bandwidth_gbps: float,
    latency_s: float = 0.0,
) -> list[dict[str, object]]:
    """One row per world size, with speed-ups against the sequential (vanilla) estimate."""
    base = sequential_s(p, num_steps)
    rows = []
    for w in worlds:
        r = project(p, key_steps, num_steps, w, bandwidth_gbps, latency_s)
        r["speedup_vs_vanilla"] = base / r["total_s"] if r["total_s"] else math.inf
        rows.append(r)
    return rows
