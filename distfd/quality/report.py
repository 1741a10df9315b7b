"""The harness's outputs: a Markdown table, a JSON file and a PNG grid."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .harness import Row

LABELS = {
    "adherence_shape": "shape ok",
    "adherence_colour": "colour ok",
    "adherence_all": "shape+colour ok",
    "fd_judge": "FD (judge)",
    "fd": "FD",
    "clip_score": "CLIP score",
    "fid": "FID",
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def short_name(name: str) -> str:
    """A configuration name as shown: a preset file by its file name only."""
    parts = name.split(":")
    return ":".join(Path(x).name if x.endswith(".json") else x for x in parts)


def _keys(row: Row) -> str:
    if row.key_steps is None:
        return "-"
    shown = ",".join(map(str, row.key_steps)) if len(row.key_steps) <= 12 else f"{row.key_steps[:6]}..."
    return f"{len(row.key_steps)}: {shown}"


def markdown(rows: Sequence[Row], title: str, meta: Mapping[str, Any]) -> str:
    metric_names = list(dict.fromkeys(k for r in rows for k in r.metrics))
    head = [
        "configuration",
        "key steps",
        "denoiser FLOPs speed-up",
        "s/img (CPU)",
        "PSNR vs vanilla",
        "SSIM vs vanilla",
    ]
    head += [LABELS.get(k, k) for k in metric_names]
    lines = [f"### {title}", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.skipped:
            lines.append(f"| {short_name(r.name)} | skipped: {r.skipped} |" + " |" * (len(head) - 2))
            continue
        cells = [
            short_name(r.name),
            _keys(r),
            _fmt(r.flops_speedup),
            _fmt(r.seconds_per_image),
            _fmt(r.psnr),
            _fmt(r.ssim),
        ]
        cells += [_fmt(r.metrics.get(k)) for k in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += intervals(rows)
    return "\n".join(lines) + "\n"


def _difference(metric: str, lo: float, hi: float) -> str:
    scale, digits, unit = (100, 1, " points") if metric.startswith("adherence") else (1, 3, "")  # points: %
    lo, mid, hi = (round(scale * v, digits) + 0.0 for v in (lo, (lo + hi) / 2, hi))  # + 0.0: no "-0.0"
    return f"{LABELS.get(metric, metric)} {mid:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def intervals(rows: Sequence[Row]) -> list[str]:
    """Lines with every row's 95% intervals (mean PSNR; paired differences from vanilla)."""
    out = []
    for r in rows:
        parts = [f"PSNR [{r.psnr_interval[0]:.2f}, {r.psnr_interval[1]:.2f}]"] if r.psnr_interval else []
        parts += [_difference(k, *v) for k, v in r.differences.items()]
        if parts:
            out.append(f"- {short_name(r.name)}: " + "; ".join(parts))
    if not out:
        return []
    head = (
        "95% intervals (mean +- 1.96 standard errors over the images): of the mean PSNR, and of the mean "
        "difference from vanilla, image by image (same prompts and seeds):"
    )
    return ["", head, "", *out]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # strict JSON has no inf
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def write(
    rows: Sequence[Row],
    images: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    name: str,
    meta: Mapping[str, Any],
    grid_columns: int = 8,
) -> list[Path]:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``out_dir``."""
    from ..plots import image_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text(markdown(rows, name, meta))
    js = out / f"{name}.json"
    js.write_text(json.dumps(_jsonable({"meta": dict(meta), "rows": [asdict(r) for r in rows]}), indent=2))
    paths = [md, js]
    if images:
        paths.append(image_grid(images, out / f"{name}.png", columns=grid_columns))
    return paths
