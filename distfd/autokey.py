"""Automatic key steps: calibrate on one vanilla run, then pick the key steps that minimise drift
(``objective="drift"``, the fast option) or the error of the final image (``objective="final"``, a
local search scored by accelerated runs: :mod:`distfd.keysearch`).

The paper chose its key steps by hand from the curves of Fig. 2a (Sec. 3.3, Supp. C). Here a
vanilla run records the encoder's outputs (the tensors distfd replays: conv_in, every down block,
the mid block) at every step; ``drift[k, j]`` is how far step ``j``'s encoder output is from step
``k``'s, i.e. the error of replaying key step ``k`` at step ``j``. Dynamic programming then picks
the ``K`` key steps (0 always among them) with the least total drift over all non-key steps.

Drift is a proxy: it measures the replayed features, not the image. ``objective="final"`` starts from
the drift optimum, the evenly spaced set and the paper's set of the same budget and refines them by the
final latents' error against vanilla on the calibration prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .adapters import call_defaults, find_adapter
from .apply import is_applied
from .keysearch import OBJECTIVES, Candidate, FinalLatentError, local_search, paper_set, uniform_set
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
        cost: The minimised objective's value for the chosen key steps: their total drift
            (``objective="drift"``) or the mean over prompts of their final latents' relative squared
            error against vanilla's, in dB (``"final"``; :class:`distfd.keysearch.FinalLatentError`).
        encoder_fraction: Share of one denoiser call's FLOPs spent in the encoder modules.
        weights: Per-step weights of the drift objective (``None``: uniform).
        objective: ``"drift"`` or ``"final"``.
        candidates: Every key-step set scored by the final objective, in order (empty for drift).
        pipeline_calls: Pipeline calls the calibration made (the vanilla run included).
    """

    num_steps: int
    key_steps: tuple[int, ...]
    drift: torch.Tensor
    cost: float
    encoder_fraction: float
    weights: torch.Tensor | None = None
    objective: str = "drift"
    candidates: tuple[Candidate, ...] = ()
    pipeline_calls: int = 1

    @property
    def loop_length(self) -> int:
        return self.drift.shape[0]

    @property
    def predicted_speedup(self) -> float:
        """Denoiser FLOPs of the vanilla loop over those with these key steps (see ``budget_for_speedup``)."""
        return speedup_for_budget(self.loop_length, self.encoder_fraction, len(self.key_steps))

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write a preset JSON that ``FasterDiffusionConfig(key_steps=path)`` accepts; ``meta`` (e.g. the
        call that produced it) is stored alongside."""
        extra: dict[str, Any] = {"objective": self.objective, "pipeline_calls": self.pipeline_calls}
        if self.candidates:
            extra["candidates"] = [c.as_dict() for c in self.candidates]
        return save_preset_file(
            path,
            self.num_steps,
            self.key_steps,
            source="distfd.calibrate",
            cost=round(self.cost, 6) if self.objective == "drift" else round(self.cost, 9),
            encoder_fraction=round(self.encoder_fraction, 6),
            **extra,
            **meta,
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
    return record_vanilla(pipe, num_inference_steps, prompts, seed, **call_kwargs)[:3]


def record_vanilla(
    pipe: Any, num_inference_steps: int, prompts: Sequence[str], seed: int, **call_kwargs
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """:func:`record_encoder_drift` plus the run's final latents (prompt ``i`` with seed ``seed + i``)."""
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
            out = pipe(
                prompt=list(prompts),
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="latent",
                **{**call_defaults(pipe), **call_kwargs},
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
    timesteps = pipe.scheduler.timesteps[-len(steps) :].cpu()
    return _relative_drift(steps), enc / total, timesteps, out.images.detach().cpu()


def calibrate(
    pipe: Any,
    num_inference_steps: int,
    budget: int | None = None,
    target_speedup: float | None = None,
    prompts: str | Sequence[str] = "a photograph of an astronaut riding a horse",
    seed: int = 0,
    save_to: str | Path | None = None,
    weighting: str = "uniform",
    objective: str = "drift",
    max_evals: int = 200,
    starts: Mapping[str, Sequence[int]] | None = None,
    mode: str = "propagate",
    noise_alpha: float = 0.003,
    progress: bool = False,
    **call_kwargs,
) -> Calibration:
    """Choose key steps for ``pipe`` (beyond the paper's hand-picked sets).

    Give either ``budget`` (the number of key steps, 0 included) or ``target_speedup`` (a denoiser-FLOP
    speed-up, turned into a budget by :func:`budget_for_speedup`). ``call_kwargs`` go to the pipeline
    call (guidance scale, size, ...); use the ones you will generate with. Prompt ``i`` uses noise seed
    ``seed + i``; keep the calibration prompts apart from those you evaluate on. ``save_to`` writes a
    preset JSON for ``FasterDiffusionConfig(key_steps=path)``.

    ``objective="drift"`` (default, one vanilla call) minimises encoder drift; ``weighting``:
    ``"uniform"`` counts every step's drift alike, ``"sigma"`` weights it by how much the step moves the
    sample (:func:`sigma_weights`; it did slightly worse on the embedded model, so it is not the default).

    ``objective="final"`` minimises the final latents' error against vanilla by local search
    (:mod:`distfd.keysearch`) from the drift optimum, the evenly spaced set, the paper's set of the same
    budget and any ``starts`` (name -> key steps); it costs one vanilla call plus at most ``max_evals``
    distfd calls (``mode`` and ``noise_alpha`` as you will generate with), each on all prompts at once.
    ``progress`` shows a progress bar over those calls.
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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}.")
    if objective == "final" and (
        isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1
    ):
        raise ValueError(f"max_evals must be a positive int; got {max_evals!r}.")
    if mode not in ("propagate", "parallel"):
        raise ValueError(f"mode must be 'propagate' or 'parallel'; got {mode!r}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt to calibrate on.")
    drift, fraction, timesteps, reference = record_vanilla(
        pipe, num_inference_steps, prompts, seed, **call_kwargs
    )
    weights = sigma_weights(pipe.scheduler, timesteps) if weighting == "sigma" else None
    if weighting == "sigma" and weights is None:
        logger.warning(
            "%s has no alphas_cumprod; calibrating with uniform weights", type(pipe.scheduler).__name__
        )
    loop_length = drift.shape[0]
    if budget is None:
        budget = budget_for_speedup(loop_length, fraction, float(target_speedup))
    keys, cost = select_key_steps(drift, budget, weights)
    candidates: tuple[Candidate, ...] = ()
    calls = 1
    if objective == "final":
        keys, cost, candidates, calls = _search_final(
            pipe,
            num_inference_steps,
            loop_length,
            budget,
            keys,
            prompts,
            seed,
            reference,
            starts or {},
            max_evals,
            mode,
            noise_alpha,
            progress,
            call_kwargs,
        )
    result = Calibration(
        num_inference_steps, keys, drift, cost, fraction, weights, objective, candidates, calls
    )
    logger.info(
        "calibrated %d key steps for %d steps (%s objective, %d pipeline calls): %s "
        "(objective %.4g, encoder %.1f%% of FLOPs, %.2fx predicted)",
        len(keys),
        num_inference_steps,
        objective,
        calls,
        list(keys),
        cost,
        100 * fraction,
        result.predicted_speedup,
    )
    if save_to is not None:
        result.save(save_to)
    return result


def _search_final(
    pipe: Any,
    num_steps: int,
    loop_length: int,
    budget: int,
    drift_keys: tuple[int, ...],
    prompts: list[str],
    seed: int,
    reference: torch.Tensor,
    extra_starts: Mapping[str, Sequence[int]],
    max_evals: int,
    mode: str,
    noise_alpha: float,
    progress: bool,
    call_kwargs: dict[str, Any],
) -> tuple[tuple[int, ...], float, tuple[Candidate, ...], int]:
    starts: dict[str, Sequence[int]] = {"drift": drift_keys, "uniform": uniform_set(loop_length, budget)}
    paper = paper_set(pipe.scheduler, num_steps)
    if paper is not None and len(paper) == budget:
        starts["paper"] = paper
    for name, keys in extra_starts.items():
        if len(set(keys)) != budget:
            raise ValueError(f"start set {name!r} has {len(set(keys))} key steps; the budget is {budget}.")
        starts[name] = keys
    objective = FinalLatentError(
        pipe, num_steps, prompts, seed, reference, mode=mode, noise_alpha=noise_alpha, **call_kwargs
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=max_evals, desc="calibrate", unit="call", disable=not progress)

    lowest = [float("inf")]

    def on_eval(c: Candidate) -> None:
        lowest[0] = min(lowest[0], c.value)
        bar.update(1)
        bar.set_postfix(best=f"{lowest[0]:.2f} dB")
        logger.debug("key steps %s (%s): final-latent error %.4f dB", list(c.key_steps), c.origin, c.value)

    try:
        best, scored = local_search(objective, loop_length, starts, max_evals=max_evals, on_eval=on_eval)
        bar.total = bar.n  # the search stopped before max_evals: show it complete
        bar.refresh()
    finally:
        bar.close()
    return best.key_steps, best.value, tuple(scored), 1 + objective.calls
