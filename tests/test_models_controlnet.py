"""ControlNet, Multi-ControlNet and SDXL ControlNet: the ControlNet runs at key steps only."""

from __future__ import annotations

import pytest
import torch

import distfd

from . import tiny
from .equivalence import check_equivalences
from .reference import check_against_reference
from .tiny_models import control_image, sd_controlnet, sdxl_controlnet

STEPS, KEYS = 6, [0, 1, 3]


def count_controlnet_forwards(pipe) -> list[int]:
    """Counts real ControlNet computations (its conditioning embedding runs once per forward)."""
    count = [0]
    nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
    for net in nets:
        net.controlnet_cond_embedding.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def cn_call(image, **kw):
    return lambda p: tiny.run(p, steps=STEPS, image=image, **kw)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_equivalences(guess_mode):
    pipe = sd_controlnet()
    check_equivalences(pipe, cn_call(control_image(), guess_mode=guess_mode), STEPS, KEYS)


def test_multi_controlnet_equivalences():
    pipe = sd_controlnet(nets=2)
    call = cn_call([control_image(1), control_image(3)], controlnet_conditioning_scale=[1.0, 0.5])
    check_equivalences(pipe, call, STEPS, KEYS)


def test_sdxl_controlnet_equivalences():
    check_equivalences(sdxl_controlnet(), cn_call(control_image()), STEPS, KEYS)


@pytest.mark.parametrize(("mode", "nets"), [("propagate", 1), ("parallel", 2)])
def test_controlnet_runs_at_key_steps_only(mode, nets):
    pipe = sd_controlnet(nets=nets)
    count = count_controlnet_forwards(pipe)
    image = control_image() if nets == 1 else [control_image(1), control_image(3)]
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, mode=mode))
    for _ in range(2):  # a second call starts a new run: its step 0 computes again
        tiny.run(pipe, steps=STEPS, image=image)
    handle.remove()
    assert count[0] == 2 * len(KEYS) * nets
    count[0] = 0
    tiny.run(pipe, steps=STEPS, image=image)
    assert count[0] == STEPS * nets  # removed: every step again


def test_controlnet_residuals_matter():
    """The tiny ControlNet's residuals are not zero (diffusers zero-initialises its output layers)."""
    pipe = sd_controlnet()
    sample = torch.randn(1, 4, 16, 16)
    ehs = torch.randn(1, 16, 32)
    down, mid = pipe.controlnet(sample, 10, ehs, control_image(), return_dict=False)
    assert all(d.abs().mean() > 1e-3 for d in down) and mid.abs().mean() > 1e-3


@pytest.mark.parametrize(
    ("make", "image", "kw"),
    [
        (sd_controlnet, control_image(), {"guess_mode": True}),
        (lambda: sd_controlnet(nets=2), [control_image(1), control_image(3)], {}),
        (sdxl_controlnet, control_image(), {"control_guidance_end": 0.5}),
    ],
    ids=["guess-mode", "multi", "sdxl-guidance-end"],
)
def test_controlnet_matches_reference(make, image, kw):
    """The UNet's encoder and the ControlNet compute at key steps only; the other steps reuse the key
    step's residuals, as in tests/reference.py (noise injection on)."""
    check_against_reference(make(), cn_call(image, **kw), KEYS)
