"""The OpenAI images API of ``distfd serve`` with the real ``openai`` client, over real HTTP, on 1 rank
and on 2 ranks as 2 groups of 1: images byte-equal to /generate's with seed + i, warnings to the
client, every refusal as the client's own exception class, and the curl examples of docs/openai.md.
The cases that end in the HTTP front (refusals, auth, routes, the docs' examples) run on 1 rank only.

The service (the embedded model, so a prompt it cannot read earns a warning) runs under
tests/faulty_rank.py: every rank runs out of memory for width 48 (507) and fails otherwise for width
40 (500).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(420)

from distfd.pool.coordinator import Coordinator  # noqa: E402
from distfd.pool.layout import SizePolicy  # noqa: E402
from distfd.pool.links import connect  # noqa: E402
from distfd.runtime import DistContext  # noqa: E402
from distfd.serve.app import build_app  # noqa: E402
from distfd.serve.front import FrontSettings  # noqa: E402
from distfd.serve.metrics import Metrics  # noqa: E402
from distfd.serve.server import HttpServer  # noqa: E402

from .servers import ROOT, Service, call  # noqa: E402

TOKEN = "openai-route-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "a small red circle at the top left on a blue background"  # the embedded model can read it
QUEUE = 4  # --queue-size and --max-images-per-request (its default)
# Seconds of work per image on the embedded model: fills the queue while a test looks at it.
LONG = {"prompt": PROMPT, "num_inference_steps": 150, "size": "64x64", "mode": "off"}


def front_only(test):
    """A case answered by rank 0's HTTP front alone, or one whose answer does not depend on the
    ranks: it runs on 1 rank only."""
    test.front_only = True
    return test


def pytest_generate_tests(metafunc):
    if "service" in metafunc.fixturenames:
        worlds = [1] if getattr(metafunc.function, "front_only", False) else [1, 2]
        ids = [{1: "1-rank", 2: "2-ranks-as-2-groups"}[w] for w in worlds]
        metafunc.parametrize("service", worlds, ids=ids, indirect=True, scope="module")


@pytest.fixture(scope="module")
def service(request, tmp_path_factory):
    world = request.param
    log_dir = tmp_path_factory.mktemp(f"openai{world}")
    token = log_dir / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    args = ["--steps", "6", "--height", "32", "--width", "32", "--timeout", "20", "--ranks-per-image", "1"]
    args += ["--token-file", str(token), "--queue-size", str(QUEUE), "--max-images-per-request", str(QUEUE)]
    every = range(world)
    env = {
        "DISTFD_TEST_OOM": ",".join(f"48:{r}" for r in every),
        "DISTFD_TEST_FAIL": ",".join(f"40:{r}" for r in every),
    }
    s = Service(args, log_dir, world, module="tests.faulty_rank", **env)
    try:
        s.wait_ready()
        s.world = world
        yield s
    finally:
        s.signal(signal.SIGTERM)
        codes, _ = s.wait(60)
        assert codes == [0] * world, s.results()


def client(s: Service, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", TOKEN), max_retries=0, **kw)


def generate_png(s: Service, **body) -> bytes:
    status, headers, png = call(s.url, "/generate", {"prompt": PROMPT, **body}, AUTH)
    assert status == 200 and headers["content-type"] == "image/png", png
    return png


def images(response) -> list[bytes]:
    return [base64.b64decode(d.b64_json) for d in response.data]


def test_n_images_are_those_of_generate_with_seed_plus_i(service):
    raw = client(service).images.with_raw_response.generate(prompt=PROMPT, n=3, extra_body={"seed": 11})
    got = images(raw.parse())
    assert got == [generate_png(service, seed=11 + i) for i in range(3)]  # byte for byte, seed order
    assert len(set(got)) == 3
    # The 3 images went to the pool together: on 2 groups, both groups made some.
    assert raw.headers["x-ranks"] == ",".join(str(r) for r in range(service.world))
    assert raw.headers["x-ranks-per-image"] == "1,1,1" and raw.headers["x-batch-size"] == "1,1,1"
    assert float(raw.headers["x-generation-seconds"]) > 0 and "x-key-steps" in raw.headers
    assert "x-distfd-warning" not in raw.headers and "warnings" not in (raw.parse().model_extra or {})


def test_one_image_with_the_default_seed_and_the_same_bytes_twice(service):
    c = client(service)
    first = c.images.generate(
        prompt=PROMPT, model="embedded:tiny-shapes", size="32x32", response_format="b64_json"
    )
    again = c.images.generate(prompt=PROMPT, n=1, size="auto", extra_body={"seed": 0})
    assert images(first) == images(again) == [generate_png(service)]  # the service's --seed: 0
    assert first.size == "32x32" and first.output_format == "png" and first.data[0].revised_prompt is None
    sampled = c.images.generate(
        prompt=PROMPT,
        extra_body={
            "seed": 4,
            "num_inference_steps": 4,
            "guidance_scale": 3.0,
            "negative_prompt": "a square",
        },
    )
    same = generate_png(service, seed=4, steps=4, guidance_scale=3.0, negative_prompt="a square")
    assert images(sampled) == [same] and same != generate_png(service, seed=4)


def test_a_prompt_the_model_cannot_read_gets_images_and_the_warning(service):
    raw = client(service).images.with_raw_response.generate(prompt="a red fox", n=2)
    answer = raw.parse()
    assert len(answer.data) == 2
    (warning,) = answer.model_extra["warnings"]  # one warning, though two images earned it
    assert "'fox'" in warning and raw.headers["x-distfd-warning"] == warning
    status, headers, _ = call(service.url, "/generate", {"prompt": "a red fox"}, AUTH)
    assert status == 200 and headers["x-distfd-warning"] == warning
    assert "x-distfd-warning" not in call(service.url, "/generate", {"prompt": PROMPT}, AUTH)[1]


@front_only
@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"quality": "hd"}, "quality", "cannot be honoured"),
        ({"style": "vivid"}, "style", "cannot be honoured"),
        ({"background": "transparent"}, "background", "cannot be honoured"),
        ({"size": "big"}, "size", "'WIDTHxHEIGHT'"),
        ({"size": "33x32"}, "size", "multiple of 8"),
        ({"size": "512x512"}, "size", "--max-pixels"),
        ({"n": QUEUE + 1}, "n", "--max-images-per-request"),
        ({"n": 0}, "n", "from 1 to"),
        ({"model": "dall-e-3"}, "model", "embedded:tiny-shapes"),
        ({"response_format": "url"}, "response_format", "'b64_json'"),
        ({"output_format": "jpeg"}, "output_format", "'png'"),
        ({"extra_body": {"colour": "red"}}, "colour", "unknown field(s) 'colour'"),
        ({"extra_body": {"k" * 5000: 1}}, "k" * 40, "(5002 characters)"),  # not echoed whole
        ({"extra_body": {"num_inference_steps": 1000}}, "num_inference_steps", "--max-steps"),
        ({"extra_body": {"seed": -1}}, "seed", "seed must be"),
        ({"extra_body": {"seed": 2**64 - 2}, "n": 3}, "seed", "image 2 would get seed"),
        ({"extra_body": {"mode": "off", "key_steps": [0, 2]}}, "key_steps", "mode 'off'"),
    ],
)
def test_bad_requests_raise_bad_request_error_naming_the_parameter(service, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client(service).images.generate(prompt=PROMPT, **kwargs)
    error = caught.value.body
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error" and caught.value.status_code == 400


@front_only
def test_wrong_token_raises_authentication_error(service):
    bad = client(service, api_key="not-the-token-at-all-000")
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@front_only
def test_models_and_unknown_paths(service):
    c = client(service)
    assert [m.id for m in c.models.list()] == ["embedded:tiny-shapes"]
    assert c.models.retrieve("embedded:tiny-shapes").owned_by == "distfd"
    with pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("dall-e-3")
    assert "embedded:tiny-shapes" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.images.edit(image=b"not a png", prompt=PROMPT)  # a route this service does not have
    # Every error of the service is JSON; under /v1/ in OpenAI's shape.
    for path, status in (("/v1/images/generations", 405), ("/v1/nothing", 404)):
        got, headers, body = call(service.url, path, headers=AUTH)
        assert got == status and headers["content-type"] == "application/json"
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    for path, status in (("/generate", 405), ("/nothing", 404)):
        got, headers, body = call(service.url, path, headers=AUTH)
        assert got == status and headers["content-type"] == "application/json"
        assert isinstance(json.loads(body)["error"], str)


@front_only
def test_a_body_over_the_limit_raises_the_413_status_error(service):
    with pytest.raises(openai.APIStatusError) as caught:
        client(service).images.generate(prompt="x" * 70_000)  # --max-body-bytes 64 KiB
    assert type(caught.value) is openai.APIStatusError and caught.value.status_code == 413
    assert "--max-body-bytes" in caught.value.body["message"]


def answered(s: Service, status: int) -> int:
    """How many answers of ``status`` the service has counted."""
    text = call(s.url, "/metrics", headers=AUTH)[2].decode()
    line = f'distfd_requests_total{{status="{status}"}} '
    return int(sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)))


@pytest.mark.parametrize(("size", "status", "code"), [("48x32", 507, "out_of_memory"), ("40x32", 500, None)])
def test_failed_images_raise_internal_server_error_and_the_service_goes_on(service, size, status, code):
    before = answered(service, status)
    with pytest.raises(openai.InternalServerError) as caught:  # the client's default retries on
        openai.OpenAI(base_url=service.url + "/v1", api_key=TOKEN).images.generate(
            prompt=PROMPT, size=size, n=2
        )
    assert caught.value.status_code == status and caught.value.body["code"] == code
    assert answered(service, status) == before + 1  # not retried: the same request would fail again
    assert "injected" not in caught.value.body["message"]  # backend text stays in the log
    assert images(client(service).images.generate(prompt=PROMPT)) == [generate_png(service)]


def hold(s: Service, body: dict) -> socket.socket:
    """A raw client whose request waits; closing the socket cancels its images."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n"
        + data
    )  # fmt: skip
    return sock


