"""``distfd serve`` on 2 gloo ranks over real HTTP with a tiny saved pipeline: concurrent requests,
bad requests, the same pixels as ``distfd generate``, a killed rank, SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytestmark = pytest.mark.timeout(300)

from distfd.cli import main  # noqa: E402

from . import tiny  # noqa: E402
from .cli_helpers import SLACK_S  # noqa: E402
from .servers import LISTENING, ROOT, Ranks, Service, call, wait_ready  # noqa: E402

TINY = ["--steps", "10", "--key-steps", "0,1,3,6", "--height", "32", "--width", "32"]
TIMEOUT_S = 10  # the collective timeout of these services: a lost rank must end them within it
REQUEST = {"prompt": "a red circle", "seed": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("serve")
    s = Service(["--model", str(model_dir), *TINY, "--timeout", str(TIMEOUT_S)], log_dir)
    try:
        s.wait_ready()
        yield s
    finally:
        s.signal(signal.SIGTERM)
        codes, _ = s.wait(60)
        assert codes == [0, 0], s.results()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_health_reports_world_size_model_and_queue(service, model_dir):
    h = service.health()
    assert h["status"] == "ok" and h["world_size"] == 2 and h["queue"] == 0
    assert h["model"] == model_dir.name  # the folder name only: no server paths in answers


def test_same_pixels_as_generate(service, model_dir, tmp_path):
    out = tmp_path / "generate.png"
    argv = ["generate", "--model", str(model_dir), *TINY, "--prompt", "a red circle", "--seed", "3"]
    ranks = Ranks([*argv, "--out", str(out), "--timeout", "60"], tmp_path / "generate")
    codes, _ = ranks.wait(180)
    assert codes == [0, 0], ranks.results()
    status, headers, png = call(service.url, "/generate", REQUEST)
    assert status == 200 and headers["content-type"] == "image/png"
    assert float(headers["x-generation-seconds"]) > 0
    np.testing.assert_array_equal(pixels(png), pixels(out.read_bytes()))
    assert png == out.read_bytes()  # the same PNG, byte for byte


def test_concurrent_requests_all_answered_and_the_same_as_alone(service):
    bodies = [{"prompt": "a blue square", "seed": s % 3} for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: call(service.url, "/generate", b), bodies))
    assert [a[0] for a in answers] == [200] * 6
    # Queued and concurrent requests give what the same request gives alone (on an idle service).
    for seed in range(3):
        status, _, alone = call(service.url, "/generate", bodies[seed])
        assert status == 200 and alone == answers[seed][2] == answers[seed + 3][2], seed
    assert not np.array_equal(pixels(answers[0][2]), pixels(answers[1][2]))
    text = call(service.url, "/metrics")[2].decode()
    assert 'distfd_requests_total{status="200"}' in text and "distfd_request_seconds_bucket" in text
    sent = [line for line in text.splitlines() if line.startswith("distfd_broadcast_bytes_total ")]
    assert float(sent[0].split()[1]) > 0


@pytest.mark.parametrize(
    ("body", "cli_args", "message"),
    [
        ({"seed": 1}, None, "prompt is missing"),
        ({"prompt": "a red circle", "steps": "ten"}, None, "steps must be an integer"),
        ({"prompt": "a red circle", "colour": "red"}, None, "unknown field(s) 'colour'"),
        ({"prompt": "a red circle", "steps": 0}, ["--steps", "0"], "steps must be >= 1"),
        ({"prompt": "a red circle", "key_steps": [0, 1, 99]}, ["--key-steps", "0,1,99"], "99"),
        ({"prompt": "a red circle", "height": 30}, ["--height", "30"], "multiple of 8"),
    ],
)
def test_bad_requests_get_400_with_the_cli_message(
    service, model_dir, tmp_path, capsys, body, cli_args, message
):
    status, headers, answer = call(service.url, "/generate", body)
    assert status == 400 and headers["content-type"] == "application/json"
    error = json.loads(answer)["error"]
    assert message in error
    if cli_args is not None:  # the same request on the command line: the same message
        argv = ["generate", "--model", str(model_dir), *TINY, *cli_args, "--out", str(tmp_path / "x.png")]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"distfd generate: error: {error}"


# 100 steps: the request in flight lasts long enough (about a second) to queue two more behind it.


def test_a_killed_rank_ends_the_service_with_503_and_no_hang(model_dir, tmp_path):
    s = Service(["--model", str(model_dir), *TINY, "--steps", "100", "--timeout", str(TIMEOUT_S)], tmp_path)
    try:
        s.wait_ready()
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(call, s.url, "/generate", {**REQUEST, "seed": 0})]
            s.wait_health(lambda h: h["in_flight"] == 1)  # the first one is in flight
            for k in (1, 2):  # queued one after the other: a known order
                waiting.append(pool.submit(call, s.url, "/generate", {**REQUEST, "seed": k}))
                s.wait_health(lambda h, k=k: h["in_flight"] == 1 and h["queue"] == k)
            s.signal(signal.SIGKILL, [1])
            killed = time.monotonic()
            answers = [f.result(TIMEOUT_S + SLACK_S) for f in waiting]
        # The one in flight may have finished before rank 1 died; the waiting ones cannot.
        assert answers[0][0] in (200, 503)
        for status, _, body in answers[1:]:
            assert status == 503 and "was lost" in json.loads(body)["error"]
        status, _, body = call(s.url, "/generate", REQUEST)  # later: still an answer, not a hang
        assert status == 503 and "lost" in json.loads(body)["error"]
        codes, _ = s.wait(TIMEOUT_S + SLACK_S)
        assert codes[0] == 1 and codes[1] == -signal.SIGKILL, s.results()
        assert time.monotonic() - killed < TIMEOUT_S + SLACK_S
    finally:
        s.kill()


def test_a_killed_rank_0_ends_the_other_ranks_with_an_error(model_dir, tmp_path):
    s = Service(["--model", str(model_dir), *TINY, "--timeout", str(TIMEOUT_S)], tmp_path)
    try:
        s.wait_ready()
        s.signal(signal.SIGKILL, [0])  # the HTTP server goes with it; rank 1 waits in a collective
        codes, took = s.wait(TIMEOUT_S + SLACK_S)
        assert codes == [-signal.SIGKILL, 1], s.results()
        assert took < TIMEOUT_S + SLACK_S
        assert "lost a rank" in s.log(1)
    finally:
        s.kill()


@pytest.mark.parametrize("signalled", [[0, 1], [1]], ids=["every-rank", "one-follower"])
def test_sigterm_finishes_the_request_in_flight_and_answers_the_queued_with_503(
    model_dir, tmp_path, signalled
):
    s = Service(["--model", str(model_dir), *TINY, "--steps", "100", "--timeout", str(TIMEOUT_S)], tmp_path)
    try:
        s.wait_ready()
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(call, s.url, "/generate", {**REQUEST, "seed": 0})]
            s.wait_health(lambda h: h["in_flight"] == 1)  # the first one is in flight
            for k in (1, 2):  # queued one after the other: a known order
                waiting.append(pool.submit(call, s.url, "/generate", {**REQUEST, "seed": k}))
                s.wait_health(lambda h, k=k: h["in_flight"] == 1 and h["queue"] == k)
            s.signal(signal.SIGTERM, signalled)  # torchrun and scancel signal every rank
            answers = [f.result(TIMEOUT_S * 3) for f in waiting]
        statuses = [a[0] for a in answers]
        if signalled == [0, 1]:
            assert statuses == [200, 503, 503]
        else:
            # Rank 1's wish reaches rank 0 with the next message it joins; if rank 1 was already
            # waiting for that message, the one after. Requests handed out before it finish.
            assert statuses[0] == 200 and statuses == sorted(statuses), statuses
            assert set(statuses) <= {200, 503}
        for status, _, body in answers:
            if status == 503:
                assert "shutting down" in json.loads(body)["error"]
        codes, _ = s.wait(30)
        assert codes == [0, 0], s.results()
        why = "signal 15" if 0 in signalled else "another rank was asked to stop"
        assert f"stopping ({why})" in s.log(0)
    finally:
        s.kill()


def test_torchrun_recipe_serves_and_stops_on_sigterm(service, model_dir, tmp_path):
    cmd = ["bash", str(ROOT / "launch" / "serve-torchrun.sh"), "2", "--model", str(model_dir), *TINY]
    cmd += ["--port", "0", "--timeout", str(TIMEOUT_S)]  # rank 0 binds a free port and logs it
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the venv's torchrun
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not (found := LISTENING.search(log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        url = found[1]
        assert wait_ready(url, [proc], 180, log.read_text)["world_size"] == 2
        status, _, png = call(url, "/generate", REQUEST)
        assert status == 200 and png == call(service.url, "/generate", REQUEST)[2]
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "stopping (signal 15)" in text and "lost a rank" not in text, text[-3000:]


def test_idle_service_outlives_the_collective_timeout(service):
    """Idle ranks wait in a collective; the heartbeat keeps them inside the timeout."""
    assert service.health()["queue"] == 0
    time.sleep(TIMEOUT_S + 2)  # idle past the collective timeout
    assert service.health()["status"] == "ok"
    assert call(service.url, "/generate", REQUEST)[0] == 200
