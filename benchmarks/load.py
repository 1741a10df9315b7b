"""Load test of ``distfd serve``: requests/s and latency against group size, clients and hostile traffic.

    python benchmarks/load.py --ranks 4 --ranks-per-image 4 2 1 auto --clients 1 4 16 --hostile-share 0.25

For each ``--ranks-per-image K`` (and each ``--max-batch B``) a service is started the documented way (``torchrun --standalone
--nproc-per-node W -m distfd serve --ranks-per-image K``) on the embedded model (or ``--model``),
warmed up, then loaded by C concurrent clients for each C in ``--clients``: once with good requests
only, once with a share of hostile ones mixed in (oversized images, too many steps, malformed and
deeply nested JSON, a body over the limit, a huge key-step list, a file path as key steps, a string
that once made a check backtrack, numbers out of range, a field given twice), all sent by
the same clients in turn, while ``--pest-connections`` connections hold the front open without a
request (half silent, half sending a request head a byte a second). Recorded per run: every answer's status, the good requests' p50/p95 latency
(arrival to image, queueing included), good requests/s over the loaded period, the generation seconds
and group sizes the service reported, then the command, versions and host. Written: one JSON, a
Markdown table and a PNG in ``benchmarks/results/`` (``load-<model>-<device>-w<W>.*``).
Every wait is bounded; the services are stopped with SIGTERM.

``--openai-n N``: each good request is ``POST /v1/images/generations`` for N images (docs/openai.md),
so the N images of one request can be made in one pipeline call (``--max-batch N``) or spread over
groups (``--ranks-per-image`` < W); the latency is the whole request's, and images/s counts images:

    python benchmarks/load.py --ranks 2 --ranks-per-image 1 2 --max-batch 1 4 --clients 1 4 --openai-n 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
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

# Hostile requests: (name, body bytes). Each must be refused (4xx) without costing the good ones.
HOSTILE: list[tuple[str, bytes]] = [
    ("oversized image", json.dumps({"prompt": PROMPTS[0], "height": 8192, "width": 8192}).encode()),
    ("too many steps", json.dumps({"prompt": PROMPTS[0], "steps": 100000}).encode()),
    ("malformed JSON", b'{"prompt": "a red circle", "seed": '),
    ("deep JSON", b"[" * 30000 + b"]" * 30000),
    ("body over the limit", b'{"prompt": "' + b"x" * 100_000 + b'"}'),
    ("huge key-step list", json.dumps({"prompt": PROMPTS[0], "key_steps": list(range(9000))}).encode()),
    ("file path as key steps", json.dumps({"prompt": PROMPTS[0], "key_steps": "/etc/passwd"}).encode()),
    # A string that made a backtracking check take 20 s (now one linear pass).
    (
        "backtracking key steps",
        json.dumps({"prompt": PROMPTS[0], "key_steps": "0" + " " * 60000 + "x"}).encode(),
    ),
    ("number too large for a float", b'{"prompt": "a red circle", "guidance_scale": 1' + b"0" * 400 + b"}"),
    ("1e400 steps", b'{"prompt": "a red circle", "steps": 1e400}'),
    ("a field twice", b'{"prompt": "a red circle", "seed": 1, "seed": 2}'),
]


class Pests:
    """Connections that hold the front without a request while a run lasts: half open and silent,
    half sending a request head one byte a second; each one the server closes is opened again."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.stopped = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pests:
        if self.count:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.count:
            self.thread.join(10)

    def _run(self) -> None:
        socks: list[tuple[socket.socket, bool]] = []
        while not self.stopped.is_set():
            alive = []
            for sock, dribbles in socks:
                try:
                    if dribbles:
                        sock.send(b"G")
                    sock.setblocking(False)
                    if sock.recv(1, socket.MSG_PEEK) == b"":  # closed by the server
                        raise OSError
                    alive.append((sock, dribbles))
                except BlockingIOError:
                    alive.append((sock, dribbles))
                except OSError:
                    sock.close()
            socks = alive
            while len(socks) < self.count:
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                except OSError:
                    break
                socks.append((sock, len(socks) % 2 == 1))
                self.opened += 1
            self.stopped.wait(1.0)
        for sock, _ in socks:
            sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float, path: str = "/generate") -> tuple[int, float, dict]:
    """(status, seconds to the answer, response headers with lower-case names)."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.perf_counter() - start, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - start, {k.lower(): v for k, v in e.headers.items()}
    except OSError:  # the server closed early on a body it refused
        return 0, time.perf_counter() - start, {}


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                health = json.loads(r.read())
                if health.get("status") == "ok":
                    return health
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready within {limit_s:.0f}s")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def load(
    url: str, clients: int, good: int, hostile_share: float, timeout: float, seed: int, openai_n: int = 0
) -> dict:
    """C threads send ``good`` good requests, with hostile ones mixed in at ``hostile_share``; with
    ``openai_n``, each good one asks the OpenAI route for that many images."""
    rng = random.Random(seed)
    hostile = round(good * hostile_share / (1 - hostile_share)) if hostile_share else 0
    if hostile_share:
        hostile = max(hostile, len(HOSTILE))  # every kind at least once
    plan = [("good", i) for i in range(good)] + [("hostile", i) for i in range(hostile)]
    rng.shuffle(plan)
    records: list[dict] = []
    lock = threading.Lock()
    todo = iter(plan)

    def client() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            kind, i = item
            path = "/generate"
            if kind == "good" and openai_n:
                body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i * openai_n, "n": openai_n})
                name, body, path = "good", body.encode(), "/v1/images/generations"
            elif kind == "good":
                body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}).encode()
                name = "good"
            else:
                name, body = HOSTILE[i % len(HOSTILE)]
            status, seconds, headers = post(url, body, timeout, path)
            with lock:
                records.append(
                    {
                        "kind": name,
                        "status": status,
                        "latency_s": seconds,
                        "generation_s": float(headers["x-generation-seconds"]) if status == 200 else None,
                        # the OpenAI route lists each image's group size and batch size
                        "ranks_per_image": _first(headers["x-ranks-per-image"]) if status == 200 else None,
                        "batch": _first(headers.get("x-batch-size", "1")) if status == 200 else None,
                        "ranks": headers.get("x-ranks") if status == 200 else None,
                    }
                )

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * len(plan))
    wall = time.perf_counter() - start
    ok = [r for r in records if r["kind"] == "good" and r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    statuses: dict[str, dict[str, int]] = {}
    for r in records:
        by = statuses.setdefault(r["kind"], {})
        by[str(r["status"])] = by.get(str(r["status"]), 0) + 1
    sizes: dict[str, int] = {}
    batches: dict[str, int] = {}
    spans: dict[str, int] = {}
    for r in ok:
        sizes[str(r["ranks_per_image"])] = sizes.get(str(r["ranks_per_image"]), 0) + 1
        batches[str(r["batch"])] = batches.get(str(r["batch"]), 0) + 1
        spans[str(r["ranks"])] = spans.get(str(r["ranks"]), 0) + 1
    per_request = max(1, openai_n)
    return {
        "clients": clients,
        "good_requests": good,
        "hostile_requests": hostile,
        "good_ok": len(ok),
        "statuses": statuses,
        "hostile_refused": sum(
            n for kind, by in statuses.items() if kind != "good" for s, n in by.items() if s.startswith("4")
        ),
        "wall_s": wall,
        "good_per_s": len(ok) / wall,
        "images_per_request": per_request,
        "images_per_s": len(ok) * per_request / wall,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "generation_mean_s": statistics.fmean(r["generation_s"] for r in ok) if ok else None,
        "ranks_per_image_seen": sizes,
        "batch_sizes_seen": batches,
        "ranks_seen_per_request": spans,
    }


def _first(value: str) -> int:
    """The largest of a header's comma-separated numbers (one number on /generate)."""
    return max(int(v) for v in value.split(","))


