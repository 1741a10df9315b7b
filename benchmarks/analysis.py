"""The paper's feature analysis (Sec. 3.2, Fig. 2a-c) for a pipeline: PNG plots, JSON, a summary.

python benchmarks/analysis.py --model embedded --steps 50 --num-prompts 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distfd.analysis import analyse_features  # noqa: E402
from distfd.plots import save_analysis_plots  # noqa: E402
from distfd.quality import sources  # noqa: E402

logger = logging.getLogger("distfd")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="embedded", help="'embedded', 'embedded-mmdit', 'tiny' or a diffusers directory"
    )
    p.add_argument("--scheduler", choices=sorted(sources.SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", help="prompts file, one per line (default for embedded: scene captions)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis"))
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the change is between adjacent steps).")
    try:
        if args.model in ("embedded", "embedded-mmdit"):
            pipe, guidance = sources.load_embedded_pipeline(args.model), 7.5
            prompts = sources.embedded_prompts(args.num_prompts, 424242)[0]
        elif args.model == "tiny":
            from tests import tiny

            pipe, guidance, prompts = tiny.sd(), 5.0, ["a red circle"] * args.num_prompts
        else:
            pipe, guidance = sources.load_path_pipeline(args.model, args.device), 7.5
        if args.prompts:
            prompts = sources.read_prompts(args.prompts, args.num_prompts)
        elif args.model not in ("embedded", "embedded-mmdit", "tiny"):
            p.error("a model path needs --prompts FILE.")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    sources.set_scheduler(pipe, args.scheduler)
    guidance = args.guidance if args.guidance is not None else guidance
    result = analyse_features(pipe, prompts, args.steps, args.seed, guidance_scale=guidance)
    out = Path(args.out)
    paths = save_analysis_plots(result, out)
    paths.append(result.to_json(out / "analysis.json"))
    for path in paths:
        logger.info("wrote %s", path)
    print(json.dumps(result.summary(), indent=2))
    for b in result.blocks:
        rel = sum(b.relative_change) / len(b.relative_change)
        print(f"{b.name:7s} {b.part:10s} {b.size:3d}  mean Eq.2 {sum(b.change) / len(b.change):.4g}  "
              f"max {max(b.change):.4g}  relative {rel:.4g}  norm std {b.norm_std:.4g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
