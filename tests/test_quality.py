"""Quality harness: metrics on known cases, configuration names, DeepCache, the CLI's input checks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from distfd.quality import evaluators, harness, methods, metrics, report
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return smooth.clamp(0, 1)  # (n, 3, 32, 32)


def test_psnr_ssim_known_cases() -> None:
    a = images()
    assert torch.isinf(metrics.psnr(a, a)).all()
    torch.testing.assert_close(metrics.ssim(a, a), torch.ones(4))
    shifted = torch.roll(a, shifts=3, dims=-1)
    noisy = (a + 0.01 * torch.randn_like(a)).clamp(0, 1)
    assert (metrics.psnr(a, noisy) > metrics.psnr(a, shifted)).all()
    assert (metrics.ssim(a, noisy) > metrics.ssim(a, shifted)).all()
    assert (metrics.ssim(a, shifted) < 1).all()
    # PSNR of a constant offset: 10 log10(1 / 0.1^2) = 20 dB.
    assert metrics.psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1)).item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="equal shape"):
        metrics.psnr(a, a[:2])


def test_frechet_distance_known_cases() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # Two Gaussians with identity covariance and means 2 apart in one coordinate: FD = 4.
    big = torch.randn(200_000, 2, generator=g)
    assert metrics.frechet_distance(big, big + torch.tensor([2.0, 0.0])) == pytest.approx(4.0, rel=1e-6)
    a = images(64)
    feats = evaluators.pooled_pixels
    ref = feats(a)
    assert (
        metrics.frechet_distance(feats(a), ref)
        < 1e-6
        < metrics.frechet_distance(feats(torch.roll(a, 8, -1)), ref)
    )
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(x[:1], x)


def test_adherence() -> None:
    pred = {"shape": torch.tensor([0, 1, 2, 0]), "colour": torch.tensor([1, 1, 1, 1])}
    want = {"shape": torch.tensor([0, 1, 0, 0]), "colour": torch.tensor([1, 1, 1, 0])}
    assert metrics.adherence(pred, want, ["shape", "colour"]) == {"shape": 0.75, "colour": 0.75, "all": 0.5}
    with pytest.raises(ValueError, match="missing"):
        metrics.adherence(pred, want, ["position"])


class FakeJudge:
    """Reads 'shape' from the mean red level and 'colour' from the mean green level."""

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"shape": (x[:, 0].mean((1, 2)) > 0).long(), "colour": (x[:, 1].mean((1, 2)) > 0).long()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return evaluators.pooled_pixels(x, 2)


def test_scene_evaluator_with_a_stand_in_judge() -> None:
    red = torch.zeros(4, 3, 8, 8)
    red[:, 0] = 1.0
    labels = {"shape": torch.tensor([1, 1, 0, 1]), "colour": torch.zeros(4, dtype=torch.long)}
    ev = evaluators.SceneEvaluator(
        FakeJudge(), labels, FakeJudge().features(red * 2 - 1 + 0.01 * torch.randn_like(red))
    )
    out = ev.score(red, ["p"] * 4)
    assert out["adherence_shape"] == 0.75 and out["adherence_colour"] == 1.0 and out["adherence_all"] == 0.75
    assert out["fd_judge"] < 1e-2
    each = ev.per_image(red, ["p"] * 4)
    assert (
        each["adherence_all"].tolist() == [1.0, 1.0, 0.0, 1.0]
        and each["adherence_colour"].tolist() == [1.0] * 4
    )


def test_mean_interval() -> None:
    v = torch.tensor([0.0, 1.0] * 50)
    half = 1.96 * float(v.double().std()) / 10  # n = 100
    assert metrics.mean_interval(v) == pytest.approx((0.5 - half, 0.5 + half))
    assert metrics.mean_interval(torch.full((5,), 2.0)) == (2.0, 2.0)
    for bad in (torch.tensor([1.0, math.inf]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="at least 2 finite"):
            metrics.mean_interval(bad)


class RedLevel:
    """A per-image evaluator: the mean red level of each image; counts its per-image passes."""

    calls = 0

    def per_image(self, images: torch.Tensor, prompts) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"red": images[:, 0].mean((1, 2))}

    def score(self, images: torch.Tensor, prompts, values=None) -> dict[str, float]:
        values = self.per_image(images, prompts) if values is None else values
        return {"red": float(values["red"].mean())}


def test_harness_paired_intervals() -> None:
    setup = harness.Setup(prompts=["a red circle", "a blue square", "a cat"], num_steps=5, guidance_scale=5.0)
    ev = RedLevel()
    rows, imgs, _ = harness.evaluate(tiny.sd(), ["propagate:uniform-3"], setup, ev)
    vanilla, row = rows
    assert ev.calls == 2  # one per-image pass per configuration, shared by score()
    assert vanilla.differences == {} and vanilla.psnr_interval is None  # PSNR of vanilla to itself is inf
    red = {n: x[:, 0].mean((1, 2)) for n, x in imgs.items()}
    lo, hi = row.differences["red"]
    assert (lo, hi) == pytest.approx(metrics.mean_interval(red[row.name] - red["vanilla"]))
    assert lo < row.metrics["red"] - vanilla.metrics["red"] < hi and lo < hi
    assert row.psnr_interval[0] < row.psnr < row.psnr_interval[1]
    text = report.markdown(rows, "t", {})
    assert "95% intervals" in text and f"- propagate:uniform-3: PSNR [{row.psnr_interval[0]:.2f}, " in text
    # Adherence differences are fractions, shown in points; no "-0.0".
    row.differences = {"adherence_all": [-0.02, -0.005], "adherence_colour": [-1e-4, 5e-5]}
    assert "shape+colour ok -1.2 points [-2.0, -0.5]; colour ok +0.0 points [+0.0, +0.0]" in report.markdown(
        rows, "t", {}
    )


def test_real_model_metrics_need_local_weights(tmp_path) -> None:
    with pytest.raises(evaluators.WeightsMissing, match="clip-model"):
        evaluators.ClipFidEvaluator(clip_model=tmp_path / "no-such-clip")
    with pytest.raises(evaluators.WeightsMissing, match="give"):
        evaluators.ClipFidEvaluator()
    with pytest.raises(evaluators.WeightsMissing, match="weights-inception"):
        evaluators.find_inception_weights(tmp_path / "weights-inception-2015-12-05-6726825d.pth")


def test_clip_score_with_a_local_tiny_clip(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(vocab_size=256, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                max_position_embeddings=16, bos_token_id=188, eos_token_id=189, pad_token_id=189)  # fmt: skip
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
    crop = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=crop, tokenizer=tiny.tokenizer()).save_pretrained(tmp_path)
    ev = evaluators.ClipFidEvaluator(clip_model=tmp_path)
    prompts = ["a red circle", "a cat", "a dog"]
    out = ev.score(images(3), prompts)
    assert set(out) == {"clip_score"}
    assert ev.score(images(3), prompts) == out
    # Independently: the model's own forward (normalised embeddings), 100 * max(cos, 0), the mean.
    model, processor = CLIPModel.from_pretrained(tmp_path).eval(), CLIPProcessor.from_pretrained(tmp_path)
    arrays = [im.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy() for im in images(3)]
    with torch.no_grad():
        both = model(**processor(text=prompts, images=arrays, return_tensors="pt", padding=True))
    cos = (both.image_embeds * both.text_embeds).sum(-1)  # (3,)
    assert float(torch.as_tensor(out["clip_score"])) == pytest.approx(
        float(100 * cos.clamp(min=0).mean()), rel=1e-4
    )
    assert ev.score(images(3), prompts[::-1]) != out  # the prompts matter


@pytest.mark.parametrize(
    "name,match",
    [("fast", "unknown configuration"), ("propagate:every-2", "unknown key-step preset"),
     ("deepcache-x", "deepcache-N"), ("parallel:paper:nonoise:extra", "unknown configuration")],
)  # fmt: skip
def test_bad_configuration_names(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        methods.parse_method(name)


def test_configuration_names() -> None:
    m = methods.parse_method("parallel:uniform-3:nonoise")
    assert (m.kind, m.mode, m.keys, m.noise) == ("distfd", "parallel", "uniform-3", False)
    assert methods.parse_method("propagate").keys == "paper"
    assert methods.parse_method("deepcache-5").interval == 5
    assert [m.name for m in methods.parse_methods(list(methods.DEFAULT_METHODS))] == list(
        methods.DEFAULT_METHODS
    )
    with pytest.raises(ValueError, match="twice"):
        methods.parse_methods(["vanilla", "vanilla"])


def test_deepcache_runs_and_leaves_no_trace() -> None:
    pipe = tiny.sd()
    ref = tiny.run(pipe, steps=6)
    before = {n: dict(m.__dict__) for n, m in pipe.unet.named_modules()}
    calls = []
    deep = pipe.unet.down_blocks[1].resnets[0].conv1
    hook = deep.register_forward_hook(lambda *a: calls.append(1))
    with methods.activated(pipe, methods.parse_method("deepcache-1")):
        torch.testing.assert_close(tiny.run(pipe, steps=6), ref)
    assert len(calls) == 6
    calls.clear()
    with methods.activated(pipe, methods.parse_method("deepcache-3")):
        cached = tiny.run(pipe, steps=6)
    assert len(calls) == 2  # the deep blocks run at steps 0 and 3 only
    assert not torch.allclose(cached, ref)
    hook.remove()
    assert {n: set(m.__dict__) for n, m in pipe.unet.named_modules()} == {
        n: set(d) for n, d in before.items()
    }
    torch.testing.assert_close(tiny.run(pipe, steps=6), ref)


def test_harness_on_tiny_pipeline(tmp_path) -> None:
    pipe = tiny.sd()
    setup = harness.Setup(
        prompts=["a red circle", "a blue square"], num_steps=5, guidance_scale=5.0, batch_size=2, budget=3
    )
    ev = evaluators.FeatureEvaluator(evaluators.pooled_pixels, torch.rand(16, 48))
    names = ["propagate:uniform-2", "parallel:auto:nonoise", "deepcache-2"]
    rows, imgs, extras = harness.evaluate(pipe, names, setup, ev)
    by = {r.name: r for r in rows}
    assert list(by) == ["vanilla", *names]
    assert math.isinf(by["vanilla"].psnr) and by["vanilla"].ssim == pytest.approx(1.0)
    assert by["vanilla"].flops_speedup == pytest.approx(1.0)
    assert by["propagate:uniform-2"].key_steps == [0, 2, 4] and by["propagate:uniform-2"].flops_speedup > 1
    assert len(by["parallel:auto:nonoise"].key_steps) == 3 == len(extras["calibrations"]["auto"].key_steps)
    assert all(math.isfinite(r.psnr) and "fd" in r.metrics for r in rows[1:])
    assert imgs["vanilla"].shape == (2, 3, 32, 32)
    paths = report.write(rows, imgs, tmp_path, "t", {"steps": 6}, grid_columns=2)
    assert json.loads(paths[1].read_text())["rows"][0]["psnr"] == "inf"
    assert "| propagate:uniform-2 | 3: 0,2,4 |" in paths[0].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_budget_larger_than_steps() -> None:
    with pytest.raises(ValueError, match="budget 9"):
        harness.Setup(prompts=["x"], num_steps=8, budget=9)
    with pytest.raises(ValueError, match="no prompts"):
        harness.Setup(prompts=[], num_steps=8)


def load_cli():
    spec = importlib.util.spec_from_file_location("quality_cli", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(capsys, *args: str) -> tuple[object, str]:
    with pytest.raises(SystemExit) as e:
        load_cli().main(list(args))
    return e.value.code, capsys.readouterr().err + str(e.value.code)


def test_cli_bad_input(tmp_path, capsys) -> None:
    code, err = cli(capsys, "--model", "tiny", "--configs", "vanilla,turbo")
    assert code == 2 and "unknown configuration 'turbo'" in err
    code, err = cli(capsys, "--model", "tiny", "--steps", "10", "--budget", "11")
    assert code == 2 and "--budget 11" in err
    code, err = cli(capsys, "--model", "tiny", "--prompts", str(tmp_path / "missing.txt"))
    assert "does not exist" in err
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, err = cli(capsys, "--model", "tiny", "--prompts", str(tmp_path / "empty.txt"))
    assert "holds no prompts" in err
    code, err = cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "--prompts" in err
    (tmp_path / "p.txt").write_text("a cat\n")
    code, err = cli(
        capsys,
        "--model",
        str(tmp_path),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--clip-model",
        str(tmp_path / "nope"),
    )
    assert "does not exist" in err


def test_embedded_judge_reads_real_scenes() -> None:
    pytest.importorskip("distfd.embedded")
    from distfd.quality import sources

    prompts, labels = sources.embedded_prompts(32, 424242)
    ev = sources.embedded_evaluator(labels, 256, 7)
    real = sources.embedded_real_images(32, 424242)
    out = ev.score(real, prompts)
    assert out["adherence_all"] > 0.9
    assert ev.score(torch.roll(real, 6, -1), prompts)["fd_judge"] > out["fd_judge"]


def test_diffusers_taylorseer_cache_on_sd3_runs_and_leaves_no_trace() -> None:
    """The peer cache on an MMDiT: TaylorSeer skips transformer work (fewer FLOPs), changes the image,
    is reset between loops (two calls agree) and is gone afterwards. FirstBlockCache cannot run on
    SD3 in diffusers 0.42 and is reported unavailable by name."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests import tiny_mmdit

    pipe = tiny_mmdit.sd3(layers=4)

    def run():
        gen = torch.Generator().manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            out = pipe(
                "a red cube",
                num_inference_steps=10,
                height=32,
                width=32,
                max_sequence_length=8,
                generator=gen,
                output_type="latent",
            )
        return out.images, counter.get_total_flops()

    base, base_flops = run()
    with methods.activated(pipe, methods.parse_method("taylorseer-3")):
        cached, cached_flops = run()
        again, _ = run()
    after, after_flops = run()
    assert cached_flops < 0.9 * base_flops
    assert not torch.equal(cached, base) and torch.equal(again, cached)
    assert torch.equal(after, base) and after_flops == base_flops
    with pytest.raises(methods.MethodUnavailable, match="context-pre-only"):
        with methods.activated(pipe, methods.parse_method("fbcache-0.1")):
            pass
