"""DeepFloyd-IF stages I and II and the x4 upscaler (stage III), with the paper's key steps."""

from __future__ import annotations

import torch

from distfd.presets import PRESETS

from .equivalence import check_equivalences
from .reference import check_against_reference
from .tiny_models import if_stage1, if_stage2, prompt_embeds, upscaler

STEPS, KEYS = 6, [0, 1, 3]


def gen():
    return torch.Generator().manual_seed(0)


def if_call(**kw):
    def call(pipe):
        return pipe(num_inference_steps=STEPS, generator=gen(), **kw).images

    return call


def low_res() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_if_stage1_equivalences():
    # Pixel-space DDPM at guidance 7 amplifies batching's rounding (1/sqrt(alpha_bar) near t=T).
    call = if_call(prompt=None, output_type="pt", **prompt_embeds())
    check_equivalences(if_stage1(), call, STEPS, KEYS, atol=5e-5)


def test_if_stage2_equivalences():
    """Stage II: noise-level class labels and the concatenated low-res image are per-row arguments."""
    call = if_call(prompt=None, image=low_res(), output_type="pt", **prompt_embeds())
    check_equivalences(if_stage2(), call, STEPS, KEYS)


def test_upscaler_equivalences():
    call = if_call(prompt="a red circle", image=low_res(), output_type="latent")
    check_equivalences(upscaler(), call, STEPS, KEYS)


def test_if_presets_follow_the_paper():
    """Supp. C.1: paper timesteps T..1 become loop indices T - t."""
    s1 = PRESETS["if-stage1-100"]
    assert s1.num_steps == 100
    non_key = sorted(set(range(100)) - set(s1.key_steps))
    # Non-key timesteps 89-86, 84-81, 24-21, 19-16 -> loop indices 100 - t.
    assert non_key == sorted(
        100 - t for t in [*range(86, 90), *range(81, 85), *range(21, 25), *range(16, 20)]
    )
    assert PRESETS["if-stage2-50"].key_steps == tuple(range(50))
    assert PRESETS["if-stage3-75"].key_steps == (0, 2, 5, 9, 14, 20, 27, 35, 44, 54, 65)


def test_if_stages_match_reference():
    """Stages I, II and III against tests/reference.py (noise injection on), encoder runs per step."""
    check_against_reference(if_stage1(), if_call(prompt=None, output_type="pt", **prompt_embeds()), KEYS)
    stage2 = if_call(prompt=None, image=low_res(), output_type="pt", **prompt_embeds())
    check_against_reference(if_stage2(), stage2, KEYS)
    check_against_reference(
        upscaler(), if_call(prompt="a red circle", image=low_res(), output_type="latent"), KEYS
    )
