"""Property-based fuzzing of the one entry for a request from someone else (:mod:`distfd.intake`).

Thousands of generated JSON bodies (every field, every JSON type and magnitude: huge integers,
1e400, NaN, nested values where scalars belong, empty strings, duplicated keys, unknown fields) go
to a running 1-rank service over HTTP and to the batch reader's entry. Not one may give a 500 (or
an exception out of the batch reader); every answer is counted in /metrics; a good request is still
served after the barrage.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (a test dependency: never skipped)
from hypothesis import strategies as st  # noqa: E402

from distfd.intake import Admitted, Intake, RequestRefused  # noqa: E402
from distfd.limits import RequestLimits  # noqa: E402
from distfd.request import ImageRequest  # noqa: E402

from . import tiny  # noqa: E402
from .servers import Service, call  # noqa: E402

pytestmark = pytest.mark.timeout(600)

EXAMPLES = 2000
# The same generated bodies in every run (derandomized, no example database): a failure reproduces.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
FIELDS = ImageRequest.fields()
HUGE = 10**400

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-HUGE, max_value=HUGE),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "0", "0,1", "0,-3", "0,2.7", "uniform-2", "uniform-0", "sd-ddim-50", "a.json"]),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
)
# Values that often pass, so that the checks after the first ones are reached too.
plausible = {
    "prompt": st.sampled_from(
        ["a red circle", "x", "a small blue square at the top left on a black background"]
    ),
    "negative_prompt": st.sampled_from([None, "", "blurry"]),
    "seed": st.integers(min_value=-1, max_value=2**64),
    "steps": st.integers(min_value=-1, max_value=6),
    "guidance_scale": st.sampled_from([0, 1, 1.5, 5, 7.5, 0.5, -1]),
    "height": st.sampled_from([None, 7, 8, 16, 17, 24, 32, 64]),
    "width": st.sampled_from([None, 8, 16, 24, 32, 33]),
    "key_steps": st.one_of(
        st.none(),
        st.lists(st.integers(min_value=-1, max_value=5), max_size=5),
        st.sampled_from(["0,1", "uniform-1"]),
    ),
    "mode": st.sampled_from(["parallel", "propagate", "off", "OFF", ""]),
}


@st.composite
def bodies(draw) -> bytes:
    """A JSON body: mostly an object of request fields, sometimes one built as raw text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(
            st.sampled_from(
                [
                    b'{"prompt": "a red circle", "seed": 1, "seed": 2}',
                    b'{"prompt": "a red circle", "guidance_scale": 1e400}',
                    b'{"prompt": "a red circle", "steps": 1' + b"0" * 5000 + b"}",
                    b'{"prompt": "a red circle", "height": -0}',
                    b'{"prompt": "a red circle", "guidance_scale": NaN}',
                    b'{"prompt": "\\ud800"}',
                    b"[]",
                    b"null",
                    b'"just a string"',
                    b"",
                    b"\xff\xfe",
                ]
            )
        )
    names = draw(st.lists(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), max_size=6, unique=True))
    if draw(st.booleans()):
        names = ["prompt", *[n for n in names if n != "prompt"]]
    data = {}
    for name in names:
        wild = name not in plausible or draw(st.integers(0, 3)) == 0
        data[name] = draw(anything if wild else plausible[name])
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--steps", "2", "--height", "16", "--width", "16", "--key-steps", "0"]
    args += ["--max-steps", "6", "--max-pixels", str(32 * 32), "--queue-size", "64", "--timeout", "30"]
    s = Service(args, tmp_path_factory.mktemp("fuzz-log"), world=1)
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


def _counted(url: str) -> Counter:
    text = call(url, "/metrics")[2].decode()
    return Counter(
        {
            m.group(1): int(float(m.group(2)))
            for m in re.finditer(r'distfd_requests_total\{status="(\d+)"\} (\S+)', text)
        }
    )


def test_no_body_gives_a_500_and_every_answer_is_counted(service):
    before = _counted(service.url)
    seen: Counter = Counter()

    @FUZZ
    @given(body=bodies())
    def post(body: bytes) -> None:
        status, headers, answer = call(service.url, "/generate", raw=body)
        seen[str(status)] += 1
        assert status in (200, 400), (status, body[:200], answer[:300])
        if status == 400:
            assert headers["content-type"] == "application/json"
            message = json.loads(answer)["error"]
            assert message and len(message) <= 400

    post()
    assert sum(seen.values()) >= EXAMPLES
    assert seen["200"] > 0 and seen["400"] > 0, seen  # the barrage reached both outcomes
    counted = _counted(service.url) - before
    assert counted == seen, (counted, seen)  # every status counted, none missed
    status, _, png = call(service.url, "/generate", {"prompt": "a red circle", "seed": 1})
    assert status == 200 and png.startswith(b"\x89PNG")


def test_the_batch_reader_never_raises_on_a_line(tmp_path):
    """The same bodies as lines of a prompts file: each admitted or refused, never an exception."""
    facts_dir = tmp_path / "tiny-sd"
    tiny.sd().save_pretrained(facts_dir)
    from distfd.cli.generate import folder_check
    from distfd.request import ModelFacts

    class Args:
        model, scheduler = str(facts_dir), "ddim"

    facts = ModelFacts.from_folder(facts_dir)
    defaults = ImageRequest("a red circle", steps=2, height=16, width=16, key_steps=(0,))
    intake = Intake(defaults, RequestLimits(32 * 32, 6), folder_check(Args, facts), facts)
    outcomes: Counter = Counter()

    @FUZZ
    @given(body=bodies())
    def line(body: bytes) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return  # a prompts file is read as UTF-8 before any line is looked at
        try:
            admitted = intake.admit_line(text.replace("\n", " "))
        except RequestRefused as e:
            outcomes["refused"] += 1
            assert e.message
            return
        outcomes["admitted" if isinstance(admitted, Admitted) else "skipped"] += 1

    line()
    assert outcomes["refused"] > 0 and outcomes["admitted"] > 0, outcomes


def test_read_items_reports_bad_lines_and_keeps_the_good(tmp_path):
    from distfd.cli.batch import read_items

    prompts = tmp_path / "p.txt"
    lines = [
        '{"prompt": "a red circle", "guidance_scale": 1' + "0" * 400 + "}",
        "a red circle",
        '{"prompt": "x", "mode": 7}',
    ]
    prompts.write_text("\n".join(lines))
    intake = Intake(ImageRequest("x", steps=2), RequestLimits(), lambda r: r)
    items, problems = read_items(Path(prompts), intake, {})
    assert [i.line for i in items] == [2]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{prompts}:1", f"{prompts}:3"]
    assert "guidance_scale must be finite" in problems[0] and "mode must be one of" in problems[1]
