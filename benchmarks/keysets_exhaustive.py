"""Every key-step set of one budget, scored on the final latents: how far is the calibrated set from the best?

    python benchmarks/keysets_exhaustive.py --scheduler dpm --steps 20 --budget 7 --workers 2

``distfd calibrate`` searches locally (a few hundred pipeline calls). This study scores *every* set of the
budget on the embedded model (step 0 always key): C(L-1, K-1) sets, 27,132 for 7 of 20. One pipeline
call per set would take hours on a CPU, so the study walks the tree of key / non-key decisions depth
first and reuses the sampling state (latents, scheduler, cached encoder features) of every shared
prefix: 116,296 denoiser steps for 7 of 20 instead of 542,640 (27 min on 2 cores with 8 captions).

That needs a sampling loop it can branch, so the study runs its own: the text-to-image loop of the
pipeline (CFG, the scheduler's step, distfd's prior noise injection), the encoder modules of distfd's
UNet adapter replaying their cached outputs at non-key steps. Before searching it checks that loop
against the real thing: with every step key and no noise it must give the vanilla pipeline's latents,
and on two sets it must give ``distfd.keysearch.FinalLatentError``'s value (distfd applied to the
pipeline); the differences are recorded.

Stage 1 scores every set on the first ``--search-prompts`` calibration captions (the captions
``distfd calibrate`` uses, apart from the quality harness's). Stage 2 re-scores the ``--rescore`` best
sets, and the named ones (calibrated, uniform, evenly spread, paper), on ``--num-prompts`` captions: the
objective ``distfd calibrate``'s sets were calibrated on. Writes ``<name>.json`` and ``<name>.png`` (the
distribution of all sets' values, named sets marked).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sysinfo import host_facts  # noqa: E402
from distfd.adapters import find_adapter  # noqa: E402
from distfd.cli.calibrate import CALIBRATION_SEED  # noqa: E402  (prompt i uses noise seed SEED + i)
from distfd.config import FasterDiffusionConfig  # noqa: E402
from distfd.embedded import calibration_captions, default_model_path  # noqa: E402
from distfd.keysearch import FinalLatentError, error_db, paper_set, uniform_set  # noqa: E402
from distfd.keysteps import save_preset_file  # noqa: E402
from distfd.quality.sources import load_embedded_pipeline, set_scheduler  # noqa: E402

GUIDANCE = 7.5
DEFAULTS = FasterDiffusionConfig()  # distfd's prior noise injection: noise_alpha below noise_below
NOISE_ALPHA = DEFAULTS.noise_alpha


class Loop:
    """The pipeline's text-to-image sampling loop for a fixed prompt batch, one step at a time.

    A state is ``(latents, scheduler, encoder cache)``; :meth:`step` returns a new state and leaves the
    given one intact, so a depth-first walk can branch at every step.
    """

    def __init__(self, pipe: Any, prompts: list[str], steps: int, noise_alpha: float = NOISE_ALPHA) -> None:
        adapter, self.unet = find_adapter(pipe)
        self.noise_alpha = noise_alpha
        pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True, None)
        self.embeds = torch.cat([neg, pos])
        size = self.unet.config.sample_size * pipe.vae_scale_factor
        generators = [torch.Generator().manual_seed(CALIBRATION_SEED + i) for i in range(len(prompts))]
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.scheduler.set_timesteps(steps)
        self.z_T = pipe.prepare_latents(
            len(prompts), self.unet.config.in_channels, size, size, self.embeds.dtype, "cpu", generators
        )
        self.timesteps = self.scheduler.timesteps
        self.noise_limit = DEFAULTS.noise_below * self.scheduler.config.num_train_timesteps
        self.modules = [m.module for m in adapter.encoder_modules(self.unet)]
        self._replay: list | None = None  # cached outputs to hand out, or None to compute
        self._record: list | None = None

    def __enter__(self) -> Loop:
        self._saved = []
        for i, m in enumerate(self.modules):
            original = m.forward
            self._saved.append((m, m.__dict__.get("forward")))

            def forward(*args, _original=original, _i=i, **kwargs):
                if self._replay is not None:
                    return self._replay[_i]
                out = _original(*args, **kwargs)
                if self._record is not None:
                    self._record[_i] = out
                return out

            m.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for m, own in self._saved:
            if own is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = own

    def start(self) -> tuple:
        return (self.z_T, self.scheduler, None)

    def step(self, state: tuple, i: int, key: bool) -> tuple:
        z, scheduler, cache = state
        scheduler = copy.deepcopy(scheduler)
        t = self.timesteps[i]
        x = scheduler.scale_model_input(torch.cat([z, z]), t)
        if key:
            self._replay, self._record = None, [None] * len(self.modules)
            eps = self.unet(x, t, encoder_hidden_states=self.embeds, return_dict=False)[0]
            cache = self._record
        else:
            self._replay, self._record = cache, None
            eps = self.unet(x, t, encoder_hidden_states=self.embeds, return_dict=False)[0]
        self._replay = self._record = None
        uncond, cond = eps.chunk(2)
        eps = uncond + GUIDANCE * (cond - uncond)
        if self.noise_alpha > 0 and float(t) < self.noise_limit:
            z = z + self.noise_alpha * self.z_T
        return (scheduler.step(eps, t, z, return_dict=False)[0], scheduler, cache)

    def run(self, keys: set[int] | None) -> torch.Tensor:
        """Final latents with these key steps (``None``: every step key)."""
        state = self.start()
        for i in range(len(self.timesteps)):
            state = self.step(state, i, keys is None or i in keys)
        return state[0]


# Workers inherit these through fork (set in main before the pool starts).
_SEARCH: dict[str, Any] = {}


def _search_prefix(prefix: str) -> tuple[str, list[tuple[float, tuple[int, ...]]], int]:
    """All sets whose decisions for steps 1..len(prefix) are ``prefix`` ('k' key, 'n' not)."""
    loop, ref, budget = _SEARCH["loop"], _SEARCH["ref"], _SEARCH["budget"]
    length = len(loop.timesteps)
    found: list[tuple[float, tuple[int, ...]]] = []
    nodes = 0

    def walk(i: int, state: tuple, keys: list[int]) -> None:
        nonlocal nodes
        if i == length:
            found.append((error_db(state[0], ref), tuple(keys)))
            return
        if len(keys) < budget:
            nodes += 1
            walk(i + 1, loop.step(state, i, True), [*keys, i])
        if budget - len(keys) < length - i:
            nodes += 1
            walk(i + 1, loop.step(state, i, False), keys)

    with torch.inference_mode(), loop:
        state, keys = loop.step(loop.start(), 0, True), [0]
        for i, c in enumerate(prefix, start=1):
            state = loop.step(state, i, c == "k")
            keys += [i] if c == "k" else []
        nodes += 1 + len(prefix)
        walk(1 + len(prefix), state, keys)
    return prefix, found, nodes


def _score_set(keys: tuple[int, ...]) -> tuple[tuple[int, ...], float]:
    loop, ref = _SEARCH["loop"], _SEARCH["ref"]
    with torch.inference_mode(), loop:
        return keys, error_db(loop.run(set(keys)), ref)


def prefixes(length: int, budget: int, depth: int) -> list[str]:
    """Feasible decision strings for steps 1..depth, the largest subtrees first."""
    out = []
    for n in range(2**depth):
        p = "".join("k" if n >> (depth - 1 - j) & 1 else "n" for j in range(depth))
        used = 1 + p.count("k")
        if used <= budget and budget - used <= length - 1 - depth:
            out.append(p)
    return sorted(out, key=lambda p: -math.comb(length - 1 - depth, budget - 1 - p.count("k")))


def verify(pipe: Any, loop: Loop, prompts: list[str], steps: int, sets: list[tuple[int, ...]]) -> dict:
    """The study's loop against the vanilla pipeline and against distfd's own objective."""
    gens = [torch.Generator().manual_seed(CALIBRATION_SEED + i) for i in range(len(prompts))]
    vanilla = pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=gens,
        output_type="latent",
    ).images
    objective = FinalLatentError(
        pipe, steps, prompts, CALIBRATION_SEED, vanilla, noise_alpha=NOISE_ALPHA, guidance_scale=GUIDANCE
    )
    distfd_values = {keys: objective(list(keys)) for keys in sets}
    with torch.inference_mode():
        plain = Loop(pipe, prompts, steps, noise_alpha=0.0)
        with plain:
            own_vanilla = plain.run(None)
        with loop:
            own = {keys: error_db(loop.run(set(keys)), vanilla) for keys in sets}
    out = {
        "vanilla_max_abs_diff": float((own_vanilla - vanilla).abs().max()),
        "latent_scale": float(vanilla.abs().max()),
        "sets": [
            {
                "key_steps": list(k),
                "distfd": distfd_values[k],
                "study": own[k],
                "diff": own[k] - distfd_values[k],
            }
            for k in sets
        ],
    }
    worst = max(abs(s["diff"]) for s in out["sets"])
    if out["vanilla_max_abs_diff"] > 1e-4 * out["latent_scale"] or worst > 1e-3:
        raise SystemExit(f"the study's loop does not reproduce the pipeline and distfd: {out}")
    return out


def calibrated_file(scheduler: str, steps: int, budget: int) -> Path:
    """``distfd calibrate``'s set of this budget: the embedded model's default where it has this many
    key steps, else ``benchmarks/results/keysets/<scheduler>-<steps>-k<budget>.json``."""
    shipped = Path(default_model_path()) / "key_steps" / f"{scheduler}-{steps}.json"
    if shipped.is_file() and len(json.loads(shipped.read_text())["key_steps"]) == budget:
        return shipped
    return ROOT / "benchmarks" / "results" / "keysets" / f"{scheduler}-{steps}-k{budget}.json"


def named_sets(pipe: Any, steps: int, budget: int, calibrated: Path | None) -> dict[str, tuple[int, ...]]:
    # The quality harness's names: even-K spreads K over the loop, uniform-N keys every N-th step.
    sets = {f"even-{budget}": uniform_set(steps, budget)}
    interval = next((n for n in range(1, steps + 1) if len(range(0, steps, n)) == budget), None)
    if interval is not None:
        sets[f"uniform-{interval}"] = tuple(range(0, steps, interval))
    paper = paper_set(pipe.scheduler, steps)
    if paper is not None and len(paper) == budget:
        sets["paper"] = paper
    if calibrated is not None and calibrated.is_file():
        keys = tuple(json.loads(calibrated.read_text())["key_steps"])
        if len(keys) == budget:
            sets["calibrated"] = keys
    return sets


def plot(values: list[float], marks: dict[str, float], title: str, path: Path) -> None:
    from distfd.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(values, bins=80, color="0.6")
    for i, (name, v) in enumerate(sorted(marks.items(), key=lambda kv: kv[1])):
        ax.axvline(v, color=f"C{i}", lw=1.2, label=f"{name}: {v:.2f} dB")
    ax.set_xlabel("final-latent error vs vanilla, dB (lower is closer)")
    ax.set_ylabel("key-step sets")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_presets(result: dict, out: Path, name: str, top: int) -> list[Path]:
    """The best ``top`` sets of stage 2 and the best of stage 1 as preset files, for the quality
    harness (``--configs propagate:<file>``) and ``--key-steps``."""
    picks = [(f"s2-r{r}", e) for r, e in enumerate(result["stage2"]["ranking"][:top], start=1)]
    picks.append(("s1-r1", result["stage1"]["best"][0]))
    meta = {"source": "benchmarks/keysets_exhaustive.py", "scheduler": result["scheduler"]}
    return [
        save_preset_file(
            out / f"{name}-{tag}.json", result["steps"], e["key_steps"], value=e["value"], **meta
        )
        for tag, e in picks
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="dpm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget", type=int, default=7)
    p.add_argument("--search-prompts", type=int, default=8, help="captions of the exhaustive stage")
    p.add_argument("--num-prompts", type=int, default=32, help="captions of the re-scoring stage")
    p.add_argument("--rescore", type=int, default=200, help="best sets of stage 1 to re-score")
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument(
        "--calibrated",
        type=Path,
        help="preset JSON to mark (default: distfd calibrate's set of the budget, see calibrated_file)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "keysets")
    p.add_argument("--name", help="output stem (default: exhaustive-<scheduler>-<steps>-k<budget>)")
    p.add_argument("--presets", type=int, default=5, help="best stage-2 sets written as preset files")
    p.add_argument(
        "--presets-from", type=Path, help="only write the preset files from this result JSON (no search)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.budget <= args.steps:
        p.error(f"--budget {args.budget} must be between 1 and --steps {args.steps}.")
    if args.search_prompts < 1 or args.num_prompts < args.search_prompts or args.workers < 1:
        p.error("need 1 <= --search-prompts <= --num-prompts and --workers >= 1.")
    total = math.comb(args.steps - 1, args.budget - 1)
    if total > 200_000:
        p.error(f"{total} sets is too many for an exhaustive study; use distfd calibrate.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    name = args.name or f"exhaustive-{args.scheduler}-{args.steps}-k{args.budget}"
    if args.presets_from is not None:
        result = json.loads(args.presets_from.read_text())
        for path in write_presets(result, args.presets_from.parent, args.presets_from.stem, args.presets):
            print(f"wrote {path}")
        return 0
    calibrated = args.calibrated or calibrated_file(args.scheduler, args.steps, args.budget)
    facts = host_facts(torch.device("cpu"), ["benchmarks/keysets_exhaustive.py", *(argv or sys.argv[1:])])
    pipe = load_embedded_pipeline()
    set_scheduler(pipe, args.scheduler)
    prompts = calibration_captions(args.num_prompts)
    named = named_sets(pipe, args.steps, args.budget, calibrated)

    t0 = time.time()
    with torch.inference_mode():
        full = Loop(pipe, prompts, args.steps)
    check = verify(pipe, full, prompts, args.steps, list(dict.fromkeys(named.values()))[:2])
    print(
        f"loop verified: vanilla max abs diff {check['vanilla_max_abs_diff']:.2e}; "
        + ", ".join(
            f"{s['key_steps']}: {s['study']:.4f} dB vs distfd {s['distfd']:.4f}" for s in check["sets"]
        ),
        flush=True,
    )

    # Stage 1: every set on the first --search-prompts captions.
    with torch.inference_mode():
        small = Loop(pipe, prompts[: args.search_prompts], args.steps)
        ref_small = Loop(pipe, prompts[: args.search_prompts], args.steps, noise_alpha=0.0)
        with ref_small:
            _SEARCH.update(loop=small, ref=ref_small.run(None), budget=args.budget)
    jobs = prefixes(args.steps, args.budget, min(3, args.steps - 1))
    total = math.comb(args.steps - 1, args.budget - 1)
    found: list[tuple[float, tuple[int, ...]]] = []
    nodes, t1 = 0, time.time()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        for prefix, sets, n in pool.imap_unordered(_search_prefix, jobs):
            found += sets
            nodes += n
            best = min(found)
            print(
                f"stage 1: {len(found)}/{total} sets ({time.time() - t1:.0f} s), prefix {prefix} done; "
                f"best so far {best[0]:.3f} dB {list(best[1])}",
                flush=True,
            )
    if len(found) != total:
        raise SystemExit(f"stage 1 scored {len(found)} sets, expected {total}.")
    found.sort()
    stage1_seconds = time.time() - t1
    # The walk's value of its best set must be what a plain run of that set gives.
    replayed = _score_set(found[0][1])[1]
    if abs(replayed - found[0][0]) > 1e-6:
        raise SystemExit(f"stage 1's best set scores {found[0][0]} in the walk but {replayed} replayed.")
    rank1 = {keys: r for r, (_, keys) in enumerate(found, start=1)}

    # Stage 2: the best sets and the named ones on all --num-prompts captions.
    with torch.inference_mode():
        ref_full = Loop(pipe, prompts, args.steps, noise_alpha=0.0)
        with ref_full:
            _SEARCH.update(loop=full, ref=ref_full.run(None))
    todo = list(dict.fromkeys([keys for _, keys in found[: args.rescore]] + list(named.values())))
    t2 = time.time()
    rescored: dict[tuple[int, ...], float] = {}
    with ctx.Pool(args.workers) as pool:
        for keys, value in pool.imap_unordered(_score_set, todo):
            rescored[keys] = value
            if len(rescored) % 20 == 0 or len(rescored) == len(todo):
                print(f"stage 2: {len(rescored)}/{len(todo)} sets ({time.time() - t2:.0f} s)", flush=True)
    ranking = sorted(rescored.items(), key=lambda kv: kv[1])

    stage1_values = [v for v, _ in found]
    result = {
        **facts,
        "model": "embedded",
        "scheduler": args.scheduler,
        "steps": args.steps,
        "budget": args.budget,
        "guidance_scale": GUIDANCE,
        "noise_alpha": NOISE_ALPHA,
        "calibration_seed": CALIBRATION_SEED,
        "prompts": prompts,
        "verification": check,
        "stage1": {
            "prompts": args.search_prompts,
            "sets": total,
            "denoiser_steps": nodes,
            "seconds": round(stage1_seconds, 1),
            "best_replayed": replayed,
            "best": [{"key_steps": list(k), "value": v} for v, k in found[:50]],
            "named": {
                n: {"key_steps": list(k), "value": next(v for v, kk in found if kk == k), "rank": rank1[k]}
                for n, k in named.items()
            },
        },
        "stage2": {
            "prompts": args.num_prompts,
            "seconds": round(time.time() - t2, 1),
            "ranking": [{"key_steps": list(k), "value": v, "stage1_rank": rank1[k]} for k, v in ranking],
            "named": {
                n: {
                    "key_steps": list(k),
                    "value": rescored[k],
                    "rank": 1 + [kk for kk, _ in ranking].index(k),
                }
                for n, k in named.items()
            },
        },
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    marks = {f"{n} (stage 1)": result["stage1"]["named"][n]["value"] for n in named}
    marks[f"best {list(found[0][1])}"] = found[0][0]
    plot(
        stage1_values,
        marks,
        f"all {total} sets of {args.budget} key steps, {args.scheduler}-{args.steps}, embedded model, "
        f"{args.search_prompts} calibration captions",
        args.out / f"{name}.png",
    )
    print(
        f"best of stage 2: {list(ranking[0][0])} {ranking[0][1]:.3f} dB; "
        + ", ".join(
            f"{n} {result['stage2']['named'][n]['value']:.3f} dB (rank {result['stage2']['named'][n]['rank']})"
            for n in named
        )
    )
    presets = write_presets(result, args.out, name, args.presets)
    print(
        f"wrote {args.out / name}.json and .png and {len(presets)} preset files in {result['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
