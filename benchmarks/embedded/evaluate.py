"""Prompt-adherence evaluation of a tiny-shapes pipeline with the judge.

Samples one image per held-out caption (single-shape scenes) and reports the
fraction whose shape, colour, and both, as read by the judge, match the
prompt; plus size/position/background accuracy and the Frechet distance
between judge features of the samples and of real scenes with the same
captions.

Example::

    python -m benchmarks.embedded.evaluate --n 200 --steps 50 --out eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from distfd.embedded import default_model_path, load_judge
from distfd.embedded.judge import Judge, accuracy
from distfd.embedded.scenes import generate_scenes, to_float

logger = logging.getLogger(__name__)
DEFAULT_EVAL_SEED = 424242  # never used for training


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def load_pipeline(path: str | Path | None = None) -> StableDiffusionPipeline:
    """Load the (default: shipped) pipeline in float32 with a DDIM scheduler."""
    pipe = StableDiffusionPipeline.from_pretrained(str(path or default_model_path()), dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(
    pipe: StableDiffusionPipeline,
    captions: list[str],
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = DEFAULT_EVAL_SEED,
    batch_size: int = 100,
) -> np.ndarray:
    """Images ``(n, H, W, 3)`` in ``[0, 1]``; sample ``i`` uses generator seed ``seed + i``."""
    out = []
    for i in tqdm(range(0, len(captions), batch_size), desc="sampling"):
        batch = captions[i : i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(batch))]
        res = pipe(
            batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="np"
        )
        out.append(res.images)
    return np.concatenate(out)


def save_grid(images: np.ndarray, path: str | Path, columns: int = 8, scale: int = 4) -> None:
    """Save ``(n, H, W, 3)`` images in ``[0, 1]`` as one PNG grid, upscaled ``scale`` times."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    img = Image.fromarray((canvas * 255).round().astype(np.uint8))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def score(judge: Judge, images, labels: dict[str, torch.Tensor], reference=None) -> dict[str, float]:
    """Judge accuracies (incl. ``both`` = shape and colour right) and optional Frechet distance."""
    pred = judge.predict(images)
    metrics = {f"{k}_accuracy": v for k, v in accuracy(pred, labels).items()}
    both = (pred["shape"] == labels["shape"]) & (pred["colour"] == labels["colour"])
    metrics["shape_and_colour_accuracy"] = float(both.float().mean())
    if reference is not None:
        metrics["frechet_distance"] = frechet_distance(judge.features(images), judge.features(reference))
    return metrics


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
    """uint8 scenes through the VAE (posterior mean) and back: the ceiling any sample can reach."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size]).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(rec.add(1).mul(127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def evaluate(
    path: str | Path | None = None,
    n: int = 200,
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = DEFAULT_EVAL_SEED,
    batch_size: int = 100,
    grid: Path | None = None,
) -> dict:
    """Full evaluation on ``n`` held-out single-shape captions drawn from ``seed``.

    Besides the samples, the judge also scores the real scenes for those captions
    and their VAE reconstructions (the ceiling the latent space allows).

    With ``grid``, the first 64 samples are also saved there as an 8x8 PNG.
    """
    t0 = time.time()
    pipe = load_pipeline(path)
    judge = load_judge()
    real = generate_scenes(n, seed)  # same captions as the prompts, rendered for reference
    images = sample(pipe, real.captions, steps, guidance_scale, seed, batch_size)
    metrics = score(judge, images, real.labels, reference=real.images)
    if grid is not None:
        save_grid(images[:64], grid)
    metrics["real_images"] = score(judge, real.images, real.labels)
    metrics["vae_reconstructions"] = score(judge, reconstruct(pipe.vae, real.images), real.labels)
    return {
        "model": str(path or default_model_path()),
        "n": n,
        "caption_seed": seed,
        "scheduler": "DDIMScheduler",
        "steps": steps,
        "guidance_scale": guidance_scale,
        **metrics,
        "wall_time_s": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline directory (default: the shipped one)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    p.add_argument("--grid", type=Path, default=None, help="save the first 64 samples as a PNG grid here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    result = evaluate(
        args.model, args.n, args.steps, args.guidance_scale, args.seed, args.batch_size, args.grid
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
