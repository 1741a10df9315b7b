"""The feature analysis (Sec. 3.2, Fig. 2) on a tiny pipeline: traces, summary, PNG plots."""

from __future__ import annotations

import json

import pytest
import torch

import distfd
from distfd import analysis, plots
from distfd.adapters import find_adapter
from tests import tiny, tiny_mmdit

STEPS = 6


@pytest.fixture(scope="module")
def result() -> analysis.FeatureAnalysis:
    return analysis.analyse_features(
        tiny.sd(), ["a red circle", "a blue square"], STEPS, seed=1, guidance_scale=5.0, height=32, width=32
    )


def test_traces_cover_every_block_and_step(result: analysis.FeatureAnalysis) -> None:
    assert [b.name for b in result.blocks] == ["down0", "down1", "mid", "up0", "up1"]
    assert [b.part for b in result.blocks] == ["encoder", "encoder", "bottleneck", "decoder", "decoder"]
    assert [b.size for b in result.blocks] == [8, 8, 8, 16, 16]
    for b in result.blocks:
        assert len(b.norms) == STEPS and len(b.change) == STEPS - 1
        assert all(c > 0 for c in b.change)


def test_eq2_matches_a_direct_computation() -> None:
    trace = analysis.BlockTrace("down0", "encoder")
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    trace.observe((a, ()))
    trace.observe((b, ()))
    assert trace.change == [pytest.approx(float(((a - b) ** 2).sum() / a.numel()))]
    assert trace.norms[0] == pytest.approx(float(a.mean(1).flatten(1).norm(dim=1).mean()))


def test_plots_and_json(result: analysis.FeatureAnalysis, tmp_path) -> None:
    paths = plots.save_analysis_plots(result, tmp_path)
    assert [p.name for p in paths][-1] == "feature_relative_change.png" and len(paths) == 4
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(result.to_json(tmp_path / "analysis.json").read_text())
    assert set(data["summary"]) == {"encoder", "bottleneck", "decoder"}


def test_needs_vanilla_pipeline() -> None:
    pipe = tiny.sd()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=[0]))
    try:
        with pytest.raises(RuntimeError, match="vanilla"):
            analysis.analyse_features(pipe, "a red circle", 4)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="prompts"):
        analysis.analyse_features(pipe, [], 4)


def test_transformer_blocks_trace_the_image_stream() -> None:
    """An MMDiT: every joint block traced (its image stream, 64 tokens), parts from the adapter's split,
    and the relative change equal to a direct computation on the recorded stream."""
    pipe = tiny_mmdit.sd3(layers=4)
    seen = []
    hook = pipe.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        result = analysis.analyse_features(
            pipe, "a red cube", STEPS, guidance_scale=4.0, height=32, width=32, max_sequence_length=8
        )
    finally:
        hook.remove()
    assert [b.name for b in result.blocks] == ["block0", "block1", "block2", "block3"]
    encoder = find_adapter(pipe)[0].encoder_modules(pipe.transformer)
    n = sum(m.name.startswith("transformer_blocks.") for m in encoder)
    assert [b.part for b in result.blocks] == ["encoder"] * n + ["decoder"] * (4 - n)
    b = result.blocks[1]
    assert b.size == 64 and len(b.relative_change) == STEPS - 1
    direct = (seen[1] - seen[0]).pow(2).mean() / seen[1].pow(2).mean()
    assert b.relative_change[0] == pytest.approx(float(direct), rel=1e-5)
