"""The service's queue, states and routes over real HTTP, with a controllable stand-in session.

The stand-in blocks until the test releases it, so a full queue, a stop with requests waiting and a
lost rank mid-request happen deterministically. The real pipeline over 2 ranks is in test_serve.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from distfd import serve_loop  # noqa: E402
from distfd.runtime import DistContext, DistributedError  # noqa: E402
from distfd.serve_http import HttpServer, build_app  # noqa: E402
from distfd.serve_loop import Dispatcher, RankLoop, StopFlag  # noqa: E402
from distfd.serve_metrics import Metrics  # noqa: E402

WAIT_S = 20.0


@dataclass
class FakeResult:
    image: Image.Image
    seconds: float
    key_steps: tuple[int, ...]
    stats: dict


class FakeSession:
    """Answers a solid image after the test calls ``release()``; raises what ``fail_with`` holds."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.started = threading.Event()
        self.fail_with: Exception | None = None
        self.runs: list[dict] = []

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def run(self, request: dict) -> FakeResult:
        self.started.set()
        assert self.gate.acquire(timeout=WAIT_S), "the test never released the session"
        if self.fail_with is not None:
            raise self.fail_with
        self.runs.append(request)
        return FakeResult(Image.new("RGB", (8, 8), (request["seed"], 0, 0)), 0.25, (0, 3), {"bytes_sent": 10})


def validate(data: dict) -> dict:
    unknown = set(data) - {"prompt", "seed"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    if not isinstance(data.get("seed", 0), int):
        raise TypeError("seed must be an integer")
    return {"prompt": data.get("prompt", ""), "seed": data.get("seed", 0)}


class Service:
    """Dispatcher + HTTP server + the rank loop of world size 1 in a thread."""

    def __init__(self, queue_size: int = 2) -> None:
        self.session = FakeSession()
        self.stop = StopFlag()
        self.dispatcher = Dispatcher(queue_size)
        self.metrics = Metrics(self.dispatcher.depth, 1)
        app = build_app(self.dispatcher, self.metrics, validate, {"world_size": 1, "model": "fake"})
        self.http = HttpServer("127.0.0.1", 0)
        self.http.start(app)
        loop = RankLoop(DistContext.single(), self.session, self.stop, self.dispatcher, self.metrics)
        self.code: int | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "code", loop.serve()), daemon=True)
        self.thread.start()
        wait_for(lambda: self.dispatcher.state == "serving")

    def close(self) -> None:
        self.stop.set_by = self.stop.set_by or "test end"
        self.session.release(10)
        self.thread.join(WAIT_S)
        self.http.stop()


