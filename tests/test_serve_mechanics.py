"""The service's queue, states, bounds and routes over real HTTP, with a controllable stand-in session.

The stand-in blocks until the test releases it (looking at its cancel flag meanwhile, as the real
session does at step boundaries), so a full queue, a stop with requests waiting, a deadline and a lost
rank mid-request happen deterministically. The real pipeline over gloo ranks is in test_serve.py and
test_serve_hostile.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import Pipe

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from distfd.cli.output import png_bytes  # noqa: E402
from distfd.intake import Admitted, RequestRefused  # noqa: E402
from distfd.pool import coordinator as coordinator_module  # noqa: E402
from distfd.pool.coordinator import Coordinator, tick_seconds  # noqa: E402
from distfd.pool.jobs import Cancelled  # noqa: E402
from distfd.pool.layout import SizePolicy  # noqa: E402
from distfd.pool.links import connect  # noqa: E402
from distfd.pool.worker import Worker  # noqa: E402
from distfd.request import ImageRequest  # noqa: E402
from distfd.runtime import CANCELLED, DistContext, DistributedError, StoppedTogether  # noqa: E402
from distfd.serve.app import build_app  # noqa: E402
from distfd.serve.front import REASONS, FrontSettings  # noqa: E402
from distfd.serve.metrics import Metrics  # noqa: E402
from distfd.serve.server import HttpServer  # noqa: E402
from distfd.session import PER_IMAGE_FIELDS, batch_key  # noqa: E402

from .servers import call, read_answer  # noqa: E402

WAIT_S = 20.0
# A value other than the base request's for each field that changes a whole pipeline call.
BATCH_VARIANTS = {
    "steps": 5,
    "guidance_scale": 3.0,
    "height": 48,
    "width": 48,
    "key_steps": (0, 1),
    "mode": "propagate",
}
TOKEN = "a-test-token-of-enough-length"


@dataclass
class FakeRequest:
    prompt: str
    seed: int
    width: int = 8
    height: int = 8
    steps: int = 4

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class FakeResult:
    image: Image.Image
    seconds: float
    key_steps: list[int]
    stats: dict
    request: FakeRequest


@dataclass
class FakeSession:
    """Answers a solid image after the test calls ``release()``; raises what ``fail_with`` holds."""

    gate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    started: threading.Event = field(default_factory=threading.Event)
    fail_with: Exception | None = None
    runs: list[int] = field(default_factory=list)
    cancelled_runs: list[int] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)  # the seeds of each call
    boundaries: int = 0  # "step boundaries" passed, over all calls

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def run_many(self, requests: list[FakeRequest], ctx=None, cancelled=None) -> list[FakeResult]:
        """One "pipeline call" for all of ``requests``: one release of the gate."""
        self.started.set()
        deadline = time.monotonic() + WAIT_S
        while not self.gate.acquire(timeout=0.02):  # a "step boundary" every 20 ms
            self.boundaries += 1
            if cancelled is not None and cancelled():
                self.cancelled_runs.extend(r.seed for r in requests)
                raise StoppedTogether(CANCELLED, "the image was cancelled")
            assert time.monotonic() < deadline, "the test never released the session"
        if self.fail_with is not None:
            raise self.fail_with
        self.runs.extend(r.seed for r in requests)
        self.batches.append([r.seed for r in requests])
        return [
            FakeResult(Image.new("RGB", (8, 8), (r.seed, 0, 0)), 0.25, [0, 3], {"bytes_sent": 10}, r)
            for r in requests
        ]


def validate(data: dict) -> Admitted:
    """The stand-in's intake: refusals as distfd.intake gives them."""
    if data.get("prompt") == "a bug of ours":
        raise RuntimeError("internal detail /srv/secret")
    unknown = set(data) - {"prompt", "seed"}
    if unknown:
        raise RequestRefused(f"unknown field(s) {sorted(unknown)}")
    if not isinstance(data.get("seed", 0), int):
        raise RequestRefused("seed must be an integer", "seed")
    return Admitted(FakeRequest(data.get("prompt", ""), data.get("seed", 0)))


