"""Start ``distfd serve`` on N gloo ranks on CPU, one process per rank with the environment ``srun``
gives (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and MASTER_* as launch/slurm/serve.sbatch exports),
talk to it over real HTTP on 127.0.0.1, and end it; every wait is bounded. The HTTP port is the one
rank 0 binds with ``--port 0`` (read from its log); rank 0 hosts the rendezvous on a free MASTER_PORT,
and the ranks start again on another if a process took it first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .multirank import PORT_ATTEMPTS, free_port, port_taken

ROOT = Path(__file__).resolve().parents[1]
HTTP_TIMEOUT_S = 120.0
LISTENING = re.compile(r"listening on (http://\S+:(\d+))")  # rank 0's log line once it serves


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
        self.command, self.module, self.env_extra = command, module, env_extra
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        self.procs: list[subprocess.Popen] = []
        self.attempts = 0
        self._start()

    def _start(self) -> None:
        self.attempts += 1
        master = str(free_port())
        world = len(self.logs)
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.procs = []
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
                **self.env_extra,
            }
            with open(self.logs[rank], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", self.module, *self.command],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )

    def restart_if_port_taken(self) -> bool:
        """If a rank has ended saying another process took MASTER_PORT before rank 0 bound it: every
        rank stopped and started again on a fresh port (at most :data:`PORT_ATTEMPTS` starts)."""
        if self.attempts >= PORT_ATTEMPTS or all(p.poll() is None for p in self.procs):
            return False
        if not any(port_taken(self.log(r)) for r in range(len(self.procs))):
            return False
        self.kill()
        self._start()
        return True

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
        while self.restart_if_port_taken():
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
    """``distfd serve --port 0``; :meth:`wait_ready` reads the port rank 0 bound from its log, then
    polls /health until it answers 200."""

    def __init__(self, args: list[str], log_dir: Path, world: int = 2, **kw) -> None:
        self.port = 0
        self.url = ""  # known once rank 0 serves
        super().__init__(["serve", "--port", "0", *args], log_dir, world, **kw)

    def wait_ready(self, limit_s: float = 180.0) -> dict:
        deadline = time.monotonic() + limit_s
        while not self.url:
            found = LISTENING.search(self.log(0))
            if found:
                self.url, self.port = found[1], int(found[2])
            elif any(p.poll() is not None for p in self.procs) and not self.restart_if_port_taken():
                raise AssertionError(f"a process exited before the service was ready\n{self.results()}")
            elif time.monotonic() > deadline:
                raise AssertionError(f"rank 0 did not listen within {limit_s}s\n{self.results()}")
            else:
                time.sleep(0.05)
        health = wait_ready(self.url, self.procs, max(1.0, deadline - time.monotonic()), self.results)
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
