"""An independent reference for every model family: encoder propagation and prior noise injection
(FasterDiffusion, Sec. 3.3) written with plain torch hooks around the pipeline's own ``__call__``.

Nothing of distfd runs here (no engine, hooks, passes or adapters). The reference lists each family's
encoder modules itself, counts loop steps by the scheduler updates it sees, records every encoder
module's output at a key step and returns the recorded output at the other steps (torch forward
hooks), does the same for a ControlNet (its residuals are reused, Sec. 4.2), and adds
``alpha * z_T`` to the latents before each scheduler update whose timestep lies below
``below * num_train_timesteps``. Parallel decoding computes the same thing in another order, so
both distfd modes are checked against it.

:func:`observe` watches a run (distfd's or not) without changing it: the final latents (the last
scheduler update's output, whatever ``output_type`` the call asks for) and, per encoder module and
ControlNet, the loop steps at which it really computed. Its counters wrap the modules' ``forward``
before distfd installs its hooks, so a replayed output is not counted: a module must compute at the
key steps and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet3DConditionModel,
)
from torch import nn
from torch.utils import _pytree as pytree

import distfd

from . import tiny

# Stronger than the paper's 0.003 so that an injection of the wrong tensor moves the latents far past
# float32 batching noise (at 0.003 it still does, by ~1e-3 relative; this leaves a wide margin).
ALPHA, BELOW = 0.05, 0.5


def denoiser(pipe) -> nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def encoder_modules(pipe, encoder_blocks: int | None = None) -> dict[str, nn.Module]:
    """The encoder of each family, in call order (UNet: conv_in, down blocks, mid block; the video
    UNet's temporal ``transformer_in`` too; DiT/PixArt: the patch embedding and the first
    ``encoder_blocks`` transformer blocks; SD3 and FLUX: the image and text embeddings and the first
    ``encoder_blocks`` blocks, FLUX's double blocks before its single ones)."""
    model = denoiser(pipe)
    transformers = (
        DiTTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        FluxTransformer2DModel,
    )
    if isinstance(model, transformers) and encoder_blocks is None:
        raise ValueError("give encoder_blocks for a transformer (the reference does not guess it)")
    if isinstance(model, DiTTransformer2DModel | PixArtTransformer2DModel):
        blocks = {f"transformer_blocks.{i}": model.transformer_blocks[i] for i in range(encoder_blocks)}
        return {"pos_embed": model.pos_embed, **blocks}
    if isinstance(model, SD3Transformer2DModel | FluxTransformer2DModel):
        image = "pos_embed" if isinstance(model, SD3Transformer2DModel) else "x_embedder"
        blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
        blocks += [
            (f"single_transformer_blocks.{i}", b)
            for i, b in enumerate(getattr(model, "single_transformer_blocks", ()))
        ]
        embeddings = {image: getattr(model, image), "context_embedder": model.context_embedder}
        return {**embeddings, **dict(blocks[:encoder_blocks])}
    mods = {"conv_in": model.conv_in}
    if isinstance(model, UNet3DConditionModel):
        mods["transformer_in"] = model.transformer_in
    mods.update({f"down_blocks.{i}": b for i, b in enumerate(model.down_blocks)})
    mods["mid_block"] = model.mid_block
    return mods


def side_models(pipe) -> dict[str, nn.Module]:
    """Models the pipeline runs before the denoiser in each step that propagation skips (ControlNet)."""
    net = getattr(pipe, "controlnet", None)
    return {"controlnet": net} if isinstance(net, nn.Module) else {}


@dataclass
class Loop:
    """What one sampling loop did: its scheduler updates, z_T, the final latents, and the steps at
    which each watched module computed."""

    updates: int = 0
    z_T: torch.Tensor | None = None
    final: torch.Tensor | None = None
    injected: list[int] = field(default_factory=list)  # steps whose update got alpha * z_T
    output: Any = None  # what the call returned
    computed: dict[str, list[int]] = field(default_factory=dict)


@contextlib.contextmanager
def scheduler_spy(
    scheduler, loop: Loop, noise: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None
) -> Iterator[Loop]:
    """Wrap ``scheduler.step`` (signature kept: pipelines inspect it) to count updates, keep z_T and
    the last output, and optionally change the sample first (``noise(step, timestep, sample)``)."""
    assert "step" not in scheduler.__dict__, "the scheduler is already wrapped"
    step = scheduler.step

    @functools.wraps(step)
    def spied(model_output, timestep, sample=None, *args, **kwargs):
        if sample is None:
            sample = kwargs.pop("sample")
        if loop.z_T is None:
            loop.z_T = sample.clone()
        if noise is not None:
            sample = noise(loop.updates, timestep, sample)
        out = step(model_output, timestep, sample, *args, **kwargs)
        loop.final = (out[0] if isinstance(out, tuple) else out.prev_sample).clone()
        loop.updates += 1
        return out

    scheduler.step = spied
    try:
        yield loop
    finally:
        del scheduler.step


def _clone(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, torch.clone, tree)


@torch.no_grad()
def reference(
    pipe,
    call: Callable[[Any], Any],
    key_steps: Sequence[int],
    alpha: float = ALPHA,
    below: float = BELOW,
    encoder_blocks: int | None = None,
) -> Loop:
    """Run ``call(pipe)`` with encoder propagation and noise injection done by this file's hooks."""
    keys, loop, cache = set(key_steps), Loop(), {}
    limit = below * pipe.scheduler.config.num_train_timesteps

    def replay(name: str):
        def hook(module, args, output):
            if loop.updates in keys:
                cache[name] = _clone(output)
                return None
            return _clone(cache[name])

        return hook

    def inject(i: int, t, sample: torch.Tensor) -> torch.Tensor:
        if alpha and float(torch.as_tensor(t).reshape(-1)[0]) < limit:
            loop.injected.append(i)
            return sample + alpha * loop.z_T
        return sample

    modules = {**encoder_modules(pipe, encoder_blocks), **side_models(pipe)}
    handles = [m.register_forward_hook(replay(name)) for name, m in modules.items()]
    try:
        with scheduler_spy(pipe.scheduler, loop, inject):
            loop.output = call(pipe)
    finally:
        for h in handles:
            h.remove()
    return loop


@contextlib.contextmanager
def observe(pipe, encoder_blocks: int | None = None) -> Iterator[Loop]:
    """Watch one sampling loop: final latents, and the steps at which each encoder module (and
    ControlNet) computed. Enter before ``distfd.apply`` and leave after ``remove()``."""
    loop = Loop()
    modules = {**encoder_modules(pipe, encoder_blocks), **side_models(pipe)}

    def counting(name: str, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def counted(*args, **kwargs):
            loop.computed.setdefault(name, []).append(loop.updates)
            return forward(*args, **kwargs)

        return counted

    for name, m in modules.items():
        assert "forward" not in m.__dict__, f"{name} is already wrapped"
        m.forward = counting(name, m.forward)
    try:
        with scheduler_spy(pipe.scheduler, loop):
            yield loop
    finally:
        for m in modules.values():
            del m.forward


def check_against_reference(
    pipe,
    call: Callable[[Any], Any],
    key_steps: Sequence[int],
    encoder_blocks: int | None = None,
    rtol: float = 1e-4,
    modes: Sequence[str] = ("propagate", "parallel"),
) -> Loop:
    """distfd's final latents in each mode equal the reference's (noise injection on), and each
    encoder module and ControlNet computes exactly once at each key step and at no other step."""
    keys = sorted(key_steps)
    ref = reference(pipe, call, keys, encoder_blocks=encoder_blocks)
    assert ref.injected, "noise injection must fire (the test would be blind to it otherwise)"
    with observe(pipe, encoder_blocks) as plain:
        call(pipe)
    assert not torch.allclose(ref.final, plain.final, rtol=1e-3, atol=1e-3), "the reference changed nothing"
    assert all(steps == list(range(plain.updates)) for steps in plain.computed.values()), plain.computed
    config = dict(key_steps=keys, noise_alpha=ALPHA, noise_below=BELOW, encoder_blocks=encoder_blocks)
    for mode in modes:
        with observe(pipe, encoder_blocks) as seen:
            handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(mode=mode, **config))
            try:
                call(pipe)
            finally:
                handle.remove()
        assert seen.updates == ref.updates
        tiny.assert_close(seen.final, ref.final, rtol=rtol, msg=lambda m, mode=mode: f"{mode}: {m}")
        assert seen.computed == {name: keys for name in plain.computed}, f"{mode}: {seen.computed}"
    return ref
