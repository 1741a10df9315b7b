"""Evaluate sampling configurations on the same prompts and seeds against the vanilla pipeline."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import call_defaults, find_adapter
from ..autokey import calibrate
from ..keysearch import PAPER_SETS, uniform_set
from ..keysteps import resolve_key_steps
from ..presets import PRESETS
from .evaluators import Evaluator
from .methods import AUTO, Method, MethodUnavailable, activated, even_budget, parse_method
from .metrics import mean_interval, psnr, ssim

logger = logging.getLogger("distfd")


@dataclass
class Setup:
    """What every configuration is run with.

    Args:
        prompts: One image per prompt; image ``i`` uses seed ``seed + i`` in every configuration.
        num_steps: ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Prompts per pipeline call.
        budget: Key steps for ``auto`` (default: as many as the paper's set).
        calibration_prompts: Prompts ``auto`` calibrates on (keep them apart from ``prompts``).
        call_kwargs: Further pipeline arguments (``height``, ``width``, ...).
        encoder_blocks: For transformers, the encoder's block count in every distfd configuration
            (None: the adapter's default).
    """

    prompts: list[str]
    num_steps: int
    seed: int = 0
    guidance_scale: float = 7.5
    batch_size: int = 16
    budget: int | None = None
    calibration_prompts: list[str] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder_blocks: int | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts to evaluate on.")
        if self.budget is not None and not 1 <= self.budget <= self.num_steps:
            raise ValueError(f"budget {self.budget} must be between 1 and the step count {self.num_steps}.")


@dataclass
class Row:
    """One configuration's results (means over the prompts).

    ``psnr_interval``: a 95% interval of the mean PSNR; ``differences``: per metric the evaluator gives
    per image (adherence, CLIP score), a 95% interval of the mean paired difference from vanilla (same
    prompts and seeds), both by :func:`~.metrics.mean_interval`.
    """

    name: str
    key_steps: list[int] | None = None
    flops_speedup: float | None = None
    seconds_per_image: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    psnr_interval: list[float] | None = None
    differences: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None


def paper_key_steps(pipe: Any, num_steps: int) -> str:
    """The paper's preset for the pipeline's scheduler and step count (DDIM-50 rescaled otherwise)."""
    name = PAPER_SETS.get((type(pipe.scheduler).__name__, num_steps))
    if name is None:
        logger.info(
            "no paper key-step set for %s with %d steps; rescaling sd-ddim-50",
            type(pipe.scheduler).__name__,
            num_steps,
        )
        name = "sd-ddim-50"
    return name


def _call(pipe: Any, setup: Setup, prompts: Sequence[str], seeds: Sequence[int], **kw) -> Any:
    return pipe(
        prompt=list(prompts),
        num_inference_steps=setup.num_steps,
        guidance_scale=setup.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **{**call_defaults(pipe), **setup.call_kwargs, **kw},
    )


def generate(pipe: Any, setup: Setup) -> tuple[torch.Tensor, float]:
    """All prompts' images ``(n, 3, H, W)`` in ``[0, 1]`` and the wall seconds per image."""
    out, start = [], time.perf_counter()
    for i in range(0, len(setup.prompts), setup.batch_size):
        prompts = setup.prompts[i : i + setup.batch_size]
        seeds = range(setup.seed + i, setup.seed + i + len(prompts))
        out.append(_call(pipe, setup, prompts, seeds, output_type="pt").images.float().cpu())
    return torch.cat(out), (time.perf_counter() - start) / len(setup.prompts)


def denoiser_flops(pipe: Any, setup: Setup) -> float:
    """FLOPs the denoiser spends on one prompt's sampling loop (measured, so DeepCache counts too)."""
    with FlopCounterMode(display=False) as counter:
        _call(pipe, setup, setup.prompts[:1], [setup.seed], output_type="latent")
    _, model = find_adapter(pipe)
    return float(sum(counter.get_flop_counts().get(type(model).__name__, {}).values()))


def resolve_keys(pipe: Any, method: Method, setup: Setup, cache: dict[str, Any]) -> Any:
    """Concrete key steps for a distfd method: ``paper`` -> preset, ``even-K`` -> K evenly spread steps,
    ``auto*`` -> one calibration each."""
    if method.kind != "distfd":
        return None
    paper = paper_key_steps(pipe, setup.num_steps)
    if method.keys == "paper":
        return paper
    k = even_budget(method.keys)
    if k is not None:
        if k > setup.num_steps:
            raise ValueError(f"{method.name}: {k} key steps exceed the {setup.num_steps} steps.")
        return list(uniform_set(setup.num_steps, k))
    if method.keys not in AUTO:
        return method.keys
    if method.keys not in cache:
        budget = setup.budget or len(_expand(paper, setup.num_steps))
        prompts = setup.calibration_prompts or setup.prompts[:4]
        objective, weighting = AUTO[method.keys]
        result = calibrate(
            pipe,
            setup.num_steps,
            budget=budget,
            prompts=prompts,
            seed=setup.seed + 100_000,
            weighting=weighting,
            objective=objective,
            guidance_scale=setup.guidance_scale,
            **setup.call_kwargs,
        )
        cache[method.keys] = result
    return cache[method.keys].key_steps


def _expand(spec: Any, num_steps: int) -> list[int]:
    if isinstance(spec, str) and spec in PRESETS:
        return list(resolve_key_steps(spec, num_steps, allow_rescale=True))
    return list(resolve_key_steps(spec, num_steps))


def _mean(values: torch.Tensor) -> float:
    vals = values.tolist()
    return math.inf if all(math.isinf(v) for v in vals) else statistics.fmean(vals)


def evaluate(
    pipe: Any, names: Sequence[str], setup: Setup, evaluator: Evaluator | None = None
) -> tuple[list[Row], dict[str, torch.Tensor], dict[str, Any]]:
    """Run every configuration; returns the rows, each configuration's images, and extras
    (the calibrations under ``"calibrations"``, by key name). ``vanilla`` always runs first."""
    methods = [parse_method(n) for n in names]
    if not any(m.kind == "vanilla" for m in methods):
        methods.insert(0, parse_method("vanilla"))
    methods.sort(key=lambda m: m.kind != "vanilla")
    cache: dict[str, Any] = {}
    rows, images = [], {}
    vanilla_flops = reference = None
    per_image = getattr(evaluator, "per_image", None)
    reference_values: dict[str, torch.Tensor] = {}
    for method in methods:
        row = Row(method.name)
        try:
            keys = resolve_keys(pipe, method, setup, cache)
            with activated(pipe, method, keys, setup.encoder_blocks):
                flops = denoiser_flops(pipe, setup)
                imgs, row.seconds_per_image = generate(pipe, setup)
        except MethodUnavailable as e:
            row.skipped = str(e)
            logger.warning("skipping %s: %s", method.name, e)
            rows.append(row)
            continue
        if keys is not None:
            row.key_steps = _expand(keys, setup.num_steps)
        if reference is None:
            reference, vanilla_flops = imgs, flops
        row.flops_speedup = vanilla_flops / flops
        each_psnr = psnr(imgs, reference)
        row.psnr, row.ssim = _mean(each_psnr), _mean(ssim(imgs, reference))
        if bool(torch.isfinite(each_psnr).all()) and len(each_psnr) > 1:
            row.psnr_interval = list(mean_interval(each_psnr))
        if per_image is not None:
            values = per_image(imgs, setup.prompts)
            row.metrics = evaluator.score(imgs, setup.prompts, values)
            if imgs is reference:
                reference_values = values
            elif len(imgs) > 1:
                row.differences = {k: list(mean_interval(v - reference_values[k])) for k, v in values.items()}
        elif evaluator is not None:
            row.metrics = evaluator.score(imgs, setup.prompts)
        logger.info("%s: %s", method.name, {k: v for k, v in vars(row).items() if k != "name"})
        rows.append(row)
        images[method.name] = imgs
    return rows, images, {"calibrations": cache}
