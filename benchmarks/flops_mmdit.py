"""FLOP model and multi-GPU projection for MMDiT transformers: FLUX.1-dev and SD3.5-medium at 1024x1024.

Counts one transformer forward on the meta device (no weights, no memory) with the FLOP counter of
``benchmarks/measure.py`` (one multiply-add = 2 FLOPs), attributed per module and split as distfd's
MMDiT adapter splits it: encoder = the image and text embeddings and the first N blocks (default N
of ``distfd.adapters.mmdit``); decoder = the rest (timestep/guidance embedding, rotary embedding,
the other blocks, the output head). Then, with K key steps of S::

    single GPU:  speed-up = S (E + D) / (K E + S D)
    W GPUs:      benchmarks/projection.py's critical path, times = FLOPs / (peak x utilisation),
                 the encoder's cached streams broadcast per key step, the predictions gathered

The times are a FLOP model, not a measurement: ``benchmarks/gpu_check.sh`` measures FLUX on a GPU.

    python benchmarks/flops_mmdit.py --out benchmarks/results/flops-mmdit-1024
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.measure import flop_counter
from benchmarks.projection import Pieces, projection_table

# diffusers configs of the released checkpoints (transformer/config.json).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
# name -> (config, text tokens, CFG rows per step, steps): the pipelines' defaults at 1024x1024.
MODELS = {
    "flux1-dev": (FLUX_DEV, 512, 1, 28),
    "sd35-medium": (SD35_MEDIUM, 77 + 256, 2, 28),
}
UNET_FLOPS = {  # measured UNet FLOP files next to which these are reported
    "sd15-512-ddim50": "flops-sd15-512-ddim50.json",
    "sdxl-1024-ddim50": "flops-sdxl-1024-ddim50.json",
}
PEAK_TFLOPS, UTILISATION = 989.0, 0.5  # H100 SXM dense bf16, an assumed model-FLOP utilisation
LINKS_GBPS = {"nvlink": 3600.0, "pcie4": 200.0}  # per device, Gbit/s
WORLDS = (1, 2, 4, 8)


def _forward(name: str, rows: int, resolution: int) -> tuple[torch.nn.Module, dict[str, int]]:
    """One forward of ``rows`` rows on the meta device: the model and FLOPs per top-level module path."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg, text, _, _ = MODELS[name]
    latent = resolution // 8
    with torch.device("meta"), torch.no_grad():
        if name.startswith("flux"):
            model = FluxTransformer2DModel(**cfg)
            tokens = (latent // 2) ** 2
            kw = dict(
                hidden_states=torch.empty(rows, tokens, cfg["in_channels"]),
                encoder_hidden_states=torch.empty(rows, text, cfg["joint_attention_dim"]),
                pooled_projections=torch.empty(rows, cfg["pooled_projection_dim"]),
                timestep=torch.full((rows,), 0.5),
                guidance=torch.full((rows,), 3.5),
                img_ids=torch.zeros(tokens, 3),
                txt_ids=torch.zeros(text, 3),
            )
        else:
            model = SD3Transformer2DModel(**cfg)
            kw = dict(
                hidden_states=torch.empty(rows, cfg["in_channels"], latent, latent),
                encoder_hidden_states=torch.empty(rows, text, cfg["joint_attention_dim"]),
                pooled_projections=torch.empty(rows, cfg["pooled_projection_dim"]),
                timestep=torch.full((rows,), 500.0),
            )
        mode = flop_counter()
        with mode:
            model(**kw)
    per: dict[str, int] = {}
    for path, ops in mode.get_flop_counts().items():
        parts = path.split(".")
        if len(parts) == 2 or (len(parts) == 3 and parts[1].endswith("transformer_blocks")):
            per[".".join(parts[1:])] = int(sum(ops.values()))
    return model, {"total": int(mode.get_total_flops()), **per}


def split(name: str, rows: int, resolution: int, encoder_blocks: int | None = None) -> dict[str, Any]:
    """Encoder and decoder FLOPs of one forward as distfd's adapter splits it."""
    from distfd.adapters import REGISTRY
    from distfd.adapters.mmdit import blocks

    model, per = _forward(name, rows, resolution)
    named = blocks(model)
    n = encoder_blocks or REGISTRY[type(model)].default_blocks(len(named))
    embed = "x_embedder" if name.startswith("flux") else "pos_embed"
    enc_names = [embed, "context_embedder", *(b for b, _ in named[:n])]
    enc = sum(per.get(k, 0) for k in enc_names)
    return {
        "blocks": len(named),
        "encoder_blocks": n,
        "total": per["total"],
        "encoder": enc,
        "decoder": per["total"] - enc,
    }


def project_model(name: str, resolution: int = 1024) -> dict[str, Any]:
    from distfd.keysteps import resolve_key_steps

    cfg, text, rows, steps = MODELS[name]
    keys = resolve_key_steps("sd-ddim-50", steps, steps, allow_rescale=True)  # distfd's default for them
    s = split(name, rows, resolution)
    rate = PEAK_TFLOPS * 1e12 * UTILISATION
    tokens = (resolution // 16) ** 2
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if not name.startswith("flux"):
        dim = cfg["caption_projection_dim"]  # SD3's inner width is the caption projection's
    pieces = Pieces(
        encoder_s=s["encoder"] / rate,
        decoder_points=((rows, s["decoder"] / rate), (rows * 8, 8 * s["decoder"] / rate)),
        broadcast_bytes=rows * (tokens + text) * dim * 2,  # both streams, bf16
        gather_bytes_per_row=tokens * (64 if name.startswith("flux") else 16 * 4) * 2,
        batch_rows=rows,
    )
    van, fd = steps * s["total"], len(keys) * s["encoder"] + steps * s["decoder"]
    return {
        "model": name,
        "resolution": resolution,
        "steps": steps,
        "rows_per_step": rows,
        "key_steps": list(keys),
        "step_tflops": s["total"] / 1e12,
        "blocks": s["blocks"],
        "encoder_blocks": s["encoder_blocks"],
        "encoder_share": s["encoder"] / s["total"],
        "single_gpu_flop_speedup": van / fd,
        "broadcast_mb_per_key_step": pieces.broadcast_bytes / 1e6,
        "projection": {
            link: [
                {"world": r["world"], "speedup_vs_vanilla": r["speedup_vs_vanilla"], "total_s": r["total_s"]}
                for r in projection_table(pieces, keys, steps, WORLDS, bw)
            ]
            for link, bw in LINKS_GBPS.items()
        },
    }


def unet_reference(results: Path) -> dict[str, Any]:
    """Encoder share and single-GPU FLOP speed-up from the UNet FLOP files already in results/."""
    out = {}
    for label, file in UNET_FLOPS.items():
        path = results / file
        if path.is_file():
            data = json.loads(path.read_text())["batch2_cfg"]
            out[label] = {
                "encoder_share": data["encoder_gflops"] / data["unet_step_gflops"],
                "single_gpu_flop_speedup": 1 / data["ratio"],
            }
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in report["models"]:
        for link, style in (("nvlink", "-o"), ("pcie4", "--s")):
            rows = m["projection"][link]
            ax.plot(
                [r["world"] for r in rows],
                [r["speedup_vs_vanilla"] for r in rows],
                style,
                label=f"{m['model']} {link}",
            )
    for label, u in report["unet_reference"].items():
        ax.axhline(u["single_gpu_flop_speedup"], color="grey", lw=0.8, ls=":")
        ax.annotate(f"{label} 1 GPU (FLOPs)", (1, u["single_gpu_flop_speedup"]), fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="GPUs (W)", ylabel="speed-up vs vanilla (FLOP model)", xticks=list(WORLDS))
    ax.set_xticklabels([str(w) for w in WORLDS])
    ax.minorticks_off()
    ax.set_title("FasterDiffusion on MMDiT, 1024x1024, 28 steps (projection)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| model | blocks (encoder N) | encoder FLOP share | key steps | 1 GPU FLOP speed-up | W=1 | W=2 | W=4 | W=8 (NVLink) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        w = [f"{r['speedup_vs_vanilla']:.2f}x" for r in m["projection"]["nvlink"]]
        lines.append(
            f"| {m['model']} ({m['rows_per_step']} row/step) | {m['blocks']} ({m['encoder_blocks']}) | "
            f"{m['encoder_share']:.1%} | {len(m['key_steps'])} of {m['steps']} | "
            f"{m['single_gpu_flop_speedup']:.2f}x | {' | '.join(w)} |"
        )
    for label, u in report["unet_reference"].items():
        lines.append(
            f"| {label} (UNet, CFG) | | {u['encoder_share']:.1%} | | {u['single_gpu_flop_speedup']:.2f}x | | | | |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--out", type=Path, help="write OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    report = {
        "counter": "torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 x MACs), meta device",
        "timing_model": f"FLOPs / ({PEAK_TFLOPS} TFLOP/s x {UTILISATION}); links {LINKS_GBPS} Gbit/s",
        "default_n": (
            "SD3: 5 of 6 blocks, measured on the embedded MMDiT (docs/quality.md); "
            "FLUX: the paper's DiT split (18 of 28) scaled"
        ),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "models": [project_model(m, args.resolution) for m in args.models],
        "unet_reference": unet_reference(results),
    }
    text = json.dumps(report, indent=2)
    print(markdown(report))
    if args.out:
        args.out.with_suffix(".json").write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
        plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
