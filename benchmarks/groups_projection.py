"""Projection: W GPUs as W/K groups of K ranks per image, from pieces measured on one H200.

    python benchmarks/groups_projection.py --gpus 8

Inputs (``benchmarks/results/h200-2026-11-29/``, one H200, eager, fp16, DDIM-50, the paper's key
steps): each model's measured vanilla and distfd-parallel seconds per image (pipeline call, and its
denoising part), and the measured encoder/decoder pass times that ``benchmarks/projection.py`` turns
into a critical path on K devices. One image on a group of K:

    T(K) = (distfd pipeline_s - distfd denoiser_s)            measured on one GPU, fixed
         + distfd denoiser_s * proj(K) / proj(1)               projected critical path, scaled

so T(1) is the measured one-GPU time. With the queue always full, W/K groups make (W/K)/T(K) images/s;
with one request at a time, the latency is T(K). Between the two, the mean latency at an arrival rate
is an M/D/c estimate (c = W/K servers of service time T(K); Erlang C halved, Allen-Cunneen). These
are projections, not measurements: NCCL and multi-GPU runs have not been measured yet.
Writes ``benchmarks/results/groups-projection-w<W>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.projection import Pieces, project  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "h200-2026-11-29"
RUNS = {
    "SD-1.5 512": "sd15-full512-ddim50-nvidia-h200-w1-20261129T235619.json",
    "SDXL 1024": "sdxl-full1024-ddim50-nvidia-h200-w1-20261129T235844.json",
}


def pieces_of(run: dict) -> Pieces:
    p = run["projection"]["pieces"]
    samples = sorted(p["encoder_s_samples"])
    return Pieces(
        encoder_s=samples[len(samples) // 2],
        decoder_points=tuple((int(r), float(s)) for r, s in p["decoder_s_by_rows"].items()),
        broadcast_bytes=int(p["broadcast_bytes_per_key_step"]),
        gather_bytes_per_row=int(p["gather_bytes_per_row"]),
        batch_rows=int(p["batch_rows"]),
    )


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load ``load`` (= lambda/mu)."""
    if load >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for n in range(1, servers):
        term *= load / n
        total += term
    last = term * load / servers / (1 - load / servers)
    return last / (total + last)


def mean_latency(rate: float, servers: int, service_s: float) -> float:
    """Mean time in system of an M/D/c queue (Allen-Cunneen: the M/M/c wait halved); inf if overloaded."""
    load = rate * service_s
    if load >= servers:
        return math.inf
    wait = erlang_c(servers, load) * service_s / (servers - load) / 2
    return service_s + wait


def model_rows(name: str, run: dict, gpus: int) -> dict:
    methods = {m["name"]: m for m in run["methods"]}
    vanilla = methods["vanilla"]["pipeline_s"]["median"]
    par = methods["distfd-parallel"]
    pipeline, denoise = par["pipeline_s"]["median"], par["denoiser_s"]["median"]
    pieces = pieces_of(run)
    cfg, bw = run["config"], run["projection"]["bandwidth_gbps"]
    keys, steps = cfg["key_steps_resolved"], cfg["steps"]
    base = project(pieces, keys, steps, 1, bw)["total_s"]
    sizes = [k for k in range(gpus, 0, -1) if gpus % k == 0]
    rows = []
    for k in sizes:
        t = (pipeline - denoise) + denoise * project(pieces, keys, steps, k, bw)["total_s"] / base
        groups = gpus // k
        rows.append(
            {
                "ranks_per_image": k,
                "groups": groups,
                "seconds_per_image": t,
                "speedup_one_image": vanilla / t,
                "images_per_s_saturated": groups / t,
                "vanilla_images_per_vanilla_time": groups * vanilla / t,
            }
        )
    return {"model": name, "vanilla_s": vanilla, "distfd_s_one_gpu": pipeline, "bandwidth_gbps": bw,
            "file": str(RUNS[name]), "rows": rows}  # fmt: skip


def markdown(record: dict) -> str:
    out = [
        f"# {record['gpus']} GPUs as groups: projection from one H200's measured pieces",
        "",
        record["note"],
        "",
    ]
    for m in record["models"]:
        out += [
            f"## {m['model']} (vanilla {m['vanilla_s']:.3f} s, distfd on one GPU {m['distfd_s_one_gpu']:.3f} s)",
            "",
            "| ranks per image K | groups | s/image (idle latency) | speed-up of one image | images/s, queue full | "
            "vanilla-images per vanilla-time |",
            "|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            out.append(
                f"| {r['ranks_per_image']} | {r['groups']} | {r['seconds_per_image']:.3f} | "
                f"{r['speedup_one_image']:.2f}x | {r['images_per_s_saturated']:.2f} | "
                f"{r['vanilla_images_per_vanilla_time']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def plot(record: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = record["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    for col, m in enumerate(models):
        ks = [r["ranks_per_image"] for r in m["rows"]]
        ax = axes[0][col]
        ax.plot(
            ks,
            [r["images_per_s_saturated"] for r in m["rows"]],
            "o-",
            color="C0",
            label="images/s, queue full",
        )
        ax.set(xscale="log", xlabel="ranks per image K", ylabel="images/s", title=m["model"])
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        twin = ax.twinx()
        twin.plot(ks, [r["seconds_per_image"] for r in m["rows"]], "s--", color="C3", label="s/image, idle")
        twin.set_ylabel("seconds per image (one request at a time)")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        top = max(r["images_per_s_saturated"] for r in m["rows"])
        rates = [top * i / 200 for i in range(1, 200)]
        best = []
        for r in m["rows"]:
            lat = [mean_latency(x, r["groups"], r["seconds_per_image"]) for x in rates]
            best.append(lat)
            ax.plot(rates, lat, label=f"K={r['ranks_per_image']}")
        ax.plot(rates, [min(v) for v in zip(*best, strict=True)], "k:", lw=2, label="best K at each load")
        ax.set(xlabel="arrival rate (images/s)", ylabel="mean latency (s), M/D/c", yscale="log")
        ax.set_ylim(top=10 * max(r["seconds_per_image"] for r in m["rows"]))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['gpus']} GPUs as groups of K (projection from one H200's measured pieces)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    args = p.parse_args()
    runs = {name: json.loads((RESULTS / f).read_text()) for name, f in RUNS.items()}
    record = {
        "benchmark": "groups-projection",
        "command": "python benchmarks/groups_projection.py " + " ".join(sys.argv[1:]),
        "gpus": args.gpus,
        "note": (
            "Projected, not measured: one image's time on K GPUs is the measured one-GPU distfd time "
            "with its denoising part scaled by benchmarks/projection.py's critical path on K devices "
            "(the link bandwidth of each source run); the latency curves are an M/D/c estimate."
        ),
        "models": [model_rows(name, run, args.gpus) for name, run in runs.items()],
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"groups-projection-w{args.gpus}"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    plot(record, out.with_suffix(".png"))
    print(markdown(record))
    print(f"wrote {out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
