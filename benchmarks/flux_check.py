"""FLUX.1-dev's architecture on one GPU (random weights, bf16, 1024x1024, 28 steps): vanilla, distfd
(propagate and parallel, default key steps and encoder N) and diffusers' FirstBlockCache.

Random weights: the images mean nothing, the timings do (the work per step is the real model's).
Prompt embeddings are random too (no text encoders or VAE are built: latents out).

    python benchmarks/flux_check.py --out flux-check.json            # on a GPU
    python benchmarks/flux_check.py --size tiny --device cpu        # checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.flops_mmdit import FLUX_DEV

TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))  # fmt: skip
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    cfg = FLUX_DEV if size == "full" else TINY
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 12B parameters built in bf16 directly (24 GB, not 48)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(default)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds = dict(
        prompt_embeds=torch.randn(1, 512, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_prompt_embeds=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
    )
    return pipe, embeds


def timed(pipe, embeds, args, sync) -> tuple[float, torch.Tensor]:
    def once():
        return pipe(
            **embeds,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.steps,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    once()  # warm-up
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        out = once()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out.float().cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 (full), 64 (tiny)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--fbc-threshold", type=float, default=0.12)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.resolution = args.resolution or (1024 if args.size == "full" else 64)
    from diffusers.hooks import FirstBlockCacheConfig

    import distfd
    from distfd.keysteps import resolve_key_steps

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pipe, embeds = build(args.size, args.device, dtype)
    keys = resolve_key_steps("sd-ddim-50", args.steps, args.steps, allow_rescale=True)
    report = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype),
        "resolution": args.resolution,
        "steps": args.steps,
        "key_steps": list(keys),
        "torch": torch.__version__,
        "methods": {},
    }
    base, ref = timed(pipe, embeds, args, sync)
    report["methods"]["vanilla"] = {"s": base}

    def record(name, s, out, **extra):
        rel = float((out - ref).norm() / ref.norm())
        report["methods"][name] = {"s": s, "speedup": base / s, "rel_l2_vs_vanilla": rel, **extra}
        print(f"{name}: {s:.3f} s, {base / s:.2f}x, rel L2 {rel:.3g}", flush=True)

    for mode in ("propagate", "parallel"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=list(keys), mode=mode))
        try:
            s, out = timed(pipe, embeds, args, sync)
            stats = handle.stats()
        finally:
            handle.remove()
        record(f"distfd-{mode}", s, out, encoder_blocks=len(handle.engine.modules) - 2)
        if cuda:
            report["methods"][f"distfd-{mode}"]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        calls = args.reps + 1  # the warm-up too
        report["methods"][f"distfd-{mode}"]["encoder_passes_per_image"] = stats["encoder_passes"] / calls
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=args.fbc_threshold))
    try:
        s, out = timed(pipe, embeds, args, sync)
    finally:
        pipe.transformer.disable_cache()
    record("first-block-cache", s, out, threshold=args.fbc_threshold)
    print(f"vanilla: {base:.3f} s", flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