def test_a_full_queue_raises_rate_limit_error_with_retry_after(service):
    world = service.world
    held = [hold(service, {**LONG, "n": QUEUE})]  # `world` of them run, the rest wait
    service.wait_health(lambda h: h["in_flight"] == world and h["queue"] == QUEUE - world)
    held.append(hold(service, {**LONG, "n": world, "seed": 9}))
    service.wait_health(lambda h: h["queue"] == QUEUE)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client(service).images.generate(prompt=PROMPT)
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert caught.value.body["code"] == "queue_full" and "queue is full" in caught.value.body["message"]
    finally:
        for sock in held:
            sock.close()  # the images are dropped or stopped at their next step
    service.wait_health(lambda h: h["queue"] == 0 and h["in_flight"] == 0)
    assert len(client(service).images.generate(prompt=PROMPT, n=QUEUE).data) == QUEUE


@front_only
def test_curl_examples_of_the_docs(service, tmp_path):
    """Every ```bash block of docs/openai.md that calls curl, run as written against this service; the
    ``<!-- expect: ... -->`` line above it says what comes back."""
    text = (ROOT / "docs" / "openai.md").read_text()
    examples = re.findall(r"<!-- expect: (.*?) -->\n```bash\n(.*?)```", text, flags=re.S)
    assert len(examples) >= 3
    env = {**os.environ, "DISTFD_URL": service.url, "DISTFD_TOKEN": TOKEN}
    for expect, script in examples:
        assert "curl" in script
        done = subprocess.run(
            ["bash", "-e", "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=60
        )
        assert done.returncode == 0, (script, done.stderr)
        kind, _, detail = expect.partition(" ")
        if kind == "images":  # that many images, base64 PNGs
            data = json.loads(done.stdout)["data"]
            assert len(data) == int(detail)
            assert all(base64.b64decode(d["b64_json"]).startswith(b"\x89PNG") for d in data)
        elif kind == "error":  # OpenAI's error shape, blaming that parameter
            assert json.loads(done.stdout)["error"]["param"] == detail, done.stdout
        elif kind == "models":
            assert json.loads(done.stdout)["data"][0]["id"] == "embedded:tiny-shapes"
        elif kind == "file":  # the script wrote a PNG of that name
            assert (tmp_path / detail).read_bytes().startswith(b"\x89PNG"), script
        else:
            raise AssertionError(f"unknown expectation {expect!r}")


@front_only
def test_openai_client_example_of_the_docs(service, tmp_path):
    """The ```python example of docs/openai.md, run as written (but for the address) in a folder with
    the token: it writes the images of seeds 7 to 10, those /generate makes."""
    (script,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "openai.md").read_text(), flags=re.S)
    assert "http://127.0.0.1:8000/v1" in script
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "example.py").write_text(script.replace("http://127.0.0.1:8000", service.url))
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    fields = {"steps": 20, "guidance_scale": 7.5}
    for seed in range(7, 11):
        assert (tmp_path / f"circle-{seed}.png").read_bytes() == generate_png(service, seed=seed, **fields)


def test_while_loading_the_client_gets_internal_server_error_with_retry_after():
    links, _ = connect(DistContext.single())
    coordinator = Coordinator(links, SizePolicy(1, 1), queue_size=2, timeout_s=30)
    app = build_app(coordinator, Metrics(coordinator.depth, lambda: 0, 1), dict, dict, FrontSettings())
    http = HttpServer("127.0.0.1", 0)
    http.start(app)
    try:
        c = openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            c.images.generate(prompt=PROMPT)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "5"
        assert "loading" in caught.value.body["message"] and caught.value.body["code"] == "unavailable"
    finally:
        http.stop()


def test_max_images_per_request_is_checked_before_loading(monkeypatch, capsys):
    from distfd.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "DISTFD_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for argv, message in [
        (
            ["--max-images-per-request", "0"],
            "--max-images-per-request must be from 1 to --queue-size (16); got 0.",
        ),
        (
            ["--queue-size", "2", "--max-images-per-request", "3"],
            "--max-images-per-request must be from 1 to --queue-size (2); got 3.",
        ),
    ]:
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