def wait_for(cond, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def call(url: str, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


def test_health_generate_metrics_and_bad_requests(service):
    url = service.http.url
    status, _, body = call(url, "/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "world_size": 1, "model": "fake", "queue": 0, "in_flight": 0}

    for bad, message in [
        ({"prompt": "x", "colour": 1}, "unknown field(s) ['colour']"),
        ({"prompt": "x", "seed": "one"}, "seed must be an integer"),
    ]:
        status, headers, body = call(url, "/generate", bad)
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": message}
    status, _, body = call(url, "/generate", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = call(url, "/generate", [1, 2])
    assert status == 400 and "JSON object" in json.loads(body)["error"]

    service.session.release()
    status, headers, body = call(url, "/generate", {"prompt": "x", "seed": 7})
    assert status == 200 and headers["content-type"] == "image/png"
    assert float(headers["x-generation-seconds"]) == 0.25 and headers["x-key-steps"] == "0,3"
    assert Image.open(__import__("io").BytesIO(body)).getpixel((0, 0)) == (7, 0, 0)

    text = call(url, "/metrics")[2].decode()
    assert 'distfd_requests_total{status="400"} 4.0' in text
    assert 'distfd_requests_total{status="200"} 1.0' in text
    assert "distfd_request_seconds_count 1.0" in text
    assert "distfd_queue_depth 0.0" in text
    assert "distfd_broadcast_bytes_total 10.0" in text  # world size 1: only the session's bytes


def test_full_queue_gets_503_with_retry_after_and_fifo_order(service):
    url = service.http.url
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)  # seed 1 is in flight
        queued = []
        for depth, seed in enumerate((2, 3), start=1):  # one after the other: a known arrival order
            queued.append(pool.submit(call, url, "/generate", {"seed": seed}))
            wait_for(lambda d=depth: service.dispatcher.depth() == d)
        status, headers, body = call(url, "/generate", {"seed": 4})
        assert status == 503 and "queue is full" in json.loads(body)["error"]
        assert int(headers["retry-after"]) >= 1
        health = json.loads(call(url, "/health")[2])
        assert health["queue"] == 2 and health["in_flight"] == 1
        service.session.release(3)
        assert [f.result(WAIT_S)[0] for f in (first, *queued)] == [200, 200, 200]
    assert [r["seed"] for r in service.session.runs] == [1, 2, 3]


def test_stop_finishes_the_request_in_flight_and_answers_the_queued_with_503(service):
    url = service.http.url
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)
        queued = [pool.submit(call, url, "/generate", {"seed": s}) for s in (2, 3)]
        wait_for(lambda: service.dispatcher.depth() == 2)
        service.stop(15, None)  # what SIGTERM calls
        time.sleep(3 * serve_loop.POLL_S)
        service.session.release()
        assert first.result(WAIT_S)[0] == 200
        for f in queued:
            status, _, body = f.result(WAIT_S)
            assert status == 503 and "shutting down" in json.loads(body)["error"]
    service.thread.join(WAIT_S)
    assert service.code == 0
    status, _, body = call(url, "/generate", {"seed": 5})
    assert status == 503 and json.loads(call(url, "/health")[2])["status"] == "stopping"


def test_a_lost_rank_answers_waiting_and_later_requests_with_503(service, monkeypatch):
    monkeypatch.setattr(serve_loop, "FAILED_LINGER_S", 0.5)
    url = service.http.url
    service.session.fail_with = DistributedError("rank 0/2: broadcast failed (peer gone)")
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)
        queued = pool.submit(call, url, "/generate", {"seed": 2})
        wait_for(lambda: service.dispatcher.depth() == 1)
        service.session.release()
        for f in (first, queued):
            status, _, body = f.result(WAIT_S)
            assert status == 503 and "rank of the service was lost" in json.loads(body)["error"]
        status, _, body = call(url, "/generate", {"seed": 3})
        assert status == 503 and "peer gone" in json.loads(body)["error"]
    service.thread.join(WAIT_S)
    assert service.code == 1


def test_an_error_in_one_request_is_a_500_and_the_service_goes_on(service):
    url = service.http.url
    service.session.fail_with = RuntimeError("out of memory")
    service.session.release()
    status, _, body = call(url, "/generate", {"seed": 1})
    assert status == 500 and "out of memory" in json.loads(body)["error"]
    service.session.fail_with = None
    service.session.release()
    assert call(url, "/generate", {"seed": 2})[0] == 200


def test_while_loading_health_and_generate_answer_503_with_the_reason():
    dispatcher = Dispatcher(2)
    app = build_app(dispatcher, Metrics(dispatcher.depth, 2), validate, {"world_size": 2, "model": "m"})
    http = HttpServer("127.0.0.1", 0)
    http.start(app)
    try:
        status, _, body = call(http.url, "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        status, headers, body = call(http.url, "/generate", {"prompt": "x"})
        assert status == 503 and headers["retry-after"] == "5"
        assert "loading" in json.loads(body)["error"]
    finally:
        http.stop()


def test_heartbeat_is_well_inside_the_collective_timeout():
    assert serve_loop.tick_seconds(300) == 5.0
    assert serve_loop.tick_seconds(8) == 2.0
    with pytest.raises(ValueError, match="--queue-size"):
        Dispatcher(0)


def test_serve_refuses_bad_options_before_loading(monkeypatch, capsys):
    import importlib.util
    import socket

    from distfd.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["serve", "--queue-size", "0"]) == 2
    assert "--queue-size must be >= 1; got 0." in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m: None if m == "uvicorn" else real(m))
    assert main(["serve"]) == 2
    assert "pip install 'distfd[serve]'" in capsys.readouterr().err
