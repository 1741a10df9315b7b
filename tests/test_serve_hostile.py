"""``distfd serve`` against hostile and careless clients, over real HTTP, on 1 and 2 gloo ranks (the
cases that end in the HTTP front, before any rank is involved, on 2 ranks only).

Each case is followed by the same check: /health answers within 100 ms and a good request still gives
the very PNG it gave before the battery. The service runs under tests/faulty_rank.py, which makes one
rank's denoiser allocation fail for two image widths (rank 0's for width 48, the last rank's for 56),
and its peak memory is read from /proc at the end.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytestmark = pytest.mark.timeout(420)

from distfd.keysteps import save_preset_file  # noqa: E402
from distfd.pool.coordinator import tick_seconds  # noqa: E402

from . import tiny  # noqa: E402
from .cli_helpers import SLACK_S, spawn_ranks  # noqa: E402
from .servers import Service, call, read_answer  # noqa: E402

TOKEN = "hostile-battery-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {"prompt": "a red circle", "seed": 3}
LONG = {"prompt": "a red circle", "steps": 150, "height": 64, "width": 64, "mode": "off"}  # seconds of work
REQUEST_TIMEOUT_S = 3.0
GRACE_S = 2.0
TIMEOUT_S = 6  # --timeout: short, so a rank starved by a slow check would be declared lost
HEALTH_LIMIT_S = 0.1
# Peak resident memory of rank 0 over the whole battery (tiny model, torch, the HTTP server): the
# refused 8192x8192 request alone would need several GiB.
MEMORY_BOUND_KIB = 1536 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


def front_only(test):
    """A case answered by rank 0's HTTP front alone (auth, body, limits, parsing): the rank count
    cannot change it, so it runs on 2 ranks only (where a starved rank 1 would also show)."""
    test.front_only = True
    return test


def pytest_generate_tests(metafunc):
    if "service" in metafunc.fixturenames:
        worlds = [2] if getattr(metafunc.function, "front_only", False) else [1, 2]
        ids = [{1: "1-rank", 2: "2-ranks"}[w] for w in worlds]
        metafunc.parametrize("service", worlds, ids=ids, indirect=True, scope="module")


@pytest.fixture(scope="module")
def service(request, model_dir, tmp_path_factory):
    world = request.param
    log_dir = tmp_path_factory.mktemp(f"hostile{world}")
    token = log_dir / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    keys = log_dir / "operator-keys.json"  # the operator's preset file: read once, never named to clients
    save_preset_file(keys, 10, [0, 1, 3, 6])
    args = ["--model", str(model_dir), "--steps", "10", "--key-steps", str(keys), "--height", "32"]
    args += ["--width", "32", "--timeout", str(TIMEOUT_S), "--token-file", str(token), "--queue-size", "2"]
    args += ["--request-timeout", str(REQUEST_TIMEOUT_S), "--body-timeout", "2", "--grace", str(GRACE_S)]
    s = Service(args, log_dir, world, module="tests.faulty_rank", DISTFD_TEST_OOM=f"48:0,56:{world - 1}")
    try:
        s.wait_ready()
        keys.unlink()  # read at start, not per request
        s.keys_file = keys
        status, _, png = call(s.url, "/generate", GOOD, AUTH)
        assert status == 200, s.results()
        s.reference = png
        yield s
    finally:
        s.kill()


def post(s: Service, body=None, raw: bytes | None = None, headers: dict | None = None):
    status, h, answer = call(s.url, "/generate", body, {**AUTH, **(headers or {})}, raw)
    return status, h, answer


def error(answer: bytes) -> str:
    return json.loads(answer)["error"]


def health_s(s: Service) -> float:
    start = time.monotonic()
    status, _, _ = call(s.url, "/health")
    took = time.monotonic() - start
    assert status == 200
    return took


def assert_healthy(s: Service) -> None:
    """After every case: /health within 100 ms, and the good request's very PNG."""
    assert health_s(s) < HEALTH_LIMIT_S
    status, _, png = post(s, GOOD)
    assert status == 200 and png == s.reference, s.results()


