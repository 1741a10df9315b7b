"""Compiled distfd on one device: same image as eager distfd, the planned graphs, no extra host syncs.

On the embedded model (the shipped pipeline, DDIM-50, its calibrated key steps, CFG 7.5) it runs:

1. eager distfd parallel: the reference latents;
2. for each compile style (``torch.compile(pipe.unet)`` and ``pipe.unet.compile()``) with the given
   backend and mode: distfd's warm-up calls (graphs compiled per call, CUDA graphs recorded), one more
   call (must compile nothing), the latents' difference from eager distfd, graph breaks, recompiles,
   and the graphs planned before sampling (``distfd.passes.planned_graphs``);
3. on CUDA: the device synchronisations of one call, counted with ``torch.cuda.set_sync_debug_mode``
   for vanilla, eager distfd and compiled distfd.

Writes one JSON file. ``python benchmarks/compile_check.py --device cuda --backend inductor
--mode reduce-overhead --out check.json``; on CPU, ``--device cpu --backend eager`` runs the same
steps (no sync counts).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import distfd
from distfd.compiling import cuda_graphs_recorded, graph_breaks, graphs_compiled, warm_up
from distfd.passes import planned_graphs

log = logging.getLogger("benchmarks.compile_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None, help="torch.compile mode (inductor only), e.g. reduce-overhead")
    p.add_argument("--dynamic", choices=["none", "true", "false"], default="none")
    p.add_argument("--styles", default="module,inplace")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--key-steps", default=None, help="preset or list (default: the embedded model's calibrated set)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("compile-check.json"))
    return p.parse_args(argv)


def load(device: torch.device):
    import diffusers

    from distfd.embedded import default_model_path

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(default_model_path()), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(steps: int) -> dict[str, Any]:
    return dict(
        prompt="a small red circle at the top left on a blue background",
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
    )


def timed(pipe, steps: int, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = pipe(**call_kwargs(steps)).images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.float().cpu(), time.perf_counter() - t0


def count_syncs(pipe, steps: int) -> int:
    """Synchronising CUDA calls made by one pipeline call (torch's sync debug mode warns on each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe(**call_kwargs(steps))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def check_style(pipe, unet, style: str, args, config, reference: torch.Tensor, device) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": args.backend}
    if args.mode and args.backend == "inductor":
        options["mode"] = args.mode
    options["dynamic"] = {"none": None, "true": True, "false": False}[args.dynamic]
    if style == "module":
        pipe.unet = torch.compile(unet, **options)
    else:
        unet.compile(**options)
    out: dict[str, Any] = {"style": style, "options": {k: str(v) for k, v in options.items()}}
    from torch._dynamo.utils import counters

    counters.clear()
    handle = distfd.apply(pipe, config)
    try:
        report = warm_up(pipe, calls=args.warmup, **call_kwargs(args.steps))
        out["warmup"] = report.as_dict()
        g0 = graphs_compiled()
        c0 = cuda_graphs_recorded(device) if device.type == "cuda" else None
        latents, seconds = timed(pipe, args.steps, device)
        out["timed_call_s"] = seconds
        out["graphs_compiled_in_timed_call"] = graphs_compiled() - g0
        c1 = cuda_graphs_recorded(device) if c0 is not None else None
        if c1 is not None:
            out["cuda_graphs_recorded_in_timed_call"] = c1 - c0
        out["graphs_total"] = graphs_compiled()
        out["graph_breaks"] = graph_breaks()
        out["recompiles"] = dict(counters["recompiles"])
        out["max_abs_diff_vs_eager_distfd"] = float((latents - reference).abs().max())
        out["reference_scale"] = float(reference.abs().max())
        if device.type == "cuda":
            out["sync_calls_per_image"] = count_syncs(pipe, args.steps)
    finally:
        handle.remove()
        if style == "module":
            pipe.unet = unet
        else:
            unet._compiled_call_impl = None  # back to eager for the next style
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    from distfd.embedded import calibrated_key_steps
    from distfd.keysteps import resolve_key_steps

    spec = args.key_steps or calibrated_key_steps("ddim", args.steps) or "uniform-5"
    keys = list(resolve_key_steps(str(spec), args.steps))
    config = distfd.FasterDiffusionConfig(key_steps=keys, mode="parallel")
    pipe = load(device)
    unet = pipe.unet
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "key_steps": keys,
    }
    ks = keys
    dynamic = args.dynamic == "true"
    result["planned"] = {
        "graphs": planned_graphs(ks, args.steps, 2, dynamic=dynamic).graphs,
        "cuda_graph_captures": planned_graphs(ks, args.steps, 2).captures,
    }
    vanilla, t_v = timed(pipe, args.steps, device)
    vanilla, t_v = timed(pipe, args.steps, device)
    handle = distfd.apply(pipe, config)
    timed(pipe, args.steps, device)  # warm-up (new batch shapes)
    reference, t_e = timed(pipe, args.steps, device)
    result["eager"] = {"vanilla_s": t_v, "distfd_s": t_e}
    if device.type == "cuda":
        result["eager"]["sync_calls_per_image_distfd"] = count_syncs(pipe, args.steps)
    handle.remove()
    if device.type == "cuda":
        result["eager"]["sync_calls_per_image_vanilla"] = count_syncs(pipe, args.steps)
    result["styles"] = []
    for style in args.styles.split(","):
        try:
            result["styles"].append(check_style(pipe, unet, style, args, config, reference, device))
        except Exception as e:  # noqa: BLE001 - record and go on to the next style
            log.exception("style %s failed", style)
            result["styles"].append({"style": style, "error": f"{type(e).__name__}: {e}"})
        torch._dynamo.reset()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
