"""One validation for every way of giving key steps and config values; the file is read once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distfd
from distfd.keysteps import KeySteps, save_preset_file
from distfd.request import ImageRequest

from . import tiny

# Each bad list and what the error says, whichever way the list arrives.
BAD_LISTS = [
    ([], ValueError, "empty"),
    ([1, 2], ValueError, "lacks index 0"),
    ([0, 3, 3], ValueError, "duplicates"),
    ([0, -3, 5], ValueError, "non-negative"),
    ([0, 2.7], TypeError, "ints"),
    ([0, True], TypeError, "ints"),
    ([0, "2"], TypeError, "ints"),
]


def _file(tmp_path, steps, num_steps=10):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"num_steps": num_steps, "key_steps": steps}))
    return str(path)


@pytest.mark.parametrize(("steps", "error", "match"), BAD_LISTS)
@pytest.mark.parametrize("how", ["list", "file", "config-file", "cli-string"])
def test_bad_key_steps_are_refused_the_same_way_everywhere(how, steps, error, match, tmp_path):
    if how == "cli-string":  # each item as written: '0,-3,5', '0,2.7', "0,'2'", '' for the empty list
        value = ",".join(repr(k) for k in steps)
    else:
        value = list(steps) if how == "list" else _file(tmp_path, steps)
    with pytest.raises(error, match=match):
        if how == "config-file":
            distfd.FasterDiffusionConfig(key_steps=value)
        else:
            KeySteps.parse(value)


def test_unsorted_lists_with_zero_are_accepted_from_every_source(tmp_path):
    assert KeySteps.parse([5, 0, 2]).indices == (0, 2, 5)
    assert KeySteps.parse(_file(tmp_path, [5, 0, 2])).indices == (0, 2, 5)
    assert KeySteps.parse("5,0,2").indices == (0, 2, 5)


def test_preset_file_is_read_once_when_the_config_is_built(tmp_path):
    path = _file(tmp_path, [0, 2, 5])
    cfg = distfd.FasterDiffusionConfig(key_steps=path, mode="propagate")
    (tmp_path / "keys.json").unlink()  # later runs must not go back to the file
    pipe = tiny.sd()
    with distfd.apply(pipe, cfg) as handle:
        tiny.run(pipe)
        tiny.run(pipe)
        assert handle.stats()["encoder_passes"] == 2 * 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty string"),
        ("auto", "distfd.calibrate"),
        ("uniform-0", "uniform-K"),
        ("uniform-x", "uniform-K"),
        ("sd-ddim-51", "unknown key-step preset"),
        ("missing.json", "cannot read key-step preset file"),
    ],
)
def test_bad_names(text, match):
    with pytest.raises(ValueError, match=match):
        KeySteps.parse(text)


def test_bad_preset_file_shapes(tmp_path):
    path = tmp_path / "bad.json"
    for content, match in [
        ("[0, 1]", "must hold"),
        ('{"num_steps": "10", "key_steps": [0]}', "num_steps must be an int"),
        ("{not json", "cannot read"),
    ]:
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            KeySteps.parse(str(path))


def test_resolution_against_the_loop():
    assert KeySteps.parse("uniform-5").resolve(20) == (0, 5, 10, 15)
    assert KeySteps.parse("sd-ddim-50").resolve(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    with pytest.raises(ValueError, match="built for 50 steps"):
        KeySteps.parse("sd-ddim-50").resolve(25)
    assert KeySteps.parse("sd-ddim-50").resolve(25, allow_rescale=True) == (0, 1, 2, 5, 8, 12, 18)
    with pytest.raises(ValueError, match="out of range for a sampling loop of 10"):
        KeySteps.parse([0, 10]).resolve(10)
    assert KeySteps.parse([0, 10]).resolve(10, loop_length=11) == (0, 10)  # PNDM's longer loop


def test_save_preset_file_round_trip(tmp_path):
    path = save_preset_file(tmp_path / "k.json", 12, [0, 4, 8], source="test")
    parsed = KeySteps.parse(str(path))
    assert parsed.indices == (0, 4, 8) and parsed.built_for == 12
    assert distfd.resolve_key_steps(str(path), 12) == (0, 4, 8)
    assert distfd.FasterDiffusionConfig(key_steps=str(path)).key_steps == parsed  # built_for kept
    with pytest.raises(ValueError, match=r"key_steps in preset file \S*bad.json \[4, 8\] lacks index 0"):
        save_preset_file(tmp_path / "bad.json", 12, [4, 8])
    assert not (tmp_path / "bad.json").exists()


def test_saving_a_shipped_preset_writes_it_again_byte_for_byte(tmp_path):
    """The files ``distfd calibrate`` writes are the shipped ones' layout (two-space indent, one
    field per line, a final newline), so a recalibration's diff shows what changed."""
    shipped = sorted(Path(distfd.__file__).parent.glob("embedded/weights/*/key_steps/*.json"))
    assert len(shipped) >= 3, shipped
    for n, path in enumerate(shipped):
        data = json.loads(path.read_text())
        again = save_preset_file(tmp_path / f"{n}.json", data.pop("num_steps"), data.pop("key_steps"), **data)
        assert again.read_bytes() == path.read_bytes(), path


