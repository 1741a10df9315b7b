"""distfd calibrate: choose key steps for a model, scheduler and step count; write a preset JSON.

The file is what `distfd generate --key-steps FILE` and `FasterDiffusionConfig(key_steps=FILE)`
accept. Besides the key steps it records the objective's value of every candidate set scored, the
pipeline calls spent, and the command that produced it (so it can be re-run):

    distfd calibrate --scheduler dpm --steps 20 --budget 9 --out key_steps/dpm-20.json

On the embedded model the calibration prompts default to a seeded draw of scene captions
(--num-prompts, --prompt-seed) that skips every caption of the quality harness's evaluation draw; for another
model give --prompts FILE (one per line), kept apart from the prompts you evaluate on.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

from ..embedded import CALIBRATION_CAPTION_SEED, is_embedded
from ..samplers import SCHEDULERS
from .options import HelpFormatter

logger = logging.getLogger("distfd")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The paper's budgets: its preset's size for the scheduler and step count (Supp. C).
PAPER_BUDGETS = {("ddim", 50): 9, ("dpm", 20): 7, ("dpm++", 20): 7}
CALIBRATION_SEED = 100_000


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``calibrate`` on the CLI's subparsers."""
    c = subparsers.add_parser(
        "calibrate",
        help="choose key steps for a model/scheduler/steps and write a preset JSON",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    c.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline path, or embedded-mmdit (default: the embedded tiny-shapes model)",
    )
    c.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    c.add_argument("--steps", type=int, default=50)
    size = c.add_mutually_exclusive_group()
    size.add_argument(
        "--budget", type=int, help="number of key steps, 0 included (default: the paper's for ddim-50/dpm-20)"
    )
    size.add_argument(
        "--target-speedup", type=float, help="denoiser-FLOP speed-up to reach instead of --budget"
    )
    c.add_argument("--prompts", type=Path, help="calibration prompts, one per line (needed for --model)")
    c.add_argument(
        "--num-prompts",
        type=int,
        default=8,
        help="how many prompts to calibrate on; more generalise better (the embedded model's shipped sets used 32)",
    )
    c.add_argument(
        "--prompt-seed",
        type=int,
        default=CALIBRATION_CAPTION_SEED,
        help="seed of the embedded model's caption draw (captions of the quality harness's draw 424242 are skipped)",
    )
    c.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="prompt i uses noise seed SEED + i")
    c.add_argument(
        "--objective",
        choices=["final", "drift"],
        default="final",
        help="final: error of the final latents against vanilla (local search); drift: encoder drift (fast)",
    )
    c.add_argument("--weighting", choices=["uniform", "sigma"], default="uniform", help="drift weighting")
    c.add_argument(
        "--max-evals", type=int, default=200, help="most distfd pipeline calls the search may spend"
    )
    c.add_argument("--mode", choices=["propagate", "parallel"], default="propagate")
    c.add_argument("--noise-alpha", type=float, default=0.003)
    c.add_argument("--guidance-scale", type=float, default=7.5)
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("-v", "--verbose", action="store_true")
    c.add_argument(
        "--out", type=Path, default=None, help="preset JSON to write (default key_steps-SCHED-STEPS.json)"
    )
    c.set_defaults(run=run, parser=c)
    return c


