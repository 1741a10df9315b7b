"""The command line: a real run on a tiny saved pipeline, argparse errors, and torchrun with 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from distfd.cli import main

from . import tiny
from .multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--steps", "10", "--key-steps", "0,1,3,6", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


def test_generate_compare_writes_png_and_prints_speedup(model_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "a red circle",
            *TINY_RUN,
            "--compare",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert Image.open(out).size == (32, 32)
    text = capsys.readouterr().out
    assert "vanilla" in text and "speed-up" in text and "encoder passes 4" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--key-steps", "1,2"], "lacks index 0"),
        (["--key-steps", "sd-ddim-99"], "unknown key-step preset"),
        (["--mode", "fast"], "invalid choice"),
        (["--noise-alpha", "-1"], "noise_alpha must be >= 0"),
        (["--steps", "ten"], "invalid int value"),
    ],
)
def test_bad_arguments_get_an_argparse_error(model_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model_dir), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_torchrun_two_ranks(model_dir, tmp_path):
    out = tmp_path / "two.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "distfd",
        "generate",
        "--model",
        str(model_dir),
        *TINY_RUN,
        "--out",
        str(out),
        "--timeout",
        "60",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).size == (32, 32)
    assert "2 rank(s)" in proc.stdout and "collectives" in proc.stdout