class Service:
    """Coordinator + HTTP server + the worker of world size 1, each in a thread."""

    def __init__(
        self,
        queue_size: int = 2,
        grace_s: float | None = 30.0,
        max_batch: int = 1,
        batch_key=lambda r: r.prompt,  # the stand-in's compatible requests: the same prompt
        **front,
    ) -> None:
        self.session = FakeSession()
        self.stop_reason: str | None = None
        links, link = connect(DistContext.single())
        self.coordinator = Coordinator(
            links,
            SizePolicy(1, 1),
            queue_size=queue_size,
            timeout_s=30,
            stop=lambda: self.stop_reason,
            grace_s=grace_s,
            max_batch=max_batch,
            batch_key=batch_key,
        )
        self.metrics = Metrics(self.coordinator.depth, lambda: self.coordinator.in_flight, 1)
        self.coordinator.hooks = self.metrics
        info = lambda: {"world_size": 1, "model": "fake"}  # noqa: E731
        settings = FrontSettings(**{"request_timeout_s": 30.0, **front})
        self.http = HttpServer("127.0.0.1", 0)
        self.http.start(build_app(self.coordinator, self.metrics, validate, info, settings))
        self.url = self.http.url
        worker = Worker(link, 0, {1: DistContext.single()}, self.session, lambda: False, 30, png_bytes)
        self.codes: dict[str, int] = {}
        self.threads = [
            threading.Thread(target=lambda: self.codes.setdefault("worker", worker.serve()), daemon=True),
            threading.Thread(
                target=lambda: self.codes.setdefault("pool", self.coordinator.run()), daemon=True
            ),
        ]
        for t in self.threads:
            t.start()
        wait_for(lambda: self.coordinator.state == "serving")

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_reason = self.stop_reason or "test end"
        self.session.release(10)
        for t in self.threads:
            t.join(WAIT_S)
        self.http.stop()


def wait_for(cond, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def timed_health(url: str) -> float:
    start = time.monotonic()
    status, _, _ = call(url, "/health")
    assert status == 200
    return time.monotonic() - start


@pytest.fixture
def service():
    with Service() as s:
        yield s


def test_health_generate_metrics_and_bad_requests(service):
    url = service.url
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
    assert headers["x-ranks-per-image"] == "1" and headers["x-ranks"] == "0"
    assert float(headers["x-generation-start"]) <= float(headers["x-generation-end"])
    assert Image.open(io.BytesIO(body)).getpixel((0, 0)) == (7, 0, 0)

    text = call(url, "/metrics")[2].decode()
    assert 'distfd_requests_total{status="400"} 4.0' in text
    assert 'distfd_requests_total{status="200"} 1.0' in text
    assert "distfd_request_seconds_count 1.0" in text
    assert "distfd_queue_depth 0.0" in text
    assert "distfd_broadcast_bytes_total 10.0" in text
    assert 'distfd_images_total{ranks="1"} 1.0' in text and "distfd_ranks_per_image 1.0" in text


def test_an_unexpected_error_is_a_counted_json_500_without_details(service):
    status, headers, body = call(service.url, "/generate", {"prompt": "a bug of ours"})
    assert status == 500 and headers["content-type"] == "application/json"
    assert "secret" not in body.decode() and "log" in json.loads(body)["error"]
    for method, path, code in (("GET", "/generate", 405), ("GET", "/nowhere", 404)):
        req = urllib.request.Request(service.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=10)
        assert answer.value.code == code and "error" in json.loads(answer.value.read())
    text = call(service.url, "/metrics")[2].decode()
    assert 'distfd_requests_total{status="500"} 1.0' in text


def test_full_queue_gets_503_with_retry_after_and_fifo_order(service):
    url = service.url
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)  # seed 1 is in flight
        queued = []
        for depth, seed in enumerate((2, 3), start=1):  # one after the other: a known arrival order
            queued.append(pool.submit(call, url, "/generate", {"seed": seed}))
            wait_for(lambda d=depth: service.coordinator.depth() == d)
        status, headers, body = call(url, "/generate", {"seed": 4})
        assert status == 503 and "queue is full" in json.loads(body)["error"]
        assert int(headers["retry-after"]) >= 1
        health = json.loads(call(url, "/health")[2])
        assert health["queue"] == 2 and health["in_flight"] == 1
        assert timed_health(url) < 0.1  # answered at once with a request running and the queue full
        service.session.release(3)
        assert [f.result(WAIT_S)[0] for f in (first, *queued)] == [200, 200, 200]
    assert service.session.runs == [1, 2, 3]