def raw_request(s: Service, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(head + body)
    return sock


@front_only
def test_missing_or_wrong_token_gets_401(service):
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all-000"}, {"Authorization": TOKEN}):
        status, h, answer = call(service.url, "/generate", GOOD, headers)
        assert status == 401 and h["www-authenticate"] == "Bearer", answer
    assert call(service.url, "/metrics")[0] == 401
    assert call(service.url, "/metrics", headers=AUTH)[0] == 200
    assert_healthy(service)


@front_only
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**GOOD, "height": 8192, "width": 8192}, "--max-pixels"),
        ({**GOOD, "steps": 100000}, "--max-steps"),
        ({**GOOD, "prompt": "a red circle " * 300}, "--max-prompt-chars"),
        ({**GOOD, "negative_prompt": "x" * 2001, "guidance_scale": 5}, "--max-prompt-chars"),
    ],
    ids=["oversized-image", "too-many-steps", "long-prompt", "long-negative-prompt"],
)
def test_work_over_the_limits_is_refused_naming_the_limit(service, body, message):
    start = time.monotonic()
    status, _, answer = post(service, body)
    assert status == 400 and message in error(answer)
    assert time.monotonic() - start < 1.0
    assert_healthy(service)


@front_only
def test_a_huge_body_gets_413_without_being_read(service):
    status, _, answer = post(service, raw=b'{"prompt": "' + b"x" * 200_000 + b'"}')
    assert status == 413 and "--max-body-bytes" in error(answer)
    # Chunked, with no Content-Length: counted as it arrives, refused past the bound.
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 16384
    with raw_request(service, head) as sock:
        sock.settimeout(20)
        try:
            for _ in range(8):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server may close as soon as it has answered
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert_healthy(service)


@front_only
def test_deeply_nested_json_gets_400(service):
    status, _, answer = post(service, raw=b"[" * 30000 + b"]" * 30000)
    assert status == 400 and "nests too deeply" in error(answer)
    status, _, answer = post(service, raw=b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}")
    assert status == 400
    assert_healthy(service)


@front_only
def test_a_huge_key_step_list_is_refused_at_once(service):
    for keys in (list(range(9000)), ",".join(str(k) for k in range(9000))):
        start = time.monotonic()
        status, _, answer = post(service, {**GOOD, "key_steps": keys})
        assert status == 400 and "key_steps lists 9000 entries for 10 steps" in error(answer)
        assert time.monotonic() - start < 1.0
    assert_healthy(service)


@front_only
def test_key_steps_cannot_name_a_server_file(service, model_dir):
    messages = set()
    for path in ("/etc/passwd", "/no/such/file.json", str(model_dir / "model_index.json"), "../x.json"):
        status, _, answer = post(service, {**GOOD, "key_steps": path})
        assert status == 400
        messages.add(error(answer))
        assert "/" not in error(answer) and "No such file" not in error(answer)
    assert len(messages) == 1  # the same answer whether or not the file exists
    assert_healthy(service)


# Strings a check could choke on (backtracking, quadratic scans, echoing), each near the body limit.
ADVERSARIAL = {
    "backtracking-index-list": "0" + " " * 60000 + "x",
    "commas": "0," * 30000,
    "uniform-huge": "uniform-" + "9" * 60000,
    "digits": "1" * 60000,
    "spaces": " " * 60000,
    "slashes": "/" * 60000,
    "words": "background " * 5400,
    "accents": "é" * 30000,
}


@pytest.mark.parametrize(
    "field", ["prompt", "negative_prompt", "key_steps", "mode", "seed", "height", "name"]
)
def test_adversarial_strings_are_answered_at_once_and_health_meanwhile(service, field):
    """Every check on request text is linear: each pathological string, in each string-bearing
    place, is refused within 1 s while /health keeps answering within 100 ms (and on 2 ranks the
    other rank is not starved into being declared lost, with a short --timeout)."""
    health: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            health.append(health_s(service))
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        for name, text in ADVERSARIAL.items():
            body = {text: 1, **GOOD} if field == "name" else {**GOOD, field: text}
            if field == "negative_prompt":
                body["guidance_scale"] = 5
            start = time.monotonic()
            status, _, answer = post(service, body)
            took = time.monotonic() - start
            assert status in (400, 413), (name, status, answer[:300])
            assert took < 1.0, (name, took)
            assert len(error(answer)) <= 400, name  # the string is not echoed back
    finally:
        stop.set()
        watcher.join(5)
    assert health and max(health) < HEALTH_LIMIT_S, max(health)
    assert_healthy(service)


def test_the_heartbeat_follows_the_timeout_on_any_rank_count(service):
    assert f"heartbeat every {tick_seconds(TIMEOUT_S):.1f}s" in service.log(0)


@front_only
def test_the_operators_preset_file_is_read_once_and_never_named(service):
    status, _, answer = post(service, {**GOOD, "steps": 8})  # the default preset is built for 10
    assert status == 400 and "built for 10 steps" in error(answer), answer
    assert str(service.keys_file.parent) not in error(answer) and "operator-keys" not in error(answer)
    assert "the service's default key steps" in error(answer)
    status, _, body = call(service.url, "/health")
    assert str(service.keys_file.parent) not in body.decode()
    assert_healthy(service)  # the file is gone since start: the preset was read once


