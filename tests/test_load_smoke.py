"""Smoke test of benchmarks/load.py: a 1-rank service under good, hostile and pest traffic (no timing
thresholds; the figures of a shared CPU are rough)."""

from __future__ import annotations

import json

import pytest

from .test_benchmark_smoke import run_script

pytest.importorskip("starlette")


def test_load_benchmark_runs_with_hostile_requests_and_pest_connections(tmp_path):
    out = tmp_path / "load"
    run_script(
        "load.py", "--ranks", "1", "--clients", "2", "--requests-per-client", "6", "--hostile-share", "0.25",
        "--pest-connections", "20", "--out", str(out),
    )  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    clean, hostile = record["runs"]
    assert clean["good_ok"] == clean["good_requests"] == 12 and hostile["good_ok"] == 12
    assert hostile["hostile_refused"] == hostile["hostile_requests"] >= len(record["config"]["hostile_kinds"])
    assert hostile["pests_opened"] >= 20 and clean["pests_opened"] == 0
    assert "backtracking key steps" in record["config"]["hostile_kinds"]
    assert "p50 / clean p50" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
