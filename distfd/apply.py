"""``distfd.apply(pipe, config)``: FasterDiffusion on a stock diffusers pipeline, reversibly."""

from __future__ import annotations

import logging
from typing import Any

from .adapters import find_adapter
from .adapters.controlnet import side_hooks
from .compiling import Denoiser, unwrap
from .config import FasterDiffusionConfig
from .engine import Engine
from .hooks import DenoiserHook, EncoderModuleHook, ModuleHooks, SchedulerHooks
from .passes import CompiledPasses
from .runtime import DistContext
from .schedule import check_spec

logger = logging.getLogger("distfd")

_ATTR = "_distfd_handle"


class Handle:
    """What ``apply`` returns: statistics of the last run, and ``remove()``."""

    def __init__(self, pipe: Any, engine: Engine, modules: ModuleHooks, denoiser: Denoiser) -> None:
        self.pipe, self.engine, self._modules, self.denoiser = pipe, engine, modules, denoiser
        self._scheduler_hooks = SchedulerHooks(pipe.scheduler, engine)
        engine.get_scheduler = self._scheduler
        self.removed = False

    @property
    def config(self) -> FasterDiffusionConfig:
        return self.engine.config

    @property
    def context(self) -> DistContext:
        return self.engine.ctx

    def _scheduler(self):
        # A scheduler swapped in after apply() gets the hooks moved onto it.
        if self.pipe.scheduler is not self._scheduler_hooks.scheduler:
            self._scheduler_hooks.remove()
            self._scheduler_hooks = SchedulerHooks(self.pipe.scheduler, self.engine)
            self.engine.new_run()
        return self.pipe.scheduler

    def stats(self) -> dict[str, Any]:
        """Counters of what ran (cumulative) and this rank's communication in the latest run."""
        return {**self.engine.counters.as_dict(), **self.engine.ctx.stats.as_dict()}

    def remove(self) -> None:
        """Restore the pipeline exactly as it was before ``apply``."""
        if self.removed:
            return
        self._modules.remove()
        self.denoiser.restore()
        self._scheduler_hooks.remove()
        self.pipe.__dict__.pop(_ATTR, None)
        self.engine._end_run()
        self.removed = True


def apply(
    pipe: Any, config: FasterDiffusionConfig | None = None, context: DistContext | None = None
) -> Handle:
    """Apply encoder propagation (and parallel decoding) to ``pipe`` (FasterDiffusion, Sec. 3.3).

    The pipeline's own ``__call__`` and its denoiser's ``forward`` keep running; hooks on the
    encoder modules cache their outputs at key steps and replay them elsewhere. With a
    :class:`DistContext` of several ranks (or inside an initialised process group), the decoder
    work is shared across the ranks. Undo with ``handle.remove()``.
    """
    if config is None:
        config = FasterDiffusionConfig()
    if not isinstance(config, FasterDiffusionConfig):
        raise TypeError(f"config must be a distfd.FasterDiffusionConfig; got {type(config).__name__}.")
    if getattr(pipe, _ATTR, None) is not None:
        raise RuntimeError(
            "distfd is already applied to this pipeline; call handle.remove() before applying again."
        )
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError(
            f"{type(pipe).__name__} has no scheduler; distfd needs the pipeline's sampling loop."
        )
    check_spec(config.key_steps)
    adapter, model = find_adapter(pipe)
    adapter = adapter.configured(config)
    denoiser = unwrap(getattr(pipe, adapter.denoiser_attr))
    if context is None:
        context = DistContext.from_process_group(device=model.device)
    # A compiled denoiser: the pipeline's call stays eager (distfd's bookkeeping), the encoder and
    # decoder passes are compiled separately with the user's options (passes.py).
    passes = None
    if denoiser.compiled:
        passes = CompiledPasses(denoiser.context, clone_outputs=model.device.type == "cuda")
    engine = Engine(model, adapter, config, context, get_scheduler=lambda: pipe.scheduler, passes=passes)
    modules = ModuleHooks()
    for index, enc in enumerate(engine.modules):
        modules.add(enc.module, EncoderModuleHook(engine, index))
    inner_forward = model.forward if denoiser.outer is not model else None
    modules.add(denoiser.outer, DenoiserHook(engine, inner_forward))
    for module, hook in side_hooks(pipe, engine):
        modules.add(module, hook)
    denoiser.suspend()
    handle = Handle(pipe, engine, modules, denoiser)
    pipe.__dict__[_ATTR] = handle
    return handle