def check(args: argparse.Namespace) -> None:
    """Reject bad arguments before any model is loaded (``ValueError`` naming the fix)."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}.")
    if args.budget is None and args.target_speedup is None:
        args.budget = PAPER_BUDGETS.get((args.scheduler, args.steps))
        if args.budget is None:
            raise ValueError(
                f"no default budget for {args.scheduler}-{args.steps}; give --budget K or --target-speedup S."
            )
    if args.budget is not None and not 1 <= args.budget <= args.steps:
        raise ValueError(f"--budget {args.budget} must be between 1 and --steps {args.steps}.")
    if args.target_speedup is not None and not args.target_speedup >= 1:
        raise ValueError(f"--target-speedup must be >= 1; got {args.target_speedup}.")
    if args.num_prompts < 1 or args.max_evals < 1:
        raise ValueError("--num-prompts and --max-evals must be >= 1.")
    if not is_embedded(args.model) and args.prompts is None:
        raise ValueError(
            "--model needs --prompts FILE (calibration prompts, one per line, not your test prompts)."
        )
    if args.prompts is not None and not args.prompts.is_file():
        raise ValueError(f"--prompts {args.prompts} is not a file.")


def prompts_for(args: argparse.Namespace) -> list[str]:
    if args.prompts is not None:
        from ..quality.sources import read_prompts

        return read_prompts(args.prompts, args.num_prompts)
    from ..embedded import calibration_captions

    return calibration_captions(args.num_prompts, args.prompt_seed)


def load(args: argparse.Namespace) -> Any:
    import diffusers
    import torch

    from ..samplers import set_scheduler
    from ..session import resolve_model

    model = resolve_model(args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if dtype is None:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=True)
    set_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def command_line(args: argparse.Namespace) -> str:
    """The ``distfd calibrate`` call that reproduces ``args`` (``--out`` and display flags left out)."""
    parts = ["distfd", "calibrate"]
    if args.model is not None:
        parts += ["--model", str(args.model)]
    parts += ["--scheduler", args.scheduler, "--steps", str(args.steps)]
    if args.target_speedup is not None:
        parts += ["--target-speedup", str(args.target_speedup)]
    else:
        parts += ["--budget", str(args.budget)]
    if args.prompts is not None:
        parts += ["--prompts", str(args.prompts)]
    else:
        parts += ["--prompt-seed", str(args.prompt_seed)]
    parts += ["--num-prompts", str(args.num_prompts), "--seed", str(args.seed), "--objective", args.objective]
    if args.objective == "final":
        parts += [
            "--max-evals",
            str(args.max_evals),
            "--mode",
            args.mode,
            "--noise-alpha",
            str(args.noise_alpha),
        ]
    if args.weighting != "uniform":
        parts += ["--weighting", args.weighting]
    parts += ["--guidance-scale", str(args.guidance_scale)]
    for flag in ("height", "width"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.dtype is not None:
        parts += ["--dtype", args.dtype]
    return shlex.join(parts)


def calibrate(args: argparse.Namespace, pipe: Any | None = None) -> Any:
    """Run the calibration ``args`` describe (on ``pipe`` if given, its scheduler set to ``--scheduler``)
    and return the ``Calibration``."""
    import torch

    from ..autokey import calibrate as run_calibration
    from ..samplers import set_scheduler

    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = prompts_for(args)
    if pipe is None:
        pipe = load(args)
    else:
        set_scheduler(pipe, args.scheduler)
    kwargs = {k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None}
    return run_calibration(
        pipe,
        args.steps,
        budget=args.budget,
        target_speedup=args.target_speedup,
        prompts=prompts,
        seed=args.seed,
        weighting=args.weighting,
        objective=args.objective,
        max_evals=args.max_evals,
        mode=args.mode,
        noise_alpha=args.noise_alpha,
        progress=not args.no_progress,
        guidance_scale=args.guidance_scale,
        **kwargs,
    )


def run(args: argparse.Namespace) -> int:
    try:
        check(args)
    except ValueError as e:
        args.parser.error(str(e))
    result = calibrate(args)
    out = args.out or Path(f"key_steps-{args.scheduler}-{args.steps}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(
        out,
        scheduler=args.scheduler,
        calibration={"command": command_line(args), "prompts": prompts_for(args)},
    )
    lines = [f"wrote {out}", f"key steps ({len(result.key_steps)} of {args.steps}): {list(result.key_steps)}"]
    unit = " dB (final latents' error against vanilla; lower is better)" if args.objective == "final" else ""
    lines.append(
        f"{args.objective} objective: {result.cost:.6g}{unit}; {result.pipeline_calls} pipeline call(s)"
    )
    for c in result.candidates:
        if c.origin != "search":
            lines.append(f"  start {c.origin:<8} {list(c.key_steps)}: {c.value:.6g}")
    lines.append(f"denoiser-FLOP speed-up {result.predicted_speedup:.2f}x")
    print("\n".join(lines))
    return 0
