"""Schedulers by name, built from a pipeline's own scheduler config (used by the CLI and the harness).

``flow-euler`` is the flow-matching Euler sampler of FLUX.1 and SD3 (``FlowMatchEulerDiscreteScheduler``,
keeping the model's shift and FLUX's resolution-dependent dynamic shift); it is the default for a
flow-matching model and the only name that can sample one (the others need a beta schedule).

``dpm`` means DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095) everywhere in distfd: the
solver diffusers and the paper's SD experiments use with 20 steps. ``dpm++`` is the same scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# name -> (diffusers class, extra config, description)
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM-Solver++ multistep"),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "same as dpm"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler ancestral"),
    "pndm": ("PNDMScheduler", {}, "PNDM (PLMS)"),
    "flow-euler": (
        "FlowMatchEulerDiscreteScheduler",
        {},
        "flow matching Euler (FLUX, SD3; the default for them)",
    ),
}
FLOW = frozenset({"flow-euler"})


def is_flow(config: Mapping[str, Any] | None) -> bool:
    """Whether a scheduler config is flow matching (sigmas from 1 to 0, no betas)."""
    if not config:
        return False
    return str(config.get("_class_name", "")).startswith("FlowMatch") or "base_image_seq_len" in config


def resolve(name: str | None, config: Mapping[str, Any] | None) -> str:
    """``name``, or where it is None the default for the model: flow-euler for flow matching, else ddim."""
    return name if name is not None else ("flow-euler" if is_flow(config) else "ddim")


def describe() -> str:
    """One line listing the names and what they mean (for --help)."""
    return ", ".join(f"{name}: {desc}" for name, (_, _, desc) in SCHEDULERS.items())


def _check(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}.")


def build(name: str, config: Mapping[str, Any]) -> Any:
    """A new scheduler called ``name`` from a scheduler ``config`` (keeps its betas and horizon)."""
    import diffusers

    _check(name)
    if is_flow(config) != (name in FLOW):
        kind = (
            "a flow-matching model (FLUX, SD3)" if is_flow(config) else "a model trained with a beta schedule"
        )
        fits = "flow-euler" if is_flow(config) else ", ".join(n for n in SCHEDULERS if n not in FLOW)
        raise ValueError(f"the {name} scheduler cannot sample {kind}; use {fits}.")
    cls_name, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(dict(config), **extra)


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe.scheduler`` for the scheduler called ``name``, keeping its betas and horizon."""
    pipe.scheduler = build(name, pipe.scheduler.config)


def _timesteps(name: str, config: Mapping[str, Any], steps: int) -> int:
    sched = build(name, config)
    # FLUX's dynamic shift takes mu from the image size; the count of steps does not depend on it.
    kw = {"mu": 0.0} if sched.config.get("use_dynamic_shifting") and name in FLOW else {}
    sched.set_timesteps(steps, **kw)
    return len(sched.timesteps)


def min_steps(name: str, config: Mapping[str, Any], upto: int = 20) -> int:
    """The fewest sampling steps the scheduler can run (PNDM with its Runge-Kutta warm-up needs 4)."""
    for steps in range(1, upto + 1):
        try:
            _timesteps(name, config, steps)
            return steps
        except (ValueError, IndexError):
            continue
    return upto


def loop_length(name: str, config: Mapping[str, Any], steps: int) -> int:
    """How many denoiser calls the sampling loop makes for ``steps`` (PNDM makes more); a step
    count the scheduler cannot run is a ValueError saying the smallest it can."""
    try:
        return _timesteps(name, config, steps)
    except (ValueError, IndexError) as e:
        raise ValueError(
            f"the {name} scheduler cannot run {steps} step(s) ({e}); use steps >= {min_steps(name, config)}."
        ) from e