def test_resolve_key_steps_passes_on_the_loop_length_and_the_rescale_choice():
    """``resolve_key_steps`` is ``KeySteps.parse(...).resolve(...)``: no rescale unless asked, and the
    loop length (PNDM's loop is one call longer) reaches the range check."""
    with pytest.raises(ValueError, match="built for 50 steps"):
        distfd.resolve_key_steps("sd-ddim-50", 25)
    assert distfd.resolve_key_steps("sd-ddim-50", 25, allow_rescale=True) == (0, 1, 2, 5, 8, 12, 18)
    assert distfd.resolve_key_steps("sd-ddim-50", 25, None, True) == (0, 1, 2, 5, 8, 12, 18)
    assert distfd.resolve_key_steps([0, 10], 10, loop_length=11) == (0, 10)
    with pytest.raises(ValueError, match="out of range for a sampling loop of 10"):
        distfd.resolve_key_steps([0, 10], 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise_below": "0.5"}, TypeError, "noise_below must be a finite number"),
        ({"noise_alpha": "0.003"}, TypeError, "noise_alpha must be a finite number"),
        ({"noise_alpha": float("nan")}, TypeError, "finite"),
        ({"noise_alpha": True}, TypeError, "noise_alpha"),
        ({"rescale_key_steps": "False"}, TypeError, "rescale_key_steps must be True or False"),
        ({"rescale_key_steps": 1}, TypeError, "rescale_key_steps"),
        ({"max_parallel_steps": 2.0}, ValueError, "max_parallel_steps must be None or an int"),
        ({"max_parallel_steps": True}, ValueError, "max_parallel_steps"),
        ({"encoder_blocks": 0}, ValueError, "encoder_blocks must be None or an int"),
        ({"mode": None}, ValueError, "mode must be one of"),
    ],
)
def test_config_types_are_checked_where_it_is_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        distfd.FasterDiffusionConfig(**kwargs)


def test_config_is_immutable_and_holds_the_parsed_value():
    cfg = distfd.FasterDiffusionConfig(key_steps="0,1,3")
    assert cfg.key_steps == KeySteps("list", (0, 1, 3))
    assert distfd.FasterDiffusionConfig(key_steps=cfg.key_steps) == cfg
    with pytest.raises(AttributeError):
        cfg.mode = "propagate"


def test_handle_is_a_context_manager_and_is_applied_tells():
    pipe = tiny.sd()
    before = tiny.run(pipe)
    assert not distfd.is_applied(pipe)
    with distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=[0, 2])) as handle:
        assert distfd.is_applied(pipe)
        assert not torch.equal(tiny.run(pipe), before)
    assert handle.removed and not distfd.is_applied(pipe)
    assert torch.equal(tiny.run(pipe), before)


def test_an_interrupted_run_does_not_leak_into_the_next_call():
    pipe = tiny.sd()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=[0, 2, 5], mode="propagate"))
    reference = tiny.run(pipe)

    def stop(p, i, t, kw):
        if i == 3:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        tiny.run(pipe, callback_on_step_end=stop)
    assert handle.engine.run is not None  # left mid-loop
    pipe.scheduler = tiny.scheduler("ddim")  # swapped mid-run: detected at the next denoiser call
    torch.testing.assert_close(tiny.run(pipe), reference, rtol=0, atol=0)
    assert handle.engine.run is None  # dropped after the last update


@pytest.mark.parametrize(
    "text,is_file",
    [("auto", False), (" auto ", False), ("sd-ddim-50", False), ("uniform-5", False), ("0,1,5", False),
     ("9" * 5000, False), ("", False), ("my.json", True), ("./x", True), ("AUTO", True)],
)  # fmt: skip
def test_names_a_file_only_for_what_no_other_form_reads(text, is_file):
    """Which key-step texts are read from a file (and so refused from someone else): not 'auto', a
    preset name, 'uniform-K', a list, nor an index too long to be one; anything else, 'AUTO' too."""
    from distfd.keysteps import names_a_file

    assert names_a_file(text) is is_file


