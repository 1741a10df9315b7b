"""Key steps chosen on the final image: the search, the objective against an independent reference,
and ``distfd calibrate`` writing a preset that ``distfd generate`` accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import distfd
from distfd import keysearch
from distfd.cli import main

from . import tiny

STEPS, BUDGET = 10, 4
CALL = dict(guidance_scale=5.0, height=32, width=32)
CALL_SIZE = dict(height=32, width=32)
PROMPTS = ["a red circle", "a blue square"]


def final_latents(pipe, keys=None, noise_alpha: float = 0.003) -> torch.Tensor:
    """Reference: the final latents of a plain pipeline call, with distfd applied iff ``keys``."""
    handle = None
    if keys is not None:
        config = distfd.FasterDiffusionConfig(key_steps=list(keys), mode="parallel", noise_alpha=noise_alpha)
        handle = distfd.apply(pipe, config)
    try:
        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
        return pipe(
            prompt=PROMPTS, num_inference_steps=STEPS, generator=gens, output_type="latent", **CALL
        ).images.double()
    finally:
        if handle is not None:
            handle.remove()


def error_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over prompts of the relative squared error in dB, written out here as the reference."""
    per_prompt = [float(((a - b) ** 2).sum() / (b**2).sum()) for a, b in zip(x, ref, strict=True)]
    return sum(10 * math.log10(e) for e in per_prompt) / len(per_prompt)


def test_final_objective_beats_drift_and_uniform_sets() -> None:
    pipe = tiny.sd()
    cal = distfd.calibrate(pipe, STEPS, budget=BUDGET, prompts=PROMPTS, seed=7, objective="final", **CALL)
    drift = distfd.calibrate(pipe, STEPS, budget=BUDGET, prompts=PROMPTS, seed=7, **CALL)
    uniform = keysearch.uniform_set(STEPS, BUDGET)
    assert len(cal.key_steps) == BUDGET and cal.key_steps[0] == 0 and cal.objective == "final"
    # Scored independently (parallel mode, plain pipeline calls): at least as close to vanilla.
    vanilla = final_latents(pipe)
    errors = {
        name: error_db(final_latents(pipe, keys), vanilla)
        for name, keys in {"final": cal.key_steps, "drift": drift.key_steps, "uniform": uniform}.items()
    }
    assert errors["final"] <= errors["drift"] + 1e-9 and errors["final"] <= errors["uniform"] + 1e-9
    assert cal.cost == pytest.approx(errors["final"], rel=1e-6)
    # Every scored set is recorded; the starts come first; the cost is counted in pipeline calls.
    origins = [c.origin for c in cal.candidates]
    assert origins[:2] == ["drift", "uniform"] and set(origins[2:]) <= {"search"}
    assert cal.candidates[0].key_steps == drift.key_steps
    assert cal.pipeline_calls == 1 + len(cal.candidates) <= 1 + 200
    assert min(c.value for c in cal.candidates) == cal.cost


def test_every_key_step_gives_vanilla_and_the_objective_is_its_floor() -> None:
    pipe = tiny.sd()
    vanilla = final_latents(pipe)
    objective = keysearch.FinalLatentError(pipe, STEPS, PROMPTS, 7, vanilla, noise_alpha=0.0, **CALL)
    assert torch.equal(objective.latents(tuple(range(STEPS))), vanilla)
    assert objective(tuple(range(STEPS))) == keysearch.FLOOR_DB
    assert keysearch.FLOOR_DB < objective((0, 5)) < 0.0 and objective.calls == 3


def separable(target: tuple[int, ...]):
    def f(keys: tuple[int, ...]) -> float:
        return float(sum((k - t) ** 2 for k, t in zip(keys, target, strict=True)))

    return f


def test_local_search_finds_the_optimum_and_respects_the_call_budget() -> None:
    target = (0, 9, 20, 31, 44)
    best, scored = keysearch.local_search(separable(target), 50, {"uniform": keysearch.uniform_set(50, 5)})
    assert best.key_steps == target and best.value == 0.0
    assert len({c.key_steps for c in scored}) == len(scored)  # no set scored twice
    capped, scored = keysearch.local_search(
        separable(target), 50, {"uniform": keysearch.uniform_set(50, 5)}, max_evals=6
    )
    assert len(scored) == 6 and capped.value > 0.0
    # The best start wins; a better start is kept as is.
    best, scored = keysearch.local_search(separable(target), 50, {"a": (0, 1, 2, 3, 4), "b": target})
    assert best.key_steps == target and best.origin == "b" and len(scored) > 2
    with pytest.raises(ValueError, match="differ in size"):
        keysearch.local_search(separable(target), 50, {"a": (0, 1), "b": target})
    with pytest.raises(ValueError, match="start at 0"):
        keysearch.local_search(separable(target), 50, {"a": (1, 9, 20, 31, 44)})