def test_max_batch_runs_waiting_requests_with_the_same_key_in_one_call():
    with Service(queue_size=8, max_batch=3) as s:
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(call, s.url, "/generate", {"prompt": "a", "seed": 1})
            assert s.session.started.wait(WAIT_S)  # seed 1 is in flight, alone
            order = [("a", 2), ("b", 3), ("a", 4), ("a", 5), ("a", 6)]
            queued = []
            for depth, (prompt, seed) in enumerate(order, start=1):
                queued.append(pool.submit(call, s.url, "/generate", {"prompt": prompt, "seed": seed}))
                wait_for(lambda d=depth: s.coordinator.depth() == d)
            s.session.release(4)
            answers = [f.result(WAIT_S) for f in (first, *queued)]
        # At most 3 per call, the first waiting request and later ones of its key; b keeps its place.
        assert s.session.batches == [[1], [2, 4, 5], [3], [6]]
        sizes = {1: "1", 2: "3", 4: "3", 5: "3", 3: "1", 6: "1"}
        for (status, headers, body), seed in zip(answers, [1, 2, 3, 4, 5, 6], strict=True):
            assert status == 200
            assert Image.open(io.BytesIO(body)).getpixel((0, 0)) == (seed, 0, 0)  # its own image
            assert headers["x-batch-size"] == sizes[seed]
        text = call(s.url, "/metrics")[2].decode()
        assert 'distfd_images_total{ranks="1"} 6.0' in text


def test_requests_differing_in_any_image_changing_field_never_share_a_call():
    """The real batch key: for each field of ImageRequest but the per-image ones, a request that
    differs from the others only in it runs in a call of its own; the others (another prompt and
    seed) share one."""
    base = ImageRequest("a red circle", steps=4, height=32, width=32, key_steps=(0, 2), mode="parallel")
    assert set(BATCH_VARIANTS) == {f.name for f in dataclasses.fields(ImageRequest)} - set(PER_IMAGE_FIELDS)
    variants = [
        dataclasses.replace(base, seed=10 + n, **{f: v}) for n, (f, v) in enumerate(BATCH_VARIANTS.items())
    ]
    # Negative prompts are per image, but the pipeline takes one for every image or none.
    variants.append(dataclasses.replace(base, seed=10 + len(variants), negative_prompt="blur"))
    mates = [
        dataclasses.replace(base, seed=1, prompt="a blue square"),
        dataclasses.replace(base, seed=2),
    ]
    with Service(queue_size=32, max_batch=32, batch_key=batch_key) as s:
        busy = s.coordinator.submit(dataclasses.replace(base, seed=0))
        assert s.session.started.wait(WAIT_S)  # the rest waits in the queue
        jobs = s.coordinator.submit_many([mates[0], *variants, mates[1]])
        s.session.release(2 + len(variants))
        for job in [busy, *jobs]:
            job.future.result(WAIT_S)
    assert s.session.batches == [[0], [1, 2], *([10 + n] for n in range(len(variants)))]


def test_cancelling_one_request_of_a_shared_call_stops_it_only_when_all_are_cancelled():
    with Service(queue_size=8, max_batch=2) as s:
        c = s.coordinator
        first = c.submit(FakeRequest("a", 1))
        assert s.session.started.wait(WAIT_S)
        pair = c.submit_many([FakeRequest("a", 2), FakeRequest("a", 3)])
        s.session.release()
        first.future.result(WAIT_S)
        wait_for(lambda: c.in_flight == 2)  # 2 and 3 run in one call
        c.cancel(pair[0], "the client went away")
        wait_for(lambda: not c._cancels)  # the coordinator has acted on it
        # The call must go on: a wrongly sent cancel would be seen at the session's next "step
        # boundary"; three of them pass, and the call is still running.
        seen = s.session.boundaries
        wait_for(lambda: s.session.boundaries >= seen + 10)
        assert s.session.cancelled_runs == []
        s.session.release()
        assert pair[1].future.result(WAIT_S).png  # 3 has its image
        assert s.session.batches[-1] == [2, 3]
        both = c.submit_many([FakeRequest("a", 4), FakeRequest("a", 5)])
        wait_for(lambda: c.in_flight == 2)
        for job in both:
            c.cancel(job, "the client went away")
        for job in both:
            with pytest.raises(Cancelled):
                job.future.result(WAIT_S)
        assert s.session.cancelled_runs == [4, 5]


