"""Connection-level bounds of ``distfd serve``'s front, over real sockets on 127.0.0.1.

1,000 connections that send nothing, send a request head a byte at a time, or trickle a declared
body after their 401: each is closed by the server within its timeout plus 5 s, /health answers
meanwhile (silent connections are evicted to make room for it), the log stays small, and a good
request is still served. A front out of file descriptors logs that at most once a second and
answers again once the idle connections are gone.
"""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytestmark = pytest.mark.timeout(300)

from . import tiny  # noqa: E402
from .servers import Service, call  # noqa: E402

TOKEN = "connection-bounds-token-0123456789"
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
SLACK_S = 5.0
GOOD = {"prompt": "a red circle", "seed": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


def _service(model_dir: Path, log_dir: Path, max_connections: int, **env: str) -> Service:
    token = log_dir / "token"
    log_dir.mkdir(parents=True, exist_ok=True)
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    args = ["--model", str(model_dir), "--steps", "2", "--height", "16", "--width", "16", "--key-steps", "0"]
    args += ["--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)]
    args += ["--max-connections", str(max_connections), "--token-file", str(token), "--timeout", "30"]
    module = "tests.fd_limited" if env else "distfd"
    s = Service(args, log_dir, world=1, module=module, **env)
    s.wait_ready()
    return s


def _health_s(url: str) -> float:
    start = time.monotonic()
    status, _, _ = call(url, "/health")
    assert status == 200
    return time.monotonic() - start


class Crowd:
    """Many client sockets, each with the moment it opened and the moment the server closed it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.opened: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}
        self.limit: dict[socket.socket, float] = {}
        self.dribble: list[tuple[socket.socket, bytes]] = []

    def open(self, port: int, first: bytes, then: bytes | None, limit_s: float) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        if first:
            sock.sendall(first)
        self.opened[sock], self.limit[sock] = time.monotonic(), limit_s
        self.selector.register(sock, selectors.EVENT_READ)
        if then is not None:
            self.dribble.append((sock, then))

    def watch(self, until_s: float, every_s: float = 0.5) -> None:
        """Read what arrives; send one dribbled byte every ``every_s``; note each close."""
        deadline = time.monotonic() + until_s
        next_drip = time.monotonic()
        while len(self.closed) < len(self.opened) and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset by the server: closed as well
                    data = b""
                if data == b"":
                    self.closed[sock] = time.monotonic()
                    self.selector.unregister(sock)
            if time.monotonic() >= next_drip:
                next_drip += every_s
                for sock, byte in self.dribble:
                    if sock not in self.closed:
                        try:
                            sock.send(byte)
                        except OSError:
                            pass

    def overdue(self) -> list[float]:
        """How long each connection lived beyond its limit (not closed: until now)."""
        now = time.monotonic()
        late = []
        for sock, opened in self.opened.items():
            lived = self.closed.get(sock, now) - opened
            if lived > self.limit[sock]:
                late.append(lived - self.limit[sock])
        return late

    def close(self) -> None:
        for sock in self.opened:
            sock.close()


def test_a_thousand_idle_and_dribbling_connections_are_closed_and_health_answers(model_dir, tmp_path):
    s = _service(model_dir, tmp_path / "log", max_connections=256)
    crowd = Crowd()
    try:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        for i in range(1000):
            kind = i % 4
            if kind == 0:  # connects, says nothing
                crowd.open(s.port, b"", None, HEADER_TIMEOUT_S + SLACK_S)
            elif kind == 1:  # a request head, one byte every half second
                crowd.open(s.port, b"G", b"E", HEADER_TIMEOUT_S + SLACK_S)
            elif kind == 2:  # a whole head without a token (401), then a body trickled forever
                crowd.open(s.port, head, b"x", BODY_TIMEOUT_S + SLACK_S)
            else:  # a head whose end never comes
                crowd.open(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X", HEADER_TIMEOUT_S + SLACK_S)
            if i % 250 == 249:
                assert _health_s(s.url) < 1.0  # evicting silent connections makes room for it
        crowd.watch(until_s=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + SLACK_S + 10)
        assert not crowd.overdue(), f"{len(crowd.overdue())} connection(s) outlived their limit"
        assert _health_s(s.url) < 0.5
        status, _, png = call(s.url, "/generate", GOOD, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and png.startswith(b"\x89PNG")
    finally:
        crowd.close()
        s.kill()
    assert len(s.log(0).encode()) < 100 * 1024, len(s.log(0))


def test_out_of_file_descriptors_is_logged_at_most_once_a_second(model_dir, tmp_path):
    # The process may hold 256 descriptors and cannot raise that; --max-connections is above it.
    s = _service(model_dir, tmp_path / "log", max_connections=1000, DISTFD_TEST_NOFILE="256")
    crowd = Crowd()
    try:
        start = time.monotonic()
        for _ in range(400):
            crowd.open(s.port, b"", None, 60)
        crowd.watch(until_s=6)  # the front runs out of descriptors, then idle ones time out
        crowd.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if call(s.url, "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        took = time.monotonic() - start
        assert _health_s(s.url) < 0.5
        status, _, _ = call(s.url, "/generate", GOOD, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
    finally:
        crowd.close()
        s.kill()
    log = s.log(0)
    assert "open-file limit is 256" in log  # said at start: the cap is above what the process may open
    reports = log.count("out of system resource")
    assert reports >= 1, log[-3000:]
    assert reports <= took + 2, (reports, took)
    assert len(log.encode()) < 100 * 1024, len(log)
