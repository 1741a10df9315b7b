"""Train the embedded tiny-shapes text-to-image pipeline on CPU.

Two stages, both reproducible from ``--seed``:

1. the ``AutoencoderKL`` (32x32x3 <-> 16x16x4) on rendered scenes;
2. the CLIP text encoder and the cross-attention UNet jointly, on cached
   latents (v-prediction, capped-SNR loss weights, caption dropout for
   classifier-free guidance, EMA weights).

The result is a standard diffusers ``StableDiffusionPipeline`` directory plus
``training.json`` (seed, steps, final losses, wall time, command) in ``--out``.

Example::

    python -m benchmarks.embedded.train_pipeline --out distfd/embedded/weights/tiny-shapes --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from distfd.embedded.scenes import generate_scenes

from . import models
from .tokenizer import build_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def train_vae(
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    gen: torch.Generator,
    vae: AutoencoderKL | None = None,
):
    """Stage 1: fit the autoencoder to float images in ``[-1, 1]``; returns (vae, final losses)."""
    vae = (vae or models.make_vae()).float().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    ema_rec = ema_kl = None
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_rec = rec_loss.item() if ema_rec is None else 0.98 * ema_rec + 0.02 * rec_loss.item()
        ema_kl = kl.item() if ema_kl is None else 0.98 * ema_kl + 0.02 * kl.item()
        bar.set_postfix(rec=f"{ema_rec:.5f}", kl=f"{ema_kl:.3f}")
    return vae.eval(), {"vae_reconstruction_mse": ema_rec, "vae_kl_per_dim": ema_kl}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Posterior means of ``images`` (unscaled latents)."""
    chunks = [
        vae.encode(images[i : i + batch_size]).latent_dist.mean
        for i in tqdm(range(0, len(images), batch_size), desc="encode")
    ]
    return torch.cat(chunks)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


def train_denoiser(
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    tokenizer,
    args,
    gen,
    on_checkpoint=None,
):
    """Stage 2: text encoder + UNet on scaled latents; returns (ema text encoder, ema unet, losses).

    ``on_checkpoint(step, ema_text_encoder, ema_unet)`` is called every
    ``args.checkpoint_every`` steps (if both are set).
    """
    if args.init_from:  # continue training a previously saved pipeline
        text_encoder = CLIPTextModel.from_pretrained(str(args.init_from / "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(args.init_from / "unet"))
    else:
        text_encoder = models.make_text_encoder(tokenizer)
        unet = models.make_unet(args.unet_width, args.layers_per_block)
    text_encoder.float().train()
    unet.float().train()
    scheduler = models.make_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    # The loss in image terms is weighted by min(snr + 1, gamma) (v) or min(snr, gamma) (epsilon):
    # a capped weight for nearly clean steps (min-SNR-gamma), and for v the nearly pure-noise steps,
    # where the prompt alone decides the image, keep full weight.
    weights = (
        torch.clamp(args.snr_gamma / (snr + 1), max=1.0)
        if v_pred
        else torch.clamp(snr, max=args.snr_gamma) / snr
    )
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps, max(1, args.steps // 20)))
    ema_loss = None
    bar = tqdm(range(args.steps), desc="unet+text")
    for step in bar:
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        tok[drop] = empty_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(tok).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        target = scheduler.get_velocity(x0, noise, t) if v_pred else noise
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        ema_loss = per.mean().item() if ema_loss is None else 0.98 * ema_loss + 0.02 * per.mean().item()
        bar.set_postfix(mse=f"{ema_loss:.4f}")
        if on_checkpoint and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            on_checkpoint(step + 1, ema_te, ema_unet)
    key = "denoiser_v_mse" if v_pred else "denoiser_epsilon_mse"
    return ema_te, ema_unet, {key: ema_loss}


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the model length, exactly as StableDiffusionPipeline does."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def save_pipeline(out: Path, vae, text_encoder, unet, tokenizer, fp16: bool) -> None:
    """Write a loadable ``StableDiffusionPipeline`` directory (copies, so training can go on)."""
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(text_encoder),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet),
        scheduler=models.make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out / "tokenizer")  # also classic vocab.json / merges.txt


def run(args: argparse.Namespace) -> dict:
    """Train both stages and write the pipeline plus ``training.json`` to ``args.out``."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer = build_tokenizer(args.max_length)

    data = generate_scenes(args.n_scenes, args.seed, two_shape_prob=args.two_shape_prob)
    images = data.as_float()
    init_vae = AutoencoderKL.from_pretrained(str(args.init_from / "vae")) if args.init_from else None
    if init_vae is not None and args.vae_steps == 0:
        vae = init_vae.float().eval()
        prev = json.loads((args.init_from / "training.json").read_text())
        vae_losses = {k: v for k, v in prev["final_losses"].items() if k.startswith("vae_")}
    else:
        vae, vae_losses = train_vae(
            images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight, gen, init_vae
        )
    t_vae = time.time() - t0

    latents = encode_latents(vae, images)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    ids = tokenize(tokenizer, data.captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    out = Path(args.out)

    def checkpoint(step: int, te: CLIPTextModel, un: UNet2DConditionModel) -> None:
        save_pipeline(out / "checkpoints" / f"step-{step}", vae, te, un, tokenizer, fp16=False)

    text_encoder, unet, den_losses = train_denoiser(
        latents * scaling_factor, ids, empty_ids, tokenizer, args, gen, on_checkpoint=checkpoint
    )
    save_pipeline(out, vae, text_encoder, unet, tokenizer, fp16=args.fp16)
    report = {
        "seed": args.seed,
        "command": "python -m benchmarks.embedded.train_pipeline " + shlex.join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "vae_steps": args.vae_steps,
        "denoiser_steps": args.steps,
        "init_from": str(args.init_from) if args.init_from else None,
        "init_from_training": (
            json.loads((args.init_from / "training.json").read_text()) if args.init_from else None
        ),
        "final_losses": {**vae_losses, **den_losses},
        "vae_scaling_factor": scaling_factor,
        "parameters": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
        },
        "wall_time_s": {"vae": round(t_vae, 1), "total": round(time.time() - t0, 1)},
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-scenes", type=int, default=30000)
    p.add_argument("--two-shape-prob", type=float, default=0.15)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--unet-width", type=int, default=32)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--max-length", type=int, default=24, help="tokenizer/text encoder context length")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue training a saved pipeline directory (with --vae-steps 0 its VAE is kept as is)",
    )
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also save the EMA pipeline to OUT/checkpoints/step-N every N denoiser steps (0: never)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args)
    print(json.dumps({k: report[k] for k in ("final_losses", "vae_scaling_factor", "wall_time_s")}, indent=2))


if __name__ == "__main__":
    main()
