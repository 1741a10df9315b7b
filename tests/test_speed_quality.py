"""The speed-quality picture: speed-ups from the committed H200 latency JSON, families, the front check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import speed_quality as sq

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200-2026-11-29"


def latency(kind: str) -> dict:
    return json.loads(next(iter(sorted(RESULTS.glob(f"sd15-full512-{kind}-*.json")))).read_text())


def test_speed_model_uses_measurements_and_estimates_the_rest() -> None:
    ddim = latency("ddim50")
    model = sq.SpeedModel(ddim)
    by = {m["name"]: m["pipeline_s"]["median"] for m in ddim["methods"]}
    speed, source = model.distfd(ddim["config"]["key_steps_resolved"])
    assert source == "measured" and speed == pytest.approx(by["vanilla"] / by["distfd-parallel"])
    speed, source = model.deepcache(3)
    assert source == "measured" and speed == pytest.approx(by["vanilla"] / by["deepcache"])
    # Estimates: more key steps or a shorter cache interval are slower; the estimate of the measured
    # set is within 10% of its measurement.
    even = [model.distfd(list(range(0, 50, 50 // k)))[0] for k in (5, 10, 25)]
    assert even[0] > even[1] > even[2] > 1.0
    assert model.deepcache(2)[0] < model.deepcache(3)[0] < model.deepcache(5)[0]
    pieces_only = sq.SpeedModel(
        {**ddim, "methods": [m for m in ddim["methods"] if m["name"] != "distfd-parallel"]}
    )
    estimate, source = pieces_only.distfd(ddim["config"]["key_steps_resolved"])
    assert source == "estimated" and estimate == pytest.approx(by["vanilla"] / by["distfd-parallel"], rel=0.1)
    # DPM-20 has no pieces of its own: the DDIM-50 file's (same UNet, same size) are used.
    dpm = sq.SpeedModel(latency("dpm20"), ddim)
    assert dpm.distfd([0, 2, 4, 6, 8, 10, 12, 14, 16, 18])[1] == "estimated"
    assert sq.SpeedModel(latency("dpm20")).distfd([0, 5])[1] == "none"


def row(name: str, keys, adherence: float, psnr: float) -> dict:
    return {
        "name": name,
        "key_steps": keys,
        "flops_speedup": 1.2,
        "psnr": psnr,
        "metrics": {"adherence_all": adherence},
    }


def test_families_points_and_front(tmp_path) -> None:
    rows = [
        {"name": "vanilla", "key_steps": None, "psnr": "inf", "metrics": {"adherence_all": 0.95}},
        row("propagate:even-9", list(range(0, 45, 5)), 0.94, 38.0),
        row("propagate:paper", [0, 1, 2, 3, 5, 10, 15, 25, 35], 0.80, 27.0),
        row("propagate:auto", [0, 6, 10, 15, 20, 25, 30, 36, 42], 0.93, 37.0),
        row("deepcache-3", None, 0.945, 43.0),
        {"name": "deepcache-9", "skipped": "not installed"},
    ]
    pts = sq.points(rows, sq.SpeedModel(latency("ddim50")))
    assert [p.family for p in pts] == ["vanilla", "uniform", "paper", "drift", "deepcache"]
    assert pts[0].speedup == 1.0 and pts[0].psnr is None and pts[2].speed_source == "measured"
    check = {c["deepcache"]: c for c in sq.front_check(pts, "psnr")}
    assert check["deepcache-3"]["at or above"] is False  # 38 dB < 43 dB
    assert {c["deepcache"]: c for c in sq.front_check(pts, "adherence")}["deepcache-3"][
        "at or above"
    ] is False
    assert sq.family("propagate:x.json", {"objective": "final"}) == "calibrated"
    paths = sq.write(rows, latency("ddim50"), None, tmp_path, "t", "t")
    assert all(p.is_file() for p in paths) and "BELOW" in (tmp_path / "t-speed.md").read_text()
