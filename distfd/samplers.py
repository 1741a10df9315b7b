"""Schedulers by name, built from a pipeline's own scheduler config (used by the CLI and the harness)."""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # DPM-Solver++ (multistep)
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe.scheduler`` for the scheduler called ``name``, keeping its betas and horizon."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}.")
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
