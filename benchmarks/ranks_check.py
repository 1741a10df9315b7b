"""Several ranks, one image: save the final latents of distfd parallel on this world size.

Run once alone and once under torchrun, then compare the two files (``--compare A B``). With
``--backend gloo`` two ranks can share one GPU (NCCL refuses), which checks the CUDA code path of the
distributed runtime (broadcasts, all-gathers of CUDA tensors, the final sync) on a single GPU::

    python benchmarks/ranks_check.py --device cuda --out w1.pt
    torchrun --standalone --nproc-per-node 2 benchmarks/ranks_check.py --device cuda --backend gloo --out w2.pt
    python benchmarks/ranks_check.py --compare w1.pt w2.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def generate(args) -> None:
    from diffusers import DiffusionPipeline

    import distfd
    from distfd.embedded import default_model_path

    ctx = distfd.DistContext.from_env(backend=args.backend, timeout_s=120, device=args.device)
    dtype = torch.float16 if ctx.device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(default_model_path()), dtype=dtype).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    config = distfd.FasterDiffusionConfig(key_steps=args.key_steps, mode="parallel", encoder=args.encoder)
    try:
        with_handle = distfd.apply(pipe, config, context=ctx)
        out = pipe(
            "a small red circle at the top left on a blue background",
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        ).images
        stats = with_handle.stats()
        with_handle.remove()
        if ctx.is_main:
            torch.save({"latents": out.float().cpu(), "world_size": ctx.world_size, "stats": stats}, args.out)
            print(f"rank 0 of {ctx.world_size} on {ctx.device}: wrote {args.out}; stats {stats}")
    finally:
        ctx.close()


def compare(a: Path, b: Path) -> int:
    x, y = torch.load(a), torch.load(b)
    diff = (x["latents"] - y["latents"]).abs()
    scale = float(x["latents"].abs().max())
    report = {
        "a": str(a),
        "b": str(b),
        "world_sizes": [x["world_size"], y["world_size"]],
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "latent_scale": scale,
        "collectives_b": y["stats"].get("collectives"),
        "bytes_sent_b": y["stats"].get("bytes_sent"),
    }
    # fp16 with other batch splits rounds differently; a wrong share or order shows up as O(scale).
    report["same_image"] = report["max_abs_diff"] <= 0.02 * scale
    print(json.dumps(report, indent=2))
    return 0 if report["same_image"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (this rank's GPU) or cpu; default: cuda if present")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    p.add_argument("--encoder", choices=["rank0", "replicated"], default="rank0")
    p.add_argument("--key-steps", default="sd-ddim-50")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("latents.pt"))
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    generate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
