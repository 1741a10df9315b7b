"""Full-size FLOP counts per UNet step and per image, on the meta device (no memory, no weights).

Counts with ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs; matmul,
conv and attention counted). Splits each UNet forward into FasterDiffusion's encoder (conv_in,
time embedding, down blocks, mid block) and decoder (up blocks, output head), then

    vanilla        = steps * (E + D)
    FasterDiffusion = len(key_steps) * E + steps * D

with and without the classifier-free-guidance batch of 2.

    python benchmarks/flops.py --arch sd15 --scheduler ddim
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
from diffusers import AutoencoderKL, UNet2DConditionModel

from benchmarks.measure import flop_counter
from benchmarks.models import RESOLUTION, SD15_UNET, SD_VAE, SDXL_UNET

ENCODER_PARTS = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "add_time_proj",
    "add_embedding",
    "down_blocks",
    "mid_block",
)


def unet_split_flops(cfg: dict[str, Any], latent: int, rows: int, device: str = "meta") -> dict[str, int]:
    """FLOPs of one UNet forward with ``rows`` rows, split into encoder and decoder parts.

    ``device="meta"`` counts without computing; ``"cpu"`` runs a real random-weight forward.
    """
    with torch.device(device), torch.no_grad():
        unet = UNet2DConditionModel(**cfg)
        kw: dict[str, Any] = {}
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.empty(rows, pooled),
                "time_ids": torch.empty(rows, 6),
            }
        mode = flop_counter()
        with mode:
            unet(
                torch.empty(rows, 4, latent, latent),
                torch.tensor(500),
                torch.empty(rows, 77, cfg["cross_attention_dim"]),
                **kw,
            )
    counts = mode.get_flop_counts()
    enc = 0
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "UNet2DConditionModel" and parts[1] in ENCODER_PARTS:
            if len(parts) == 2 or (parts[1] == "down_blocks" and len(parts) == 3):
                enc += sum(ops.values())
    total = int(mode.get_total_flops())
    return {"total": total, "encoder": int(enc), "decoder": total - int(enc)}


def vae_decode_flops(resolution: int) -> int:
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        mode = flop_counter()
        with mode:
            vae.decode(torch.empty(1, 4, resolution // 8, resolution // 8))
    return int(mode.get_total_flops())


def per_image(split: dict[str, int], steps: int, n_keys: int) -> dict[str, float]:
    van = steps * split["total"]
    fd = n_keys * split["encoder"] + steps * split["decoder"]
    return {"vanilla_gflops": van / 1e9, "fasterdiffusion_gflops": fd / 1e9, "ratio": fd / van}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--resolution", type=int)
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--check-cpu", action="store_true", help="also count one real CPU forward (batch 1)")
    args = p.parse_args(argv)
    from distfd import resolve_key_steps

    steps, preset = (50, "sd-ddim-50") if args.scheduler == "ddim" else (20, "sd-dpm-20")
    keys = resolve_key_steps(preset, steps)
    res = args.resolution or RESOLUTION[(args.arch, "full")]
    cfg = SD15_UNET if args.arch == "sd15" else SDXL_UNET
    out: dict[str, Any] = {
        "arch": args.arch,
        "resolution": res,
        "steps": steps,
        "key_steps": list(keys),
        "counter": "torch.utils.flop_counter.FlopCounterMode (FLOPs = 2 x MACs)",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "vae_decode_gflops": vae_decode_flops(res) / 1e9,
    }
    for rows, label in ((1, "batch1_no_cfg"), (2, "batch2_cfg")):
        split = unet_split_flops(cfg, res // 8, rows)
        out[label] = {
            "unet_step_gflops": split["total"] / 1e9,
            "encoder_gflops": split["encoder"] / 1e9,
            "decoder_gflops": split["decoder"] / 1e9,
            **per_image(split, steps, len(keys)),
        }
        out[label]["unet_step_gmacs"] = split["total"] / 2e9
    if args.check_cpu:
        cpu = unet_split_flops(cfg, res // 8, 1, device="cpu")
        out["cpu_check_batch1"] = {
            "unet_step_gflops": cpu["total"] / 1e9,
            "matches_meta": cpu["total"] / 1e9 == out["batch1_no_cfg"]["unet_step_gflops"],
        }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
