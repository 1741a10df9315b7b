"""The MMDiT FLOP model: FLUX.1-dev's count against a hand count, the split at the default N."""

from __future__ import annotations

import pytest

from benchmarks import flops_mmdit


def test_flux_dev_step_flops_match_a_hand_count():
    s = flops_mmdit.split("flux1-dev", rows=1, resolution=1024)
    t, d = 64 * 64 + 512, 3072  # tokens (image + text), width
    # Per token (each stream of a double block: qkv + out 4 d^2, MLP 8 d^2; a single block: qkv 3 d^2,
    # MLP in 4 d^2, out 5 d^2): 12 d^2 MACs; attention 2 T^2 d MACs per block (scores and values).
    # The adaLN modulation is per row, not per token (under 1%).
    linear = 2 * t * (19 * 12 * d * d + 38 * 12 * d * d)
    attention = 57 * 4 * t * t * d
    assert s["total"] == pytest.approx(linear + attention, rel=0.01)
    assert (s["blocks"], s["encoder_blocks"]) == (57, 37)
    # The encoder: the 19 double blocks and 18 of the 38 single blocks, about two thirds of a step.
    assert 0.6 < s["encoder"] / s["total"] < 0.7


def test_projection_report_shape(tmp_path):
    assert (
        flops_mmdit.main(["--models", "sd35-medium", "--resolution", "256", "--out", str(tmp_path / "r")])
        == 0
    )
    report = (tmp_path / "r.md").read_text()
    assert "sd35-medium" in report and (tmp_path / "r.png").stat().st_size > 0


def test_flux_check_runs_tiny_on_cpu(tmp_path):
    """The FLUX section of gpu_check.sh, tiny on CPU: every method runs and distfd skips encoder passes."""
    import json

    from benchmarks import flux_check

    out = tmp_path / "flux.json"
    assert (
        flux_check.main(
            ["--size", "tiny", "--device", "cpu", "--steps", "12", "--reps", "1", "--out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"vanilla", "distfd-propagate", "distfd-parallel", "first-block-cache"}
    keys = len(report["key_steps"])
    assert keys < 12 and methods["distfd-parallel"]["encoder_passes_per_image"] == keys
    assert 0 < methods["distfd-parallel"]["rel_l2_vs_vanilla"] < 0.5
