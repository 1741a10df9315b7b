"""The checks every supported model passes: all key steps reproduce vanilla, parallel decoding equals
propagation, and ``remove()`` restores the vanilla pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.testing import assert_close

import distfd


def apply_run(pipe, call: Callable[[Any], torch.Tensor], **config) -> tuple[torch.Tensor, dict]:
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(**config))
    try:
        out = call(pipe)
        stats = handle.stats()
    finally:
        handle.remove()
    return out, stats


def check_equivalences(
    pipe, call: Callable[[Any], torch.Tensor], steps: int, key_steps: Sequence[int], atol: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Vanilla vs all-key (atol 1e-6), parallel vs propagate (rtol 1e-4, ``atol`` for values near 0:
    batching rounds differently), removal restores vanilla."""
    vanilla = call(pipe)
    all_key, stats = apply_run(pipe, call, key_steps=list(range(steps)), noise_alpha=0.0, mode="parallel")
    assert stats["encoder_passes"] == steps
    assert_close(all_key, vanilla, atol=1e-6, rtol=1e-6)
    prop, stats = apply_run(pipe, call, key_steps=list(key_steps), mode="propagate")
    assert stats["encoder_passes"] == len(key_steps) and stats["steps"] == steps
    par, stats = apply_run(pipe, call, key_steps=list(key_steps), mode="parallel")
    assert stats["decoder_passes"] == len(key_steps)  # one batch per key-step group
    assert_close(par, prop, rtol=1e-4, atol=atol)
    assert not torch.allclose(prop, vanilla, atol=1e-4), "propagation changed nothing: the test is blind"
    assert_close(call(pipe), vanilla, atol=0, rtol=0)
    return {"vanilla": vanilla, "propagate": prop, "parallel": par}