def test_stop_finishes_the_request_in_flight_and_answers_the_queued_with_503(service):
    url = service.url
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)
        queued = [pool.submit(call, url, "/generate", {"seed": s}) for s in (2, 3)]
        wait_for(lambda: service.coordinator.depth() == 2)
        service.stop_reason = "signal 15"  # what SIGTERM sets
        wait_for(lambda: service.coordinator.state == "stopping")
        service.session.release()
        assert first.result(WAIT_S)[0] == 200
        for f in queued:
            status, _, body = f.result(WAIT_S)
            assert status == 503 and "shutting down" in json.loads(body)["error"]
    for t in service.threads:
        t.join(WAIT_S)
    assert service.codes == {"worker": 0, "pool": 0}
    status, _, body = call(url, "/generate", {"seed": 5})
    assert status == 503 and json.loads(call(url, "/health")[2])["status"] == "stopping"


def test_stop_cancels_an_image_that_overruns_the_grace_period():
    with Service(grace_s=0.3) as s:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, s.url, "/generate", {"seed": 1})
            assert s.session.started.wait(WAIT_S)
            s.stop_reason = "signal 15"
            stopped = time.monotonic()
            status, _, body = first.result(WAIT_S)  # never released: stopped at a "step boundary"
            assert time.monotonic() - stopped < 0.3 + 1.0  # the grace, then the next boundary (20 ms)
        assert status == 503 and "shutting down" in json.loads(body)["error"]
        assert s.session.cancelled_runs == [1]
        for t in s.threads:
            t.join(WAIT_S)
        assert s.codes == {"worker": 0, "pool": 0}


def test_deadline_answers_504_and_stops_the_image():
    with Service(request_timeout_s=0.5) as s:
        start = time.monotonic()
        status, _, body = call(s.url, "/generate", {"seed": 1})
        assert status == 504 and "--request-timeout" in json.loads(body)["error"]
        assert 0.5 <= time.monotonic() - start < 3
        wait_for(lambda: s.session.cancelled_runs == [1])  # the ranks stopped it, not only the answer
        s.session.release()
        status, _, _ = call(s.url, "/generate", {"seed": 2})  # the service goes on
        assert status == 200 and s.session.runs == [2]


def test_a_queued_request_whose_client_left_is_dropped_before_it_runs(service):
    url = service.url
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)
        # A raw client: send the request, then hang up while it waits in the queue.
        body = json.dumps({"seed": 2}).encode()
        host, port = service.http.host, service.http.port
        with socket.create_connection((host, port)) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: service.coordinator.depth() == 1)
        wait_for(lambda: service.coordinator.depth() == 0)  # dropped once the server saw it go
        service.session.release()
        assert first.result(WAIT_S)[0] == 200
    wait_for(lambda: service.coordinator.in_flight == 0)
    assert service.session.runs == [1]  # seed 2 never ran (it left the queue: it cannot run later)


