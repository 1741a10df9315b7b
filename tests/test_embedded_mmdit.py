"""The embedded MMDiT (tiny-shapes-mmdit): shipped, loadable offline, run by the CLI, seeded training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distfd.cli import main
from distfd.embedded import MODELS, is_embedded, load_judge, model_path
from distfd.embedded.scenes import ATTRIBUTES, sample_captions
from distfd.quality.sources import load_embedded_pipeline

ROOT = model_path("embedded-mmdit")


@pytest.fixture(scope="module")
def pipe():
    return load_embedded_pipeline("embedded-mmdit")


def test_shipped_files_and_names():
    assert MODELS == {"embedded": "tiny-shapes", "embedded-mmdit": "tiny-shapes-mmdit"}
    assert model_path(None) == model_path("embedded") and model_path("some/model") is None
    assert is_embedded("embedded-mmdit") and not is_embedded("./embedded-mmdit-copy")
    index = json.loads((ROOT / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
        assert (ROOT / sub).is_dir(), sub
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size < 15e6, size  # the weights budget
    training = json.loads((ROOT / "training.json").read_text())
    assert training["command"].startswith("python -m benchmarks.embedded.train_mmdit")
    assert np.isfinite(training["final_losses"]["flow_mse"])


def test_loads_offline_as_sd3_with_flow_matching(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from distfd.adapters import call_defaults, find_adapter

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert find_adapter(pipe)[0].name == "sd3"
    assert call_defaults(pipe) == {"max_sequence_length": 24}  # its T5 tokenizer's length
    ids = pipe.tokenizer_3("a small red circle at the top left on a blue background").input_ids
    assert len(ids) == 12 + 1  # one piece per word, then </s>


def test_judge_reads_its_images(pipe):
    """Vanilla sampling makes the captioned scene: the judge reads shape and colour in most images
    (an untrained or mis-wired model scores near chance, 1/18)."""
    captions, labels = sample_captions(16, 31337)
    out = pipe(
        captions,
        num_inference_steps=28,
        guidance_scale=7.5,
        max_sequence_length=24,
        generator=[torch.Generator().manual_seed(i) for i in range(16)],
        output_type="pt",
    ).images
    pred = load_judge().predict(out * 2 - 1)
    both = (pred["shape"] == labels["shape"]) & (pred["colour"] == labels["colour"])
    assert both.float().mean() >= 0.5, both
    assert set(pred) >= set(ATTRIBUTES)


def test_cli_runs_it_with_flow_euler_and_its_default_key_steps(tmp_path, capsys):
    out = tmp_path / "mmdit.png"
    argv = ["generate", "--model", "embedded-mmdit", "--steps", "12", "--seed", "1", "--out", str(out)]
    assert main([*argv, "--prompt", "a large red square in the centre on a white background"]) == 0
    printed = capsys.readouterr().out
    assert "flow-euler" in printed
    assert Image.open(out).size == (32, 32)
    assert main(["generate", "--model", "embedded-nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "embedded-mmdit" in capsys.readouterr().err


def test_training_script_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.embedded import train_mmdit

    def train(out, seed):
        argv = ["--out", str(out), "--seed", str(seed), "--n-scenes", "32", "--steps", "2"]
        argv += ["--batch-size", "4", "--layers", "2", "--heads", "2", "--threads", "1"]
        return train_mmdit.run(train_mmdit.parse_args(argv))

    report = train(tmp_path / "a", 3)
    train(tmp_path / "b", 3)
    train(tmp_path / "c", 4)
    weights = {
        k: load_file(tmp_path / k / "transformer" / "diffusion_pytorch_model.safetensors") for k in "abc"
    }
    assert all(torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"])
    assert not all(torch.equal(weights["a"][n], weights["c"][n]) for n in weights["a"])
    assert np.isfinite(report["final_losses"]["flow_mse"])
    assert json.loads((tmp_path / "a" / "training.json").read_text())["seed"] == 3
