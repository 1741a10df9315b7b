"""Latency benchmark: vanilla diffusers vs distfd (propagate, parallel) vs DeepCache.

One process, one pipeline, same prompt and seed for every method. Also measures the pieces of
the parallel-decoding critical path and projects it to W devices (``benchmarks/projection.py``).

    python benchmarks/latency.py --arch sd15 --size reduced --scheduler ddim
    torchrun --nproc-per-node 2 benchmarks/latency.py --arch sd15 --size full   # distributed
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import methods as M
from benchmarks.measure import ModuleTimer, flop_counter, summarize_calls, timed_call
from benchmarks.models import ARCHS, RESOLUTION, SCHEDULERS, SIZES, build
from benchmarks.pieces import measure_pieces
from benchmarks.projection import key_step_groups, projection_table
from benchmarks.report import markdown, write_all
from benchmarks.sysinfo import GpuSampler, host_facts
from distfd.keysteps import KeySteps

log = logging.getLogger("benchmarks.latency")
DEFAULT_PRESET = {("ddim", 50): "sd-ddim-50", ("dpm", 20): "sd-dpm-20"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--size", choices=SIZES, default="reduced")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--steps", type=int, help="default 50 (ddim) / 20 (dpm)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default depends on arch/size)")
    p.add_argument(
        "--key-steps", help="preset name (sd-ddim-50, sd-dpm-20, uniform-K) or comma list of indices"
    )
    p.add_argument("--noise-alpha", type=float, default=0.003)
    p.add_argument("--methods", default=",".join(M.METHODS), help=f"comma list from {M.METHODS}")
    p.add_argument("--deepcache-interval", type=int, default=3)
    p.add_argument("--deepcache-branch", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    p.add_argument("--no-projection", action="store_true", help="skip encoder/decoder piece measurements")
    p.add_argument("--decoder-rows", default="1,2,4,8,16", help="row counts at which to time the decoder")
    p.add_argument(
        "--bandwidth-gbps", type=float, default=400.0, help="link bandwidth, Gbit/s, for the projection"
    )
    p.add_argument("--latency-us", type=float, default=0.0, help="per-collective latency for the projection")
    p.add_argument("--worlds", default="1,2,4,8", help="world sizes to project")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def resolve_key_steps(spec: str, steps: int) -> tuple[str, list[int]]:
    """(what to pass to distfd, the resolved loop indices)."""
    return spec, list(KeySteps.parse(spec).resolve(steps))


def _flops_run(bench, run) -> tuple[int, int | None]:
    mode = flop_counter()
    with mode:
        run()
    den = mode.get_flop_counts().get(type(bench.denoiser).__name__)
    return int(mode.get_total_flops()), (int(sum(den.values())) if den else None)


CUMULATIVE = ("encoder_passes", "decoder_passes", "decoder_rows", "steps")


def per_image_stats(stats: dict[str, Any], images: int = 1) -> dict[str, Any]:
    """distfd counters of one timed call, per image (communication counters are per run already)."""
    return {k: (v / images if k in CUMULATIVE else v) for k, v in stats.items()}


def method_note(r: dict[str, Any], world: int) -> str:
    """Short Markdown note: distfd work/communication per image, DeepCache settings."""
    if r["status"] != "ok":
        return ""
    st, info = r.get("method_stats") or {}, r.get("info") or {}
    parts = []
    if "encoder_passes" in st:
        parts.append(f"enc {st['encoder_passes']:g} / dec {st['decoder_passes']:g} passes")
        if world > 1:
            parts.append(
                f"rank 0 sent {st.get('bytes_sent', 0) / 2**20:.1f} MiB in {st.get('collectives', 0)} collectives"
            )
    if "cache_interval" in info:
        parts.append(f"interval {info['cache_interval']}, branch {info['cache_branch_id']}")
    if world > 1 and r.get("flops"):
        parts.append("FLOPs: rank 0 only")
    return "; ".join(parts)


def prepare_method(name: str, bench, args, opts: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Install once: FLOP-counting run (doubles as the first warm-up), further warm-ups, remove."""
    rec: dict[str, Any] = {"name": name, "_calls": [], "_sampler": GpuSampler(index=device.index or 0)}
    try:
        inst = M.setup(name, bench, opts)
    except M.Skip as e:
        log.warning("skipping %s: %s", name, e)
        return {"name": name, "status": "skipped", "reason": str(e)}
    run = lambda: bench.run(args.prompt, args.steps, args.seed)  # noqa: E731
    try:
        warmup = args.warmup
        if not args.no_flops:
            rec["flops"], rec["denoiser_flops"] = _flops_run(bench, run)
            log.info(
                "%s: %.2f GFLOPs/image (UNet %.2f)",
                name,
                rec["flops"] / 1e9,
                (rec["denoiser_flops"] or 0) / 1e9,
            )
            warmup -= 1
        for i in range(max(0, warmup)):
            log.info("%s: warm-up %d", name, i + 1)
            run()
        rec["info"], rec["status"] = inst.info, "ok"
    finally:
        inst.remove()
    return rec