def serve(args, k: str, batch: int, port: int) -> tuple[subprocess.Popen, Path, list[str]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks)]
    cmd += ["-m", "distfd", "serve", "--port", str(port), "--queue-size", str(args.queue_size)]
    cmd += ["--timeout", str(args.timeout), "--ranks-per-image", k, "--max-batch", str(batch)]
    cmd += ["--max-images-per-request", str(args.openai_n)] if args.openai_n > 1 else []
    cmd += ["--model", args.model] if args.model else []
    cmd += args.serve_args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"distfd-load-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, log_path, cmd


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def markdown(record: dict) -> str:
    lines = [
        f"# `distfd serve` under load: {record['service']['model']}, {record['service']['world_size']} ranks "
        f"on {record['device']}",
        "",
        f"Command: `{record['command']}`; {record['note']}",
        "",
        "| ranks per image | max batch | clients | hostile share | good 200/sent | good req/s | p50 | p95 | "
        "generation s (per call) | hostile refused (4xx) | images per request | images/s | p50 / clean p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    clean = {
        (r["ranks_per_image"], r["max_batch"], r["clients"]): r["p50_s"]
        for r in record["runs"]
        if r["hostile_share"] == 0
    }
    for r in record["runs"]:
        base = clean.get((r["ranks_per_image"], r["max_batch"], r["clients"]))
        ratio = f"{r['p50_s'] / base:.2f}" if r["hostile_share"] and base and r["p50_s"] else "-"
        p50 = f"{r['p50_s']:.3f} s" if r["p50_s"] is not None else "-"
        p95 = f"{r['p95_s']:.3f} s" if r["p95_s"] is not None else "-"
        gen = f"{r['generation_mean_s']:.3f}" if r["generation_mean_s"] is not None else "-"
        lines.append(
            f"| {r['ranks_per_image']} | {r['max_batch']} | {r['clients']} | {r['hostile_share']:.0%} | "
            f"{r['good_ok']}/"
            f"{r['good_requests']} | {r['good_per_s']:.2f} | {p50} | {p95} | {gen} | "
            f"{r['hostile_refused']}/{r['hostile_requests']} | {r.get('images_per_request', 1)} | "
            f"{r.get('images_per_s', r['good_per_s']):.2f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    batches = record["config"]["max_batch"]
    for i, service in enumerate(record["service"]["runs"]):
        k, b = service["ranks_per_image"], service["max_batch"]
        runs = [
            r
            for r in record["runs"]
            if r["ranks_per_image"] == k and r["max_batch"] == b and r["hostile_share"] == 0
        ]
        name = f"K={k}" if batches == [1] else f"K={k} B={b}"
        clients = [r["clients"] for r in runs]
        ax1.plot(
            clients, [r.get("images_per_s", r["good_per_s"]) for r in runs], "o-", color=f"C{i}", label=name
        )
        ax2.plot(clients, [r["p50_s"] for r in runs], "o-", color=f"C{i}", label=f"{name} p50")
        ax2.plot(clients, [r["p95_s"] for r in runs], "x--", color=f"C{i}", label=f"{name} p95")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title="throughput")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"distfd serve, {record['service']['world_size']} ranks on {record['device']} (rough)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="W ranks (gloo processes on CPU)")
    p.add_argument("--ranks-per-image", nargs="+", default=None, help="K values to compare (default: W)")
    p.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, each a run"
    )
    p.add_argument(
        "--requests-per-client", type=int, default=4, help="good requests per client (at least 12)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        nargs="+",
        default=[1],
        help="max batch values to compare (serve --max-batch)",
    )
    p.add_argument("--hostile-share", type=float, default=0.25, help="share of hostile requests; 0: none")
    p.add_argument(
        "--pest-connections",
        type=int,
        default=200,
        help="idle and dribbling connections held open during the hostile runs (reopened when closed)",
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, and per-request limit")
    p.add_argument(
        "--openai-n", type=int, default=0, help="good requests ask POST /v1/images/generations for N images"
    )
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    p.add_argument("serve_args", nargs="*", help="more `distfd serve` options, after --")
    args = p.parse_args()
    if min(args.clients) < 1 or min(args.max_batch) < 1 or not 0 <= args.hostile_share < 1:
        p.error("--clients and --max-batch must be >= 1 and --hostile-share in [0, 1)")
    sizes = args.ranks_per_image or [str(args.ranks)]
    shares = [0.0, args.hostile_share] if args.hostile_share else [0.0]

    runs, services = [], []
    for k, batch in itertools.product(sizes, args.max_batch):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, log_path, cmd = serve(args, k, batch, port)
        try:
            health = wait_ready(url, proc, 300)
            for i in range(max(2, args.ranks)):  # warm every group up
                post(url, json.dumps({"prompt": PROMPTS[0], "seed": i}).encode(), args.timeout)
            for clients in args.clients:
                for share in shares:
                    good = max(12, clients * args.requests_per_client)
                    with Pests(port, args.pest_connections if share else 0) as pests:
                        r = load(
                            url, clients, good, share, args.timeout, seed=clients, openai_n=args.openai_n
                        )
                    r.update(ranks_per_image=k, max_batch=batch, hostile_share=share)
                    r.update(
                        pest_connections=args.pest_connections if share else 0, pests_opened=pests.opened
                    )
                    runs.append(r)
                    print(
                        f"K={k} B={batch} clients={clients} hostile={share:.0%}: {r['good_ok']}/{good} ok, "
                        f"{r['good_per_s']:.2f}/s ({r['images_per_s']:.2f} images/s), p50 {seconds(r['p50_s'])}, p95 {seconds(r['p95_s'])}, "
                        f"hostile refused {r['hostile_refused']}/{r['hostile_requests']}",
                        flush=True,
                    )
        finally:
            code = stop(proc)
        services.append(
            {"ranks_per_image": k, "max_batch": batch, "command": " ".join(cmd[1:]), "exit_code_after_sigterm": code,
             "stopped_cleanly": "stopping (signal 15)" in log_path.read_text()}
        )  # fmt: skip

    facts = host_facts(torch.device("cpu"))
    name = f"load-{'embedded' if not args.model else Path(args.model).name}-cpu-w{args.ranks}"
    out = args.out or ROOT / "benchmarks" / "results" / name
    record = {
        **facts,  # versions and host; the keys below are this benchmark's own
        "benchmark": "load",
        "command": "python benchmarks/load.py " + " ".join(sys.argv[1:]),
        "device": f"CPU ({facts.get('cpu', {}).get('logical_cores', '?')} cores), gloo",
        "note": (
            "a shared CPU machine with fewer cores than ranks, so figures are rough: they show the "
            "shape (groups against one group, hostile traffic against none), not GPU numbers."
        ),
        "config": {
            "ranks_per_image": sizes,
            "max_batch": args.max_batch,
            "clients": args.clients,
            "hostile_share": args.hostile_share,
            "hostile_kinds": [n for n, _ in HOSTILE],
            "openai_n": args.openai_n,
        },
        "service": {"model": health["model"], "world_size": health["world_size"], "runs": services},
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png")
    bad = [r for r in runs if r["good_ok"] != r["good_requests"]]
    return 1 if bad or not all(s["stopped_cleanly"] for s in services) else 0


if __name__ == "__main__":
    sys.exit(main())
