"""The key steps shipped for the embedded models are what their recorded ``distfd calibrate`` call gives.

The call is re-run through the same code (CLI arguments, vanilla run, drift optimum, start sets, local
search); to keep it cheap, the final-image objective is evaluated for real on the start sets and the
chosen set (each must reproduce its recorded value) and read from the file's record for the sets in
between, so the search must ask for exactly the recorded sets and end on the shipped one. Set
``DISTFD_FULL_RECALIBRATION=1`` to evaluate every set for real (minutes on a CPU).
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

from distfd import autokey
from distfd.cli import build_parser
from distfd.cli import calibrate as calibrate_cmd
from distfd.embedded import calibrated_key_steps
from distfd.embedded.scenes import sample_captions
from distfd.keysteps import read_preset_file
from distfd.quality.sources import load_embedded_pipeline

SHIPPED = [(None, "ddim", 50, 9), (None, "dpm", 20, 9), ("embedded-mmdit", "flow-euler", 28, 11)]
FULL = os.environ.get("DISTFD_FULL_RECALIBRATION") == "1"


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.mark.parametrize(("model", "scheduler", "steps", "budget"), SHIPPED)
def test_shipped_key_steps_are_the_recorded_calibration(
    pipes, monkeypatch, model, scheduler, steps, budget
) -> None:
    if model not in pipes:
        pipes[model] = load_embedded_pipeline(model or "embedded")
    pipe = pipes[model]
    path = calibrated_key_steps(scheduler, steps, model)
    assert path is not None and path.name == f"{scheduler}-{steps}.json"
    shipped = json.loads(path.read_text())
    preset = read_preset_file(path)
    assert preset.num_steps == steps and len(preset.key_steps) == budget and shipped["objective"] == "final"
    command = shipped["calibration"]["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["distfd", "calibrate"]
    args = build_parser().parse_args(argv[1:])
    args.no_progress = True
    assert (args.scheduler, args.steps, args.budget, args.model) == (scheduler, steps, budget, model)
    recorded = {tuple(c["key_steps"]): c["value"] for c in shipped["candidates"]}
    real = {tuple(c["key_steps"]) for c in shipped["candidates"] if c["origin"] != "search"}
    real.add(tuple(shipped["key_steps"]))
    asked: list[tuple[int, ...]] = []

    class Replayed(autokey.FinalLatentError):
        def __call__(self, key_steps):
            keys = tuple(key_steps)
            asked.append(keys)
            assert keys in recorded, f"the search asked for {list(keys)}, which {path.name} does not record"
            if FULL or keys in real:
                value = super().__call__(keys)
                assert value == pytest.approx(recorded[keys], rel=1e-4, abs=1e-9), list(keys)
            else:
                self.calls += 1  # a call the recorded run made
            return recorded[keys]

    monkeypatch.setattr(autokey, "FinalLatentError", Replayed)
    cal = calibrate_cmd.calibrate(args, pipe)
    assert cal.key_steps == preset.key_steps
    assert asked == [tuple(c["key_steps"]) for c in shipped["candidates"]]
    assert cal.pipeline_calls - 1 == len(asked) == shipped["pipeline_calls"] - 1
    # The calibration prompts are recorded and are not the quality harness's evaluation captions.
    assert shipped["calibration"]["prompts"] == calibrate_cmd.prompts_for(args)
    evaluation, _ = sample_captions(200, 424242)
    assert not set(shipped["calibration"]["prompts"]) & set(evaluation)
