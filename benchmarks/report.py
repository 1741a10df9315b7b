"""Write a benchmark result as JSON, a Markdown table and a PNG bar chart."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def result_stem(res: dict[str, Any]) -> str:
    """e.g. ``sd15-reduced128-ddim50-cpu-w1-20250101T120000``."""
    cfg, host = res["config"], res["host"]
    dev = host.get("cuda", {}).get("device_name") or "cpu"
    dev = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    stamp = re.sub(r"[^0-9T]", "", host["timestamp"].split("+")[0])
    return (
        f"{cfg['arch']}-{cfg['size']}{cfg['resolution']}-{cfg['scheduler']}{cfg['steps']}-{dev}"
        f"-w{cfg['world_size']}-{stamp}"
    )


def _fmt_s(s: dict[str, Any] | None) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def _fmt_mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def _load(host: dict[str, Any]) -> str:
    start, end = host.get("load_average_1_5_15"), host.get("load_average_end")
    if start and end:
        return f"{start[0]:.1f} at start, {end[0]:.1f} at end"
    return f"{start[0]:.1f}" if start else "n/a"


_CPU_NOTE = (
    "CPU-s = process CPU time (`time.process_time`); on a shared, oversubscribed host it is far less "
    "sensitive to other jobs than wall time, so its speed-ups are the more trustworthy ones here."
)


def _on_cpu(res: dict[str, Any]) -> bool:
    return not res["host"].get("gpu_present") or res["host"]["device"] == "cpu"


def _cpu_cols(res: dict[str, Any], m: dict[str, Any]) -> str:
    if not _on_cpu(res):
        util = (m.get("gpu_sampling") or {}).get("util_pct_mean")
        return f"{'n/a' if util is None else f'{util:.0f}'} | "
    return f"{_fmt_s(m.get('denoiser_cpu_s'))} | {_x(m.get('speedup_denoiser_cpu'))} | "


def markdown(res: dict[str, Any]) -> str:
    cfg, host = res["config"], res["host"]
    cpu_head = (
        " UNet CPU-s/img median [min–max] | speed-up UNet CPU-s |" if _on_cpu(res) else " GPU util % (mean) |"
    )
    dev = (
        host.get("cuda", {}).get("device_name")
        or f"CPU: {host['cpu']['model']} ({host['cpu']['logical_cores']} cores)"
    )
    lines = [
        f"### {cfg['arch']} ({cfg['size']}, {cfg['resolution']}×{cfg['resolution']}), "
        f"{cfg['scheduler']}-{cfg['steps']}, key steps {cfg['key_steps_resolved']}",
        "",
        f"Device: {dev}; dtype {cfg['dtype']}; world size {cfg['world_size']}; "
        f"{cfg['warmup']} warm-up + {cfg['reps']} timed runs per method (median [min–max]); seed {cfg['seed']}; {host['timestamp']}; "
        f"1-min load average {_load(host)} (other jobs share this host), torch threads {host['cpu']['torch_threads']}.",
        "",
        f"Command: `{host['command']}`",
        "",
        f"Timed calls interleaved round-robin over the methods. {_CPU_NOTE if _on_cpu(res) else ''}",
        "",
        "| method | pipeline s/img median [min–max] | UNet s/img median [min–max] | speed-up pipeline "
        f"| speed-up UNet |{cpu_head} UNet calls/img | GFLOPs/img | peak mem GiB | note |",
        "|---|---|---|---|---|" + ("---|---|" if _on_cpu(res) else "---|") + "---|---|---|---|",
    ]
    for m in res["methods"]:
        if m["status"] != "ok":
            lines.append(
                f"| {m['name']} | skipped |" + " |" * (8 if _on_cpu(res) else 7) + f" {m['reason']} |"
            )
            continue
        gf = "n/a" if m.get("flops") is None else f"{m['flops'] / 1e9:,.{0 if m['flops'] >= 1e11 else 2}f}"
        lines.append(
            f"| {m['name']} | {_fmt_s(m['pipeline_s'])} | {_fmt_s(m['denoiser_s'])} | "
            f"{_x(m.get('speedup_pipeline'))} | {_x(m.get('speedup_denoiser'))} | {_cpu_cols(res, m)}"
            f"{m['denoiser_calls']} | {gf} | "
            f"{_fmt_mem(m['peak_memory_bytes'])} | {m.get('note', '')} |"
        )
    proj = res.get("projection")
    if proj and proj.get("table"):
        lines += [
            "",
            f"Projected (not measured) parallel-decoding critical path, link {proj['bandwidth_gbps']} Gbit/s, "
            f"from single-device pieces measured on this device ({proj['pieces'].get('clock', 'wall')} clock; UNet only; "
            "speed-up against the sequential estimate steps × (encoder + decoder) from the same pieces):",
            "",
            "| W | UNet s/img | encoder s | broadcast ms | decoder s | gather ms | speed-up vs vanilla UNet |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in proj["table"]:
            lines.append(
                f"| {r['world']} | {r['total_s']:.3f} | {r['encoder_s']:.3f} | {r['broadcast_s'] * 1e3:.3f} | "
                f"{r['decoder_s']:.3f} | {r['gather_s'] * 1e3:.3f} | {r['speedup_vs_vanilla']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    ok = [m for m in res["methods"] if m["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(ok) + 2), 4))
    series = [("pipeline_s", "whole pipeline (wall)"), ("denoiser_s", "UNet only (wall)")]
    if _on_cpu(res) and all("denoiser_cpu_s" in m for m in ok):
        series.append(("denoiser_cpu_s", "UNet only (process CPU time)"))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(ok))]
        med = [m[key]["median"] for m in ok]
        err = [[m[key]["median"] - m[key]["min"] for m in ok], [m[key]["max"] - m[key]["median"] for m in ok]]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(ok)), [m["name"] for m in ok], rotation=15)
    ax.set_ylabel("seconds per image (median, min–max)")
    cfg = res["config"]
    dev = res["host"].get("cuda", {}).get("device_name") or "CPU"
    ax.set_title(
        f"{cfg['arch']} {cfg['resolution']}px {cfg['scheduler']}-{cfg['steps']} on {dev}", fontsize=9
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(res: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(res)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    res = {**res, "files": {k: p.name for k, p in paths.items()}}
    paths["json"].write_text(json.dumps(res, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(res))
    chart(res, paths["png"])
    return paths
