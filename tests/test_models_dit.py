"""DiT and PixArt: the encoder is the patch embedding plus the first transformer blocks."""

from __future__ import annotations

import pytest
import torch

import distfd
from distfd.adapters.dit import default_encoder_blocks
from distfd.keysteps import resolve_key_steps
from distfd.presets import DIT_250, PRESETS

from .equivalence import apply_run, check_equivalences
from .reference import check_against_reference
from .tiny_models import dit, pixart, prompt_embeds

STEPS, KEYS = 6, [0, 1, 3]


def dit_call(pipe, labels=(3, 7), steps: int = STEPS, guidance: float = 4.0):
    g = torch.Generator().manual_seed(0)
    out = pipe(
        class_labels=list(labels),
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=g,
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_dit_equivalences(guidance):
    pipe = dit()
    check_equivalences(pipe, lambda p: dit_call(p, guidance=guidance), STEPS, KEYS)


def test_dit_cfg_rows_stay_paired():
    """Parallel batches keep each row's class label with its latent (the authors' DiT code did not)."""
    pipe = dit()
    swapped, _ = apply_run(pipe, lambda p: dit_call(p, labels=(7, 3)), key_steps=KEYS, mode="parallel")
    ordered, _ = apply_run(pipe, lambda p: dit_call(p, labels=(3, 7)), key_steps=KEYS, mode="propagate")
    # Same noise per position, labels swapped: a mix-up of label rows would not give different images.
    assert not torch.allclose(swapped, ordered, atol=1e-4)
    single, _ = apply_run(pipe, lambda p: dit_call(p, labels=(3,)), key_steps=KEYS, mode="parallel")
    assert single.shape[0] == 1


def test_dit_encoder_split():
    assert default_encoder_blocks(28) == 18
    assert default_encoder_blocks(4) == 3
    assert default_encoder_blocks(2) == 1
    pipe = dit()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, encoder_blocks=1))
    names = [m.name for m in handle.engine.modules]
    keeps = [m.keep for m in handle.engine.modules]
    handle.remove()
    assert names == ["pos_embed", "transformer_blocks.0"] and keeps == [False, True]
    two, _ = apply_run(pipe, dit_call, key_steps=KEYS, encoder_blocks=2, mode="propagate")
    three, _ = apply_run(pipe, dit_call, key_steps=KEYS, mode="propagate")  # default: 3 of 4
    assert not torch.allclose(two, three, atol=1e-5)
    with pytest.raises(ValueError, match="encoder_blocks=4 does not fit"):
        distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=KEYS, encoder_blocks=4))


def test_encoder_blocks_rejected_for_unet():
    from . import tiny

    with pytest.raises(ValueError, match="DiT and PixArt only"):
        distfd.apply(tiny.sd(), distfd.FasterDiffusionConfig(encoder_blocks=3))


def test_dit_preset():
    assert PRESETS["dit-250"].key_steps == DIT_250 and len(DIT_250) == 166
    assert resolve_key_steps("dit-250", 250) == DIT_250
    assert PRESETS["dit-250"].num_steps == 250 and DIT_250[:8] == (0, 1, 2, 3, 4, 5, 6, 10)


def pixart_call(pipe, steps: int = STEPS):
    e = prompt_embeds(batch=1, length=8, dim=32)
    mask = torch.ones(1, 8)
    mask[:, 6:] = 0  # padded prompt tokens: the mask rows must follow their prompt rows
    out = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=e["prompt_embeds"],
        prompt_attention_mask=mask,
        negative_prompt_embeds=e["negative_prompt_embeds"],
        negative_prompt_attention_mask=torch.ones(1, 8),
        num_inference_steps=steps,
        height=16,
        width=16,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.images


def test_pixart_equivalences():
    check_equivalences(pixart(), pixart_call, STEPS, KEYS)


@pytest.mark.parametrize(("blocks", "guidance"), [(3, 4.0), (1, 1.0)])
def test_dit_matches_reference(blocks, guidance):
    """The patch embedding and the encoder blocks compute at key steps only (tests/reference.py)."""
    call = lambda p: dit_call(p, guidance=guidance)  # noqa: E731
    check_against_reference(dit(), call, KEYS, encoder_blocks=blocks)


def test_pixart_matches_reference():
    check_against_reference(pixart(), pixart_call, KEYS, encoder_blocks=2)