def test_key_steps_as_a_request_reports_them(tmp_path):
    """A request's JSON (batch manifests, logs) shows the indices a preset or file stands for and
    where they came from; a plain list is shown as the list, ``uniform-K`` as written."""
    path = save_preset_file(tmp_path / "k.json", 12, [0, 4, 8])
    assert KeySteps.parse(str(path)).describe() == f"[0, 4, 8] ({path})"
    assert KeySteps.parse("sd-ddim-50").describe() == "[0, 1, 2, 3, 5, 10, 15, 25, 35] (sd-ddim-50)"
    assert KeySteps.parse("0,2").describe() == KeySteps.parse([0, 2]).describe() == "[0, 2]"
    assert KeySteps.parse("uniform-3").describe() == "uniform-3"
    req = ImageRequest(prompt="a red circle", key_steps=KeySteps.parse(str(path)))
    assert req.to_dict()["key_steps"] == f"[0, 4, 8] ({path})"


def _preset_file(tmp_path, data) -> str:
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (5, TypeError, "key_steps must be a preset name, a preset .json file or a list of ints; got int."),
        ("", ValueError, "key_steps is an empty string; give a preset name such as 'sd-ddim-50'."),
        ([0, -3], ValueError, "key_steps must be non-negative loop indices; got [-3]."),
        ([0, 3, 3], ValueError, "key_steps has duplicates [3]; list each loop index once."),
        ([0, 2.7], TypeError, "key_steps must hold ints (0-based loop indices); got 2.7."),
        ("0,2.7", TypeError, "key_steps must hold ints (0-based loop indices); got '2.7'."),
        ("0,3,3", ValueError, "key_steps has duplicates [3]; list each loop index once."),
        ("0,3,", None, (0, 3)),  # one trailing comma, as written by hand
        ("0,", None, (0,)),
        ("0,+3", None, (0, 3)),
        ("0," + "9" * 18, None, (0, 10**18 - 1)),  # 18 digits are still read (and later out of range)
        (
            "0," + "9" * 19,
            ValueError,
            "key_steps holds an index of 19 digits; loop indices are below the step count.",
        ),
        ("uniform-1", None, "uniform-1"),
        ("uniform-0", ValueError, "bad uniform preset 'uniform-0': use 'uniform-K' with an integer K >= 1."),
        (
            "fast",
            ValueError,
            "unknown key-step preset 'fast'; known: dit-250, if-stage1-100, if-stage2-50, if-stage3-75, "
            "sd-ddim-50, sd-dpm-20, sd-personalized-50, uniform-K (every K-th step), indices such as "
            "'0,1,5', or a .json file.",
        ),
        ({"num_steps": 10}, ValueError, "must hold {'num_steps': N, 'key_steps': [...]}."),
        ([0, 1], ValueError, "must hold {'num_steps': N, 'key_steps': [...]}."),
        (["num_steps", "key_steps"], ValueError, "must hold {'num_steps': N, 'key_steps': [...]}."),
        (
            {"num_steps": 10, "key_steps": 5},
            TypeError,
            "key_steps in preset file {} must be a list of ints; got int.",
        ),
        (
            {"num_steps": 0, "key_steps": [0]},
            ValueError,
            "key-step preset file {}: num_steps must be an int >= 1; got 0.",
        ),
        ({"num_steps": 1, "key_steps": [0]}, None, (0,)),
    ],
)
def test_every_form_is_read_or_refused_with_its_whole_message(tmp_path, value, error, message):
    """The messages in full (what and how to fix it); a JSON object or array is written to a preset
    file first (a list is the list form, an object only reaches the parser as a file)."""
    if isinstance(value, dict) or (isinstance(value, list) and "{'num_steps'" in str(message)):
        value = _preset_file(tmp_path, value)
        message = message.replace("{}", value) if "{}" in message else message
    if error is None:
        parsed = KeySteps.parse(value)
        assert (parsed.source if parsed.every else parsed.indices) == message
        return
    with pytest.raises(error) as refused:
        KeySteps.parse(value)
    assert str(refused.value).endswith(message), str(refused.value)
    if isinstance(value, str) and value.endswith(".json") and "{'num_steps'" in message:
        assert str(refused.value) == f"key-step preset file {value} {message}"


def test_resolve_refusals_in_full():
    with pytest.raises(ValueError) as refused:
        KeySteps.parse("sd-ddim-50").resolve(25)
    assert str(refused.value) == (
        "key-step preset 'sd-ddim-50' is built for 50 steps but the pipeline runs 25; use "
        "num_inference_steps=50, pick another preset, or set rescale_key_steps=True to rescale it."
    )
    with pytest.raises(ValueError) as refused:
        KeySteps.parse([0, 12]).resolve(10)
    assert (
        str(refused.value) == "key_steps [12] are out of range for a sampling loop of 10 steps (valid: 0..9)."
    )
