"""``distfd generate``: one image, vanilla or FasterDiffusion, on one process or many ranks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import calibrate_cmd
from .samplers import SCHEDULERS, set_scheduler

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distfd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    calibrate_cmd.add_parser(sub)
    g = sub.add_parser("generate", help="generate one image with FasterDiffusion (and optionally vanilla)")
    g.add_argument(
        "--model", default=None, help="diffusers pipeline path or hub id (default: the embedded model)"
    )
    g.add_argument("--prompt", default="a small red circle at the top left on a blue background")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    g.add_argument(
        "--key-steps",
        default=None,
        help="preset name (sd-ddim-50, sd-dpm-20, uniform-K, ...), preset .json, or '0,1,2,5'; "
        "default: the paper's preset for the scheduler, rescaled to --steps (the embedded model: its "
        "calibrated set where one ships for --scheduler and --steps)",
    )
    g.add_argument(
        "--mode",
        choices=["propagate", "parallel", "off"],
        default="parallel",
        help="'off' runs the vanilla pipeline only",
    )
    g.add_argument(
        "--encoder",
        choices=["rank0", "replicated"],
        default="rank0",
        help="where the encoder runs when several ranks share the image",
    )
    g.add_argument("--noise-alpha", type=float, default=0.003)
    g.add_argument("--max-parallel-steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    g.add_argument("--device", default="auto", help="auto (LOCAL_RANK's GPU, else CPU), cpu, cuda, cuda:N")
    g.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before a silent peer rank is an error"
    )
    g.add_argument(
        "--compare", action="store_true", help="also run vanilla with the same seed; print the speed-up"
    )
    g.add_argument("--out", type=Path, default=Path("out.png"))
    g.add_argument("-v", "--verbose", action="store_true")
    # The deepspeed launcher (and torch.distributed.launch) append --local_rank=N; LOCAL_RANK is read instead.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _default_key_steps(args) -> tuple[str, bool]:
    """(key steps, rescale): the embedded model's calibrated set where it ships one for this scheduler
    and step count, else the paper's preset for the scheduler, rescaled to ``--steps``."""
    if args.model is None:
        from .embedded import calibrated_key_steps

        path = calibrated_key_steps(args.scheduler, args.steps)
        if path:
            return str(path), False
    return ("sd-dpm-20" if args.scheduler.startswith("dpm") else "sd-ddim-50"), True


def _config(args, parser):
    import distfd

    if args.mode == "off":
        return None
    key_steps, rescale = args.key_steps, False
    if key_steps is None:
        key_steps, rescale = _default_key_steps(args)
    try:
        return distfd.FasterDiffusionConfig(
            key_steps=key_steps,
            mode=args.mode,
            noise_alpha=args.noise_alpha,
            rescale_key_steps=rescale,
            max_parallel_steps=args.max_parallel_steps,
            encoder=args.encoder,
        )
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _load(args, ctx):
    import diffusers
    import torch

    model = args.model
    if model is None:
        try:
            from .embedded import default_model_path
        except ImportError as e:
            raise SystemExit(
                f"distfd: no --model given and the embedded model is not installed ({e})."
            ) from e
        model = str(default_model_path())
    dtype = (
        getattr(torch, DTYPES[args.dtype])
        if args.dtype
        else (torch.float16 if ctx.device.type == "cuda" else torch.float32)
    )
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=dtype)
    set_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=not ctx.is_main)
    return pipe.to(ctx.device)


def _generate(pipe, args, ctx):
    import torch

    kw = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
    )
    gen = torch.Generator("cpu").manual_seed(args.seed)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    image = pipe(generator=gen, **kw).images[0]
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return image, time.perf_counter() - start


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def generate(args, parser) -> int:
    import distfd

    config = _config(args, parser)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    device = None if args.device == "auto" else args.device
    ctx = distfd.DistContext.from_env(timeout_s=args.timeout, device=device)
    log = logging.getLogger("distfd")
    try:
        pipe = _load(args, ctx)
        # One short vanilla call warms up kernels and allocators so the timings compare like with like.
        warm = dict(vars(args), steps=2)
        _generate(pipe, argparse.Namespace(**warm), ctx)
        vanilla_s = None
        if args.compare or config is None:
            image, vanilla_s = _generate(pipe, args, ctx)
        if config is not None:
            handle = distfd.apply(pipe, config, context=ctx)
            image, fast_s = _generate(pipe, args, ctx)
            stats = handle.stats()
            handle.remove()
        if ctx.is_main:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            image.save(args.out)
            lines = [
                f"wrote {args.out}  ({ctx.world_size} rank(s), {ctx.device}, {args.steps} steps {args.scheduler})"
            ]
            if vanilla_s is not None:
                lines.append(f"vanilla          : {vanilla_s:8.3f} s/image")
            if config is not None:
                lines.append(
                    f"distfd {config.mode:<10}: {fast_s:8.3f} s/image   key steps: {config.key_steps.describe()}"
                )
                if vanilla_s is not None:
                    lines.append(
                        f"speed-up         : {vanilla_s / fast_s:8.2f}x  ({100 * (1 - fast_s / vanilla_s):.0f}% less time)"
                    )
                lines.append(
                    f"encoder passes {stats['encoder_passes']}, decoder passes {stats['decoder_passes']}, "
                    f"collectives {stats['collectives']}, sent by rank 0 {_fmt_bytes(stats['bytes_sent'])}/image"
                )
                per_key = stats["bytes_per_key_step"]
                if per_key:
                    lines.append(
                        "bytes per key step (rank 0): "
                        + ", ".join(f"{k}: {_fmt_bytes(v)}" for k, v in per_key.items())
                    )
            print("\n".join(lines))
        log.debug("done")
        return 0
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Log on rank 0 only; the others report warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    level = (logging.DEBUG if args.verbose else logging.INFO) if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(name)s: %(message)s")
    if getattr(args, "run", None):  # subcommands in their own modules (calibrate)
        return args.run(args)
    if args.command == "generate":
        return generate(args, parser)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
