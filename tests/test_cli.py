"""The command line on the tiny saved pipeline: real runs, every scheduler, up-front refusals (exit 2
before any model load, one line), the same validation for CLI values and JSON requests, help speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from distfd import samplers
from distfd.cli import main
from distfd.request import ImageRequest
from distfd.session import Session

from . import cli_helpers
from .cli_helpers import TINY_RUN, subprocess_env

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def no_load(monkeypatch):
    """Loading a pipeline is a test failure: refusals must come before it."""

    def refuse(self, *a, **k):
        raise AssertionError("the pipeline was loaded although the arguments were refused")

    monkeypatch.setattr(Session, "_load", refuse)


def test_missing_side_takes_the_models_default(model_dir, tmp_path):
    out = tmp_path / "tall.png"
    assert main(["generate", "--model", str(model_dir), *TINY_RUN, "--height", "48", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 48)  # (width, height): the model's 32 wide, 48 high as asked


def test_dpm_means_dpm_solver_plus_plus():
    assert samplers.SCHEDULERS["dpm"][1] == {"algorithm_type": "dpmsolver++"}


# (CLI arguments, the same value as JSON request fields, the message both must give)
SAME_RULES = [
    (["--steps", "0"], {"steps": 0}, "steps must be >= 1"),
    (["--seed", "-1"], {"seed": -1}, "seed must be in 0 .. 2**64-1"),
    (["--guidance-scale", "-5"], {"guidance_scale": -5}, "is negative; the pipeline would silently run"),
    (["--guidance-scale", "0.5"], {"guidance_scale": 0.5}, "is between 0 and 1"),
    (
        ["--negative-prompt", "blur", "--guidance-scale", "1"],
        {"negative_prompt": "blur", "guidance_scale": 1},
        "negative_prompt needs classifier-free guidance",
    ),
    (["--key-steps", "1,2"], {"key_steps": [1, 2]}, "lacks index 0"),
    (["--key-steps", "0,2,2"], {"key_steps": [0, 2, 2]}, "has duplicates [2]"),
    (["--key-steps", "sd-ddim-99"], {"key_steps": "sd-ddim-99"}, "unknown key-step preset"),
    (
        ["--key-steps", "0,9"],
        {"key_steps": [0, 9]},
        "key_steps [9] are out of range for a sampling loop of 6",
    ),
    (["--mode", "off", "--key-steps", "0,2"], {"mode": "off", "key_steps": [0, 2]}, "with mode 'off'"),
    (["--height", "44"], {"height": 44}, "height 44 is not a multiple of 8"),
    (["--width", "4"], {"width": 4}, "width must be at least 8 pixels"),
    (["--steps", "2000"], {"steps": 2000}, "exceeds the scheduler's 1000 training timesteps"),
]


@pytest.mark.parametrize(("argv", "fields", "message"), SAME_RULES)
def test_cli_refuses_before_loading_with_one_line(model_dir, no_load, argv, fields, message, capsys):
    base = ["generate", "--model", str(model_dir), "--steps", "6"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def session(model_dir):
    from distfd.runtime import DistContext

    return Session(DistContext.single(), str(model_dir))


@pytest.mark.parametrize(("argv", "fields", "message"), SAME_RULES)
def test_json_request_gets_the_same_message(session, argv, fields, message):
    defaults = ImageRequest("a red circle", steps=6)
    with pytest.raises((ValueError, TypeError)) as err:
        session.check(ImageRequest.from_mapping({"prompt": "x", **json.loads(json.dumps(fields))}, defaults))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": True}, "seed must be an integer; got True (bool)"),
        ({"seed": "1"}, "seed must be an integer; got '1' (str)"),
        ({"steps": 6.0}, "steps must be an integer"),
        ({"height": "32"}, "height must be an integer number of pixels"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number"),
        ({"guidance_scale": False}, "guidance_scale must be a number"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"key_steps": [0, 2.5]}, "key_steps must hold ints"),
        ({"key_steps": [0, True]}, "key_steps must hold ints"),
        ({"mode": "fast"}, "mode must be one of propagate, parallel, off"),
        ({"sead": 1, "steps": 6}, "unknown field(s) 'sead'"),
    ],
)
def test_json_types_are_strict(fields, message):
    with pytest.raises((ValueError, TypeError)) as err:
        ImageRequest.from_mapping({"prompt": "a red circle", **fields}, ImageRequest("d"))
    assert message in str(err.value)


def test_json_request_without_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt is missing"):
        ImageRequest.from_mapping({"seed": 1}, ImageRequest("default"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "{tmp}/file.png/a.png"], "exists and is not a directory"),
        (["--out", "/proc/distfd/a.png"], "cannot write in the directory of --out /proc/distfd"),
        (["--out", "{tmp}/a.xyz"], "cannot write images as .xyz"),
        (["--out", "{tmp}"], "is a directory"),
        (["--model", "{tmp}"], "has no model_index.json"),
        (["--model", "./no/such/folder"], "no such folder, and not a hub id"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "potato"], "is not a device name"),
        (["--prompts-file", "{tmp}/none.txt", "--out-dir", "{tmp}/o"], "no such file"),
        (["--prompts-file", "{tmp}/p.txt"], "--prompts-file needs --out-dir"),
        (["--compare", "--mode", "off"], "drop --mode off"),
        (["--reps", "0"], "--reps must be >= 1"),
    ],
)
def test_output_model_and_device_are_checked_up_front(model_dir, no_load, tmp_path, argv, message, capsys):
    (tmp_path / "file.png").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    start = time.monotonic()
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - start < 20


def test_failure_inside_the_run_is_one_line_and_traceback_with_debug(
    model_dir, monkeypatch, tmp_path, capsys
):
    def broken(self, req):
        raise RuntimeError("boom in the pipeline")

    monkeypatch.setattr(Session, "_call", broken)
    argv = ["generate", "--model", str(model_dir), *TINY_RUN, "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom in the pipeline" in err and "Traceback" not in err and "--debug" in err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_vocabulary_warning_names_unknown_words(caplog):
    from distfd.cli.checks import unknown_words, warn_vocabulary

    assert unknown_words("a small red circle at the top left on a blue background") == []
    assert unknown_words("a photo of a red fox, a red FOX") == ["photo", "of", "fox"]
    with caplog.at_level("WARNING", logger="distfd"):
        warn_vocabulary("A small red circle at the top left on a blue background.", None)
        warn_vocabulary(
            "a large cyan triangle in the centre and a small red square at the bottom right on a white background"
        )
        assert not caplog.records
        warn_vocabulary("a photo of a red fox", None)
        assert "does not know 'photo', 'of', 'fox'" in caplog.text
        caplog.clear()
        warn_vocabulary("a yellow background", None)
        assert (
            "'yellow' is not one of its background colours (black, gray, white, blue, green)" in caplog.text
        )
        caplog.clear()
        warn_vocabulary("a red circle", None)
        assert "not in the form of its training captions" in caplog.text


def test_help_is_plain_shows_defaults_and_is_fast():
    env = subprocess_env()
    probe = "import sys, distfd.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
        == "[]"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "distfd", "generate", "--help"], env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0
    assert (
        "(default: 50)" in proc.stdout
        and "(default: 7.5)" in proc.stdout
        and "dpm: DPM-Solver++" in proc.stdout
    )
    assert "``" not in proc.stdout and "(default: None)" not in proc.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.1f}s"


def test_local_rank_before_the_subcommand_is_accepted(model_dir, no_load, capsys):
    # The deepspeed launcher's form: python -m distfd --local_rank=0 generate ...
    assert main(["--local_rank=0", "generate", "--model", str(model_dir), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_plain_run_prints_no_warnings(tmp_path):
    # The README's main job, shortened: the embedded model, its default prompt, one process.
    cmd = [sys.executable, "-W", "default", "-m", "distfd", "generate", "--steps", "4", "--key-steps", "0,2"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "a.png")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    noise = [line for line in lines if "Warning" in line or "WARN" in line or "torchvision" in line]
    assert not noise, noise
    assert "wrote" in proc.stdout


def test_model_facts_from_the_folder_match_the_loaded_pipeline(model_dir, session):
    from distfd.request import ModelFacts

    folder = ModelFacts.from_folder(model_dir)
    assert folder == session.facts  # read from JSON configs alone, the same as from the loaded pipeline
    assert folder.default_size() == (32, 32) and folder.size_multiple == 8
    assert folder.call_params == session.facts.call_params and "negative_prompt" in folder.call_params


@pytest.mark.parametrize(
    ("params", "fields", "message"),
    [
        ({"class_labels", "guidance_scale"}, {}, "does not take a text prompt"),
        ({"prompt"}, {"guidance_scale": 1.0}, None),
        ({"prompt"}, {"guidance_scale": 5.0}, "does not take guidance_scale, so 5 would be ignored"),
        ({"prompt", "guidance_scale"}, {"negative_prompt": "blur"}, "does not take negative_prompt"),
    ],
)
def test_values_a_pipeline_would_ignore_are_refused(params, fields, message):
    from distfd.request import ModelFacts, check_for_model

    facts = ModelFacts("SomePipeline", 8, (64, 64), call_params=frozenset(params))
    req = ImageRequest("a red circle", **fields)
    if message is None:
        assert check_for_model(req, facts).height == 512
    else:
        with pytest.raises(ValueError, match=message):
            check_for_model(req, facts)


@pytest.mark.parametrize(
    ("keys", "message"),
    [([5, 0, 2], None), ([0, -3, 5], "must be non-negative loop indices"), ([0, 2.7], "must hold ints")],
)
def test_preset_file_meets_the_list_rules_on_every_path(
    model_dir, session, no_load, tmp_path, keys, message, capsys
):
    preset = tmp_path / "keys.json"
    preset.write_text(json.dumps({"num_steps": 6, "key_steps": keys}))
    if message is None:
        req = ImageRequest.from_mapping({"prompt": "x", "key_steps": str(preset)}, ImageRequest("d", steps=6))
        assert session.key_steps_for(session.check(req)) == [0, 2, 5]
        return
    code = main(["generate", "--model", str(model_dir), "--steps", "6", "--key-steps", str(preset)])
    assert code == 2 and message in capsys.readouterr().err
    with pytest.raises((ValueError, TypeError), match=message):
        ImageRequest.from_mapping({"prompt": "x", "key_steps": str(preset)}, ImageRequest("d", steps=6))
