"""Where the harness gets its pipeline, prompts and evaluator: the embedded shapes model or a path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .. import samplers
from .evaluators import ClipFidEvaluator, SceneEvaluator

logger = logging.getLogger("distfd")

# The harness's names -> distfd.samplers names ("dpm" here is DPM-Solver++ multistep; flow-euler is
# for flow-matching models).
SCHEDULERS = {"ddim": "ddim", "dpm": "dpm++", "flow-euler": "flow-euler"}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap in ``ddim``, ``dpm`` (DPM-Solver++ multistep) or ``flow-euler``, built from the pipeline's
    own config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}.")
    samplers.set_scheduler(pipe, SCHEDULERS[name])


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """One prompt per line (e.g. MS-COCO captions); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompts file {p} does not exist.")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompts (one per line).")
    return prompts[:limit]


def load_path_pipeline(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline saved at ``path`` (local files only)."""
    from diffusers import DiffusionPipeline

    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise ValueError(f"{p} is not a diffusers pipeline directory (no model_index.json).")
    pipe = DiffusionPipeline.from_pretrained(p, dtype=dtype, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def path_evaluator(
    clip_model: str | None, reference_images: str | None, inception: str | None
) -> ClipFidEvaluator | None:
    """CLIP score and/or FID as asked; with neither asked, only PSNR/SSIM against vanilla are computed."""
    if clip_model is None and reference_images is None:
        logger.warning("no --clip-model or --reference-images: computing PSNR/SSIM against vanilla only")
        return None
    return ClipFidEvaluator(clip_model, reference_images, inception)


# The embedded shapes model (distfd.embedded); imported only when used.


def load_embedded_pipeline(name: str = "embedded") -> Any:
    """The embedded model ``name`` (``embedded``: tiny-shapes, ``embedded-mmdit``), in float32."""
    from diffusers import DiffusionPipeline

    from ..embedded import MODELS, model_path

    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; use one of {', '.join(MODELS)}.")
    pipe = DiffusionPipeline.from_pretrained(model_path(name), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embedded_prompts(n: int, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``n`` single-shape scene captions and their requested attributes."""
    from ..embedded.scenes import sample_captions

    return sample_captions(n, seed)


def embedded_real_images(n: int, seed: int) -> torch.Tensor:
    """The rendered scenes of ``embedded_prompts(n, seed)`` (same captions), ``(n, 3, 32, 32)`` in ``[0, 1]``."""
    from ..embedded.scenes import generate_scenes

    return (generate_scenes(n, seed).as_float() + 1) / 2


def embedded_evaluator(labels: dict[str, torch.Tensor], reference_count: int, seed: int) -> SceneEvaluator:
    """The judge, with features of ``reference_count`` real rendered scenes as the FD reference."""
    from ..embedded import load_judge
    from ..embedded.scenes import generate_scenes

    judge = load_judge()
    real = generate_scenes(reference_count, seed)
    return SceneEvaluator(judge, labels, judge.features(real.as_float()))
