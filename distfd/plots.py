"""PNG figures: the feature analysis (Fig. 2a-c), calibration drift, image grids. Needs matplotlib."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .analysis import FeatureAnalysis

COLOURS = {"encoder": "tab:blue", "bottleneck": "tab:green", "decoder": "tab:red"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("distfd's plots need matplotlib: pip install 'distfd[bench]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(b) -> str:
    if b.name.startswith("block"):  # a transformer block: size is its token count
        return f"{b.name} ({b.size} tok)"
    return f"{b.name} ({b.size}x{b.size})"


def plot_change(analysis: FeatureAnalysis, path: str | Path) -> Path:
    """Fig. 2a: Eq. 2 per block over the steps; right panel on a log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, log in zip(axes, (False, True), strict=True):
        for b in analysis.blocks:
            style = "-" if b.part == "decoder" else "--" if b.part == "encoder" else ":"
            ax.plot(
                range(1, len(b.change) + 1),
                b.change,
                style,
                color=COLOURS[b.part],
                alpha=0.8,
                label=_label(b),
            )
        ax.set_xlabel("sampling step t (change from t-1)")
        ax.set_ylabel("mean squared change per element (Eq. 2)")
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Feature change between adjacent steps (encoder dashed, mid dotted, decoder solid)")
    return _save(fig, path)


def plot_norm_boxes(analysis: FeatureAnalysis, path: str | Path) -> Path:
    """Fig. 2b: box plots over steps of each block's channel-averaged Frobenius norm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(analysis.blocks)), 4.2))
    box = ax.boxplot([b.norms for b in analysis.blocks], patch_artist=True, whis=(0, 100))
    for patch, b in zip(box["boxes"], analysis.blocks, strict=True):
        patch.set_facecolor(COLOURS[b.part])
        patch.set_alpha(0.5)
    ax.set_xticks(
        range(1, len(analysis.blocks) + 1), [_label(b) for b in analysis.blocks], rotation=30, fontsize=8
    )
    ax.set_ylabel("Frobenius norm of channel-mean feature")
    ax.set_title("Feature norm across steps per block (whiskers: min-max)")
    return _save(fig, path)


def plot_norm_std(analysis: FeatureAnalysis, path: str | Path) -> Path:
    """Fig. 2c: standard deviation over steps of each block's Frobenius norm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(analysis.blocks)), 4.2))
    x = range(len(analysis.blocks))
    ax.bar(x, [b.norm_std for b in analysis.blocks], color=[COLOURS[b.part] for b in analysis.blocks])
    ax.set_xticks(list(x), [_label(b) for b in analysis.blocks], rotation=30, fontsize=8)
    ax.set_ylabel("std over steps of the Frobenius norm")
    ax.set_title("Standard deviation of the feature norm per block")
    return _save(fig, path)


def plot_relative_change(analysis: FeatureAnalysis, path: str | Path) -> Path:
    """Each block's mean relative change between adjacent steps (Eq. 2 over the feature's mean
    square): the measure that compares transformer blocks, whose scale grows with depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(analysis.blocks)), 4.2))
    x = range(len(analysis.blocks))
    means = [sum(b.relative_change) / max(1, len(b.relative_change)) for b in analysis.blocks]
    ax.bar(x, means, color=[COLOURS[b.part] for b in analysis.blocks])
    ax.set_xticks(list(x), [b.name for b in analysis.blocks], rotation=30, fontsize=8)
    ax.set_ylabel("mean relative change between adjacent steps")
    ax.set_title("Relative feature change per block (encoder / decoder colours: the current split)")
    return _save(fig, path)


def save_analysis_plots(analysis: FeatureAnalysis, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_change(analysis, out / "feature_change.png"),
        plot_norm_boxes(analysis, out / "feature_norm_box.png"),
        plot_norm_std(analysis, out / "feature_norm_std.png"),
        plot_relative_change(analysis, out / "feature_relative_change.png"),
    ]


def plot_drift(drift: torch.Tensor, key_sets: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """The calibration's drift matrix with each key-step set marked underneath."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [4, 1]})
    n = drift.shape[0]
    shown = torch.log10(drift.double() + 1e-6)
    shown[torch.ones(n, n, dtype=torch.bool).tril()] = float("nan")  # only k < j is defined
    im = ax.imshow(shown.numpy(), cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label="log10 relative encoder drift")
    ax.set_xlabel("step j (served)")
    ax.set_ylabel("key step k")
    for row, keys in enumerate(key_sets.values()):
        bx.scatter(list(keys), [row] * len(keys), marker="|", s=200)
    bx.set_yticks(range(len(key_sets)), list(key_sets))
    bx.set_xlim(-0.5, n - 0.5)
    bx.set_xlabel("key steps (loop index)")
    return _save(fig, path)


def image_grid(rows: Mapping[str, torch.Tensor], path: str | Path, columns: int = 8) -> Path:
    """One row of images ``(n, 3, H, W)`` in ``[0, 1]`` per named configuration."""
    plt = _pyplot()
    columns = min(columns, min(len(v) for v in rows.values()))
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(1.1 * columns + 1.8, 1.1 * len(rows)), squeeze=False
    )
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.05)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path
