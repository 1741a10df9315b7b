"""The one entry for a request from someone else: each refusal names its field, strict JSON, bounded
messages, the checks in order (the limits on raw values before any parsing), warnings returned."""

from __future__ import annotations

import pytest

import distfd
from distfd.intake import Intake, RequestRefused, decode
from distfd.limits import RequestLimits
from distfd.request import ImageRequest, ModelFacts

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
        ({"prompt": "a", "colour; seed": 1}, None, "unknown field"),  # a field named after the first ';'
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


@pytest.mark.parametrize(
    ("data", "kind"),
    [([1], "array"), ("a fox", "string"), (3, "number"), (1.5, "number"), (True, "boolean"), (None, "null")],
)
def test_a_body_not_an_object_is_refused_by_its_json_type(data, kind):
    with pytest.raises(RequestRefused) as refused:
        _intake().admit(data)
    assert refused.value.message == f"a request must be a JSON object; got {kind}."


def test_a_caller_passing_the_raw_body_to_admit_is_told_its_python_type():
    with pytest.raises(RequestRefused, match=r"JSON object; got bytes\.$"):
        _intake().admit(b'{"prompt": "a"}')  # admit_json decodes; admit takes the decoded object


def test_a_request_nested_too_deeply_is_refused_not_crashed():
    deep: list = []
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(RequestRefused) as refused:
        _intake().admit({"prompt": "a", "mode": deep})
    assert refused.value.message == "the request nests too deeply; send a flat JSON object."


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100000, "the JSON nests too deeply; send a flat JSON object."),
        (b'{"prompt": }', "not valid JSON (Expecting value at column 12); send a JSON object."),
        (
            b'{"prompt": "a",}',
            "not valid JSON (Expecting property name enclosed in double quotes at column 16); "
            "send a JSON object.",
        ),
    ],
)
def test_bad_json_is_refused_with_where_it_fails(body, message):
    with pytest.raises(RequestRefused) as refused:
        _intake().admit_json(body)
    assert refused.value.message == message and refused.value.field is None


def test_a_field_given_twice_is_refused_by_name():
    with pytest.raises(RequestRefused) as refused:
        _intake().admit_json('{"prompt": "a", "steps": 12, "steps": 3}')
    assert refused.value.field == "steps"


def test_a_json_body_or_line_runs_with_its_fields_and_the_defaults():
    for admitted in (
        _intake().admit_json(b'{"prompt": "a fox", "seed": 3, "steps": 12}'),
        _intake().admit_line('  {"prompt": "a fox", "seed": 3, "steps": 12}\n'),
    ):
        assert admitted.request == ImageRequest("a fox", seed=3, steps=12, height=32, width=32)
        assert admitted.warnings == ()  # no warn: nothing to say


def test_a_request_without_a_warning_earns_none():
    admitted = _intake(warn=lambda req: None).admit({"prompt": "a"})
    assert admitted.warnings == ()


@pytest.mark.parametrize("line", ["", "   \n", "# a comment", "  #{not json}"])
def test_blank_and_comment_lines_are_no_requests(line):
    assert _intake().admit_line(line) is None


def test_the_pixel_limit_comes_from_the_models_facts():
    facts = ModelFacts("P", vae_scale_factor=8, sample_size=(4, 4))  # 32x32: at most 4 x 1024 pixels
    intake = Intake(DEFAULTS, RequestLimits(), lambda r: r, facts=facts)
    intake.admit({"prompt": "a", "height": 64, "width": 64})
    with pytest.raises(RequestRefused, match="the limit is 4096 ") as refused:
        intake.admit({"prompt": "a", "height": 72, "width": 64})
    assert refused.value.field == "height"
    unknown = Intake(DEFAULTS, RequestLimits(), lambda r: r)  # no facts: no pixel limit yet
    assert unknown.admit({"prompt": "a", "height": 4096, "width": 4096}).request.height == 4096


@pytest.mark.parametrize(
    ("message", "kept"),
    [("m" * 400, "m" * 400), ("m" * 401, "m" * 395 + " ...")],
)
def test_a_refusal_keeps_400_characters(message, kept):
    assert RequestRefused(message).message == kept


@pytest.mark.parametrize(
    ("message", "field"),
    [
        # a model's checks name the field as a word, not inside a longer one
        ("this model cannot run mode 'propagate' (the model has no UNet); use 'parallel'", "mode"),
        ("this model cannot run on 3 ranks; use 1, 2 or 4", None),
        ("the scheduler's steps_offset is 1; the loop starts late", None),
        # a key-step message that names no field as a word
        ("unknown key-step preset 'x'; known: sd-ddim-50", "key_steps"),
        # ... and one that names the step count it asks to change
        ("key-step preset 'sd-ddim-50' is built for 50 steps but the pipeline runs 10; use 50", "steps"),
    ],
)
def test_the_field_a_models_refusal_names(message, field):
    def check(req):
        raise ValueError(message)

    with pytest.raises(RequestRefused) as refused:
        _intake(check).admit({"prompt": "a"})
    assert refused.value.field == field


def test_key_steps_past_the_loop_are_refused_naming_key_steps():
    """The model's range check (the loop length is known only there) names ``key_steps``, not the
    step count its message also mentions."""

    def check(req):
        distfd.resolve_key_steps(list(req.key_steps), req.steps)
        return req

    with pytest.raises(RequestRefused, match=r"\[12\] are out of range for a sampling loop of 10") as refused:
        _intake(check).admit({"prompt": "a", "key_steps": [0, 12]})
    assert refused.value.field == "key_steps"
