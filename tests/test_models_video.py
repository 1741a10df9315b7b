"""Text-to-video: TextToVideoSDPipeline (UNet3DConditionModel) is supported, TextToVideoZero is not."""

from __future__ import annotations

import pytest
import torch
from diffusers import TextToVideoZeroPipeline

import distfd

from . import tiny
from .equivalence import check_equivalences
from .reference import check_against_reference
from .tiny_models import text2video

STEPS, KEYS = 6, [0, 1, 3]


def t2v_call(pipe):
    out = pipe(
        prompt="a red circle",
        num_frames=3,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.frames  # (B, C, frames, h, w)


def test_text_to_video_equivalences():
    pipe = text2video()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS))
    assert [m.name for m in handle.engine.modules][:2] == ["conv_in", "transformer_in"]
    handle.remove()
    # Frames are folded into the batch: with one torch thread the parallel batch's sums round apart
    # by up to ~1.5e-5 near zero (as for IF stage I).
    check_equivalences(pipe, t2v_call, STEPS, KEYS, atol=5e-5)


def test_text_to_video_zero_is_refused():
    base = tiny.sd()
    comps = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = TextToVideoZeroPipeline(**comps, requires_safety_checker=False)
    with pytest.raises(
        ValueError, match="TextToVideoZeroPipeline is not supported.*more than once per scheduler"
    ):
        distfd.apply(pipe)


def test_text_to_video_matches_reference():
    """Frames folded into the batch: the cached features keep each video's frames together."""
    check_against_reference(text2video(), t2v_call, KEYS)
