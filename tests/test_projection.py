"""Unit tests for the critical-path projection (pure arithmetic, no models)."""

from __future__ import annotations

import math

import pytest

from benchmarks.projection import (
    Pieces,
    group_time,
    interpolate,
    key_step_groups,
    project,
    projection_table,
    propagate_s,
    sequential_s,
    transfer_s,
)

SD_DDIM_50 = [0, 1, 2, 3, 5, 10, 15, 25, 35]


def linear_pieces(enc: float = 1.0, per_row: float = 0.5, bytes_: int = 8_000_000, out: int = 1000) -> Pieces:
    """Decoder time exactly per_row * rows (measured at 1, 2, 4 and 8 rows)."""
    return Pieces(
        encoder_s=enc,
        decoder_points=tuple((r, per_row * r) for r in (1, 2, 4, 8)),
        broadcast_bytes=bytes_,
        gather_bytes_per_row=out,
        batch_rows=2,
    )


def test_groups_paper_preset():
    groups = key_step_groups(SD_DDIM_50, 50)
    assert [g[0] for g in groups] == SD_DDIM_50
    assert [len(g) for g in groups] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert sum(groups, []) == list(range(50))


def test_groups_validation():
    with pytest.raises(ValueError):
        key_step_groups([1, 5], 10)
    with pytest.raises(ValueError):
        key_step_groups([0, 10], 10)
    assert key_step_groups([5, 0, 5], 6) == [[0, 1, 2, 3, 4], [5]]


def test_interpolate():
    pts = [(1, 1.0), (2, 1.5), (4, 3.5)]
    assert interpolate(pts, 2) == 1.5
    assert interpolate(pts, 3) == pytest.approx(2.5)
    assert interpolate(pts, 0.5) == 1.0  # clamped to the smallest measurement
    assert interpolate(pts, 6) == pytest.approx(5.5)  # last segment extended
    assert interpolate([(2, 4.0)], 4) == pytest.approx(8.0)


def test_transfer():
    assert transfer_s(1e9, 8.0) == pytest.approx(1.0)  # 8 Gbit/s moves 1 GB per second
    assert transfer_s(0, 100, latency_s=1e-5) == pytest.approx(1e-5)
    with pytest.raises(ValueError):
        transfer_s(1, 0)


def test_group_time_single_device_has_no_comm():
    p = linear_pieces()
    g = group_time(p, group_len=5, world=1, bandwidth_gbps=100)
    assert g["rows"] == 10 and g["share"] == 10
    assert g["broadcast_s"] == 0 and g["gather_s"] == 0
    assert g["total_s"] == pytest.approx(1.0 + 0.5 * 10)


def test_group_time_split_and_comm():
    p = linear_pieces()
    g = group_time(p, group_len=5, world=4, bandwidth_gbps=64)  # 8 GB/s
    assert g["share"] == math.ceil(10 / 4) == 3
    assert g["broadcast_s"] == pytest.approx(8e6 / 8e9)
    assert g["gather_s"] == pytest.approx((4 - 1) * 3 * 1000 / 8e9)  # all-gather of padded shares
    assert g["total_s"] == pytest.approx(1.0 + g["broadcast_s"] + 0.5 * 3 + g["gather_s"])


def test_project_sums_groups():
    p = linear_pieces()
    r = project(p, SD_DDIM_50, 50, world=2, bandwidth_gbps=100)
    expect = sum(group_time(p, n, 2, 100)["total_s"] for n in [1, 1, 1, 2, 5, 5, 10, 10, 15])
    assert r["total_s"] == pytest.approx(expect)
    assert r["encoder_s"] == pytest.approx(9 * 1.0)
    assert r["groups"] == [1, 1, 1, 2, 5, 5, 10, 10, 15]


def test_baselines_and_table():
    p = linear_pieces()
    assert sequential_s(p, 50) == pytest.approx(50 * (1.0 + 1.0))
    assert propagate_s(p, SD_DDIM_50, 50) == pytest.approx(9 * 1.0 + 50 * 1.0)
    table = projection_table(p, SD_DDIM_50, 50, [1, 2, 4], bandwidth_gbps=1e6)
    totals = [r["total_s"] for r in table]
    assert totals == sorted(totals, reverse=True)  # more devices never slower with free comm
    for r in table:
        assert r["speedup_vs_vanilla"] == pytest.approx(sequential_s(p, 50) / r["total_s"])
    # With one device parallel decoding of linear-cost rows equals propagation.
    assert table[0]["total_s"] == pytest.approx(propagate_s(p, SD_DDIM_50, 50))


def test_meta_flop_count_matches_cpu_forward():
    from benchmarks.flops import unet_split_flops
    from benchmarks.models import TINY_UNET

    meta = unet_split_flops(TINY_UNET, 8, 2)
    cpu = unet_split_flops(TINY_UNET, 8, 2, device="cpu")
    assert meta == cpu
    assert 0 < meta["encoder"] < meta["total"] and meta["decoder"] == meta["total"] - meta["encoder"]