def test_body_bounds_auth_and_a_slow_client():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Service(max_body_bytes=5000, body_timeout_s=1.0, token=TOKEN) as s:
        url = s.url
        assert call(url, "/health")[0] == 200  # no token needed
        for headers in (None, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
            status, h, body = call(url, "/generate", {"seed": 1}, headers=headers)
            assert status == 401 and h["www-authenticate"] == "Bearer"
            assert "Bearer" in json.loads(body)["error"]
        assert call(url, "/metrics")[0] == 401 and call(url, "/metrics", headers=auth)[0] == 200
        status, _, body = call(url, "/generate", raw=b"{" + b" " * 6000 + b"}", headers=auth)
        assert status == 413 and "--max-body-bytes" in json.loads(body)["error"]
        status, _, body = call(url, "/generate", raw=b"[" * 2400 + b"]" * 2400, headers=auth)
        assert status == 400 and "nests too deeply" in json.loads(body)["error"]
        # A client that sends its headers, then a byte at a time: 408 after --body-timeout, and the
        # service answers others meanwhile.
        with socket.create_connection((s.http.host, s.http.port)) as sock:
            start = time.monotonic()
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b"\r\nContent-Length: 500\r\n\r\n{"
            )
            times = []
            for _ in range(5):
                sock.sendall(b" ")
                times.append(timed_health(url))
                time.sleep(0.1)
            sock.settimeout(WAIT_S)
            answer = read_answer(sock)
            took = time.monotonic() - start
        assert max(times) < 0.1, times
        assert 1.0 <= took < 1.0 + 1.0, took  # the whole body within --body-timeout, not per byte
        assert answer.startswith("HTTP/1.1 408") and "--body-timeout" in answer
        s.session.release()
        assert call(url, "/generate", {"seed": 3}, headers=auth)[0] == 200


def test_failures_answer_500_without_details_or_507_for_memory_and_the_service_goes_on(service):
    url = service.url
    service.session.fail_with = RuntimeError("secret detail /home/op/models")
    service.session.release()
    status, _, body = call(url, "/generate", {"seed": 1})
    assert status == 500 and "log" in json.loads(body)["error"] and "secret" not in body.decode()
    service.session.fail_with = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
    service.session.release()
    status, _, body = call(url, "/generate", {"seed": 2})
    assert status == 507 and "out of memory" in json.loads(body)["error"]
    service.session.fail_with = None
    service.session.release()
    assert call(url, "/generate", {"seed": 3})[0] == 200


def test_a_lost_rank_answers_waiting_and_later_requests_with_503(service, monkeypatch):
    monkeypatch.setattr(coordinator_module, "FAILED_LINGER_S", 0.5)
    url = service.url
    service.session.fail_with = DistributedError("rank 0/2: broadcast failed (peer gone)")
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(call, url, "/generate", {"seed": 1})
        assert service.session.started.wait(WAIT_S)
        queued = pool.submit(call, url, "/generate", {"seed": 2})
        wait_for(lambda: service.coordinator.depth() == 1)
        service.session.release()
        for f in (first, queued):
            status, _, body = f.result(WAIT_S)
            assert status == 503 and json.loads(body)["error"] == REASONS["failed"]
        status, _, body = call(url, "/generate", {"seed": 3})
        assert status == 503 and json.loads(body)["error"] == REASONS["failed"]
        status, _, body = call(url, "/health")  # no backend text where no token is needed
        assert status == 503 and json.loads(body)["reason"] == REASONS["failed"]
        assert "peer gone" not in body.decode()
    for t in service.threads:
        t.join(WAIT_S)
    assert service.codes == {"worker": 1, "pool": 1}


def test_while_loading_health_and_generate_answer_503_with_the_reason():
    links, _ = connect(DistContext.single())
    coordinator = Coordinator(links, SizePolicy(1, 1), queue_size=2, timeout_s=30)
    app = build_app(coordinator, Metrics(coordinator.depth, lambda: 0, 2), validate, dict, FrontSettings())
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


def test_heartbeat_and_queue_bounds():
    assert tick_seconds(300) == 5.0
    assert tick_seconds(8) == 2.0
    links, _ = connect(DistContext.single())
    with pytest.raises(ValueError, match="--queue-size"):
        Coordinator(links, SizePolicy(1, 1), queue_size=0, timeout_s=30)