def timed_rep(rec: dict[str, Any], bench, args, opts: dict[str, Any], device: torch.device) -> None:
    """Install the method, time one pipeline call, remove it; appends to ``rec['_calls']``."""
    inst = M.setup(rec["name"], bench, opts)
    timer = ModuleTimer(bench.denoiser, device)
    try:
        with rec["_sampler"]:
            call = timed_call(lambda: bench.run(args.prompt, args.steps, args.seed), timer, device)
        call["stats"] = inst.stats()
    finally:
        timer.remove()
        inst.remove()
    rec["_calls"].append(call)
    log.info(
        "%s rep %d: %.3f s/img wall (UNet %.3f), %.3f s CPU",
        rec["name"],
        len(rec["_calls"]),
        call["wall_s"],
        call["den_wall_s"],
        call["cpu_s"],
    )


def finish_method(rec: dict[str, Any]) -> None:
    """Summaries from the timed calls; the last call's image and distfd counters are kept."""
    calls, sampler = rec.pop("_calls", []), rec.pop("_sampler", None)
    if rec["status"] != "ok":
        return
    rec.update(summarize_calls(calls))
    rec["gpu_sampling"] = sampler.summary()
    rec["image"] = calls[-1]["output"].images[0]
    rec["method_stats"] = per_image_stats(calls[-1]["stats"])


def projection(bench, args, key_steps: list[int], device, dtype) -> dict[str, Any]:
    if bench.arch == "dit":
        return {"skipped": "projection model is defined for the UNet encoder/decoder split only"}
    rows = [int(r) for r in args.decoder_rows.split(",")]
    pieces, raw = measure_pieces(
        bench.denoiser, bench.resolution // bench.pipe.vae_scale_factor, 2, rows, device, dtype
    )
    worlds = [int(w) for w in args.worlds.split(",")]
    table = projection_table(
        pieces, key_steps, args.steps, worlds, args.bandwidth_gbps, args.latency_us * 1e-6
    )
    return {
        "pieces": raw,
        "bandwidth_gbps": args.bandwidth_gbps,
        "latency_us": args.latency_us,
        "groups": [len(g) for g in key_step_groups(key_steps, args.steps)],
        "table": table,
        "note": "projected from single-device measurements; not a measured multi-device run",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    log.setLevel(logging.INFO)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (50 if args.scheduler == "ddim" else 20)
    spec = args.key_steps or DEFAULT_PRESET.get((args.scheduler, args.steps), "uniform-5")
    ks_arg, key_steps = resolve_key_steps(spec, args.steps)

    ctx, rank, world = None, 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import distfd

        ctx = distfd.DistContext.from_env()
        rank, device = ctx.rank, ctx.device
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res = args.resolution or RESOLUTION[(args.arch, args.size)]
    host = host_facts(device, sys.argv if argv is None else ["benchmarks/latency.py", *argv], args.seed)
    log.info("building %s/%s at %dpx on %s (%s)", args.arch, args.size, res, device, dtype)
    bench = build(args.arch, args.size, args.scheduler, device, dtype, res, seed=args.seed)

    opts = {
        "key_steps": ks_arg,
        "noise_alpha": args.noise_alpha,
        "context": ctx,
        "scheduler": args.scheduler,
        "deepcache_interval": args.deepcache_interval,
        "deepcache_branch": args.deepcache_branch,
    }
    # Warm-ups first, then the timed calls interleaved round-robin over the methods, so that drifting
    # background load (shared hosts) or clock/thermal state affects every method alike.
    recs = [prepare_method(n.strip(), bench, args, opts, device) for n in args.methods.split(",")]
    for _ in range(args.reps):
        for rec in recs:
            if rec["status"] == "ok":
                timed_rep(rec, bench, args, opts, device)
    for rec in recs:
        finish_method(rec)
    images = {r["name"]: r.pop("image", None) for r in recs}
    vanilla = next((r for r in recs if r["name"] == "vanilla" and r["status"] == "ok"), None)
    for r in recs:
        if vanilla and r["status"] == "ok":
            r["speedup_pipeline"] = vanilla["pipeline_s"]["median"] / r["pipeline_s"]["median"]
            r["speedup_denoiser"] = vanilla["denoiser_s"]["median"] / r["denoiser_s"]["median"]
            r["speedup_denoiser_cpu"] = vanilla["denoiser_cpu_s"]["median"] / r["denoiser_cpu_s"]["median"]
            r["image_mean_abs_diff_vs_vanilla"] = M.image_diff(images[r["name"]], images["vanilla"])
        r["note"] = method_note(r, world)

    result: dict[str, Any] = {
        "config": {
            "arch": args.arch,
            "size": args.size,
            "resolution": res,
            "scheduler": args.scheduler,
            "steps": args.steps,
            "key_steps_spec": spec,
            "key_steps_resolved": key_steps,
            "dtype": str(dtype).removeprefix("torch."),
            "warmup": args.warmup,
            "reps": args.reps,
            "seed": args.seed,
            "prompt": args.prompt,
            "world_size": world,
            "guidance_scale": bench.guidance_scale,
            "text_encoding": "random-weight CLIP text encoder(s) of the published size, inside the timed call",
        },
        "host": {**host, "load_average_end": list(os.getloadavg())},
        "methods": recs,
    }
    if not args.no_projection and world == 1:
        result["projection"] = projection(bench, args, key_steps, device, dtype)
    if ctx is not None:
        ctx.close()
    if rank == 0:
        paths = write_all(result, args.out_dir)
        print(markdown(result))
        print("wrote", *(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
