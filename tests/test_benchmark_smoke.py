"""End-to-end smoke test of benchmarks/latency.py on CPU with the tiny config (no timing thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def run_script(script: str, *args: str) -> None:
    """Run ``python benchmarks/<script>`` as a user would, single-threaded (a shared CPU); it must succeed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_cli(out: Path, *extra: str) -> dict:
    """Run ``python benchmarks/latency.py`` on the tiny config; its JSON result."""
    run_script(
        "latency.py",
        "--size",
        "tiny",
        "--steps",
        str(STEPS),
        "--key-steps",
        "uniform-3",
        "--warmup",
        "1",
        "--reps",
        "2",
        "--threads",
        "1",
        "--decoder-rows",
        "1,2,4",
        "--worlds",
        "1,2,4",
        "--out-dir",
        str(out),
        *extra,
    )
    files = sorted(out.iterdir())
    assert sorted(f.suffix for f in files) == [".json", ".md", ".png"], files
    assert len({f.stem for f in files}) == 1
    for f in files:
        assert f.stat().st_size > 0
    png = next(f for f in files if f.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(next(f for f in files if f.suffix == ".json").read_text())


def check_summary(s: dict) -> None:
    assert s["n"] == 2 and len(s["samples"]) == 2
    assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"])


def test_sd15_tiny_end_to_end(tmp_path: Path):
    res = run_cli(tmp_path, "--arch", "sd15")
    methods = {m["name"]: m for m in res["methods"]}
    assert list(methods) == ["vanilla", "distfd-propagate", "distfd-parallel", "deepcache"]
    assert all(m["status"] == "ok" for m in methods.values()), [m.get("reason") for m in methods.values()]
    van = methods["vanilla"]
    for m in methods.values():
        check_summary(m["pipeline_s"])
        check_summary(m["denoiser_s"])
        # UNet time is part of each pipeline call's time.
        assert all(
            d <= p for d, p in zip(m["denoiser_s"]["samples"], m["pipeline_s"]["samples"], strict=True)
        )
        assert m["denoiser_calls"] == STEPS
        assert m["flops"] > 0 and 0 < m["denoiser_flops"] <= m["flops"]
        assert m["speedup_pipeline"] == pytest.approx(van["pipeline_s"]["median"] / m["pipeline_s"]["median"])
        assert m["speedup_denoiser"] == pytest.approx(van["denoiser_s"]["median"] / m["denoiser_s"]["median"])
        assert m["peak_memory_bytes"] is None or m["peak_memory_bytes"] > 0
    assert van["speedup_pipeline"] == pytest.approx(1.0)
    # Fewer encoder passes => fewer FLOPs; both distfd modes do the same arithmetic.
    for name in ("distfd-propagate", "distfd-parallel", "deepcache"):
        assert methods[name]["denoiser_flops"] < van["denoiser_flops"]
    assert methods["distfd-parallel"]["denoiser_flops"] == methods["distfd-propagate"]["denoiser_flops"]
    keys = res["config"]["key_steps_resolved"]
    assert keys == [0, 3]
    par, prop = methods["distfd-parallel"]["method_stats"], methods["distfd-propagate"]["method_stats"]
    assert par["encoder_passes"] == prop["encoder_passes"] == len(keys)
    assert par["decoder_passes"] == len(keys) and prop["decoder_passes"] == STEPS
    # Host facts recorded with the result.
    host = res["host"]
    assert host["versions"]["distfd"] and host["versions"]["torch"] and "latency.py" in host["command"]
    assert host["seed"] == 0 and host["timestamp"]
    # Projection: positive, one row per world size, consistent sums.
    proj = res["projection"]
    assert [r["world"] for r in proj["table"]] == [1, 2, 4]
    assert proj["groups"] == [3, 3]
    for r in proj["table"]:
        parts = r["encoder_s"] + r["broadcast_s"] + r["decoder_s"] + r["gather_s"]
        assert r["total_s"] == pytest.approx(parts) and r["total_s"] > 0
    assert proj["pieces"]["broadcast_bytes_per_key_step"] > 0
    md = next(tmp_path.glob("*.md")).read_text()
    for name in methods:
        assert f"| {name} |" in md


def test_dit_runs_distfd_and_skips_deepcache():
    """DiT: DeepCache (UNet only) is skipped with a recorded reason; distfd runs, its encoder at the
    key steps only."""
    import distfd
    from benchmarks import methods as M
    from benchmarks.models import build

    bench = build("dit", "tiny", "ddim", "cpu", torch.float32)
    with pytest.raises(M.Skip, match="UNet"):
        M.setup("deepcache", bench, {"scheduler": "ddim", "deepcache_interval": 3, "deepcache_branch": 0})
    inst = M.setup("distfd-parallel", bench, {"key_steps": "uniform-3", "noise_alpha": 0.003})
    try:
        bench.run("a prompt", 6, 0, output_type="pt")
        stats = inst.stats()
    finally:
        inst.remove()
    keys = distfd.resolve_key_steps("uniform-3", 6)
    assert 0 < len(keys) < 6 and stats["encoder_passes"] == len(keys) and stats["steps"] == 6


def test_compiled_methods_report_compile_time_apart(tmp_path: Path):
    """Compiled methods (backend 'eager' on CPU): first call and warm-up apart from the timed calls,
    nothing compiled in a timed call, the compiled image equal to its eager counterpart's."""
    res = run_cli(
        tmp_path,
        "--arch",
        "sd15",
        "--methods",
        "vanilla,distfd-parallel,distfd-parallel-compiled,vanilla-compiled-cg",
        "--compile-backend",
        "eager",
        "--compile-warmup",
        "1",
        "--no-projection",
        "--no-flops",
    )
    methods = {m["name"]: m for m in res["methods"]}
    cg = methods["vanilla-compiled-cg"]
    assert cg["status"] == "skipped" and "CUDA" in cg["reason"]
    comp = methods["distfd-parallel-compiled"]
    assert comp["status"] == "ok", comp.get("reason")
    assert comp["compile_s"] > 0 and len(comp["warmup_s"]) == 1
    assert comp["warmup_graphs"] == [2, 0]  # key steps [0, 3] of 6: the encoder and one 6-row decoder batch
    assert comp["graphs_compiled_in_timed_calls"] == 0
    assert comp["image_mean_abs_diff_vs_eager"] == 0.0
    assert comp["method_stats"]["encoder_passes"] == 2 and comp["method_stats"]["decoder_passes"] == 2
    check_summary(comp["pipeline_s"])
    assert "compile" in comp["note"]


def test_keysets_exhaustive_smoke(tmp_path: Path) -> None:
    """The exhaustive key-step study on the embedded model: its own loop reproduces the vanilla pipeline
    and distfd's FinalLatentError (it exits otherwise), it scores every set, and stage 2 ranks them."""
    run_script(
        "keysets_exhaustive.py",
        "--steps",
        "6",
        "--budget",
        "3",
        "--search-prompts",
        "1",
        "--num-prompts",
        "2",
        "--rescore",
        "3",
        "--workers",
        "2",
        "--out",
        str(tmp_path),
    )
    result = json.loads((tmp_path / "exhaustive-dpm-6-k3.json").read_text())
    assert (tmp_path / "exhaustive-dpm-6-k3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check = result["verification"]
    assert check["vanilla_max_abs_diff"] <= 1e-5 * check["latent_scale"]
    assert all(abs(s["diff"]) < 1e-6 for s in check["sets"])
    assert result["stage1"]["sets"] == 10  # C(5, 2): step 0 and two of the other five
    best = result["stage1"]["best"]
    assert len(best) == 10 and all(a["value"] <= b["value"] for a, b in zip(best, best[1:], strict=False))
    assert abs(result["stage1"]["best_replayed"] - best[0]["value"]) < 1e-6
    # Every named set was scored in stage 1, and none beats the exhaustive best.
    assert all(n["value"] >= best[0]["value"] for n in result["stage1"]["named"].values())
    ranking = result["stage2"]["ranking"]
    assert all(a["value"] <= b["value"] for a, b in zip(ranking, ranking[1:], strict=False))


def test_every_named_defect_still_applies_and_its_tests_exist(tmp_path: Path) -> None:
    """benchmarks/defects.py: each defect's edit applies to today's source (its text found exactly
    once) and changes it, and every test file it names exists; a stale edit would stop the script."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import defects
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert len({d.name for d in defects.DEFECTS}) == len(defects.DEFECTS)
    for d in defects.DEFECTS:
        copy = tmp_path / d.name / d.path
        copy.parent.mkdir(parents=True)
        copy.write_text((ROOT / d.path).read_text())
        d.apply(tmp_path / d.name)
        assert copy.read_text() != (ROOT / d.path).read_text(), d.name
        compile(copy.read_text(), str(copy), "exec")  # the defect is a program, not a syntax error
        assert all((ROOT / t.split("::")[0]).is_file() for t in d.tests), d.tests
    # A defect whose text has gone from the source is refused, naming it.
    stale = defects.Defect("stale", "-", defects.DEFECTS[0].path, "no such text", "x", ())
    with pytest.raises(ValueError, match="stale: the edit's text occurs 0 times"):
        stale.apply(tmp_path / defects.DEFECTS[0].name)
