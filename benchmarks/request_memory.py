"""Peak memory of the worst request the service admits under its default limits, with and without the
per-request bound on the decoder batch (``Session(bound_parallel=True)``, what ``distfd serve`` and
batch jobs run).

    python benchmarks/request_memory.py

Measured (each case in a fresh process, peak resident memory from the kernel): on the embedded
model, the largest image (``--max-pixels``: 4x the default area), ``--max-steps`` 150, guidance on,
with the default key steps, with ``key_steps: [0]`` bounded (the service), and with ``[0]`` unbounded
(before the bound: the whole loop in one decoder batch). Projected: the same requests on SD-1.5 from
the H200 run's measured peaks (vanilla and parallel decoding of the paper's DDIM-50 set), assuming
decoder memory linear in rows and pixels. Writes JSON and Markdown to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

H200 = ROOT / "benchmarks/results/h200-2026-11-29/sd15-full512-ddim50-nvidia-h200-w1-20261129T235619.json"
CASES = {
    "default key steps": dict(key_steps=None, bound=True),
    "key_steps [0], bounded (the service)": dict(key_steps=[0], bound=True),
    "key_steps [0], unbounded (before)": dict(key_steps=[0], bound=False),
}

CHILD = """
import json, resource, sys
from distfd.request import ImageRequest
from distfd.runtime import DistContext
from distfd.session import Session
case = json.loads(sys.argv[1])
session = Session(DistContext.single(), bound_parallel=case["bound"])
keys = None if case["key_steps"] is None else tuple(case["key_steps"])
req = ImageRequest("a small red circle at the top left on a blue background", steps=case["steps"],
                   height=case["side"], width=case["side"], key_steps=keys)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = []
session.pipe.unet.up_blocks[-1].register_forward_pre_hook(
    lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
session.run(req)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "loaded_kib": before, "widest_rows": max(rows)}))
"""


def measure(case: dict, steps: int, side: int) -> dict:
    arg = json.dumps({**case, "steps": steps, "side": side})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=1200, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def project_sd15(steps: int) -> list[dict]:
    """SD-1.5 at 512x512 and at the service's default pixel limit (1024x1024), from the H200 peaks."""
    from distfd.keysteps import resolve_key_steps
    from distfd.schedule import groups

    methods = {m["name"]: m for m in json.loads(H200.read_text())["methods"]}
    vanilla = methods["vanilla"]["peak_memory_bytes"]
    parallel = methods["distfd-parallel"]["peak_memory_bytes"]
    widest50 = max(len(g) for g in groups(resolve_key_steps("sd-ddim-50", 50), 50))
    per_row = (parallel - vanilla) / (2 * widest50 - 2)  # CFG: two rows per step; vanilla has 2
    default = max(len(g) for g in groups(resolve_key_steps("sd-ddim-50", steps, allow_rescale=True), steps))
    out = []
    for side, factor in ((512, 1), (1024, 4)):
        for name, widest in (
            ("default key steps", default),
            ("[0] bounded", default),
            ("[0] unbounded", steps),
        ):
            out.append(
                {
                    "size": f"{side}x{side}",
                    "steps": steps,
                    "request": name,
                    "decoder_rows": 2 * widest,
                    "peak_gib": (vanilla + factor * per_row * (2 * widest - 2)) / 2**30,
                }
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="the service's --max-steps default")
    p.add_argument("--side", type=int, default=64, help="the embedded model's largest side (4x area)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/request-memory-embedded-cpu")
    args = p.parse_args()
    measured = []
    for name, case in CASES.items():
        r = measure(case, args.steps, args.side)
        measured.append({"request": name, **r})
        print(
            f"{name}: peak {r['peak_kib'] / 1024:.0f} MiB, widest decoder batch {r['widest_rows']} rows",
            flush=True,
        )
    base = measured[0]["peak_kib"]
    projected = project_sd15(args.steps)
    record = {
        "benchmark": "request_memory",
        "command": " ".join(["python benchmarks/request_memory.py", *sys.argv[1:]]),
        "device": "CPU (peak resident memory, ru_maxrss); SD-1.5 projected from the H200 run of 2026-11-29",
        "request": {"steps": args.steps, "size": f"{args.side}x{args.side}", "guidance_scale": 7.5},
        "measured": measured,
        "projected_sd15": projected,
    }
    lines = [
        "# Peak memory of the worst request within the default limits",
        "",
        f"Command: `{record['command']}`. {args.side}x{args.side}, {args.steps} steps, guidance 7.5.",
        "",
        "| embedded model (CPU, measured) | peak resident | vs default key steps | widest decoder batch |",
        "|---|---|---|---|",
    ]
    for r in measured:
        lines.append(
            f"| {r['request']} | {r['peak_kib'] / 1024:.0f} MiB | {r['peak_kib'] / base:.2f}x | {r['widest_rows']} rows |"
        )
    lines += [
        "",
        "| SD-1.5 (projected from the H200 peaks) | size | decoder rows | peak |",
        "|---|---|---|---|",
    ]
    for r in projected:
        lines.append(f"| {r['request']} | {r['size']} | {r['decoder_rows']} | {r['peak_gib']:.1f} GiB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
