"""Bounds on one request from someone else: each limit accepts its boundary and refuses one past it,
steps counted from the request or from the defaults, key steps counted in any form, the pixel limit
derived from the model's default size, and every message naming the limit and the option to raise it."""

from __future__ import annotations

import pytest

from distfd.limits import RequestLimits, parse_request
from distfd.request import ImageRequest, ModelFacts

DEFAULTS = ImageRequest("x", steps=10, height=32, width=32)
LIMITS = RequestLimits(max_pixels=64 * 64, max_steps=20, max_prompt_chars=50)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_pixels": 0}, "--max-pixels must be an integer >= 1; got 0."),
        ({"max_pixels": 2.5}, "--max-pixels must be an integer >= 1; got 2.5."),
        ({"max_steps": 0}, "--max-steps must be an integer >= 1; got 0."),
        ({"max_steps": True}, "--max-steps must be an integer >= 1; got True."),  # a bool is no count
        ({"max_prompt_chars": -3}, "--max-prompt-chars must be an integer >= 1; got -3."),
        ({"max_prompt_chars": "2000"}, "--max-prompt-chars must be an integer >= 1; got '2000'."),
    ],
)
def test_a_bad_limit_names_its_option(kwargs, message):
    with pytest.raises(ValueError) as refused:
        RequestLimits(**kwargs)
    assert str(refused.value) == message


def test_one_is_the_smallest_limit_and_the_pixel_limit_may_wait_for_the_model():
    ones = RequestLimits(max_pixels=1, max_steps=1, max_prompt_chars=1)
    ones.check_fields({"prompt": "a", "steps": 1}, DEFAULTS)
    with pytest.raises(ValueError, match="steps 2 exceeds the limit of 1"):
        ones.check_fields({"prompt": "a", "steps": 2}, DEFAULTS)
    unset = RequestLimits()  # max_pixels None: no pixel limit until for_model
    unset.check_request(ImageRequest("a", height=4096, width=4096, steps=150))
    with pytest.raises(ValueError, match="steps 151 exceeds the limit of 150 "):
        unset.check_request(ImageRequest("a", steps=151))


