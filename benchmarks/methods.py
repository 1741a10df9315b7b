"""The methods under comparison: vanilla diffusers, distfd (propagate / parallel), DeepCache, and
the compiled ones (``torch.compile`` of the denoiser, with and without CUDA graphs).

Each method is installed on the pipeline with ``setup`` and removed with the returned
``Installed.remove``; a method that cannot run raises ``Skip`` with the reason recorded. A compiled
method is installed once, on its own copy of the denoiser (``Installed.bench``), and stays installed
for the whole benchmark: re-installing hooks on a compiled model would invalidate dynamo's guards
and recompile, which is not what a user who keeps a compiled pipeline pays per image.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .models import Bench, build

log = logging.getLogger(__name__)

METHODS = ("vanilla", "distfd-propagate", "distfd-parallel", "deepcache")
# name -> (distfd mode or None for vanilla, torch.compile mode, dynamic or None for --compile-dynamic);
# "-cg": CUDA graphs ("reduce-overhead"); "-dynamic": dynamic=True (distfd: one decoder graph for every
# group size instead of one per size: fewer compiles).
COMPILED = {
    "vanilla-compiled": (None, None, None),
    "distfd-parallel-compiled": ("parallel", None, None),
    "vanilla-compiled-cg": (None, "reduce-overhead", None),
    "distfd-parallel-compiled-cg": ("parallel", "reduce-overhead", None),
    "distfd-parallel-compiled-cg-dynamic": ("parallel", "reduce-overhead", True),
}
ALL_METHODS = METHODS + tuple(COMPILED)


class Skip(Exception):
    """The method cannot run in this configuration; the message is recorded as the reason."""


@dataclass
class Installed:
    remove: Callable[[], None] = lambda: None
    stats: Callable[[], dict[str, Any]] = dict
    info: dict[str, Any] = field(default_factory=dict)
    bench: Bench | None = None  # the pipeline variant to call, when not the shared one
    persistent: bool = False  # installed once for the whole benchmark


def variant(bench: Bench) -> Bench:
    """The same pipeline with its own copy of the denoiser and of the scheduler (other parts shared)."""
    pipe = bench.pipe
    attr = "transformer" if bench.arch == "dit" else "unet"
    components = dict(pipe.components)
    components[attr] = copy.deepcopy(components[attr])
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    new = type(pipe)(**components)
    new.set_progress_bar_config(disable=True)
    return dataclasses.replace(bench, pipe=new)


def setup_compiled(name: str, bench: Bench, opts: dict[str, Any]) -> Installed:
    """torch.compile a copy of the denoiser (the user's way), then apply distfd for distfd methods."""
    distfd_mode, mode, dynamic = COMPILED[name]
    backend = opts.get("compile_backend", "inductor")
    if mode == "reduce-overhead" and (bench.pipe.device.type != "cuda" or backend != "inductor"):
        raise Skip("CUDA graphs (mode='reduce-overhead') need inductor on a CUDA device")
    if distfd_mode is not None:
        reason = _distfd_supports(bench)
        if reason:
            raise Skip(reason)
    var = variant(bench)
    attr = "transformer" if bench.arch == "dit" else "unet"
    options: dict[str, Any] = {
        "backend": backend,
        "dynamic": opts.get("compile_dynamic") if dynamic is None else dynamic,
    }
    if backend == "inductor" and mode is not None:
        options["mode"] = mode
    setattr(var.pipe, attr, torch.compile(getattr(var.pipe, attr), **options))
    info = {"compile": {k: v for k, v in options.items()}, "own_denoiser_copy": True}
    if distfd_mode is None:
        return Installed(info=info, bench=var, persistent=True)
    inst = setup_distfd(var, distfd_mode, opts["key_steps"], opts["noise_alpha"], opts.get("context"))
    return Installed(
        remove=inst.remove, stats=inst.stats, info={**inst.info, **info}, bench=var, persistent=True
    )


def _distfd_supports(bench: Bench) -> str | None:
    """None if distfd can be applied to this pipeline, else the reason it cannot."""
    try:
        import distfd
    except ImportError as e:
        return f"distfd not importable: {e}"
    if not hasattr(distfd, "apply"):
        return "distfd.apply not available in this distfd version (core library not landed)"
    name = type(getattr(bench.denoiser, "_orig_mod", bench.denoiser)).__name__  # through torch.compile
    supported = distfd.supported() if hasattr(distfd, "supported") else {}
    if name not in supported:
        return f"distfd {getattr(distfd, '__version__', '?')} does not support {name} (supported: {sorted(supported)})"
    if type(bench.pipe).__name__ not in supported[name]:
        return f"distfd does not support {type(bench.pipe).__name__} (supported: {supported[name]})"
    return None


def setup_distfd(
    bench: Bench, mode: str, key_steps: str | list[int], noise_alpha: float, context: Any = None
) -> Installed:
    reason = _distfd_supports(bench)
    if reason:
        raise Skip(reason)
    import distfd

    cfg = distfd.FasterDiffusionConfig(key_steps=key_steps, mode=mode, noise_alpha=noise_alpha)
    handle = (
        distfd.apply(bench.pipe, cfg, context=context)
        if context is not None
        else distfd.apply(bench.pipe, cfg)
    )
    stats = getattr(handle, "stats", dict)
    return Installed(
        remove=handle.remove,
        stats=stats,
        info={"key_steps": key_steps, "mode": mode, "noise_alpha": noise_alpha},
    )


def _final_latents(bench: Bench, steps: int, seed: int) -> torch.Tensor:
    return bench.run("deepcache compatibility check", steps, seed, output_type="latent").images


@functools.cache
def deepcache_compat_check(arch: str, scheduler: str) -> str | None:
    """Check DeepCacheSDHelper against this diffusers on a tiny pipeline of the same family.

    Returns None when it works, else the reason. Works means: interval 1 reproduces vanilla exactly,
    interval 3 runs, changes the output and computes fewer up-block forwards, and ``disable``
    restores vanilla output.
    """
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as e:
        return f"DeepCache not importable: {e}"
    bench = build(arch, "tiny", scheduler, "cpu", torch.float32)
    steps = 6
    ref = _final_latents(bench, steps, 0)
    helper = DeepCacheSDHelper(pipe=bench.pipe)
    calls = {"n": 0}
    # up_blocks[0] is the deepest up block: DeepCache (branch 0) skips it on non-cache steps.
    probe = bench.pipe.unet.up_blocks[0].resnets[0]
    hook = probe.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        for interval in (1, 3):
            helper.set_params(cache_interval=interval, cache_branch_id=0)
            helper.enable()
            calls["n"] = 0
            out = _final_latents(bench, steps, 0)
            helper.disable()
            if interval == 1 and not torch.equal(out, ref):
                return "DeepCache with cache_interval=1 does not reproduce vanilla output"
            if interval == 3 and (torch.equal(out, ref) or calls["n"] != 2):
                return (
                    f"DeepCache with cache_interval=3 ran the deep up block {calls['n']} times "
                    f"in {steps} steps (expected 2) or did not change the output"
                )
        if not torch.equal(_final_latents(bench, steps, 0), ref):
            return "DeepCache.disable() did not restore vanilla output"
    except Exception as e:  # noqa: BLE001 - record exactly why it fails with this diffusers
        return f"DeepCache failed with diffusers: {type(e).__name__}: {e}"
    finally:
        hook.remove()
    return None


def setup_deepcache(bench: Bench, scheduler: str, interval: int, branch: int) -> Installed:
    if bench.arch == "dit":
        raise Skip("DeepCacheSDHelper only supports UNet pipelines (no DiT)")
    reason = deepcache_compat_check(bench.arch, scheduler)
    if reason:
        raise Skip(reason)
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=bench.pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return Installed(
        remove=helper.disable,
        info={
            "cache_interval": interval,
            "cache_branch_id": branch,
            "compat_check": "passed (tiny pipeline, same family)",
        },
    )


def setup(name: str, bench: Bench, opts: dict[str, Any]) -> Installed:
    if name == "vanilla":
        return Installed()
    if name in ("distfd-propagate", "distfd-parallel"):
        return setup_distfd(
            bench, name.split("-", 1)[1], opts["key_steps"], opts["noise_alpha"], opts.get("context")
        )
    if name == "deepcache":
        return setup_deepcache(bench, opts["scheduler"], opts["deepcache_interval"], opts["deepcache_branch"])
    if name in COMPILED:
        return setup_compiled(name, bench, opts)
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def image_diff(a: Any, b: Any) -> float:
    """Mean absolute difference of two PIL images in [0, 255] units."""
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())
