"""Compare sampling configurations on the same prompts and seeds; write Markdown, JSON and a PNG grid.

    python benchmarks/quality.py --model embedded --scheduler ddim --steps 50 --num-prompts 128
    python benchmarks/quality.py --model ~/models/sd-1.5 --prompts coco_captions.txt \
        --clip-model ~/models/clip-vit-large-patch14 --reference-images ~/data/coco-val2014 --device cuda

Configurations (``--configs``, comma-separated): ``vanilla``, ``propagate|parallel[:KEYS][:nonoise]``
with KEYS in ``paper`` (default), ``auto`` (drift), ``auto-final``, ``even-K``, ``uniform-K``, a preset
or preset JSON, and ``deepcache-N``.

Besides the table it writes ``<name>-speed.{png,md,json}``: quality against the end-to-end speed-up of
each configuration on a GPU from the latency benchmark's JSON (``--latency``; default: the SD-1.5
H200 results in benchmarks/results/h200-2026-11-29 for the scheduler and step count), see
``benchmarks/speed_quality.py``. ``--replot`` redraws those from an existing result JSON only, adding
the configurations of the result JSONs named by ``--also`` (runs on the same prompts and seeds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distfd.embedded import MODELS as EMBEDDED  # noqa: E402
from distfd.embedded import calibration_captions  # noqa: E402
from distfd.quality import harness, report, sources  # noqa: E402
from distfd.quality.evaluators import WeightsMissing  # noqa: E402
from distfd.quality.methods import DEFAULT_METHODS, GRAMMAR, parse_methods  # noqa: E402

logger = logging.getLogger("distfd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="embedded",
        help="'embedded', 'embedded-mmdit', 'tiny' (smoke test) or a diffusers directory",
    )
    p.add_argument("--scheduler", choices=sorted(sources.SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--configs", default=",".join(DEFAULT_METHODS), help=GRAMMAR)
    p.add_argument(
        "--num-prompts", type=int, default=64, help="scene prompts (embedded) or a cap on --prompts"
    )
    p.add_argument("--prompts", help="prompts file, one per line (required for a model path)")
    p.add_argument(
        "--seed", type=int, default=0, help="image i uses noise seed SEED + i in every configuration"
    )
    p.add_argument(
        "--prompt-seed", type=int, default=424242, help="seed of the embedded model's scene captions"
    )
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget", type=int, help="key steps for 'auto' (default: as many as the paper's set)")
    p.add_argument("--size", type=int, help="image height and width (default: the model's)")
    p.add_argument(
        "--encoder-blocks", type=int, help="transformers: blocks in the encoder (default: the adapter's)"
    )
    p.add_argument("--reference-count", type=int, default=2000, help="real scenes for the judge's FD")
    p.add_argument("--clip-model", help="local CLIP directory for CLIP score (model path only)")
    p.add_argument("--reference-images", help="directory of real images for FID (model path only)")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: torch-fidelity's cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", help="output file stem (default: quality-<model>-<scheduler>-<steps>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--latency", help="latency-benchmark JSON for the speed axis (default: H200 SD-1.5 results)"
    )
    p.add_argument("--pieces", help="latency JSON with projection pieces (default: the DDIM-50 H200 one)")
    p.add_argument(
        "--replot", action="store_true", help="only redraw the speed-quality files from <name>.json"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        help="with --replot: add this result JSON's rows (same prompts)",
    )
    args = p.parse_args(argv)
    try:
        args.methods = parse_methods([c.strip() for c in args.configs.split(",") if c.strip()])
    except ValueError as e:
        p.error(str(e))
    if not args.methods:
        p.error("--configs lists no configuration.")
    if args.steps < 1 or args.num_prompts < 1 or args.batch_size < 1:
        p.error("--steps, --num-prompts and --batch-size must be >= 1.")
    if args.budget is not None and not 1 <= args.budget <= args.steps:
        p.error(f"--budget {args.budget} must be between 1 and --steps {args.steps}.")
    if args.model not in (*EMBEDDED, "tiny") and not args.prompts:
        p.error("a model path needs --prompts FILE (one prompt per line, e.g. MS-COCO captions).")
    return args


def load(args: argparse.Namespace):
    """Pipeline, prompts, calibration prompts, evaluator and extra pipeline arguments."""
    if args.model in EMBEDDED:
        pipe = sources.load_embedded_pipeline(args.model)
        prompts, labels = sources.embedded_prompts(args.num_prompts, args.prompt_seed)
        calib = calibration_captions(8, args.prompt_seed + 1, evaluation_seed=args.prompt_seed)
        evaluator = sources.embedded_evaluator(labels, args.reference_count, args.prompt_seed + 2)
        return pipe, prompts, calib, evaluator, 7.5
    if args.model == "tiny":
        from tests import tiny

        prompts = (
            sources.read_prompts(args.prompts, args.num_prompts) if args.prompts else ["a red circle"] * 2
        )
        return tiny.sd(), prompts, prompts[:2], None, 5.0
    every = sources.read_prompts(args.prompts)
    prompts = every[: args.num_prompts]
    calib = every[args.num_prompts : args.num_prompts + 4]  # calibrate on prompts kept out of the evaluation
    if not calib:
        logger.warning(
            "the prompts file has no prompts beyond --num-prompts; 'auto' calibrates on evaluated ones"
        )
        calib = prompts[-4:]
    try:
        evaluator = sources.path_evaluator(args.clip_model, args.reference_images, args.inception_weights)
    except WeightsMissing as e:
        raise SystemExit(f"error: {e}") from e
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    return sources.load_path_pipeline(args.model, args.device, dtype), prompts, calib, evaluator, 7.5


GPU_RESULTS = ROOT / "benchmarks" / "results" / "h200-2026-11-29"


def latency_files(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """The latency JSON for this scheduler/steps and the one holding projection pieces (SD-1.5, H200)."""
    sched = {"ddim": "ddim", "dpm": "dpm"}.get(args.scheduler)  # measured for SD-1.5 only
    if sched is None and not args.latency:
        return None, None
    lat = (
        Path(args.latency)
        if args.latency
        else next(iter(sorted(GPU_RESULTS.glob(f"sd15-full512-{sched}{args.steps}-*.json"))), None)
    )
    pieces = (
        Path(args.pieces)
        if args.pieces
        else next(iter(sorted(GPU_RESULTS.glob("sd15-full512-ddim50-*.json"))), None)
    )
    return lat, pieces


def write_speed(args: argparse.Namespace, name: str, rows: list[dict]) -> list[Path]:
    import json

    from benchmarks import speed_quality

    lat, pieces = latency_files(args)
    load = lambda p: json.loads(p.read_text()) if p else None  # noqa: E731
    sources = [
        str(p.relative_to(ROOT)) if p and p.is_relative_to(ROOT) else str(p) for p in (lat, pieces) if p
    ]
    title = f"{name}: quality vs speed-up"
    return speed_quality.write(rows, load(lat), load(pieces), args.out, name, title, sorted(set(sources)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.replot:
        import json

        model = args.model if args.model in EMBEDDED else Path(args.model).name
        name = args.name or f"quality-{model}-{args.scheduler}-{args.steps}"
        rows = json.loads((Path(args.out) / f"{name}.json").read_text())["rows"]
        for extra in args.also:
            more = json.loads(Path(extra).read_text())["rows"]
            rows += [r for r in more if r["name"] not in {x["name"] for x in rows}]
        for path in write_speed(args, name, rows):
            logger.info("wrote %s", path)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe, prompts, calib, evaluator, guidance = load(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    sources.set_scheduler(pipe, args.scheduler)
    kwargs = {"height": args.size, "width": args.size} if args.size else {}
    setup = harness.Setup(
        prompts=prompts,
        num_steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance if args.guidance is not None else guidance,
        batch_size=args.batch_size,
        budget=args.budget,
        calibration_prompts=calib,
        call_kwargs=kwargs,
        encoder_blocks=args.encoder_blocks,
    )
    rows, images, extras = harness.evaluate(pipe, [m.name for m in args.methods], setup, evaluator)
    model = args.model if args.model in EMBEDDED else Path(args.model).name
    name = args.name or f"quality-{model}-{args.scheduler}-{args.steps}"
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": args.steps,
        "prompts": len(prompts),
        "seeds": f"{args.seed}..{args.seed + len(prompts) - 1}",
        "guidance": setup.guidance_scale,
        "paper key steps": harness.paper_key_steps(pipe, args.steps),
    }
    if args.encoder_blocks is not None:
        meta["encoder blocks"] = args.encoder_blocks
    if args.model in EMBEDDED:  # the floor: real rendered scenes with the same captions
        real = evaluator.score(sources.embedded_real_images(len(prompts), args.prompt_seed), prompts)
        meta["real scenes, same captions"] = ", ".join(f"{k} {v:.3f}" for k, v in real.items())
    cals = extras["calibrations"]
    if cals:
        from distfd import resolve_key_steps
        from distfd.plots import plot_drift

        sets = {"paper": resolve_key_steps(meta["paper key steps"], args.steps, allow_rescale=True)}
        for key, cal in cals.items():
            meta[f"{key} key steps"] = list(cal.key_steps)
            sets[key] = cal.key_steps
        meta["encoder FLOP share"] = round(next(iter(cals.values())).encoder_fraction, 4)
        plot_drift(next(iter(cals.values())).drift, sets, Path(args.out) / f"{name}-drift.png")
    for path in report.write(rows, images, args.out, name, meta):
        logger.info("wrote %s", path)
    from dataclasses import asdict

    for path in write_speed(args, name, [asdict(r) for r in rows]):
        logger.info("wrote %s", path)
    print(report.markdown(rows, name, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