def test_local_search_descends_from_every_start() -> None:
    # Two basins: the better start leads into the shallow one (value 1 at T1), the other start into
    # the optimum (0 at T2). Descending from the best start alone would stop at T1.
    t1, t2 = (0, 5, 10), (0, 14, 18)

    def two_basins(keys: tuple[int, ...]) -> float:
        return float(min(separable(t1)(keys) + 1, separable(t2)(keys)))

    best, scored = keysearch.local_search(two_basins, 20, {"a": (0, 5, 11), "b": (0, 12, 16)})
    assert [c.value for c in scored[:2]] == [2.0, 8.0]
    assert best.key_steps == t2 and best.value == 0.0
    assert t1 in {c.key_steps for c in scored}  # the first descent ended in the shallow basin
    assert len({c.key_steps for c in scored}) == len(scored)


def test_uniform_and_paper_sets() -> None:
    assert keysearch.uniform_set(50, 9) == (0, 6, 11, 17, 22, 28, 33, 39, 44)
    assert keysearch.uniform_set(20, 7) == (0, 3, 6, 9, 11, 14, 17)
    assert keysearch.uniform_set(5, 5) == (0, 1, 2, 3, 4)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert keysearch.paper_set(DDIMScheduler(), 50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert keysearch.paper_set(DPMSolverMultistepScheduler(), 20) == (0, 1, 2, 3, 5, 10, 15)
    assert keysearch.paper_set(DDIMScheduler(), 20) is None


def test_calibrate_objective_bad_input() -> None:
    pipe = tiny.sd()
    with pytest.raises(ValueError, match="objective"):
        distfd.calibrate(pipe, 8, budget=2, objective="image")
    with pytest.raises(ValueError, match="max_evals"):
        distfd.calibrate(pipe, 8, budget=2, objective="final", max_evals=0)
    with pytest.raises(ValueError, match="budget is 2"):
        distfd.calibrate(pipe, 8, budget=2, objective="final", starts={"mine": [0, 1, 2]}, **CALL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


def test_cli_calibrate_writes_a_preset_generate_accepts(model_dir, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "keys.json"
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--steps", str(STEPS), "--budget", "3"]
    argv += ["--guidance-scale", "5", "--height", "32", "--width", "32", "--no-progress"]
    assert main(["calibrate", *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    preset = json.loads(out.read_text())
    assert preset["num_steps"] == STEPS and len(preset["key_steps"]) == 3 and preset["objective"] == "final"
    assert f"wrote {out}" in printed and str(preset["key_steps"]) in printed
    values = {tuple(c["key_steps"]): c["value"] for c in preset["candidates"]}
    assert values[tuple(preset["key_steps"])] == min(values.values())
    assert preset["pipeline_calls"] == 1 + len(values)
    assert preset["calibration"]["command"].startswith("distfd calibrate --model ")
    assert preset["calibration"]["prompts"] == ["a red circle", "a blue square"]
    image = tmp_path / "a.png"
    run = ["generate", "--model", str(model_dir), "--steps", str(STEPS), "--key-steps", str(out)]
    assert main([*run, "--height", "32", "--width", "32", "--out", str(image)]) == 0
    assert "encoder passes 3" in capsys.readouterr().out and image.is_file()
    # The drift objective, a target speed-up instead of a budget.
    fast = tmp_path / "fast.json"
    argv_fast = [a for a in argv if a not in ("--budget", "3")] + [
        "--target-speedup",
        "1.1",
        "--objective",
        "drift",
    ]
    assert main(["calibrate", *argv_fast, "--out", str(fast)]) == 0
    assert json.loads(fast.read_text())["objective"] == "drift"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--budget", "60"], "between 1 and --steps"),
        (["--steps", "30"], "no default budget"),
        (["--model", "somewhere"], "needs --prompts"),
        (["--target-speedup", "0.5"], "must be >= 1"),
        (["--objective", "image"], "invalid choice"),
    ],
)
def test_cli_calibrate_bad_input(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", *argv])
    assert message in capsys.readouterr().err


def test_harness_even_and_auto_final_key_steps() -> None:
    from distfd.quality import harness, methods

    with pytest.raises(ValueError, match="even-K"):
        methods.parse_method("propagate:even-0")
    pipe = tiny.sd()
    setup = harness.Setup(
        prompts=PROMPTS, num_steps=STEPS, budget=BUDGET, guidance_scale=5.0, call_kwargs=CALL_SIZE
    )
    cache: dict = {}
    even = harness.resolve_keys(pipe, methods.parse_method("propagate:even-4"), setup, cache)
    assert even == [0, 2, 5, 8]
    keys = harness.resolve_keys(pipe, methods.parse_method("propagate:auto-final"), setup, cache)
    assert len(keys) == BUDGET and cache["auto-final"].objective == "final"
