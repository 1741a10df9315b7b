"""ControlNet (and MultiControlNet) under encoder propagation: it runs at key steps only.

A ControlNet is a trainable copy of the UNet encoder (the paper propagates "both encoders",
Sec. 4.2). The pipeline calls it once per loop step, just before the UNet, and hands its residuals to
the UNet call as arguments. At a key step the hook lets it compute and keeps the residuals; at the
other steps of the same run it returns the kept ones without computing. The UNet's forward adds them
after its (replayed) down and mid blocks, and in parallel decoding they are re-indexed by row with
the call's other arguments, so every step of a key step's group sees that key step's residuals,
scaled by that key step's ``controlnet_conditioning_scale`` (and ``control_guidance_start``/``end``
gate). Each rank runs the ControlNet itself at key steps (its inputs are the same on every rank).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers.hooks import ModelHook
from torch import nn

from ..engine import Engine


class ControlNetHook(ModelHook):
    """Computes the wrapped ControlNet at key steps; returns the key step's output at the others."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.reset_state(None)

    def reset_state(self, module: nn.Module | None):
        self.cache: Any = None
        self.cache_key: tuple[int, bool] | None = None  # (run number, return_dict) it was computed for
        self.computed = 0  # ControlNet forwards actually run
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        original = self.fn_ref.original_forward
        call = inspect.signature(original).bind(*args, **kwargs).arguments
        run, key = self.engine.upcoming_call(call["timestep"])
        wanted = (run, bool(call.get("return_dict", True)))
        if key or self.cache_key != wanted:
            self.cache, self.cache_key = original(*args, **kwargs), wanted
            self.computed += 1
        return self.cache


def side_hooks(pipe: Any, engine: Engine) -> list[tuple[nn.Module, ModelHook]]:
    """Hooks for the models a pipeline calls beside its denoiser in each loop step."""
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, nn.Module):  # ControlNetModel or MultiControlNetModel
        return [(controlnet, ControlNetHook(engine))]
    return []
