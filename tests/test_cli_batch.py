"""Batch jobs: a prompts file on one loaded pipeline, bad lines skipped, resume after a kill, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distfd.cli import main

from . import cli_helpers
from .cli_helpers import assert_resumed_batch, assert_same_image, pixels, subprocess_env

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(300)

ARGS = ["--steps", "6", "--key-steps", "0,2"]


def manifest(out_dir: Path) -> list[dict]:
    path = out_dir / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_batch_lines_defaults_bad_lines_and_same_pixels_as_generate(model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "\n".join(
            [
                "a red circle",  # 1: plain line, CLI defaults
                '{"prompt": "a blue square", "seed": 3, "height": 48}',  # 2: JSON, width from the model
                "# a comment",  # 3
                '{"prompt": "x", "seed": "3"}',  # 4: wrong type
                '{"prompt": "x", "sead": 3}',  # 5: unknown field
                "{not json",  # 6
                "",  # 7
                '{"prompt": "a green circle", "mode": "off", "guidance_scale": 1}',  # 8: vanilla
                '{"prompt": "x", "key_steps": [0, 9]}',  # 9: out of range for 6 steps
                '{"prompt": "x", "guidance_scale": 1' + "0" * 400 + "}",  # 10: too large for a float
                '{"prompt": "x", "seed": 1, "seed": 2}',  # 11: a field twice
            ]
        )
    )
    out_dir = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), *ARGS, "--prompts-file", str(prompts)]
    assert main([*argv, "--out-dir", str(out_dir)]) == 1  # the good lines are made, then exit 1
    text = capsys.readouterr().err
    entries = manifest(out_dir)
    assert [e["line"] for e in entries] == [1, 2, 8]
    for e in entries:
        assert (out_dir / e["file"]).is_file()
        assert e["seconds"] > 0 and e["settings"]["scheduler"] == "ddim"
    assert entries[0]["request"]["seed"] == 0 and entries[0]["key_steps"] == [0, 2]
    assert entries[1]["request"]["height"] == 48 and entries[1]["request"]["width"] == 32
    assert pixels(out_dir / entries[1]["file"]).shape == (48, 32, 3)
    assert entries[2]["key_steps"] is None and entries[2]["request"]["mode"] == "off"
    assert f"{prompts}:4: seed must be an integer" in text
    assert f"{prompts}:5: unknown field(s) 'sead'" in text
    assert f"{prompts}:6: not valid JSON" in text
    assert f"{prompts}:9: key_steps [9] are out of range" in text
    assert f"{prompts}:10: guidance_scale must be finite; got a 401-digit number" in text
    assert f"{prompts}:11: field 'seed' is given more than once" in text
    assert "3 image(s)" in text and "6 bad line(s)" in text
    assert "serving" not in text and "request" not in text  # a batch speaks of lines and images

    # A rerun with nothing left to make says so and ends before the model loads (exit 1: bad lines).
    import distfd.session

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(distfd.session.Session, "__init__", no_load)
    assert main([*argv, "--out-dir", str(out_dir)]) == 1
    text = capsys.readouterr().err
    assert "nothing left to make: 3 image(s)" in text and "not loading the model" in text
    assert f"{prompts}:9: key_steps [9] are out of range" in text
    monkeypatch.undo()
    # Line 2 is the image `distfd generate` makes with the same values.
    single = tmp_path / "single.png"
    argv = ["generate", "--model", str(model_dir), *ARGS, "--prompt", "a blue square", "--seed", "3"]
    assert main([*argv, "--height", "48", "--out", str(single)]) == 0
    assert_same_image(out_dir / entries[1]["file"], single, tol=0)


def _start(model_dir: Path, prompts: Path, out_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distfd", "generate", "--model", str(model_dir), "--steps", "30"]
    cmd += ["--key-steps", "0,5", "--prompts-file", str(prompts), "--out-dir", str(out_dir)]
    return subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_entries(proc: subprocess.Popen, out_dir: Path, n: int, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while len(manifest(out_dir)) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no image listed in time"
        time.sleep(0.05)


def test_batch_stops_on_sigterm_and_resumes_after_a_kill(model_dir, tmp_path):
    n = 12
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(json.dumps({"prompt": "a red circle", "seed": i}) for i in range(n)))
    out_dir = tmp_path / "out"

    # 1. SIGTERM (Slurm preemption): the image in progress is finished and listed, then a clean exit.
    proc = _start(model_dir, prompts, out_dir)
    _wait_for_entries(proc, out_dir, 1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "finishing the images in progress" in output and "a rerun resumes" in output
    assert "Traceback" not in output
    first = manifest(out_dir)
    assert 1 <= len(first) < n

    # 2. A kill (SIGKILL) while images are being made: the rerun picks up from the manifest.
    proc = _start(model_dir, prompts, out_dir)
    _wait_for_entries(proc, out_dir, len(first) + 1)
    proc.kill()
    proc.communicate(timeout=60)
    second = manifest(out_dir)
    assert len(first) < len(second) < n, "the kill came too late to test a resume"
    assert [e["line"] for e in second[: len(first)]] == [e["line"] for e in first]
    before = {e["file"]: (out_dir / e["file"]).stat().st_mtime_ns for e in second}

    # 3. The rerun makes only what is missing; each line is listed once; no temporary file is left.
    proc = _start(model_dir, prompts, out_dir)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"{len(second)} already done, {n - len(second)} to make" in output
    done = manifest(out_dir)
    assert_resumed_batch(out_dir, done, before, n)


def test_batch_on_two_ranks_gives_the_one_process_images(model_dir, tmp_path):
    from .cli_helpers import spawn_ranks

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n{"prompt": "a blue square", "seed": 5}\n{"prompt": "x", "seed": -1}\n')
    argv = ["generate", "--model", str(model_dir), *ARGS, "--prompts-file", str(prompts), "--timeout", "60"]
    assert main([*argv, "--out-dir", str(tmp_path / "one")]) == 1  # line 3 is bad
    exits = spawn_ranks([[*argv, "--out-dir", str(tmp_path / "two")]] * 2, None, wait_s=180)
    assert [e.returncode for e in exits] == [1, 0], exits[0].output[-3000:]  # rank 0 reports the line
    assert f"{prompts}:3: seed must be in 0 .. 2**64-1" in exits[0].output
    one, two = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert [e["file"] for e in two] == [e["file"] for e in one] and len(two) == 2
    assert all(e["world_size"] == 2 and e["bytes_sent"] > 0 for e in two)
    for e in one:
        assert_same_image(tmp_path / "two" / e["file"], tmp_path / "one" / e["file"])


def test_a_line_failing_in_generation_makes_the_job_exit_1(model_dir, tmp_path, monkeypatch, capsys):
    from distfd.session import Session

    original = Session._call

    def failing(self, reqs, gate=None):
        if any(r.prompt == "a failing line" for r in reqs):
            raise RuntimeError("boom in the pipeline")
        return original(self, reqs, gate)

    monkeypatch.setattr(Session, "_call", failing)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na failing line\na blue square\n")
    argv = ["generate", "--model", str(model_dir), *ARGS, "--prompts-file", str(prompts)]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 1
    assert [e["line"] for e in manifest(tmp_path / "out")] == [1, 3]  # the others are made
    assert "line 2: the image failed" in capsys.readouterr().err


def test_each_line_meets_the_limits_and_key_step_files_need_the_flag(model_dir, tmp_path, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"num_steps": 6, "key_steps": [0, 3]}))
    prompts = tmp_path / "prompts.txt"
    lines = [
        "a red circle",  # 1: fine
        '{"prompt": "x", "steps": 9}',  # 2: over --max-steps 8
        '{"prompt": "x", "height": 64, "width": 64}',  # 3: over --max-pixels
        json.dumps({"prompt": "x" * 41}),  # 4: over --max-prompt-chars
        json.dumps({"prompt": "x", "negative_prompt": "y" * 41}),  # 5: the negative prompt too
        json.dumps({"prompt": "a blue square", "key_steps": str(keys)}),  # 6: a file on this machine
    ]
    prompts.write_text("\n".join(lines))
    limits = ["--max-steps", "8", "--max-pixels", str(32 * 48), "--max-prompt-chars", "40"]
    argv = ["generate", "--model", str(model_dir), *ARGS, *limits, "--prompts-file", str(prompts)]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 1  # bad lines: exit 1 once the rest is made
    err = capsys.readouterr().err
    assert [e["line"] for e in manifest(tmp_path / "out")] == [1]
    assert f"{prompts}:2: steps 9 exceeds the limit of 8 (--max-steps)" in err
    assert f"{prompts}:3: width x height 64x64 is 4096 pixels; the limit is 1536" in err
    assert f"{prompts}:4: prompt has 41 characters; the limit is 40" in err
    assert f"{prompts}:5: negative_prompt has 41 characters" in err
    assert f"{prompts}:6: key_steps must be a list of loop indices" in err and "cannot name a file" in err
    # With the flag the file's key steps are used for that line.
    assert main([*argv, "--out-dir", str(tmp_path / "files"), "--allow-key-step-files"]) == 1  # lines 2-5
    made = {e["line"]: e for e in manifest(tmp_path / "files")}
    assert sorted(made) == [1, 6] and made[6]["key_steps"] == [0, 3]
