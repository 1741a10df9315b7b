"""Tests of the embedded tiny-shapes model, scene generator and judge (CPU, fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distfd.cli import main
from distfd.embedded import calibration_captions, default_model_path, judge_path, load_judge
from distfd.embedded.judge import accuracy
from distfd.embedded.scenes import ATTRIBUTES, generate_scenes, sample_captions
from distfd.quality.sources import load_embedded_pipeline

from .multirank import free_port

TEST_SEED = 987_654  # not used by train_judge (seed 0) nor by train_pipeline (seed 0)


@pytest.fixture(scope="module")
def pipe():
    return load_embedded_pipeline()


def test_shipped_files_exist():
    root = default_model_path()
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "training.json"):
        assert (root / sub).exists(), sub
    assert (judge_path() / "model.safetensors").exists()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False


def test_pipeline_loads_offline(pipe):
    from diffusers import UNet2DConditionModel

    assert isinstance(pipe.unet, UNet2DConditionModel)
    kinds = {type(b).__name__ for b in [*pipe.unet.down_blocks, *pipe.unet.up_blocks, pipe.unet.mid_block]}
    assert {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"} <= kinds
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_tokenizer_loads_like_stable_diffusion():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(default_model_path() / "tokenizer")
    ids = tok("a small red circle at the top left on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 12  # one token per word


def test_short_generation(pipe):
    out = pipe(
        ["a large red square in the centre on a white background"] * 2,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_scenes_deterministic():
    a, b = generate_scenes(64, seed=5, two_shape_prob=0.3), generate_scenes(64, seed=5, two_shape_prob=0.3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    c = generate_scenes(64, seed=6, two_shape_prob=0.3)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8
    assert -1.0 <= float(a.as_float().min()) and float(a.as_float().max()) <= 1.0


def test_sample_captions_match_scenes():
    caps, labels = sample_captions(20, seed=11)
    scenes = generate_scenes(20, seed=11)
    assert caps == scenes.captions
    assert set(ATTRIBUTES) <= set(labels)
    assert torch.equal(labels["shape"], scenes.labels["shape"])


def test_calibration_captions_share_none_with_the_evaluation_draw():
    evaluation = set(sample_captions(200, 424242)[0])
    draw = sample_captions(64, 424243)[0]
    assert set(draw) & evaluation  # the caption space is small: a plain draw would overlap
    calib = calibration_captions(64)
    assert len(calib) == 64 and not set(calib) & evaluation
    assert calib == [c for c in sample_captions(256, 424243)[0] if c not in evaluation][:64]
    assert calibration_captions(8) == calib[:8]  # a longer list extends a shorter one


def test_judge_accuracy_on_fresh_scenes():
    judge = load_judge()
    scenes = generate_scenes(1000, seed=TEST_SEED)
    acc = accuracy(judge.predict(scenes.images), scenes.labels)
    assert acc["shape"] >= 0.95, acc
    assert acc["colour"] >= 0.95, acc
    assert judge.features(scenes.images[:8]).shape[0] == 8


def test_training_script_is_seeded_and_records_losses(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from benchmarks.embedded import train_pipeline

    def train(out, seed):
        argv = ["--out", str(out), "--seed", str(seed), "--n-scenes", "64", "--vae-steps", "2"]
        argv += ["--vae-batch-size", "4", "--steps", "3", "--batch-size", "4", "--checkpoint-every", "2"]
        return train_pipeline.run(train_pipeline.parse_args(argv))

    report = train(tmp_path / "a", 3)
    train(tmp_path / "b", 3)
    train(tmp_path / "c", 4)
    weights = {
        k: load_file(tmp_path / k / "unet" / "diffusion_pytorch_model.safetensors") for k in ("a", "b", "c")
    }
    assert all(torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"])
    assert not all(torch.equal(weights["a"][n], weights["c"][n]) for n in weights["a"])
    assert set(report["final_losses"]) == {"vae_reconstruction_mse", "vae_kl_per_dim", "denoiser_v_mse"}
    assert all(np.isfinite(v) for v in report["final_losses"].values())
    recorded = json.loads((tmp_path / "a" / "training.json").read_text())
    assert recorded["seed"] == 3 and recorded["denoiser_steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "checkpoints" / "step-2")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16


def test_main_job_on_two_ranks_equals_one_process(tmp_path, capsys):
    """README's main job (no --model: the embedded model) under torchrun with 2 gloo ranks, vs in process."""
    job = ["generate", "--compare", "--steps", "20", "--seed", "3"]
    assert main([*job, "--out", str(tmp_path / "one.png")]) == 0
    assert "speed-up" in capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run += ["--master-port", str(free_port()), "-m", "distfd", *job, "--out", str(tmp_path / "two.png")]
    proc = subprocess.run(run + ["--timeout", "60"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "vanilla" in proc.stdout and "speed-up" in proc.stdout
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert one.shape == two.shape == (32, 32, 3)
    assert np.abs(one - two).max() <= 1  # float sums in another order may round one level apart


def test_cli_defaults_to_the_calibrated_set_on_the_embedded_model():
    from distfd.embedded import calibrated_key_steps
    from distfd.session import default_key_steps

    assert default_key_steps(None, "ddim", 50) == (str(calibrated_key_steps("ddim", 50)), False)
    # No calibrated set for this step count, or another model: the paper's preset, rescaled.
    assert default_key_steps(None, "ddim", 20) == ("sd-ddim-50", True)
    assert default_key_steps("some/model", "ddim", 50) == ("sd-ddim-50", True)
    assert default_key_steps(None, "dpm", 20) == (str(calibrated_key_steps("dpm", 20)), False)
    assert default_key_steps(None, "dpm", 25) == ("sd-dpm-20", True)
