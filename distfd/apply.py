"""``distfd.apply(pipe, config)``: FasterDiffusion on a stock diffusers pipeline, reversibly.

``apply`` installs everything (hooks on the encoder modules, the denoiser, a ControlNet, the
scheduler); the pipeline's own ``__call__`` then drives the engine. The one thing checked at each
denoiser call is whether the pipeline's scheduler was swapped since: if so the scheduler hooks move
onto the new one and any unfinished run is dropped, before the call is handled.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .adapters import find_adapter
from .config import FasterDiffusionConfig
from .engine import Engine
from .hooks import ControlNetHook, DenoiserHook, EncoderModuleHook, ModuleHooks, SchedulerHooks
from .runtime import DistContext

logger = logging.getLogger("distfd")

_ATTR = "_distfd_handle"  # where a pipeline keeps its handle while distfd is applied


class Handle:
    """What ``apply`` returns: statistics of the last run, and ``remove()``; also a context manager
    (``with distfd.apply(pipe, cfg): ...`` removes on leaving the block)."""

    def __init__(self, pipe: Any, engine: Engine, modules: ModuleHooks) -> None:
        self.pipe, self.engine, self._modules = pipe, engine, modules
        self._scheduler_hooks = SchedulerHooks(pipe.scheduler, engine)
        self.removed = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def config(self) -> FasterDiffusionConfig:
        return self.engine.config

    @property
    def context(self) -> DistContext:
        return self.engine.ctx

    def scheduler(self) -> Any:
        """The pipeline's scheduler, with the hooks on it (moved there if it was swapped since)."""
        if self.pipe.scheduler is not self._scheduler_hooks.scheduler:
            self._scheduler_hooks.remove()
            self._scheduler_hooks = SchedulerHooks(self.pipe.scheduler, self.engine)
            self.engine.end_run()
        return self.pipe.scheduler

    def stats(self) -> dict[str, Any]:
        """Counters of what ran (cumulative) and this rank's communication in the latest run."""
        return {**self.engine.counters.as_dict(), **self.engine.ctx.stats.as_dict()}

    def remove(self) -> None:
        """Restore the pipeline exactly as it was before ``apply``."""
        if self.removed:
            return
        self._modules.remove()
        self._scheduler_hooks.remove()
        self.pipe.__dict__.pop(_ATTR, None)
        self.engine.end_run()
        self.removed = True


def is_applied(pipe: Any) -> bool:
    """Whether distfd is applied to ``pipe`` (and not yet removed)."""
    return getattr(pipe, _ATTR, None) is not None


def handle_of(pipe: Any) -> Handle | None:
    """The handle of distfd on ``pipe``, if applied."""
    return getattr(pipe, _ATTR, None)


def _side_models(pipe: Any) -> list[nn.Module]:
    """Models the pipeline calls beside its denoiser in each loop step, propagated with it."""
    controlnet = getattr(pipe, "controlnet", None)
    return [controlnet] if isinstance(controlnet, nn.Module) else []  # ControlNetModel, MultiControlNetModel


def apply(
    pipe: Any, config: FasterDiffusionConfig | None = None, context: DistContext | None = None
) -> Handle:
    """Apply encoder propagation (and parallel decoding) to ``pipe`` (FasterDiffusion, Sec. 3.3).

    The pipeline's own ``__call__`` and its denoiser's ``forward`` keep running; hooks on the
    encoder modules cache their outputs at key steps and replay them elsewhere. With a
    :class:`DistContext` of several ranks (or inside an initialised process group), the decoder
    work is shared across the ranks. Undo with ``handle.remove()``, or use the handle in a ``with``.
    """
    if config is None:
        config = FasterDiffusionConfig()
    if not isinstance(config, FasterDiffusionConfig):
        raise TypeError(f"config must be a distfd.FasterDiffusionConfig; got {type(config).__name__}.")
    if is_applied(pipe):
        raise RuntimeError(
            "distfd is already applied to this pipeline; call handle.remove() before applying again."
        )
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError(
            f"{type(pipe).__name__} has no scheduler; distfd needs the pipeline's sampling loop."
        )
    adapter, model = find_adapter(pipe)
    adapter = adapter.configured(config)
    if context is None:
        context = DistContext.from_process_group(device=model.device)
    engine = Engine(model, adapter, config, context)
    modules = ModuleHooks()
    handle = Handle(pipe, engine, modules)
    for index, enc in enumerate(engine.modules):
        modules.add(enc.module, EncoderModuleHook(engine, index))
    modules.add(model, DenoiserHook(engine, handle.scheduler))
    for side in _side_models(pipe):
        modules.add(side, ControlNetHook(engine))
    pipe.__dict__[_ATTR] = handle
    return handle
