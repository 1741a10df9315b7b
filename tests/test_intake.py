"""The one entry for a request from someone else: each refusal names its field, strict JSON, bounded
messages, the checks in order (the limits on raw values before any parsing), warnings returned."""

from __future__ import annotations

import pytest

from distfd.intake import Intake, RequestRefused, decode
from distfd.limits import RequestLimits
from distfd.request import ImageRequest

DEFAULTS = ImageRequest("x", steps=10, height=32, width=32)


LIMITS = RequestLimits(32 * 32, 20)


def _intake(check=lambda r: r, warn=None) -> Intake:
    return Intake(DEFAULTS, LIMITS, check, warn=warn)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"prompt": "a", "guidance_scale": 10**400}, "guidance_scale", "must be finite"),
        ({"prompt": "a", "seed": -1}, "seed", r"0 \.\. 2\*\*64-1"),
        ({"prompt": "a", "steps": 21}, "steps", "--max-steps"),
        ({"prompt": "a", "height": 64, "width": 64}, "height", "--max-pixels"),  # names both sides
        ({"prompt": "a", "key_steps": "0,-3"}, "key_steps", "non-negative"),
        ({"prompt": "a", "key_steps": [0] * 11}, "key_steps", "11 entries for 10 steps"),
        ({"prompt": "a", "key_steps": "/etc/passwd"}, "key_steps", "cannot name a file"),
        ({"prompt": "a", "mode": ["off"]}, "mode", "must be one of"),
        ({"prompt": "a", "negative_prompt": "b", "guidance_scale": 1}, "negative_prompt", "guidance"),
        ({"prompt": "a\ud800"}, "prompt", "lone surrogate"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"seed": 1}, "prompt", "missing"),
        ({"prompt": "a", "colour": 1}, None, "unknown field"),
        ([1], None, "JSON object"),
    ],
)
def test_each_refusal_names_its_field(data, field, words):
    with pytest.raises(RequestRefused, match=words) as refused:
        _intake().admit(data)
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"prompt": "a", "seed": 1, "seed": 2}', "'seed' is given more than once"),
        (b'{"prompt": "a", "guidance_scale": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "a", "steps": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100000, "nests too deeply"),
        (b"\xff", "not valid JSON"),
    ],
)
def test_strict_json(body, words):
    with pytest.raises(RequestRefused, match=words):
        decode(body)


def test_a_refusal_never_echoes_megabytes():
    with pytest.raises(RequestRefused) as refused:
        _intake().admit({"prompt": "a", "x" * 100000: 1})
    assert len(refused.value.message) <= 400


def test_the_raw_limits_come_before_the_model_and_the_warning_after():
    calls = []

    def check(req):
        calls.append(req)
        return req

    intake = _intake(check, warn=lambda req: "unknown words" if req.prompt == "a fox" else None)
    with pytest.raises(RequestRefused, match="--max-prompt-chars"):
        intake.admit({"prompt": "y" * 3000})
    assert not calls  # refused from its raw value, before the model's checks
    admitted = intake.admit({"prompt": "a fox", "seed": 3})
    assert admitted.request.seed == 3 and admitted.warnings == ("unknown words",) and len(calls) == 1
    assert (
        intake.admit_line("  # a comment") is None
        and intake.admit_line("a red circle").request.prompt == "a red circle"
    )
