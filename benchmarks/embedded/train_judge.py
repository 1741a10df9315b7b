"""Train the scene judge (a small CNN attribute classifier).

Example::

    python -m benchmarks.embedded.train_judge --out distfd/embedded/weights/judge --seed 0

Training scenes come from seed ``seed``, test scenes from ``seed + 1_000_003``;
the test accuracy is written to ``metrics.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distfd.embedded.judge import Judge, SceneJudge, accuracy
from distfd.embedded.scenes import generate_scenes

logger = logging.getLogger(__name__)
TEST_SEED_OFFSET = 1_000_003


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur and noise so that the judge tolerates decoder artefacts."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen) * 0.7
    x = x * (1 - mix) + blurred * mix
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train(
    out: Path, seed: int, n_train: int, n_test: int, epochs: int, batch_size: int, lr: float, width: int = 16
) -> dict:
    """Train, evaluate on fresh scenes, save into ``out``; returns the metrics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    data = generate_scenes(n_train, seed)
    x_all = data.as_float()
    y_all = {
        k: v for k, v in data.labels.items() if k in ("shape", "colour", "size", "position", "background")
    }
    model = SceneJudge(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="judge")
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(n_train // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            logits = model(augment(x_all[idx], gen))
            loss = sum(F.cross_entropy(logits[k], y[idx]) for k, y in y_all.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    test = generate_scenes(n_test, seed + TEST_SEED_OFFSET)
    acc = accuracy(Judge(model).predict(test.images), test.labels)
    model.save(out)
    metrics = {
        "seed": seed,
        "test_seed": seed + TEST_SEED_OFFSET,
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs,
        "width": width,
        "command": "python -m benchmarks.embedded.train_judge " + shlex.join(sys.argv[1:]),
        "final_loss": float(loss.item()),
        "test_accuracy": acc,
        "wall_time_s": round(time.time() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=30000)
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    metrics = train(
        args.out, args.seed, args.n_train, args.n_test, args.epochs, args.batch_size, args.lr, args.width
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
