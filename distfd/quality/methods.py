"""Named sampling configurations for the quality harness, and how each is switched on and off.

Names:
    ``vanilla``                      the pipeline as is
    ``<mode>[:<keys>][:nonoise]``    distfd with ``mode`` in ``propagate`` / ``parallel``; ``keys`` is
                                     ``paper`` (default: the paper's set for the scheduler), ``auto``
                                     (calibrated on encoder drift, same budget as the paper's set
                                     unless given; ``auto-sigma``: sigma-weighted drift; ``auto-final``:
                                     the final-image objective), ``even-K`` (K key steps spread
                                     evenly), ``uniform-K`` (every K-th step), a preset name or a
                                     preset ``.json``; ``nonoise``
                                     turns prior noise injection off.
    ``deepcache-N``                  DeepCache (``DeepCacheSDHelper``), cache interval N, branch 0.
    ``taylorseer-N``                 diffusers' TaylorSeer cache (transformers), cache interval N.
    ``fbcache-T``                    diffusers' FirstBlockCache (transformers), threshold T.

The diffusers caches are applied with ``diffusers.hooks`` directly (SD3's transformer has no
``enable_cache``); the harness opens their cache context and resets their state at each loop's start.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..apply import apply
from ..config import MODES, FasterDiffusionConfig
from ..keysteps import KeySteps

DEFAULT_METHODS = (
    "vanilla",
    "propagate",
    "parallel",
    "propagate:nonoise",
    "parallel:nonoise",
    "propagate:uniform-2",
    "propagate:uniform-3",
    "propagate:uniform-5",
    "propagate:auto",
    "propagate:auto:nonoise",
    "propagate:auto-sigma",
    "deepcache-2",
    "deepcache-3",
    "deepcache-5",
)

GRAMMAR = (
    "vanilla | propagate|parallel[:paper|auto|auto-sigma|auto-final|even-K|uniform-K|<preset>|<file.json>]"
    "[:nonoise] | deepcache-N | taylorseer-N | fbcache-T"
)
# Calibrated key steps (distfd.calibrate): name -> (objective, drift weighting).
AUTO = {"auto": ("drift", "uniform"), "auto-sigma": ("drift", "sigma"), "auto-final": ("final", "uniform")}


def even_budget(keys: str) -> int | None:
    """``K`` of an ``even-K`` spec (K key steps spread evenly over the loop), else ``None``."""
    if not keys.startswith("even-"):
        return None
    k = keys.removeprefix("even-")
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"bad key steps {keys!r}: use even-K with an integer K >= 1.")
    return int(k)


class MethodUnavailable(RuntimeError):
    """A configuration cannot run here (e.g. DeepCache missing or incompatible); the reason is the message."""


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "vanilla" | "distfd" | "deepcache" | "taylorseer" | "fbcache"
    mode: str | None = None
    keys: str | None = None
    noise: bool = True
    interval: int | None = None
    threshold: float | None = None


def parse_method(name: str) -> Method:
    """A configuration from its name (see the module docstring); a clear error for anything else."""
    if name == "vanilla":
        return Method(name, "vanilla")
    if name.startswith("deepcache-"):
        interval = name.removeprefix("deepcache-")
        if not interval.isdigit() or int(interval) < 1:
            raise ValueError(f"bad configuration {name!r}: use deepcache-N with an integer N >= 1.")
        return Method(name, "deepcache", interval=int(interval))
    if name.startswith("taylorseer-"):
        interval = name.removeprefix("taylorseer-")
        if not interval.isdigit() or int(interval) < 1:
            raise ValueError(f"bad configuration {name!r}: use taylorseer-N with an integer N >= 1.")
        return Method(name, "taylorseer", interval=int(interval))
    if name.startswith("fbcache-"):
        try:
            threshold = float(name.removeprefix("fbcache-"))
        except ValueError:
            threshold = -1.0
        if not 0 < threshold < float("inf"):
            raise ValueError(f"bad configuration {name!r}: use fbcache-T with a threshold T > 0.")
        return Method(name, "fbcache", threshold=threshold)
    mode, *rest = name.split(":")
    if mode not in MODES or len(rest) > 2:
        raise ValueError(f"unknown configuration {name!r}; use {GRAMMAR}.")
    noise = True
    if rest and rest[-1] == "nonoise":
        noise, rest = False, rest[:-1]
    keys = rest[0] if rest else "paper"
    if keys not in ("paper", *AUTO):
        try:
            if even_budget(keys) is None:
                KeySteps.parse(keys)
        except ValueError as e:
            raise ValueError(f"bad configuration {name!r}: {e}") from e
    return Method(name, "distfd", mode=mode, keys=keys, noise=noise)


def parse_methods(names: Sequence[str]) -> list[Method]:
    methods = [parse_method(n) for n in names]
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"configurations listed twice: {dupes}.")
    return methods


def deepcache_helper(pipe: Any) -> Any:
    """A ``DeepCacheSDHelper`` for ``pipe``, or :class:`MethodUnavailable` saying why not."""
    if importlib.util.find_spec("DeepCache") is None:
        raise MethodUnavailable("the DeepCache package is not installed (pip install DeepCache==0.1.1).")
    try:
        from DeepCache import DeepCacheSDHelper
    except Exception as e:  # its import pulls diffusers internals that may have moved
        raise MethodUnavailable(
            f"DeepCache does not import with this diffusers: {type(e).__name__}: {e}"
        ) from e
    unet = getattr(pipe, "unet", None)
    if unet is None or not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise MethodUnavailable(f"DeepCacheSDHelper needs a UNet pipeline; {type(pipe).__name__} has none.")
    return DeepCacheSDHelper(pipe=pipe)


@contextlib.contextmanager
def diffusers_cache(pipe: Any, method: Method) -> Iterator[None]:
    """diffusers' own step cache (TaylorSeer, FirstBlockCache) on the pipeline's transformer for the
    block. The pipeline (SD3) sets no cache context, so a forward pre-hook opens one and resets the
    cache's state whenever a new sampling loop starts (the timestep goes up)."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        HookRegistry,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )
    from diffusers.models.cache_utils import CacheMixin

    model = getattr(pipe, "transformer", None)
    if model is None:
        raise MethodUnavailable(
            f"{method.name} needs a transformer pipeline; {type(pipe).__name__} has none."
        )
    if isinstance(model, CacheMixin):
        raise MethodUnavailable(
            f"{type(model).__name__} has enable_cache and its pipeline sets the cache context; "
            "this harness applies the hooks itself, for transformers without it (SD3)"
        )
    last = list(model.transformer_blocks)[-1]
    if method.kind == "fbcache" and getattr(last, "context_pre_only", False):
        raise MethodUnavailable(
            "FirstBlockCache (diffusers 0.42) subtracts the last block's text stream, which SD3's "
            "context-pre-only last joint block does not return (None): TypeError"
        )
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    if method.kind == "fbcache":
        hooks = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=method.threshold))
    else:
        hooks = (_TAYLORSEER_CACHE_HOOK,)
        apply_taylorseer_cache(
            model, TaylorSeerCacheConfig(cache_interval=method.interval, taylor_factors_dtype=torch.float32)
        )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    state: dict[str, Any] = {"t": None, "context": None}

    def on_call(_module, args, kwargs):
        t = float(kwargs["timestep"].flatten()[0])
        if state["t"] is None or t > state["t"]:  # a new sampling loop
            if state["context"] is not None:
                state["context"].__exit__(None, None, None)
            registry.reset_stateful_hooks()
            state["context"] = CacheMixin.cache_context(model, "cond_uncond")
            state["context"].__enter__()
        state["t"] = t

    handle = model.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        yield None
    finally:
        handle.remove()
        if state["context"] is not None:
            state["context"].__exit__(None, None, None)
        for name in hooks:
            registry.remove_hook(name, recurse=True)