@pytest.mark.parametrize(
    ("world", "per_image", "waiting", "mean_s", "expected"),
    [
        (1, 1, 3, 2.0, 6),  # 3 images x 2 s, one at a time
        (4, 2, 3, 2.0, 3),  # two groups of 2 ranks
        (4, None, 3, 2.0, 2),  # auto: a fourth image would get a group of 1 (4 groups): 1.5 s, rounded
        (4, None, 1, 4.0, 2),  # auto: a second image would get a group of 2 (2 groups)
    ],
    ids=["one-group", "two-groups", "auto-long-queue", "auto-short-queue"],
)
def test_retry_after_is_the_time_to_work_through_the_queue(world, per_image, waiting, mean_s, expected):
    """Retry-After on a full queue: waiting and running images times the mean seconds per image,
    over the groups that would make the next one at once; at least 1 s (no mean yet, or no queue)."""
    pipes = [Pipe() for _ in range(world)]  # links never used: the coordinator's thread is not started
    coordinator = Coordinator(
        {r: end for r, (end, _) in enumerate(pipes)}, SizePolicy(world, per_image), queue_size=8, timeout_s=30
    )
    coordinator.open()
    assert coordinator.retry_after_s() == 1  # an empty queue
    coordinator.submit_many([FakeRequest("a", i) for i in range(waiting)])
    assert coordinator.retry_after_s() == 1  # no image made yet: no mean
    coordinator.mean_seconds = mean_s
    assert coordinator.retry_after_s() == expected


def test_a_silent_idle_rank_is_lost_within_the_timeout(caplog):
    """A rank that is alive but answers no heartbeat (hung: its link stays open) is lost once it has
    been silent for ``timeout_s``: the service fails (503 to all) within the timeout plus one
    heartbeat tick, never before the timeout, and ``run`` returns 1 after its linger."""
    timeout_s = 2.0
    links, silent = connect(DistContext.single())  # the worker's end: never read, never answered
    coordinator = Coordinator(links, SizePolicy(1, 1), queue_size=2, timeout_s=timeout_s)
    codes: list[int] = []
    with caplog.at_level("ERROR", logger="distfd"):
        start = time.monotonic()
        thread = threading.Thread(target=lambda: codes.append(coordinator.run()), daemon=True)
        thread.start()
        wait_for(lambda: coordinator.state == "failed")
        took = time.monotonic() - start
        thread.join(WAIT_S)
    silent.close()
    assert timeout_s <= took < timeout_s + tick_seconds(timeout_s) + 0.5, took
    assert codes == [1]
    assert "rank 0 has not answered for 2s (--timeout)" in caplog.text


def test_serve_refuses_bad_options_before_loading(monkeypatch, capsys, tmp_path):
    import importlib.util

    from distfd.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "DISTFD_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    shared = tmp_path / "shared"
    shared.write_text("s" * 32 + "\n")
    shared.chmod(0o644)
    accented = tmp_path / "accented"
    accented.write_text("é" * 32 + "\n")
    accented.chmod(0o600)
    for argv, message in [
        (["--queue-size", "0"], "--queue-size must be >= 1; got 0."),
        (
            ["--max-parallel-steps", "0"],
            "--max-parallel-steps: max_parallel_steps must be None or an int >= 1",
        ),
        (["--noise-alpha", "nan"], "--noise-alpha: noise_alpha must be a finite number; got nan"),
        (["--timeout", "0"], "--timeout must be a positive number"),
        (["--request-timeout", "-1"], "--request-timeout must be a positive number"),
        (["--max-pixels", "0"], "--max-pixels must be an integer >= 1"),
        (["--max-batch", "0"], "--max-batch must be >= 1; got 0."),
        (["--ranks-per-image", "2"], "--ranks-per-image 2 does not divide the 1 rank(s)"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines and no token is set"),
        (["--token-file", str(short)], "must be at least 16 printable ASCII characters"),
        (["--token-file", str(tmp_path / "none")], "cannot read --token-file"),
        (
            ["--token-file", str(shared)],
            f"can be read by other users of this machine; make it private: chmod 600 {shared}",
        ),
        (["--token-file", str(accented)], "printable ASCII characters"),
        (["--header-timeout", "0"], "--header-timeout must be a positive number"),
        (["--max-connections", "0"], "--max-connections must be >= 1; got 0."),
    ]:
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert err.count("\n") == 1, err  # one line, before anything loads
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
