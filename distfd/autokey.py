"""Automatic key steps: calibrate on one vanilla run, then pick the key steps that minimise drift.

The paper chose its key steps by hand from the curves of Fig. 2a (Sec. 3.3, Supp. C). Here a
vanilla run records the encoder's outputs (the tensors distfd replays: conv_in, every down block,
the mid block) at every step; ``drift[k, j]`` is how far step ``j``'s encoder output is from step
``k``'s, i.e. the error of replaying key step ``k`` at step ``j``. Dynamic programming then picks
the ``K`` key steps (0 always among them) with the least total drift over all non-key steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .adapters import find_adapter
from .apply import is_applied
from .keysteps import save_preset_file
from .validate import positive_int

logger = logging.getLogger("distfd")

WEIGHTINGS = ("uniform", "sigma")


@dataclass(frozen=True)
class Calibration:
    """The result of :func:`calibrate`.

    Args:
        num_steps: The ``num_inference_steps`` calibrated for.
        key_steps: The chosen loop indices (sorted, starting with 0).
        drift: ``(L, L)`` relative encoder drift; ``drift[k, j]`` for ``k < j`` is the mean over encoder
            modules of ``|f_j - f_k|^2 / |f_j|^2`` (0 on and below the diagonal).
        cost: Total drift of the chosen key steps (the minimised objective).
        encoder_fraction: Share of one denoiser call's FLOPs spent in the encoder modules.
        weights: Per-step weights of the objective (``None``: uniform).
    """

    num_steps: int
    key_steps: tuple[int, ...]
    drift: torch.Tensor
    cost: float
    encoder_fraction: float
    weights: torch.Tensor | None = None

    @property
    def loop_length(self) -> int:
        return self.drift.shape[0]

    @property
    def predicted_speedup(self) -> float:
        """Denoiser FLOPs of the vanilla loop over those with these key steps (see ``budget_for_speedup``)."""
        return speedup_for_budget(self.loop_length, self.encoder_fraction, len(self.key_steps))

    def save(self, path: str | Path) -> Path:
        """Write a preset JSON that ``FasterDiffusionConfig(key_steps=path)`` accepts."""
        return save_preset_file(
            path,
            self.num_steps,
            self.key_steps,
            source="distfd.calibrate",
            cost=round(self.cost, 6),
            encoder_fraction=round(self.encoder_fraction, 6),
        )


def segment_costs(drift: torch.Tensor) -> torch.Tensor:
    """``seg[k, e]``: drift of the non-key steps ``k+1 .. e-1`` served by key step ``k`` (``e`` up to L)."""
    n = drift.shape[0]
    d = torch.triu(drift.double(), diagonal=1)  # only j > k counts
    seg = torch.zeros(n, n + 1, dtype=torch.float64)
    seg[:, 1:] = d.cumsum(1)  # seg[k, e] = sum_{j < e} d[k, j] = sum_{k < j < e} d[k, j]
    return seg  # (n, n + 1), meaningful for e > k


def select_key_steps(
    drift: torch.Tensor, budget: int, weights: torch.Tensor | None = None
) -> tuple[tuple[int, ...], float]:
    """Exactly ``budget`` key steps, 0 included, minimising ``sum_j w_j drift[k(j), j]`` over the non-key
    steps ``j`` (``k(j)``: the last key step before ``j``), by DP over segments in O(K L^2).

    Deterministic: ties go to the smaller index. Returns the key steps and their total (weighted) drift.
    """
    n = drift.shape[0]
    if drift.dim() != 2 or drift.shape[1] != n:
        raise ValueError(f"drift must be a square (L, L) matrix; got {tuple(drift.shape)}.")
    if weights is not None:
        if weights.shape != (n,) or bool((weights < 0).any()):
            raise ValueError(f"weights must be {n} non-negative numbers; got shape {tuple(weights.shape)}.")
        drift = drift * weights.to(drift.dtype)[None, :]
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int between 1 and the loop length {n}; got {budget!r}.")
    seg = segment_costs(drift).tolist()
    inf = float("inf")
    # best[c][i]: least drift of steps 0..i-1 with c key steps, the last of them at i.
    best = [[inf] * n for _ in range(budget + 1)]
    back = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = 0.0
    for c in range(2, budget + 1):
        for i in range(c - 1, n):
            for p in range(c - 2, i):
                v = best[c - 1][p] + seg[p][i]
                if v < best[c][i]:
                    best[c][i], back[c][i] = v, p
    total, last = inf, -1
    for i in range(budget - 1, n):
        v = best[budget][i] + seg[i][n]
        if v < total:
            total, last = v, i
    keys, c = [], budget
    while last >= 0:
        keys.append(last)
        last, c = back[c][last], c - 1
    return tuple(sorted(keys)), float(total)


def speedup_for_budget(loop_length: int, encoder_fraction: float, budget: int) -> float:
    """Denoiser-FLOP speed-up of ``budget`` key steps: ``L / (L (1 - e) + K e)``."""
    return loop_length / (loop_length * (1 - encoder_fraction) + budget * encoder_fraction)


def budget_for_speedup(loop_length: int, encoder_fraction: float, speedup: float) -> int:
    """The most key steps ``K`` that still reach ``speedup``.

    A vanilla loop costs ``L`` denoiser calls; with ``K`` key steps it costs ``L (1 - e) + K e``, ``e``
    being the encoder's share of a call's FLOPs (the decoder, time embedding and output layers run at
    every step). So ``K = floor(L (1/S - (1 - e)) / e)``, at least 1.
    """
    if not speedup >= 1.0:
        raise ValueError(f"target_speedup must be >= 1; got {speedup}.")
    if not 0.0 < encoder_fraction < 1.0:
        raise ValueError(f"encoder_fraction must be in (0, 1); got {encoder_fraction}.")
    best = speedup_for_budget(loop_length, encoder_fraction, 1)
    k = int(loop_length * (1.0 / speedup - (1.0 - encoder_fraction)) / encoder_fraction + 1e-9)
    if k < 1:
        raise ValueError(
            f"target_speedup {speedup} is out of reach: with the encoder at {encoder_fraction:.1%} of the "
            f"denoiser's FLOPs, {loop_length} steps allow at most {best:.2f}x (one key step)."
        )
    return min(k, loop_length)


def sigma_weights(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor | None:
    """How far each step moves along the probability-flow ODE: ``w_j = sigma_j - sigma_{j+1}`` with
    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` and ``sigma = 0`` after the last step, normalised to mean 1.

    In ``x / sqrt(abar)`` coordinates a DDIM / DPM-Solver step adds ``(sigma_{j+1} - sigma_j) * eps``, so a
    noise-prediction error at step ``j`` reaches the sample scaled by ``w_j``. ``None`` for schedulers
    without ``alphas_cumprod`` (e.g. flow matching).
    """
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        return None
    t = timesteps.long().clamp(0, len(abar) - 1)
    sigma = ((1 - abar[t]) / abar[t]).sqrt().double()  # (L,)
    w = (sigma - torch.cat([sigma[1:], sigma.new_zeros(1)])).clamp(min=0)
    return w * (len(w) / w.sum()) if w.sum() > 0 else None


def _relative_drift(features: list[list[torch.Tensor]]) -> torch.Tensor:
    """``features[step][module]`` (flattened encoder outputs) -> ``(L, L)`` relative drift."""
    n, m = len(features), len(features[0])
    drift = torch.zeros(n, n, dtype=torch.float64)
    for mod in range(m):
        f = torch.stack([features[s][mod] for s in range(n)]).double()  # (L, D)
        sq = f.pow(2).sum(1)  # (L,)
        dist = (sq[:, None] + sq[None, :] - 2 * f @ f.T).clamp(min=0)  # (L, L) |f_k - f_j|^2
        drift += dist / sq.clamp(min=1e-30)[None, :]
    return torch.triu(drift / m, diagonal=1)


def record_encoder_drift(
    pipe: Any, num_inference_steps: int, prompts: Sequence[str], seed: int, **call_kwargs
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Run the vanilla pipeline once; return the ``(L, L)`` encoder drift, the encoder FLOP share and the
    loop's timesteps."""
    if is_applied(pipe):
        raise RuntimeError("calibrate() needs the vanilla pipeline; call handle.remove() first.")
    adapter, model = find_adapter(pipe)
    modules = adapter.encoder_modules(model)
    steps: list[list[torch.Tensor]] = []

    def on_call(module, args, kwargs):
        steps.append([])

    def on_output(index: int):
        def hook(module, args, output):
            leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
            steps[-1].append(torch.cat([x.detach().float().reshape(-1).cpu() for x in leaves]))

        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [m.module.register_forward_hook(on_output(i)) for i, m in enumerate(modules)]
    generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    try:
        with FlopCounterMode(display=False) as counter:
            pipe(
                prompt=list(prompts),
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="latent",
                **call_kwargs,
            )
    finally:
        for h in handles:
            h.remove()
    if len(steps) < 1 or any(len(s) != len(modules) for s in steps):
        raise RuntimeError("calibrate(): the denoiser's encoder modules did not run once per step.")
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    names = {id(mod): name for name, mod in model.named_modules()}
    enc = sum(counts.get(f"{root}.{names[id(m.module)]}", 0) for m in modules)
    total = counts.get(root, 0)
    if total <= 0 or enc <= 0:
        raise RuntimeError(f"calibrate(): could not count the FLOPs of {root}'s encoder modules.")
    return _relative_drift(steps), enc / total, pipe.scheduler.timesteps[-len(steps) :].cpu()


def calibrate(
    pipe: Any,
    num_inference_steps: int,
    budget: int | None = None,
    target_speedup: float | None = None,
    prompts: str | Sequence[str] = "a photograph of an astronaut riding a horse",
    seed: int = 0,
    save_to: str | Path | None = None,
    weighting: str = "uniform",
    **call_kwargs,
) -> Calibration:
    """Choose key steps for ``pipe`` from one vanilla run (beyond the paper's hand-picked sets).

    Give either ``budget`` (the number of key steps, 0 included) or ``target_speedup`` (a denoiser-FLOP
    speed-up, turned into a budget by :func:`budget_for_speedup`). ``call_kwargs`` go to the pipeline
    call (guidance scale, size, ...); use the ones you will generate with. ``save_to`` writes a preset
    JSON for ``FasterDiffusionConfig(key_steps=path)``. ``weighting``: ``"uniform"`` counts every step's
    drift alike; ``"sigma"`` weights it by how much the step moves the sample (:func:`sigma_weights`;
    it did slightly worse on a validation split of the embedded model, so it is not the default).
    """
    if (budget is None) == (target_speedup is None):
        raise ValueError("give exactly one of budget (number of key steps) or target_speedup.")
    positive_int("num_inference_steps", num_inference_steps)
    if budget is not None and budget > num_inference_steps:
        raise ValueError(
            f"budget {budget} exceeds the {num_inference_steps} sampling steps; use at most {num_inference_steps}."
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt to calibrate on.")
    drift, fraction, timesteps = record_encoder_drift(pipe, num_inference_steps, prompts, seed, **call_kwargs)
    weights = sigma_weights(pipe.scheduler, timesteps) if weighting == "sigma" else None
    if weighting == "sigma" and weights is None:
        logger.warning(
            "%s has no alphas_cumprod; calibrating with uniform weights", type(pipe.scheduler).__name__
        )
    if budget is None:
        budget = budget_for_speedup(drift.shape[0], fraction, float(target_speedup))
    keys, cost = select_key_steps(drift, budget, weights)
    result = Calibration(num_inference_steps, keys, drift, cost, fraction, weights)
    logger.info(
        "calibrated %d key steps for %d steps: %s (drift %.4g, encoder %.1f%% of FLOPs, %.2fx predicted)",
        len(keys),
        num_inference_steps,
        list(keys),
        cost,
        100 * fraction,
        result.predicted_speedup,
    )
    if save_to is not None:
        result.save(save_to)
    return result
