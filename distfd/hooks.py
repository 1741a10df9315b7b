"""Reversible hooks: the denoiser's forward, its encoder modules' forwards, a ControlNet's forward, and
the scheduler's methods.

Modules are wrapped through diffusers' ``HookRegistry``; ``remove`` leaves each module and the
scheduler exactly as they were (no instance attributes left behind).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .engine import Engine

HOOK_NAME = "distfd"


class EncoderModuleHook(ModelHook):
    """Records an encoder module's output at key steps and replays it at the others."""

    def __init__(self, engine: Engine, index: int) -> None:
        super().__init__()
        self.engine, self.index = engine, index

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.engine.module_forward(self.index, self.fn_ref.original_forward, args, kwargs)


class DenoiserHook(ModelHook):
    """Routes each denoiser call of the sampling loop through the engine.

    ``scheduler``: returns the pipeline's scheduler, hooked (a scheduler swapped in after ``apply`` is
    detected there, before the call, and gets the hooks moved onto it).
    """

    def __init__(self, engine: Engine, scheduler: Callable[[], Any]) -> None:
        super().__init__()
        self.engine, self.scheduler = engine, scheduler

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.engine.denoiser_forward(self.fn_ref.original_forward, args, kwargs, self.scheduler())


class ControlNetHook(ModelHook):
    """A ControlNet (or MultiControlNet) under encoder propagation: it runs at key steps only.

    A ControlNet is a trainable copy of the UNet encoder (the paper propagates "both encoders",
    Sec. 4.2). The pipeline calls it once per loop step, just before the UNet, and hands its residuals
    to the UNet call as arguments. At a key step this hook lets it compute and keeps the residuals; at
    the other steps of the same run it returns the kept ones without computing. The UNet's forward
    adds them after its (replayed) down and mid blocks, and in parallel decoding they are re-indexed by
    row with the call's other arguments, so every step of a key step's group sees that key step's
    residuals, scaled by that key step's ``controlnet_conditioning_scale`` (and
    ``control_guidance_start``/``end`` gate). Each rank runs the ControlNet itself at key steps (its
    inputs are the same on every rank).
    """

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


class ModuleHooks:
    """Installs hooks on modules and removes them without a trace."""

    def __init__(self) -> None:
        self._installed: list[tuple[nn.Module, bool, bool]] = []

    def add(self, module: nn.Module, hook: ModelHook) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self._installed.append((module, had_registry, had_forward))

    def remove(self) -> None:
        for module, had_registry, had_forward in reversed(self._installed):
            registry = module._diffusers_hook
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
                if not had_forward and "forward" in module.__dict__:
                    del module.forward
        self._installed.clear()


class SchedulerHooks:
    """Wraps a scheduler's ``set_timesteps`` (a new run) and ``step`` (noise injection, final sync)."""

    def __init__(self, scheduler: Any, engine: Engine) -> None:
        self.scheduler, self.engine = scheduler, engine
        self._saved = {name: scheduler.__dict__.get(name) for name in ("set_timesteps", "step")}
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        # functools.wraps keeps the signatures: pipelines inspect them to decide whether to pass
        # ``generator``/``eta`` to ``step`` and ``timesteps``/``sigmas`` to ``set_timesteps``.
        @functools.wraps(set_timesteps)
        def wrapped_set_timesteps(*args, **kwargs):
            engine.end_run()
            return set_timesteps(*args, **kwargs)

        @functools.wraps(step)
        def wrapped_step(model_output, timestep, sample=None, *args, **kwargs):
            if sample is None:
                sample = kwargs.pop("sample")
            sample = engine.before_update(sample)
            out = step(model_output, timestep, sample, *args, **kwargs)
            engine.after_update(out[0] if isinstance(out, tuple) else out.prev_sample)
            return out

        scheduler.set_timesteps = wrapped_set_timesteps
        scheduler.step = wrapped_step

    def remove(self) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                self.scheduler.__dict__.pop(name, None)
            else:
                setattr(self.scheduler, name, saved)
