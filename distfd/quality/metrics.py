"""Image-quality metrics that need no downloaded weights: PSNR, SSIM, Frechet distance, adherence.

Images are float tensors ``(n, 3, H, W)`` in ``[0, 1]``; every per-image metric returns ``(n,)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"expected two image batches of equal shape (n, C, H, W); got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB; ``inf`` where the images are identical."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (n,)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian window, K1=0.01, K2=0.03,
    'valid' filtering, averaged over pixels and channels. Images smaller than the window use a
    window of their size."""
    _check_pair(a, b)
    c = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, sigma).to(a.device)[None, None].repeat(c, 1, 1, 1)  # (C, 1, s, s)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``x (n, d)`` and ``y (m, d)``
    (the FID formula): ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)``."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected features (n, d) and (m, d); got {tuple(x.shape)} and {tuple(y.shape)}.")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("a Frechet distance needs at least 2 samples on each side.")
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)  # (d, d)
    root_x = _sqrt_psd(cov_x)
    cross = _sqrt_psd(root_x @ cov_y @ root_x)
    d = (mu_x - mu_y).pow(2).sum() + cov_x.trace() + cov_y.trace() - 2 * cross.trace()
    return max(float(d), 0.0)


def adherence_hits(
    predicted: Mapping[str, torch.Tensor], requested: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Per image, whether the predicted attribute equals the requested one ``(n,)`` (bool), per key and
    for all ``keys`` together (``"all"``)."""
    missing = [k for k in keys if k not in predicted or k not in requested]
    if missing:
        raise ValueError(f"attributes {missing} are missing from the predictions or the requested labels.")
    hits = {k: predicted[k].cpu() == requested[k].cpu() for k in keys}
    hits["all"] = torch.stack(list(hits.values())).all(0)
    return hits


def adherence(
    predicted: Mapping[str, torch.Tensor], requested: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the requested one, per key and for all
    ``keys`` together (``"all"``)."""
    return {k: float(h.float().mean()) for k, h in adherence_hits(predicted, requested, keys).items()}


def mean_interval(values: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """A 95% interval of the mean of ``values (n,)``: ``mean +- z * std / sqrt(n)`` (normal
    approximation; with paired differences as ``values``, the interval of a mean difference)."""
    v = values.double().flatten()
    if len(v) < 2 or not bool(torch.isfinite(v).all()):
        raise ValueError(f"an interval needs at least 2 finite values; got {len(v)}.")
    half = z * float(v.std()) / math.sqrt(len(v))
    return float(v.mean()) - half, float(v.mean()) + half
