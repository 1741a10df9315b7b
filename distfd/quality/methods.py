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
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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
    "[:nonoise] | deepcache-N"
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
    kind: str  # "vanilla" | "distfd" | "deepcache"
    mode: str | None = None
    keys: str | None = None
    noise: bool = True
    interval: int | None = None


def parse_method(name: str) -> Method:
    """A configuration from its name (see the module docstring); a clear error for anything else."""
    if name == "vanilla":
        return Method(name, "vanilla")
    if name.startswith("deepcache-"):
        interval = name.removeprefix("deepcache-")
        if not interval.isdigit() or int(interval) < 1:
            raise ValueError(f"bad configuration {name!r}: use deepcache-N with an integer N >= 1.")
        return Method(name, "deepcache", interval=int(interval))
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
def activated(pipe: Any, method: Method, key_steps: Sequence[int] | str | None = None) -> Iterator[Any]:
    """Switch ``method`` on for the duration of the block; yields the distfd handle (or ``None``).

    ``key_steps`` is the resolved key-step spec for distfd methods (the harness maps ``paper`` and
    ``auto`` to concrete sets).
    """
    if method.kind == "vanilla":
        yield None
    elif method.kind == "distfd":
        config = FasterDiffusionConfig(
            key_steps=key_steps if key_steps is not None else method.keys,
            mode=method.mode,
            noise_alpha=0.003 if method.noise else 0.0,
            rescale_key_steps=True,
        )
        with apply(pipe, config) as handle:
            yield handle
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
