"""Quality against speed-up: the quality harness's rows placed at the wall-clock speed-up their
configuration reaches on the SD-1.5 architecture on a GPU (a configuration's timing does not depend on
the weights), plus a plot and a front comparison against DeepCache.

Speed-up of a configuration, end to end (pipeline seconds, vanilla over method), from the latency
benchmark's JSON (``benchmarks/latency.py``) for the same scheduler and step count:

* **measured**: the configuration itself was timed (distfd ``parallel`` with the benchmark's key steps,
  DeepCache with its interval, vanilla);
* **estimated** otherwise: distfd ``parallel`` from the critical path of its key-step groups over the
  encoder and decoder pieces measured on the same GPU (``benchmarks/projection.py``, one device), and
  DeepCache at another interval from the measured full step (vanilla UNet / L) and the shallow step
  solved from the measured interval; both plus the measured non-UNet time of the vanilla pipeline.

The denoiser-FLOP ratio measured by the harness on the evaluated model is the second x axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.projection import Pieces, project, sequential_s
from distfd.quality.report import short_name

FAMILIES = ("vanilla", "calibrated", "drift", "uniform", "paper", "deepcache", "other")
STYLE = {
    "calibrated": ("tab:red", "o", "distfd, calibrated (final image)"),
    "drift": ("tab:orange", "D", "distfd, calibrated (encoder drift)"),
    "uniform": ("tab:blue", "s", "distfd, evenly spread (even-K, uniform-K)"),
    "paper": ("tab:purple", "^", "distfd, paper's set"),
    "deepcache": ("tab:green", "v", "DeepCache, interval 2/3/5"),
    "vanilla": ("black", "*", "vanilla"),
    "other": ("tab:gray", "x", "other"),
}


@dataclass
class Point:
    name: str
    family: str
    key_steps: int | None
    speedup: float | None
    speed_source: str  # "measured" | "estimated" | "none"
    flops_speedup: float | None
    adherence: float | None
    psnr: float | None
    fd: float | None


def family(name: str, key_steps_file: Mapping[str, Any] | None = None) -> str:
    """The plot family of a harness configuration name (a preset file's ``objective`` decides for files)."""
    if name == "vanilla":
        return "vanilla"
    if name.startswith("deepcache-"):
        return "deepcache"
    keys = name.split(":")[1] if ":" in name else "paper"
    if keys == "paper":
        return "paper"
    if keys.startswith(("even-", "uniform-")):  # K spread evenly, or every K-th step
        return "uniform"
    if keys in ("auto", "auto-sigma"):
        return "drift"
    if keys == "auto-final":
        return "calibrated"
    if keys.endswith(".json") and key_steps_file is not None:
        return {"final": "calibrated", "drift": "drift", "uniform": "uniform"}.get(
            str(key_steps_file.get("objective", key_steps_file.get("source"))), "other"
        )
    return "other"


class SpeedModel:
    """End-to-end speed-ups of configurations from one latency-benchmark JSON (see the module docstring).

    Args:
        latency: The benchmark JSON for this scheduler and step count.
        pieces_from: A benchmark JSON with the ``projection.pieces`` (the same architecture, size and
            device; the pieces do not depend on the scheduler); default ``latency``.
    """

    def __init__(self, latency: Mapping[str, Any], pieces_from: Mapping[str, Any] | None = None) -> None:
        cfg = latency["config"]
        self.steps, self.source = int(cfg["steps"]), latency
        by = {m["name"]: m for m in latency["methods"] if m.get("status", "ok") == "ok"}
        self.vanilla_pipe = by["vanilla"]["pipeline_s"]["median"]
        self.vanilla_unet = by["vanilla"]["denoiser_s"]["median"]
        self.overhead = self.vanilla_pipe - self.vanilla_unet  # text encoder, VAE, scheduler
        self.parallel_keys = tuple(cfg["key_steps_resolved"]) if "distfd-parallel" in by else None
        self.parallel_pipe = by["distfd-parallel"]["pipeline_s"]["median"] if self.parallel_keys else None
        dc = by.get("deepcache")
        self.dc_interval = int(dc["info"]["cache_interval"]) if dc else None
        self.dc_unet = dc["denoiser_s"]["median"] if dc else None
        self.dc_pipe = dc["pipeline_s"]["median"] if dc else None
        src = pieces_from if pieces_from is not None else latency
        p = (src.get("projection") or {}).get("pieces")
        self.pieces = None
        if p:
            self.pieces = Pieces(
                encoder_s=sorted(p["encoder_s_samples"])[len(p["encoder_s_samples"]) // 2],
                decoder_points=tuple((int(k), float(v)) for k, v in p["decoder_s_by_rows"].items()),
                broadcast_bytes=int(p["broadcast_bytes_per_key_step"]),
                gather_bytes_per_row=int(p["gather_bytes_per_row"]),
                batch_rows=int(p["batch_rows"]),
            )

    def distfd(self, key_steps: Sequence[int]) -> tuple[float | None, str]:
        keys = tuple(sorted(key_steps))
        if self.parallel_keys is not None and keys == self.parallel_keys:
            return self.vanilla_pipe / self.parallel_pipe, "measured"
        if self.pieces is None:
            return None, "none"
        ratio = project(self.pieces, keys, self.steps, 1, 1.0)["total_s"] / sequential_s(
            self.pieces, self.steps
        )
        return self.vanilla_pipe / (self.overhead + self.vanilla_unet * ratio), "estimated"

    def deepcache(self, interval: int) -> tuple[float | None, str]:
        if self.dc_interval is None:
            return None, "none"
        if interval == self.dc_interval:
            return self.vanilla_pipe / self.dc_pipe, "measured"
        full = self.vanilla_unet / self.steps
        n_full = math.ceil(self.steps / self.dc_interval)
        shallow = max(0.0, (self.dc_unet - n_full * full) / (self.steps - n_full))
        n = math.ceil(self.steps / interval)
        return self.vanilla_pipe / (self.overhead + n * full + (self.steps - n) * shallow), "estimated"


def points(rows: Sequence[Mapping[str, Any]], model: SpeedModel | None) -> list[Point]:
    """One point per evaluated row (harness ``Row`` dicts); skipped rows are left out."""
    out = []
    for r in rows:
        if r.get("skipped"):
            continue
        name, keys = r["name"], r.get("key_steps")
        file = None
        spec = name.split(":")[1] if ":" in name else ""
        if spec.endswith(".json") and Path(spec).is_file():
            file = json.loads(Path(spec).read_text())
        fam = family(name, file)
        speed, source = (1.0, "measured") if fam == "vanilla" else (None, "none")
        if model is not None and fam == "deepcache":
            speed, source = model.deepcache(int(name.removeprefix("deepcache-")))
        elif model is not None and keys is not None:
            speed, source = model.distfd(keys)
        m = r.get("metrics", {})
        psnr = r.get("psnr")
        out.append(
            Point(
                name,
                fam,
                len(keys) if keys is not None else None,
                speed,
                source,
                r.get("flops_speedup"),
                m.get("adherence_all"),
                None if psnr in (None, "inf") or (isinstance(psnr, float) and math.isinf(psnr)) else psnr,
                m.get("fd_judge", m.get("fd", m.get("fid"))),
            )
        )
    return out


def front_check(pts: Sequence[Point], metric: str) -> list[dict[str, Any]]:
    """For each DeepCache point: the best distfd point at least as fast, and whether it is as good."""
    distfd = [p for p in pts if p.family in ("calibrated", "drift", "uniform", "paper") and p.speedup]
    out = []
    for dc in (p for p in pts if p.family == "deepcache" and p.speedup):
        q = getattr(dc, metric)
        faster = [p for p in distfd if p.speedup >= dc.speedup and getattr(p, metric) is not None]
        best = max(faster, key=lambda p: getattr(p, metric), default=None)
        out.append(
            {
                "deepcache": dc.name,
                "speedup": round(dc.speedup, 3),
                metric: q,
                "best distfd at >= that speed-up": best.name if best else None,
                f"its {metric}": getattr(best, metric) if best else None,
                "at or above": bool(best and q is not None and getattr(best, metric) >= q),
            }
        )
    return out


def plot(pts: Sequence[Point], path: str | Path, title: str, speed_label: str) -> Path:
    """2 x 2 panels: adherence and PSNR against the GPU wall-clock speed-up and the FLOP ratio."""
    from distfd.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (xattr, xlabel) in enumerate(
        [
            ("speedup", speed_label),
            ("flops_speedup", "denoiser-FLOP speed-up (measured on the evaluated model)"),
        ]
    ):
        for row, (yattr, ylabel) in enumerate(
            [("adherence", "judge shape+colour adherence"), ("psnr", "PSNR vs vanilla (dB)")]
        ):
            ax = axes[row][col]
            for fam in FAMILIES:
                colour, marker, label = STYLE[fam]
                sel = sorted(
                    (
                        p
                        for p in pts
                        if p.family == fam and getattr(p, xattr) and getattr(p, yattr) is not None
                    ),
                    key=lambda p: getattr(p, xattr),
                )
                if not sel:
                    continue
                xs, ys = [getattr(p, xattr) for p in sel], [getattr(p, yattr) for p in sel]
                if len(sel) > 1:
                    ax.plot(xs, ys, color=colour, lw=1, alpha=0.6)
                for p, x, y in zip(sel, xs, ys, strict=True):
                    hollow = xattr == "speedup" and p.speed_source == "estimated"
                    ax.scatter(
                        x, y, marker=marker, s=55, color=colour if not hollow else "white", edgecolors=colour
                    )
                    if p.key_steps is not None:
                        ax.annotate(
                            str(p.key_steps), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7
                        )
                    elif fam == "deepcache":
                        ax.annotate(
                            p.name.removeprefix("deepcache-"),
                            (x, y),
                            textcoords="offset points",
                            xytext=(4, 3),
                            fontsize=7,
                        )
                ax.scatter([], [], marker=marker, color=colour, label=label)
            if yattr == "adherence":
                van = next((p.adherence for p in pts if p.family == "vanilla"), None)
                if van is not None:
                    ax.axhline(van - 0.01, color="gray", ls=":", lw=1, label="vanilla - 1 point")
            else:
                ax.axhline(35.0, color="gray", ls=":", lw=1, label="35 dB")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].scatter(
        [], [], marker="o", color="white", edgecolors="gray", label="estimated speed-up (hollow)"
    )
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title + "\n(numbers at points: key steps; DeepCache: cache interval)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def write(
    rows: Sequence[Mapping[str, Any]],
    latency: Mapping[str, Any] | None,
    pieces_from: Mapping[str, Any] | None,
    out_dir: str | Path,
    name: str,
    title: str,
    sources: Sequence[str] = (),
) -> list[Path]:
    """Write ``<name>-speed.json``, ``<name>-speed.md`` and ``<name>-speed.png``."""
    model = SpeedModel(latency, pieces_from) if latency is not None else None
    pts = points(rows, model)
    device = latency["host"]["cuda"]["device_name"] if latency else None
    arch = f"{latency['config']['arch']} {latency['config']['resolution']}px" if latency else ""
    label = (
        f"end-to-end speed-up on {device}, {arch}, distfd in parallel mode on one GPU "
        "(filled: measured; hollow: estimated from measured pieces)"
        if latency
        else "no GPU latency results: speed-up unknown"
    )
    checks = {m: front_check(pts, m) for m in ("adherence", "psnr")}
    out = Path(out_dir)
    js = out / f"{name}-speed.json"
    js.write_text(
        json.dumps(
            {
                "speed": label,
                "latency sources": list(sources),
                "points": [asdict(p) for p in pts],
                "front": checks,
            },
            indent=2,
        )
    )
    lines = [f"### {name}: quality against speed-up", "", f"- speed-up: {label}"]
    lines += [f"- latency source: {s}" for s in sources]
    lines += [
        "",
        "| configuration | key steps | GPU speed-up | source | FLOP speed-up | shape+colour | PSNR | FD (judge) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for p in sorted(pts, key=lambda p: p.speedup or 0):
        lines.append(
            f"| {short_name(p.name)} | {p.key_steps or '-'} | {f(p.speedup, '.2f')} | {p.speed_source} | "
            f"{f(p.flops_speedup, '.3f')} | {f(p.adherence, '.3f')} | {f(p.psnr, '.2f')} | {f(p.fd, '.1f')} |"
        )
    for metric, rows_ in checks.items():
        lines += ["", f"Front against DeepCache ({metric}):", ""]
        for c in rows_:
            verdict = "at or above" if c["at or above"] else "BELOW"
            best = c["best distfd at >= that speed-up"]
            lines.append(
                f"- {c['deepcache']} ({c['speedup']:.2f}x, {metric} {f(c[metric], '.3f')}): best distfd at least "
                f"as fast is {short_name(best) if best else None} ({f(c[f'its {metric}'], '.3f')}) -> {verdict}"
            )
    md = out / f"{name}-speed.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md, plot(pts, out / f"{name}-speed.png", title, label)]