@contextlib.contextmanager
def activated(
    pipe: Any,
    method: Method,
    key_steps: Sequence[int] | str | None = None,
    encoder_blocks: int | None = None,
) -> Iterator[Any]:
    """Switch ``method`` on for the duration of the block; yields the distfd handle (or ``None``).

    ``key_steps`` is the resolved key-step spec for distfd methods (the harness maps ``paper`` and
    ``auto`` to concrete sets); ``encoder_blocks`` their transformer split (None: the default).
    """
    if method.kind == "vanilla":
        yield None
    elif method.kind == "distfd":
        config = FasterDiffusionConfig(
            key_steps=key_steps if key_steps is not None else method.keys,
            mode=method.mode,
            noise_alpha=0.003 if method.noise else 0.0,
            rescale_key_steps=True,
            encoder_blocks=encoder_blocks,
        )
        with apply(pipe, config) as handle:
            yield handle
    elif method.kind in ("taylorseer", "fbcache"):
        with diffusers_cache(pipe, method):
            yield None
    else:
        helper = deepcache_helper(pipe)
        helper.set_params(cache_interval=method.interval, cache_branch_id=0)
        had_forward = {id(m) for m in pipe.unet.modules() if "forward" in m.__dict__}
        helper.enable()
        try:
            yield None
        finally:
            helper.disable()
            # DeepCache leaves its unwrapped forwards behind as instance attributes; drop them.
            for module in pipe.unet.modules():
                if id(module) not in had_forward:
                    module.__dict__.pop("forward", None)
