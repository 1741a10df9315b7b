"""Wall time per image on N ranks (run under torchrun): vanilla vs distfd parallel, both encoder placements.

    torchrun --nproc-per-node 2 benchmarks/ranks.py --reps 5 --out benchmarks/results/ranks-cpu-w2.json

Every rank runs every call (SPMD); calls are barrier-aligned and timed on rank 0; methods alternate
call by call so drifting background load hits them alike. Vanilla runs on every rank too (each
rank computes the whole image), so it is the one-device baseline at any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DiffusionPipeline

import distfd
from distfd.embedded import default_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline path (default: the embedded model)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", default="sd-ddim-50")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = distfd.DistContext.from_env(timeout_s=600)
    pipe = DiffusionPipeline.from_pretrained(args.model or str(default_model_path()))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    methods = {
        "vanilla": None,
        "parallel, encoder rank0": distfd.FasterDiffusionConfig(key_steps=args.key_steps, encoder="rank0"),
        "parallel, encoder replicated": distfd.FasterDiffusionConfig(
            key_steps=args.key_steps, encoder="replicated"
        ),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    comm: dict[str, dict] = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, config in methods.items():
            handle = distfd.apply(pipe, config, context=ctx) if config else None
            if ctx.world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            pipe(
                "a small red circle at the top left on a blue background",
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
                output_type="pil",
            )
            elapsed = time.perf_counter() - start
            if handle:
                comm[name] = handle.stats()
                handle.remove()
            if rep:
                times[name].append(elapsed)
    if ctx.is_main:
        base = statistics.median(times["vanilla"])
        rows = {
            m: {
                "median_s": statistics.median(t),
                "min_s": min(t),
                "max_s": max(t),
                "speedup": base / statistics.median(t),
                "comm": comm.get(m),
            }
            for m, t in times.items()
        }
        record = {
            "world_size": ctx.world_size,
            "threads_per_rank": args.threads,
            "steps": args.steps,
            "key_steps": args.key_steps,
            "model": args.model or "embedded tiny-shapes",
            "reps": args.reps,
            "results": rows,
            "device": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "torch": torch.__version__,
            "distfd": distfd.__version__,
            "command": f"torchrun --nproc-per-node {ctx.world_size} {shlex.join(sys.argv)}",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        for m, r in rows.items():
            print(
                f"W={ctx.world_size} {m:<30} {r['median_s']:.3f} s/image (min {r['min_s']:.3f}, max {r['max_s']:.3f}) "
                f"x{r['speedup']:.2f}"
            )
    ctx.close()


if __name__ == "__main__":
    main()
