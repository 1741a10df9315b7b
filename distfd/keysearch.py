"""Key steps chosen on the final image: a local search over key-step sets of one budget, each set scored
by how far the accelerated run's final latents land from the vanilla run's.

The encoder-drift objective of :mod:`distfd.autokey` is cheap (one vanilla run) but measures the error
of the replayed features, not of the image: on DPM-Solver++-20 a plain uniform set beats the drift
optimum. Here the objective is what users see. For a candidate set ``S`` the pipeline runs once with
distfd (``propagate`` mode on one process: the same numbers as ``parallel``, FasterDiffusion Sec. 3.3)
on the calibration prompts, all in one batch, and the score is the mean over prompts of
``10 log10(|x_S - x_vanilla|^2 / |x_vanilla|^2)`` on the final latents (before the VAE): the error in
dB, lower is better, i.e. minus the mean latent PSNR. The mean of the logarithm ranks sets as the mean
image PSNR of an evaluation does; the mean of the plain ratio is ruled by the worst prompt or two. On
the embedded model's 128 held-out captions with DPM-Solver++-20, the set that minimised the plain ratio
on 8 calibration prompts also had the lower plain ratio on the held-out captions (0.109 against 0.126
for ``uniform-3``), yet the lower image PSNR (29.88 against 31.07 dB); the mean logarithm ranked the
two as PSNR did (-10.9 against -12.8 dB).

Search: every start set (the drift optimum, the evenly spaced set and the paper's set of the same size)
is scored; from each of them in turn, the best first, coordinate descent moves one key step at a time
(0 stays) by ``+-1, +-2, +-3, +-5, +-8`` loop indices between its neighbours, takes the best move of each
position if it lowers the error, and sweeps the positions until a sweep changes nothing; the search
ends when every start has been descended from or ``max_evals`` is spent, and returns the best set
scored. Descents that meet share their scores (no set is scored twice).

Cost in pipeline calls: one vanilla call (shared with the drift recording) plus one call per distinct
set scored, at most ``max_evals``; each call runs every calibration prompt (as one batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("distfd")

OBJECTIVES = ("drift", "final")
# The final objective's value for latents equal to vanilla's (the error ratio is clamped at 1e-30).
FLOOR_DB = -300.0
MOVES = (1, 2, 3, 5, 8)
# (scheduler class name, steps) -> the paper's key-step preset for it.
PAPER_SETS = {("DDIMScheduler", 50): "sd-ddim-50", ("DPMSolverMultistepScheduler", 20): "sd-dpm-20"}


@dataclass(frozen=True)
class Candidate:
    """One scored key-step set: where it came from (``drift``, ``uniform``, ``paper``, ``start``,
    ``search``) and its objective value."""

    key_steps: tuple[int, ...]
    value: float
    origin: str

    def as_dict(self) -> dict[str, Any]:
        return {"key_steps": list(self.key_steps), "value": round(self.value, 9), "origin": self.origin}


def uniform_set(loop_length: int, budget: int) -> tuple[int, ...]:
    """``budget`` key steps spread evenly over the loop: ``round(i * L / K)`` for ``i < K``."""
    if not 1 <= budget <= loop_length:
        raise ValueError(f"budget must be between 1 and the loop length {loop_length}; got {budget}.")
    return tuple(sorted({min(loop_length - 1, round(i * loop_length / budget)) for i in range(budget)}))


def paper_set(scheduler: Any, num_steps: int) -> tuple[int, ...] | None:
    """The paper's key steps for this scheduler class and step count (FasterDiffusion Supp. C), if any."""
    from .presets import PRESETS

    name = PAPER_SETS.get((type(scheduler).__name__, num_steps))
    return tuple(PRESETS[name].key_steps) if name else None