@pytest.mark.parametrize(
    ("facts", "max_pixels"),
    [
        (ModelFacts("P", vae_scale_factor=8, sample_size=(64, 96)), 4 * 512 * 768),
        (ModelFacts("P"), 4 * 1024 * 1024),  # no default size: 4x a 1024x1024 image
    ],
)
def test_the_pixel_limit_defaults_to_four_times_the_models_default_area(facts, max_pixels):
    limits = RequestLimits(max_steps=30).for_model(facts)
    assert limits.as_dict() == {
        "max_pixels": max_pixels,
        "max_steps": 30,
        "max_prompt_chars": 2000,
        "key_step_files": False,
    }
    side = 2 * 512 if facts.sample_size else 2 * 1024
    limits.check_request(ImageRequest("a", steps=10, height=max_pixels // side, width=side))
    with pytest.raises(ValueError, match="--max-pixels, by default 4x the model's default image area"):
        limits.check_request(ImageRequest("a", steps=10, height=max_pixels // side + 1, width=side))


def test_a_pixel_limit_given_is_kept_whatever_the_model():
    facts = ModelFacts("P", sample_size=(128, 128))
    assert RequestLimits(max_pixels=100).for_model(facts).max_pixels == 100


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_length_at_the_limit_is_accepted_and_one_more_refused(field):
    data = {"prompt": "p", field: "y" * 50}
    LIMITS.check_fields(data, DEFAULTS)
    with pytest.raises(ValueError) as refused:
        LIMITS.check_fields({**data, field: "y" * 51}, DEFAULTS)
    assert str(refused.value) == (
        f"{field} has 51 characters; the limit is 50 (--max-prompt-chars). "
        "Shorten it; the text encoder reads only its first tokens anyway."
    )


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_request_as_it_will_run_has_its_prompts_bounded_too(field):
    fields = {"prompt": "p", "guidance_scale": 5.0, field: "y" * 51}
    with pytest.raises(ValueError, match=f"^{field} has 51 characters"):
        LIMITS.check_request(ImageRequest(**fields))


def test_steps_from_the_request_or_from_the_defaults():
    LIMITS.check_fields({"prompt": "a", "steps": 20}, DEFAULTS)
    with pytest.raises(ValueError) as refused:
        LIMITS.check_fields({"prompt": "a", "steps": 21}, DEFAULTS)
    assert str(refused.value) == "steps 21 exceeds the limit of 20 (--max-steps); use fewer steps."
    many = ImageRequest("x", steps=40)
    with pytest.raises(ValueError, match="^steps 40 exceeds the limit of 20 "):
        LIMITS.check_fields({"prompt": "a"}, many)  # the defaults' steps, when the request has none
    LIMITS.check_fields({"prompt": "a", "steps": 5}, many)


def test_steps_as_they_will_run():
    LIMITS.check_request(ImageRequest("a", steps=20))
    with pytest.raises(ValueError, match="^steps 21 exceeds the limit of 20 "):
        LIMITS.check_request(ImageRequest("a", steps=21))


@pytest.mark.parametrize(
    ("steps", "accepted", "refused"),
    [
        (3, "0,1,2", "0,1,2,3"),
        (3, [0, 1, 2], [0, 1, 2, 3]),
        (3, (0, 1, 2), (0, 1, 2, 3)),
        (1, "0", "0,1"),
        (1, [0], [0, 1]),
    ],
)
def test_key_steps_at_most_one_per_step(steps, accepted, refused):
    LIMITS.check_fields({"prompt": "a", "steps": steps, "key_steps": accepted}, DEFAULTS)
    with pytest.raises(ValueError) as refusal:
        LIMITS.check_fields({"prompt": "a", "steps": steps, "key_steps": refused}, DEFAULTS)
    assert str(refusal.value) == (
        f"key_steps lists {steps + 1} entries for {steps} steps; give at most one per step "
        "(0-based loop indices, each once)."
    )


def test_key_steps_as_they_will_run_at_most_one_per_step():
    LIMITS.check_request(ImageRequest("a", steps=3, key_steps=(0, 1, 2)))
    with pytest.raises(ValueError) as refused:
        LIMITS.check_request(ImageRequest("a", steps=3, key_steps=(0, 1, 2, 3)))
    assert str(refused.value) == "key_steps lists 4 entries for 3 steps."


@pytest.mark.parametrize("keys", ["keys.json", "/etc/passwd", " ../presets/x "])
def test_key_steps_naming_a_file_are_refused_unless_the_operator_allows_them(keys):
    with pytest.raises(ValueError) as refused:
        LIMITS.check_fields({"prompt": "a", "key_steps": keys}, DEFAULTS)
    assert str(refused.value) == (
        "key_steps must be a list of loop indices, a preset name (see distfd.PRESETS) or 'uniform-K' "
        "here; a request cannot name a file on the server (a batch job's lines may, with "
        "--allow-key-step-files)."
    )
    RequestLimits(key_step_files=True).check_fields({"prompt": "a", "key_steps": keys}, DEFAULTS)


@pytest.mark.parametrize("keys", ["sd-ddim-50", "uniform-5", "0, 3", "auto"])
def test_key_steps_that_name_no_file_pass(keys):
    LIMITS.check_fields({"prompt": "a", "key_steps": keys}, DEFAULTS)


def test_a_side_left_to_the_model_or_no_pixel_limit_bounds_no_pixels():
    LIMITS.check_request(
        ImageRequest("a", steps=10, width=4096)
    )  # the height is the model's, known after check
    LIMITS.check_request(ImageRequest("a", steps=10, height=4096))
    RequestLimits().check_request(ImageRequest("a", steps=10, height=4096, width=4096))


def test_pixels_at_the_limit_are_accepted_and_one_row_more_refused():
    LIMITS.check_request(ImageRequest("a", steps=10, height=64, width=64))
    with pytest.raises(ValueError) as refused:
        LIMITS.check_request(ImageRequest("a", steps=10, height=65, width=64))
    assert str(refused.value) == (
        "width x height 64x65 is 4160 pixels; the limit is 4096 (--max-pixels, by default 4x the "
        "model's default image area). Ask for a smaller image."
    )


def test_parse_request_checks_the_raw_values_then_takes_the_defaults():
    req = parse_request({"prompt": "a fox", "seed": 3}, DEFAULTS, LIMITS)
    assert (req.steps, req.height, req.width) == (10, 32, 32)  # what the request left out
    with pytest.raises(ValueError, match="--max-steps"):
        parse_request({"prompt": "a", "steps": 21}, DEFAULTS, LIMITS)  # no other check refuses 21
    with pytest.raises(ValueError, match="--max-prompt-chars"):
        parse_request({"prompt": "y" * 51}, DEFAULTS, LIMITS)
    with pytest.raises(TypeError, match="a request must be a JSON object; got list"):
        parse_request(["a"], DEFAULTS, LIMITS)