@front_only
def test_a_slow_client_gets_408_and_health_answers_meanwhile(service):
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{"
    )
    times = []
    with raw_request(service, head) as sock:
        for _ in range(6):
            sock.sendall(b" ")
            times.append(health_s(service))
            time.sleep(0.2)
        sock.settimeout(20)
        answer = read_answer(sock)
    assert max(times) < HEALTH_LIMIT_S, times
    assert answer.startswith("HTTP/1.1 408") and "--body-timeout" in answer
    assert_healthy(service)


def test_deadline_full_queue_and_a_client_that_leaves(service):
    """A long request in flight, two queued (one of whose client leaves), one refused: the queue is
    full, /health still answers at once, the departed request never runs, the others get 504 at the
    deadline, and the ranks stop the long image there (the next request is not held up by it)."""
    images_before = images_started(service)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(timed_post, service, LONG)
        service.wait_health(lambda h: h["in_flight"] == 1)
        queued = pool.submit(timed_post, service, {**LONG, "seed": 1})
        service.wait_health(lambda h: h["queue"] == 1)
        body = json.dumps({**LONG, "seed": 2}).encode()
        head = (
            b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        with raw_request(service, head, body):
            service.wait_health(lambda h: h["queue"] == 2)
            status, h, answer = post(service, {**LONG, "seed": 3})
            assert status == 503 and "queue is full" in error(answer) and int(h["retry-after"]) >= 1
            assert health_s(service) < HEALTH_LIMIT_S
        service.wait_health(lambda h: h["queue"] == 1)  # the departed client's request is dropped
        for future in (running, queued):
            status, answer, took = future.result(30)
            assert status == 504 and "--request-timeout" in error(answer)
            # At the deadline from its arrival (docs/service.md), not before it, and not much after.
            assert REQUEST_TIMEOUT_S <= took < REQUEST_TIMEOUT_S + SLACK_S, took
    # The in-flight one started, perhaps the queued one too (its deadline passed while it waited or
    # just after it started); the departed client's never did.
    assert images_started(service) - images_before in (1, 2)
    t0 = time.monotonic()
    assert_healthy(service)
    assert time.monotonic() - t0 < 5  # the long images were stopped, not finished


def timed_post(s: Service, body: dict) -> tuple[int, bytes, float]:
    """(status, body, seconds from sending to the whole answer)."""
    start = time.monotonic()
    status, _, answer = post(s, body)
    return status, answer, time.monotonic() - start


def images_started(s: Service) -> int:
    text = call(s.url, "/metrics", headers=AUTH)[2].decode()
    lines = [line for line in text.splitlines() if line.startswith("distfd_images_total")]
    return int(sum(float(line.split()[-1]) for line in lines))


@pytest.mark.parametrize("width", [48, 56], ids=["rank-0", "last-rank"])
def test_out_of_memory_is_one_failed_request(service, width):
    status, _, answer = post(service, {**GOOD, "width": width})
    assert status == 507, answer
    assert "out of memory" in error(answer) and f"{width}x32" in error(answer)
    assert_healthy(service)


def test_memory_stays_bounded_and_sigterm_ends_a_long_request_within_the_grace(service):
    status_file = Path(f"/proc/{service.procs[0].pid}/status").read_text()
    peak_kib = int(next(line for line in status_file.splitlines() if line.startswith("VmHWM")).split()[1])
    print(f"rank 0's peak resident memory over the battery: {peak_kib / 1024:.0f} MiB")
    assert peak_kib < MEMORY_BOUND_KIB, f"rank 0 peaked at {peak_kib} KiB"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, service, LONG)
        service.wait_health(lambda h: h["in_flight"] == 1)
        start = time.monotonic()
        service.signal(signal.SIGTERM)
        status, _, answer = running.result(30)
        answered = time.monotonic() - start
        assert status == 503 and "shutting down" in error(answer)
    codes, _ = service.wait(30)
    took = time.monotonic() - start
    assert codes == [0] * len(codes), service.results()
    # The image in flight runs out its --grace, is stopped at the next step boundary and answered;
    # then every rank exits (docs/service.md): the grace plus the slack for a step and an exit.
    assert GRACE_S <= answered < GRACE_S + SLACK_S, answered
    assert took < GRACE_S + SLACK_S, took


def test_a_non_loopback_host_without_a_token_is_refused_on_every_rank(model_dir):
    argv = ["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--port", "0"]
    exits = spawn_ranks([argv, argv], None, wait_s=60, DISTFD_TOKEN="")
    for e in exits:
        assert e.returncode == 2, e.output
        assert "--insecure-no-auth" in e.output
