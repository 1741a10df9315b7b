"""Load test of ``distfd serve``: K concurrent clients send M requests in all over HTTP on 127.0.0.1.

    python benchmarks/load.py --clients 4 --requests 24            # embedded model, 2 gloo ranks, CPU

The service is started the documented way (``torchrun --standalone --nproc-per-node N -m distfd serve``),
warmed up with one request, loaded, then stopped with SIGTERM. Recorded: every answer's status, p50/p95
latency (arrival to image, queueing included), requests/s over the loaded period, the generation
seconds the service reported, its Prometheus counters, the command and versions. JSON goes to
``benchmarks/results/load-<model>-cpu-w<N>-k<K>-m<M>.json``. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.sysinfo import host_facts  # noqa: E402

# Captions in the embedded model's vocabulary (distfd.embedded.scenes).
PROMPTS = [
    "a small red circle at the top left on a blue background",
    "a large green square in the centre on a white background",
    "a small yellow triangle at the bottom right on a black background",
    "a large blue circle at the bottom left on a yellow background",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple[int, float, float | None]:
    """(status, seconds to the answer, X-Generation-Seconds or None)."""
    req = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            gen = float(r.headers["X-Generation-Seconds"])
            return r.status, time.perf_counter() - start, gen
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - start, None


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit(f"the service was not ready within {limit_s:.0f}s")


def load(url: str, clients: int, requests: int, timeout: float) -> tuple[list[dict], float]:
    """K threads take request numbers 0..M-1 in turn; each record: index, status, latency, generation."""
    records: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
            status, seconds, gen = post(url, body, timeout)
            with lock:
                records.append({"index": i, "status": status, "latency_s": seconds, "generation_s": gen})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * requests)
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="K concurrent clients")
    p.add_argument("--requests", type=int, default=24, help="M requests in all")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks on CPU")
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, and per-request limit")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("serve_args", nargs="*", help="more `distfd serve` options, after --")
    args = p.parse_args()
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["--port", str(port), "--queue-size", str(args.queue_size), "--timeout", str(args.timeout)]
    serve += ["--model", args.model] if args.model else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks)]
    cmd += ["-m", "distfd", "serve", *serve, *args.serve_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"distfd-load-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        health = wait_ready(url, proc, 300)
        warm = post(url, {"prompt": PROMPTS[0], "seed": 0}, args.timeout)
        records, wall = load(url, args.clients, args.requests, args.timeout)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = [
                line
                for line in r.read().decode().splitlines()
                if line.startswith(("distfd_requests_total", "distfd_broadcast_bytes_total"))
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait(10)
    log_text = log_path.read_text()

    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    gens = [r["generation_s"] for r in ok]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    result = {
        "clients": args.clients,
        "requests": args.requests,
        "answered": len(records),
        "ok": len(ok),
        "statuses": statuses,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "latency_p50_s": percentile(latencies, 0.5) if ok else None,
        "latency_p95_s": percentile(latencies, 0.95) if ok else None,
        "latency_max_s": max(latencies) if ok else None,
        "generation_mean_s": statistics.fmean(gens) if ok else None,
        "warmup_status": warm[0],
    }
    record = {
        "benchmark": "load",
        "service": {
            "model": health["model"],
            "world_size": health["world_size"],
            "command": " ".join(cmd[1:]),
            "defaults": "the generate defaults: DDIM-50, mode parallel, the model's key steps",
            "exit_code_after_sigterm": exit_code,
            "stopped_cleanly": "stopping (signal 15)" in log_text,
        },
        "result": result,
        "metrics": metrics,
        "records": records,
        **host_facts(torch.device("cpu")),
    }
    name = f"load-{'embedded' if not args.model else Path(args.model).name}-cpu-w{args.ranks}"
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}-k{args.clients}-m{args.requests}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{result['ok']}/{args.requests} answered 200 ({statuses}); {args.clients} clients, "
        f"{health['world_size']} ranks: p50 {result['latency_p50_s']:.3f} s, p95 {result['latency_p95_s']:.3f} s, "
        f"{result['requests_per_s']:.2f} requests/s, generation {result['generation_mean_s']:.3f} s/image\n"
        f"wrote {out}"
    )
    return 0 if result["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
