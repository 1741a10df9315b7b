"""Start ``distfd serve`` on N gloo ranks on CPU, one process per rank with the environment ``srun``
gives (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and MASTER_* as launch/slurm/serve.sbatch exports),
talk to it over real HTTP on 127.0.0.1, and end it; every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
HTTP_TIMEOUT_S = 120.0


def call(
    url: str, path: str, body: dict | None = None, headers: dict | None = None, raw: bytes | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one GET, or POST of a JSON body (or ``raw``)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class Ranks:
    """``python -m distfd <command> ARGS`` on ``world`` ranks as ``srun`` starts them."""

    def __init__(
        self, command: list[str], log_dir: Path, world: int = 2, module: str = "distfd", **env_extra: str
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        master = str(free_port())
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        self.procs: list[subprocess.Popen] = []
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        for rank in range(world):
            env = {
                **clean,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": master,
                **env_extra,
            }
            with open(self.logs[rank], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *command],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def signal(self, sig: int, ranks: list[int] | None = None) -> None:
        for r in ranks if ranks is not None else range(len(self.procs)):
            self.procs[r].send_signal(sig)

    def wait(self, limit_s: float) -> tuple[list[int | None], float]:
        """Every rank's exit code (None: still running at ``limit_s``, then killed), and the time taken."""
        start = time.monotonic()
        while time.monotonic() - start < limit_s and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        codes = [p.poll() for p in self.procs]
        self.kill()
        return codes, time.monotonic() - start

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    def results(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.log(r)[-3000:]}" for r in range(len(self.procs)))


class Service(Ranks):
    """``distfd serve`` on a free port; :meth:`wait_ready` until /health answers 200."""

    def __init__(self, args: list[str], log_dir: Path, world: int = 2, **kw) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--port", str(self.port), *args], log_dir, world, **kw)

    def wait_ready(self, limit_s: float = 180.0) -> dict:
        health = wait_ready(self.url, self.procs, limit_s, self.results)
        self.started = time.monotonic()
        return health

    def health(self) -> dict:
        return json.loads(call(self.url, "/health")[2])

    def wait_health(self, cond, limit_s: float = 60.0) -> dict:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            h = self.health()
            if cond(h):
                return h
            time.sleep(0.02)
        raise AssertionError(f"/health never matched; last {h}")


def wait_ready(url: str, procs: list[subprocess.Popen], limit_s: float, describe=lambda: "") -> dict:
    """Poll /health until it answers 200; fail at once if a process exits first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited before the service was ready\n{describe()}")
        try:
            status, _, body = call(url, "/health")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service was not ready within {limit_s}s\n{describe()}")


def read_answer(sock) -> str:
    """One whole HTTP response from a raw socket (headers, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(v)
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
            if k.strip().lower() == b"content-length"
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()
