"""Effects, not echoes: each image-changing option of ``distfd generate`` changes what runs (the
scheduler class, the encoder's work) and the image; ``--compare``'s vanilla side is the vanilla
pipeline. The tiny saved pipeline, in-process ``main``; what ran is read off the session's own
pipeline call."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from distfd import samplers
from distfd.cli import main
from distfd.session import Session

from . import cli_helpers
from .cli_helpers import pixels

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def loaded_once(monkeypatch):
    """``from_pretrained`` reads each folder and dtype once per test, then hands out copies: the
    session's own steps after loading (scheduler swap, dtype, device) still run every time."""
    import diffusers

    original, cache = diffusers.DiffusionPipeline.from_pretrained, {}

    def cached(path, **kw):
        key = (str(path), str(kw.get("dtype")))
        if key not in cache:
            cache[key] = original(path, **kw)
        return copy.deepcopy(cache[key])

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", cached)


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Every pipeline call of a Session: its mode, scheduler class and algorithm, how often the mid
    block computed (the encoder's last module: at every step in vanilla, at key steps under distfd)
    and the images."""
    seen: list[dict] = []
    original = Session._call

    def spied(self, reqs, gate=None):
        resnet = self.pipe.unet.mid_block.resnets[0]  # computes only when the encoder does
        count = [0]
        hook = resnet.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        try:
            images, seconds = original(self, reqs, gate)
        finally:
            hook.remove()
        sched = self.pipe.scheduler
        seen.append(
            dict(
                mode=reqs[0].mode,
                prompt=reqs[0].prompt,
                scheduler=type(sched).__name__,
                config=dict(sched.config),
                encoder_runs=count[0],
                pixels=[np.asarray(im.convert("RGB"), dtype=np.int16) for im in images],
            )
        )
        return images, seconds

    monkeypatch.setattr(Session, "_call", spied)
    return seen


BASE = ["--steps", "6", "--timeout", "60"]


def generate(model_dir: Path, out: Path, *argv: str) -> np.ndarray:
    """The PNG of one run; key steps 0 and 2 unless ``argv`` gives others or turns distfd off."""
    keys = [] if "--key-steps" in argv or "off" in argv else ["--key-steps", "0,2"]
    assert main(["generate", "--model", str(model_dir), *BASE, *keys, "--out", str(out), *argv]) == 0
    return pixels(out)


def test_every_scheduler_runs_its_own_class(model_dir, tmp_path, calls, capsys):
    images = {}
    unet = [
        n for n in samplers.SCHEDULERS if n not in samplers.FLOW
    ]  # flow-euler: tests/test_models_mmdit_cli.py
    for name in unet:
        images[name] = generate(model_dir, tmp_path / f"{name}.png", "--scheduler", name)
        assert f"6 steps {name}" in capsys.readouterr().out
        cls, extra, _ = samplers.SCHEDULERS[name]
        used = [c for c in calls if c["prompt"] != "warm-up"][-1]
        assert used["scheduler"] == cls, name
        assert all(used["config"][k] == v for k, v in extra.items()), name
    assert np.array_equal(images["dpm"], images["dpm++"])  # one scheduler, two names
    distinct = [n for n in unet if n != "dpm++"]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert not np.array_equal(images[a], images[b]), f"--scheduler {a} and {b} made the same image"


def test_compare_times_the_vanilla_pipeline_against_distfd(model_dir, tmp_path, calls, capsys):
    off = generate(model_dir, tmp_path / "off.png", "--mode", "off")
    fast = generate(model_dir, tmp_path / "fast.png")
    calls.clear()
    compared = generate(model_dir, tmp_path / "cmp.png", "--compare", "--reps", "1")
    text = capsys.readouterr().out
    assert "median of 1 calls (range)" in text and "speed-up: " in text and "of vanilla's time)" in text
    assert "vanilla" in text and "distfd parallel" in text
    assert "first (cold) calls, not in the figures above" in text
    assert "torch threads per rank: " in text  # what the figure depends on, printed beside it
    assert "key steps [0, 2]; encoder passes 2" in text
    vanilla = [c for c in calls if c["mode"] == "off"]
    distfd_side = [c for c in calls if c["mode"] == "parallel"]
    assert len(vanilla) == len(distfd_side) == 2  # a cold call and one rep each
    for c in vanilla:
        assert c["encoder_runs"] == 6  # no encoder reuse: the encoder ran at every step
        assert np.array_equal(c["pixels"][0], off)  # the image of --mode off
    for c in distfd_side:
        assert c["encoder_runs"] == 2  # key steps 0 and 2
        assert np.array_equal(c["pixels"][0], fast)
    assert np.array_equal(compared, fast)
    assert not np.array_equal(off, fast)  # the two sides make different images: the check is not blind


# Each option that changes the image, with a value that must change it (noise injection moved to a
# strength whose effect survives 8-bit quantisation; 0.003 may move the tiny model's PNG by one level).
CHANGES = [
    ("--prompt", "a blue square"),
    ("--negative-prompt", "red"),
    ("--seed", "1"),
    ("--steps", "8"),
    ("--guidance-scale", "2"),
    ("--key-steps", "0,1,2,4"),
    ("--mode", "off"),
    ("--noise-alpha", "0.2"),
    ("--scheduler", "euler"),
    ("--dtype", "bf16"),
]


def test_every_image_changing_option_changes_the_image(model_dir, tmp_path):
    base = generate(model_dir, tmp_path / "base.png", "--noise-alpha", "0")
    for n, (flag, value) in enumerate(CHANGES):
        alpha = [] if flag == "--noise-alpha" else ["--noise-alpha", "0"]
        got = generate(model_dir, tmp_path / f"{n}.png", flag, value, *alpha)
        assert not np.array_equal(got, base), f"{flag} {value} did not change the image"
    assert generate(model_dir, tmp_path / "wide.png", "--width", "48").shape == (32, 48, 3)
    # Parallel decoding computes what propagation does, in another order.
    generate(model_dir, tmp_path / "prop.png", "--mode", "propagate", "--noise-alpha", "0")
    cli_helpers.assert_same_image(tmp_path / "prop.png", tmp_path / "base.png", tol=1)