class _QuietRuns(logging.Filter):
    """Drops the engine's per-run INFO line while the search makes its many calls."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.module == "engine")


class FinalLatentError:
    """``objective(key_steps)``: mean over prompts of the final latents' relative squared error against
    vanilla's, in dB (``10 log10``); lower is better.

    Args:
        pipe: The vanilla pipeline (distfd is applied and removed around each call).
        num_steps: ``num_inference_steps``.
        prompts: Calibration prompts; prompt ``i`` uses noise seed ``seed + i``.
        reference: Vanilla final latents of the same call, ``(len(prompts), C, h, w)``.
        mode: ``propagate`` (default) or ``parallel``; both give the same numbers on one process.
        noise_alpha: Prior noise injection strength used when generating (Sec. 3.3).
        call_kwargs: The pipeline arguments used when generating (guidance scale, size, ...).
    """

    def __init__(
        self,
        pipe: Any,
        num_steps: int,
        prompts: Sequence[str],
        seed: int,
        reference: torch.Tensor,
        mode: str = "propagate",
        noise_alpha: float = 0.003,
        **call_kwargs: Any,
    ) -> None:
        self.pipe, self.num_steps, self.prompts, self.seed = pipe, num_steps, list(prompts), seed
        self.reference = reference.detach().double().cpu()
        self.mode, self.noise_alpha, self.call_kwargs = mode, noise_alpha, call_kwargs
        self.calls = 0

    def latents(self, key_steps: Sequence[int]) -> torch.Tensor:
        from .adapters import call_defaults
        from .apply import apply
        from .config import FasterDiffusionConfig

        config = FasterDiffusionConfig(
            key_steps=list(key_steps), mode=self.mode, noise_alpha=self.noise_alpha
        )
        quiet = _QuietRuns()
        logger.addFilter(quiet)
        handle = apply(self.pipe, config)
        try:
            out = self.pipe(
                prompt=self.prompts,
                num_inference_steps=self.num_steps,
                generator=[torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))],
                output_type="latent",
                **{**call_defaults(self.pipe), **self.call_kwargs},
            ).images
        finally:
            handle.remove()
            logger.removeFilter(quiet)
        self.calls += 1
        return out.detach().double().cpu()

    def __call__(self, key_steps: Sequence[int]) -> float:
        return error_db(self.latents(key_steps), self.reference)


def error_db(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of ``10 log10(|x - ref|^2 / |ref|^2)``, in float64; ``FLOOR_DB`` where equal."""
    x, ref = x.double(), reference.double()
    err = (x - ref).pow(2).flatten(1).sum(1) / ref.pow(2).flatten(1).sum(1).clamp(min=1e-30)
    return float(10 * err.clamp(min=10 ** (FLOOR_DB / 10)).log10().mean())


def neighbours(keys: tuple[int, ...], position: int, loop_length: int, moves: Iterable[int] = MOVES):
    """Sets with key ``keys[position]`` moved by ``+-m`` for ``m`` in ``moves``, staying strictly between
    its neighbours (and below ``loop_length``); in a fixed order."""
    lo = keys[position - 1]
    hi = keys[position + 1] if position + 1 < len(keys) else loop_length
    for m in moves:
        for new in (keys[position] - m, keys[position] + m):
            if lo < new < hi:
                yield (*keys[:position], new, *keys[position + 1 :])


def local_search(
    objective: Callable[[tuple[int, ...]], float],
    loop_length: int,
    starts: Mapping[str, Sequence[int]],
    max_evals: int = 200,
    moves: Iterable[int] = MOVES,
    on_eval: Callable[[Candidate], None] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """Coordinate descent from each of ``starts``, best first (all of one size, 0 included); see the module
    docstring. Returns the best set and every set scored, in order. Deterministic for a deterministic
    objective: starts are scored in the given order, ties keep the current set."""
    moves = tuple(moves)
    if max_evals < len(starts):
        raise ValueError(f"max_evals {max_evals} is below the {len(starts)} start sets to score.")
    sizes = {len(set(s)) for s in starts.values()}
    if len(sizes) != 1:
        raise ValueError(f"start sets differ in size: { {k: len(v) for k, v in starts.items()} }.")
    seen: dict[tuple[int, ...], Candidate] = {}
    scored: list[Candidate] = []

    def score(keys: tuple[int, ...], origin: str) -> Candidate:
        if keys not in seen:
            cand = Candidate(keys, objective(keys), origin)
            seen[keys] = cand
            scored.append(cand)
            if on_eval is not None:
                on_eval(cand)
        return seen[keys]

    for origin, keys in starts.items():
        keys = tuple(sorted(set(int(k) for k in keys)))
        if not keys or keys[0] != 0 or keys[-1] >= loop_length:
            raise ValueError(
                f"start set {origin!r} {list(keys)} must start at 0 and stay below {loop_length}."
            )
        score(keys, origin)
    overall = min(seen.values(), key=lambda c: c.value)
    # Descend from every start, the best first (a stable sort keeps the given order among ties).
    for start in sorted(scored, key=lambda c: c.value):
        if len(seen) >= max_evals:
            break
        best, changed = start, True
        while changed and len(seen) < max_evals:
            changed = False
            for position in range(1, len(best.key_steps)):
                trial = best
                for keys in neighbours(best.key_steps, position, loop_length, moves):
                    if len(seen) >= max_evals and keys not in seen:
                        break
                    cand = score(keys, "search")
                    if cand.value < trial.value:
                        trial = cand
                if trial is not best:
                    best, changed = trial, True
        if best.value < overall.value:
            overall = best
    return overall, scored
