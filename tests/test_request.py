"""One image request and a model's facts, in-process: each refusal's message in full (the field, the
value, the fix), each boundary accepted and the value past it refused, key steps in every form, a
request read from JSON with and without defaults, the digest changing with every field, a model's
facts read from its folder agreeing with those of the loaded pipeline (SD, DiT, FLUX), and the
model's checks on a request (call parameters, steps, default size, size multiples, key steps)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
from diffusers import AutoencoderKL, DDIMScheduler

from distfd import samplers
from distfd.keysteps import KeySteps
from distfd.request import ImageRequest, ModelFacts, check_for_model

from . import tiny, tiny_mmdit, tiny_models

SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"prompt": 3}, TypeError, "prompt must be a string; got int."),
        ({"prompt": None}, TypeError, "prompt must be a string; got null."),
        ({"prompt": ""}, ValueError, "prompt is empty; give the text of the image to generate."),
        ({"prompt": " \n\t"}, ValueError, "prompt is empty; give the text of the image to generate."),
        ({"negative_prompt": ["b"]}, TypeError, "negative_prompt must be a string or null; got list."),
        (
            {"prompt": "ab" + SURROGATE},
            ValueError,
            "prompt holds a character that is not valid Unicode (a lone surrogate at position 2); "
            "send UTF-8 text.",
        ),
        (
            {"negative_prompt": SURROGATE + "b"},
            ValueError,
            "negative_prompt holds a character that is not valid Unicode (a lone surrogate at position 0); "
            "send UTF-8 text.",
        ),
        ({"seed": 1.0}, TypeError, "seed must be an integer; got 1.0 (float)."),
        ({"seed": True}, TypeError, "seed must be an integer; got True (bool)."),
        ({"seed": None}, TypeError, "seed must be an integer; got None (null)."),
        ({"seed": -1}, ValueError, "seed must be in 0 .. 2**64-1; got -1."),
        ({"seed": 2**64}, ValueError, "seed must be in 0 .. 2**64-1; got 18446744073709551616."),
        ({"steps": "10"}, TypeError, "steps must be an integer; got '10' (str)."),
        ({"steps": 0}, ValueError, "steps must be >= 1; got 0."),
        ({"height": 7}, ValueError, "height must be at least 8 pixels; got 7."),
        ({"width": 7}, ValueError, "width must be at least 8 pixels; got 7."),
        ({"height": 32.0}, TypeError, "height must be an integer number of pixels; got 32.0 (float)."),
        ({"width": "32"}, TypeError, "width must be an integer number of pixels; got '32' (str)."),
        ({"mode": "fast"}, ValueError, "mode must be one of propagate, parallel, off; got 'fast'."),
        ({"mode": ["off"]}, ValueError, "mode must be one of propagate, parallel, off; got ['off']."),
        (
            {"mode": "off", "key_steps": [0, 3]},
            ValueError,
            "key_steps were given with mode 'off' (the vanilla pipeline), which ignores them; "
            "drop key_steps or use mode 'parallel' or 'propagate'.",
        ),
        (
            {"key_steps": 5},
            TypeError,
            "key_steps must be a preset name, a .json path or a list of integers; got int.",
        ),
        (
            {"key_steps": {"0": 1}},
            TypeError,
            "key_steps must be a preset name, a .json path or a list of integers; got dict.",
        ),
    ],
)
def test_each_refusal_names_the_field_the_value_and_the_fix(fields, error, message):
    with pytest.raises(error) as refused:
        ImageRequest(**{"prompt": "a fox", **fields})
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("guidance", "error", "message"),
    [
        ("7", TypeError, "guidance_scale must be a number; got '7' (str)."),
        (True, TypeError, "guidance_scale must be a number; got True (bool)."),
        (None, TypeError, "guidance_scale must be a number; got None (null)."),
        (10**400, ValueError, "guidance_scale must be finite; got a 401-digit number."),
        (math.inf, ValueError, "guidance_scale must be finite; got inf."),
        (-math.inf, ValueError, "guidance_scale must be finite; got -inf."),
        (math.nan, ValueError, "guidance_scale must be finite; got nan."),
        (
            -1,
            ValueError,
            "guidance_scale -1.0 is negative; the pipeline would silently run without guidance "
            "(as with 1). Use a value > 1 for classifier-free guidance, or 1 for none.",
        ),
        (
            -1e-9,
            ValueError,
            "guidance_scale -1e-09 is negative; the pipeline would silently run without guidance "
            "(as with 1). Use a value > 1 for classifier-free guidance, or 1 for none.",
        ),
        (
            1e-9,
            ValueError,
            "guidance_scale 1e-09 is between 0 and 1; the pipeline turns classifier-free guidance off "
            "at <= 1 and would give exactly the image of guidance_scale 1. Use 1 (or 0) for no "
            "guidance, or a value > 1.",
        ),
        (
            0.999,
            ValueError,
            "guidance_scale 0.999 is between 0 and 1; the pipeline turns classifier-free guidance off "
            "at <= 1 and would give exactly the image of guidance_scale 1. Use 1 (or 0) for no "
            "guidance, or a value > 1.",
        ),
    ],
)
def test_a_guidance_scale_the_pipeline_would_misread_is_refused(guidance, error, message):
    with pytest.raises(error) as refused:
        ImageRequest("a fox", guidance_scale=guidance)
    assert str(refused.value) == message


@pytest.mark.parametrize(("guidance", "uses"), [(0, False), (1, False), (1.0000001, True), (10**6, True)])
def test_zero_one_and_above_one_are_accepted_and_only_above_one_guides(guidance, uses):
    req = ImageRequest("a fox", guidance_scale=guidance)
    assert req.uses_guidance is uses
    assert type(req.guidance_scale) is float and req.guidance_scale == guidance
    assert json.dumps(req.to_dict()["guidance_scale"]) == json.dumps(float(guidance))  # 1.0, not 1


@pytest.mark.parametrize(("guidance", "shown"), [(1, "1"), (0, "0"), (0.0, "0")])
def test_a_negative_prompt_without_guidance_is_refused(guidance, shown):
    with pytest.raises(ValueError) as refused:
        ImageRequest("a fox", negative_prompt="blurry", guidance_scale=guidance)
    assert str(refused.value) == (
        f"negative_prompt needs classifier-free guidance, which guidance_scale {shown} turns off "
        "(the pipeline would ignore it); use guidance_scale > 1 or drop negative_prompt."
    )


def test_a_negative_prompt_with_guidance_and_an_empty_one_without_are_accepted():
    assert ImageRequest("a fox", negative_prompt="blurry", guidance_scale=1.5).negative_prompt == "blurry"
    assert ImageRequest("a fox", negative_prompt="", guidance_scale=1).uses_guidance is False


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"steps": 1},
        {"height": 8, "width": 8},
        {"height": None, "width": 8},
        {"negative_prompt": None, "guidance_scale": 0},
        {"prompt": " a fox "},
        {"prompt": "ünïcödé ✓ 🦊"},
        {"mode": "propagate", "key_steps": [0]},
        {"mode": "parallel", "key_steps": "uniform-2"},
        {"mode": "off"},
    ],
)
def test_the_boundary_values_are_accepted(fields):
    req = ImageRequest(**{"prompt": "a fox", **fields})
    assert {k: getattr(req, k) for k in fields if k != "key_steps"} == {
        k: v for k, v in fields.items() if k != "key_steps"
    }


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (None, None),
        ("0,5,1", (0, 1, 5)),  # indices written as text end as a sorted tuple, like a JSON list
        (" 0, 3 ", (0, 3)),
        ([5, 0, 2], (0, 2, 5)),
        ((3, 0), (0, 3)),
        ("sd-ddim-50", "sd-ddim-50"),  # a preset is kept by name (the manifest shows the name)
        (" sd-dpm-20 ", "sd-dpm-20"),
        ("uniform-4", "uniform-4"),
        (" uniform-4 ", "uniform-4"),
    ],
)
def test_key_steps_in_every_form(given, kept):
    req = ImageRequest("a fox", key_steps=given)
    assert req.key_steps == kept and type(req.key_steps) is type(kept)


@pytest.mark.parametrize(
    ("given", "error", "words"),
    [
        ("0,-3", ValueError, "non-negative"),
        ([1, 2], ValueError, "lacks index 0"),
        ((0, 2.5), TypeError, "must hold ints"),
        ("sd-ddim-51", ValueError, "unknown key-step preset 'sd-ddim-51'"),
        ("uniform-0", ValueError, "bad uniform preset"),
    ],
)
def test_bad_key_steps_are_refused_when_the_request_is_made(given, error, words):
    with pytest.raises(error, match=words):
        ImageRequest("a fox", key_steps=given)


@pytest.fixture
def preset_file(tmp_path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"num_steps": 10, "key_steps": [3, 0, 6]}))
    return path


def test_a_preset_file_is_read_once_and_shown_with_its_indices(preset_file):
    req = ImageRequest("a fox", steps=10, key_steps=str(preset_file))
    assert isinstance(req.key_steps, KeySteps) and req.key_steps.indices == (0, 3, 6)
    assert ImageRequest("a fox", key_steps=req.key_steps).key_steps is req.key_steps  # not parsed again
    assert req.to_dict()["key_steps"] == f"[0, 3, 6] ({preset_file})"
    preset_file.unlink()  # the run after the check does not read it again
    facts = ModelFacts("P", sample_size=(4, 4))
    assert check_for_model(req, facts, 10).height == 32
    with pytest.raises(ValueError, match="built for 10 steps but the pipeline runs 20"):
        check_for_model(dataclasses.replace(req, steps=20), facts, 20)


DEFAULTS = ImageRequest("x", seed=7, steps=10, guidance_scale=3.0, height=32, width=48, key_steps=[0, 4])


def test_a_mapping_takes_its_fields_and_the_defaults_the_rest():
    req = ImageRequest.from_mapping({"prompt": "a fox", "seed": 3}, DEFAULTS)
    assert req == ImageRequest(
        "a fox", seed=3, steps=10, guidance_scale=3.0, height=32, width=48, key_steps=[0, 4]
    )
    assert ImageRequest.from_mapping({"prompt": "a fox", "key_steps": [5, 0]}, DEFAULTS).key_steps == (0, 5)
    assert ImageRequest.from_mapping({"prompt": "a fox"}) == ImageRequest("a fox")  # no defaults: the class's


def test_mode_off_drops_the_defaults_key_steps_but_not_its_own():
    req = ImageRequest.from_mapping({"prompt": "a fox", "mode": "off"}, DEFAULTS)
    assert (req.mode, req.key_steps, req.seed) == ("off", None, 7)
    with pytest.raises(ValueError, match="key_steps were given with mode 'off'"):
        ImageRequest.from_mapping({"prompt": "a fox", "mode": "off", "key_steps": [0]}, DEFAULTS)
    kept = ImageRequest.from_mapping({"prompt": "a fox", "mode": "propagate"}, DEFAULTS)
    assert kept.key_steps == (0, 4)


@pytest.mark.parametrize(
    ("data", "defaults", "error", "message"),
    [
        ([("prompt", "a")], None, TypeError, "a request must be a JSON object; got list."),
        (None, DEFAULTS, TypeError, "a request must be a JSON object; got null."),
        ({"seed": 1}, DEFAULTS, ValueError, "prompt is missing; every request needs one."),
        ({}, None, ValueError, "prompt is missing; every request needs one."),
        (
            {"prompt": "a", "Seed": 1, "colour": 2},
            DEFAULTS,
            ValueError,
            "unknown field(s) 'Seed', 'colour'; known fields: prompt, negative_prompt, seed, steps, "
            "guidance_scale, height, width, key_steps, mode.",
        ),
        (
            {"prompt": "a", 3: 1},
            None,
            ValueError,
            "unknown field(s) '3'; known fields: prompt, negative_prompt, seed, steps, "
            "guidance_scale, height, width, key_steps, mode.",
        ),
    ],
)
def test_a_mapping_that_is_no_request_is_refused(data, defaults, error, message):
    with pytest.raises(error) as refused:
        ImageRequest.from_mapping(data, defaults)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "req",
    [
        ImageRequest("a fox"),
        ImageRequest(
            "a fox", negative_prompt="blur", seed=2**64 - 1, steps=3, height=8, width=16, key_steps="0,2"
        ),
        ImageRequest("a fox", key_steps="sd-ddim-50", mode="propagate", guidance_scale=0),
    ],
)
def test_a_request_written_as_json_reads_back_the_same(req):
    line = json.dumps(req.to_dict())
    again = ImageRequest.from_mapping(json.loads(line))
    assert again == req and again.digest() == req.digest()


def test_key_steps_are_a_json_list():
    assert ImageRequest("a fox", key_steps=(3, 0)).to_dict()["key_steps"] == [0, 3]
    assert type(ImageRequest("a fox", key_steps=(3, 0)).to_dict()["key_steps"]) is list


BASE = ImageRequest("a fox", seed=1, steps=10, guidance_scale=5.0, height=32, width=32, key_steps=[0, 3])


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a fox "},
        {"negative_prompt": "blur"},
        {"seed": 2},
        {"steps": 11},
        {"guidance_scale": 5.5},
        {"height": 40},
        {"width": 40},
        {"key_steps": [0, 4]},
        {"key_steps": None},
        {"key_steps": "uniform-3"},
        {"mode": "propagate"},
    ],
)
def test_the_digest_changes_with_every_field(change):
    assert dataclasses.replace(BASE, **change).digest() != BASE.digest()


def test_the_digest_is_the_same_for_the_same_image_and_changes_with_the_context():
    same = ImageRequest("a fox", seed=1, steps=10, guidance_scale=5, height=32, width=32, key_steps="3,0")
    assert same.digest() == BASE.digest() and len(BASE.digest()) == 64 and int(BASE.digest(), 16) >= 0
    assert BASE.digest("model-a") != BASE.digest("model-b") != BASE.digest()
    assert BASE.digest({"model": "m", "scheduler": "ddim"}) == BASE.digest(
        {"scheduler": "ddim", "model": "m"}
    )
    assert BASE.digest(Path("models/sd")) == BASE.digest("models/sd")  # any context, as text


# ---- a model's facts ----


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SD (its scheduler trained on 500 steps), DiT (a VAE of five levels: factor 16) and FLUX,
    each loaded and saved to a folder once."""
    root = tmp_path_factory.mktemp("models")
    sd = tiny.sd()
    sd = type(sd)(
        **{
            **sd.components,
            "scheduler": DDIMScheduler.from_config(sd.scheduler.config, num_train_timesteps=500),
        }
    )
    dit = tiny_models.dit()
    levels = 5
    vae = AutoencoderKL(
        block_out_channels=(8,) + (16,) * (levels - 1),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    dit = type(dit)(**{**dit.components, "vae": vae})
    built = {}
    for name, pipe in (("sd", sd), ("dit", dit), ("flux", tiny_mmdit.flux())):
        pipe.save_pretrained(root / name)
        built[name] = (pipe, root / name)
    return built


@pytest.mark.parametrize(
    ("name", "pipeline_class", "vae", "sample", "horizon", "patch", "multiple", "size"),
    [
        ("sd", "StableDiffusionPipeline", 2, (16, 16), 500, 1, 8, (32, 32)),
        ("dit", "DiTPipeline", 16, (8, 8), 1000, 2, 32, (128, 128)),  # DiTPipeline has no vae_scale_factor
        ("flux", "FluxPipeline", 2, (128, 128), 1000, 2, 8, (256, 256)),  # 128 cells: FluxPipeline's default
    ],
)
def test_the_facts_from_the_folder_agree_with_the_loaded_pipeline(
    models, name, pipeline_class, vae, sample, horizon, patch, multiple, size
):
    pipe, folder = models[name]
    for facts in (ModelFacts.from_folder(folder), ModelFacts.from_pipeline(pipe)):
        assert facts == ModelFacts(pipeline_class, vae, sample, horizon, patch_size=patch)
        assert (facts.size_multiple, facts.default_size()) == (multiple, size)
        assert facts.call_params is not None and "guidance_scale" in facts.call_params
        assert ("prompt" in facts.call_params) is (name != "dit")
        assert ("negative_prompt" in facts.call_params) is (name != "dit")
        assert ("class_labels" in facts.call_params) is (name == "dit")
        assert samplers.resolve(None, facts.scheduler_config) == ("flow-euler" if name == "flux" else "ddim")
    assert ModelFacts.from_folder(folder).call_params == ModelFacts.from_pipeline(pipe).call_params


def test_a_pipeline_without_a_text_prompt_is_named(models):
    facts = ModelFacts.from_pipeline(models["dit"][0])
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a fox"), facts)
    assert str(refused.value) == "DiTPipeline does not take a text prompt; use a text-to-image pipeline."


def _folder(root: Path, index: dict, **configs: dict) -> Path:
    """A pipeline folder of JSON configs alone (the facts need no weights)."""
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for name, config in configs.items():
        (root / name).mkdir()
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (root / name / file).write_text(json.dumps(config))
    return root


LISTED = {"vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"]}
SD_INDEX = {"_class_name": "StableDiffusionPipeline", **LISTED, "scheduler": ["diffusers", "DDIMScheduler"]}
VAE = {"block_out_channels": [128, 256, 512, 512]}


@pytest.mark.parametrize(
    ("index", "configs", "expected", "size"),
    [
        (
            SD_INDEX,
            {"vae": VAE, "unet": {"sample_size": 64}, "scheduler": {"num_train_timesteps": 500}},
            ModelFacts("StableDiffusionPipeline", 8, (64, 64), 500),
            (512, 512),
        ),
        # a UNet without a sample size: no default size (only FLUX's pipeline has one of its own)
        (SD_INDEX, {"vae": VAE, "unet": {"in_channels": 4}}, ModelFacts("StableDiffusionPipeline"), None),
        # a (height, width) sample size; a scheduler config without a horizon: 1000
        (
            SD_INDEX,
            {"vae": VAE, "unet": {"sample_size": [64, 96]}, "scheduler": {}},
            ModelFacts("StableDiffusionPipeline", 8, (64, 96), 1000),
            (512, 768),
        ),
        # sample sizes that are none: three sides, a non-integer side, a bool
        (
            SD_INDEX,
            {"vae": VAE, "unet": {"sample_size": [64, 96, 2]}},
            ModelFacts("StableDiffusionPipeline"),
            None,
        ),
        (
            SD_INDEX,
            {"vae": VAE, "unet": {"sample_size": [64, 9.5]}},
            ModelFacts("StableDiffusionPipeline"),
            None,
        ),
        (SD_INDEX, {"vae": VAE, "unet": {"sample_size": True}}, ModelFacts("StableDiffusionPipeline"), None),
        # a VAE of three levels; a component config on disk but not in the index is not read
        (
            SD_INDEX,
            {"vae": {"block_out_channels": [1, 2, 3]}, "unet": {"sample_size": 8}},
            ModelFacts("StableDiffusionPipeline", 4, (8, 8)),
            (32, 32),
        ),
        (
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
            {"vae": {"block_out_channels": [1, 2]}, "unet": {"sample_size": 8}},
            ModelFacts("StableDiffusionPipeline", 8, (8, 8)),
            (64, 64),
        ),
        # listed in the index but missing on disk: the defaults
        (SD_INDEX, {"unet": {"sample_size": 8}}, ModelFacts("StableDiffusionPipeline", 8, (8, 8)), (64, 64)),
        # a transformer: its patch multiplies the size step; FLUX packs 2x2 cells on top of its patch
        (
            {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": []},
            {"vae": VAE, "transformer": {"sample_size": 32, "patch_size": 4}},
            ModelFacts("DiTPipeline", 8, (32, 32), patch_size=4),
            (256, 256),
        ),
        (
            {"_class_name": "FluxPipeline", "transformer": [], "vae": []},
            {"vae": VAE, "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1}},
            ModelFacts("FluxPipeline", 8, (128, 128), patch_size=2),
            (1024, 1024),
        ),
        (
            {"_class_name": "FluxPipeline", "transformer": [], "vae": []},
            {"vae": VAE, "transformer": {"_class_name": "FluxTransformer2DModel", "sample_size": 16}},
            ModelFacts("FluxPipeline", 8, (16, 16), patch_size=2),
            (128, 128),
        ),
        # no denoiser listed, no class name
        ({}, {}, ModelFacts("?"), None),
    ],
)
def test_the_facts_a_folder_gives(tmp_path, index, configs, expected, size):
    facts = ModelFacts.from_folder(_folder(tmp_path / "m", index, **configs))
    assert facts == expected and facts.default_size() == size


def test_a_folder_names_its_pipelines_call_parameters(tmp_path):
    sd = ModelFacts.from_folder(_folder(tmp_path / "sd", SD_INDEX))
    assert {"prompt", "negative_prompt", "guidance_scale", "height"} <= sd.call_params
    for name, index in (("custom", {"_class_name": "MyOwnPipeline"}), ("unnamed", {})):
        facts = ModelFacts.from_folder(_folder(tmp_path / name, index))
        assert facts.call_params is None  # unknown: no call-parameter checks
        assert check_for_model(ImageRequest("a", negative_prompt="b", height=8, width=8), facts).height == 8


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, r"^cannot read .*model_index\.json: \[Errno 2\]"),
        ("{", r"^cannot read .*model_index\.json: Expecting property name"),
        ("[1]", r"model_index\.json is not a JSON object\.$"),
    ],
)
def test_a_folder_that_is_no_pipeline_is_refused_naming_the_file(tmp_path, text, words):
    if text is not None:
        (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(ValueError, match=words):
        ModelFacts.from_folder(tmp_path)


def test_a_broken_component_config_is_named(tmp_path):
    folder = _folder(tmp_path / "m", SD_INDEX, unet={"sample_size": 8})
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text("not json")
    with pytest.raises(ValueError, match=r"^cannot read .*vae/config\.json: "):
        ModelFacts.from_folder(folder)


class BarePipeline:
    """A pipeline with no denoiser, scheduler, VAE or size: the facts' defaults."""

    def __call__(self, prompt, guidance_scale=7.5, height=None, width=None):
        pass


class NoFactorPipeline(BarePipeline):
    vae_scale_factor = None
    vae = None


class OwnFactorPipeline(BarePipeline):
    """A pipeline that states its own VAE factor (as Sana's does for its DC-AE): that factor wins."""

    vae_scale_factor = 32
    vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[1, 2]))


class UncallablePipeline:
    __call__ = None


@pytest.mark.parametrize("pipe", [BarePipeline(), NoFactorPipeline()])
def test_a_pipeline_that_tells_little_gets_the_defaults(pipe):
    facts = ModelFacts.from_pipeline(pipe)
    assert facts == ModelFacts(type(pipe).__name__, 8, None, 1000, patch_size=1)
    assert facts.scheduler_config is None and facts.call_params == {
        "self",
        "prompt",
        "guidance_scale",
        "height",
        "width",
    }
    req = ImageRequest("a", steps=1000, height=8, width=8)
    assert check_for_model(req, facts) is req
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a", steps=1001, height=8, width=8), facts)
    assert str(refused.value) == (
        "steps 1001 exceeds the scheduler's 1000 training timesteps; use at most 1000."
    )
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a", height=8), facts)
    assert (
        str(refused.value) == f"{type(pipe).__name__} has no default image size; give both height and width."
    )


def test_a_pipelines_own_vae_factor_wins_over_its_vaes_config():
    facts = ModelFacts.from_pipeline(OwnFactorPipeline())
    assert (facts.vae_scale_factor, facts.size_multiple) == (32, 32)


def test_a_pipeline_whose_call_cannot_be_read_has_no_call_checks():
    facts = ModelFacts.from_pipeline(UncallablePipeline())
    assert facts.call_params is None
    assert check_for_model(ImageRequest("a", negative_prompt="b", height=8, width=8), facts).width == 8


# ---- the model's checks on a request ----

SOME = ModelFacts(
    "SomePipeline", 8, (64, 96), 50, call_params=frozenset({"prompt", "negative_prompt", "guidance_scale"})
)


@pytest.mark.parametrize(
    ("params", "fields", "message"),
    [
        (
            {"class_labels", "guidance_scale"},
            {},
            "SomePipeline does not take a text prompt; use a text-to-image pipeline.",
        ),
        ({"prompt"}, {"guidance_scale": 1}, None),
        ({"prompt"}, {"guidance_scale": 0}, None),
        (
            {"prompt"},
            {"guidance_scale": 1.5},
            "SomePipeline does not take guidance_scale, so 1.5 would be ignored; use 1.",
        ),
        (
            {"prompt", "guidance_scale"},
            {"negative_prompt": "blur"},
            "SomePipeline does not take negative_prompt; drop it.",
        ),
        ({"prompt", "guidance_scale"}, {"negative_prompt": ""}, None),
        ({"prompt", "negative_prompt", "guidance_scale"}, {"negative_prompt": "blur"}, None),
    ],
)
def test_values_a_pipeline_would_ignore_are_refused(params, fields, message):
    facts = dataclasses.replace(SOME, call_params=frozenset(params))
    req = ImageRequest("a red circle", **fields)
    if message is None:
        assert check_for_model(req, facts).height == 512
    else:
        with pytest.raises(ValueError) as refused:
            check_for_model(req, facts)
        assert str(refused.value) == message


def test_steps_up_to_the_training_horizon_are_accepted():
    assert check_for_model(ImageRequest("a", steps=50), SOME).steps == 50
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a", steps=51), SOME)
    assert str(refused.value) == "steps 51 exceeds the scheduler's 50 training timesteps; use at most 50."


@pytest.mark.parametrize(
    ("height", "width", "filled"),
    [(None, None, (512, 768)), (64, None, (64, 768)), (None, 64, (512, 64)), (8, 16, (8, 16))],
)
def test_each_side_not_given_takes_the_models_default(height, width, filled):
    req = ImageRequest("a", height=height, width=width)
    done = check_for_model(req, SOME)
    assert (done.height, done.width) == filled and dataclasses.replace(
        done, height=height, width=width
    ) == req


@pytest.mark.parametrize(("height", "width"), [(None, None), (64, None), (None, 64)])
def test_a_model_without_a_default_size_needs_both_sides(height, width):
    facts = ModelFacts("NoSizePipeline")
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a", height=height, width=width), facts)
    assert str(refused.value) == "NoSizePipeline has no default image size; give both height and width."
    assert check_for_model(ImageRequest("a", height=64, width=72), facts).width == 72


@pytest.mark.parametrize(
    ("facts", "fields", "message"),
    [
        (
            ModelFacts("P", 8, (64, 64)),
            {"width": 36},
            "width 36 is not a multiple of 8 (this model's VAE factor 8, and the pipeline's check of 8); "
            "use 32 or 40.",
        ),
        (
            ModelFacts("P", 8, (64, 64), patch_size=2),
            {"height": 40},
            "height 40 is not a multiple of 16 (this model's VAE factor 8 x patch 2, and the pipeline's check "
            "of 8); use 32 or 48.",
        ),
        (
            ModelFacts("P", 8, (64, 64), patch_size=2),
            {"height": 24},  # the multiple below is the multiple itself
            "height 24 is not a multiple of 16 (this model's VAE factor 8 x patch 2, and the pipeline's check "
            "of 8); use 16 or 32.",
        ),
        (
            ModelFacts("P", 8, (64, 64), patch_size=2),
            {"width": 8},  # no multiple below: the one above
            "width 8 is not a multiple of 16 (this model's VAE factor 8 x patch 2, and the pipeline's check "
            "of 8); use 16 or 16.",
        ),
        (
            ModelFacts("P", 2, (16, 16)),
            {"height": 20},  # a VAE factor of 2: the pipeline's own check of 8 rules
            "height 20 is not a multiple of 8 (this model's VAE factor 2, and the pipeline's check of 8); "
            "use 16 or 24.",
        ),
        (
            ModelFacts("P", 8, (5, 4), patch_size=2),  # a default size off the multiple is refused too
            {"width": 64},
            "height 40 is not a multiple of 16 (this model's VAE factor 8 x patch 2, and the pipeline's check "
            "of 8); use 32 or 48.",
        ),
    ],
)
def test_a_size_off_the_models_multiple_is_refused_with_the_two_nearest(facts, fields, message):
    with pytest.raises(ValueError) as refused:
        check_for_model(ImageRequest("a", **fields), facts)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("vae", "patch", "multiple", "good", "bad"),
    [(8, 1, 8, 72, 68), (8, 2, 16, 48, 40), (16, 1, 16, 48, 40), (2, 2, 8, 24, 20), (4, 3, 24, 72, 64)],
)
def test_the_size_multiple(vae, patch, multiple, good, bad):
    facts = ModelFacts("P", vae, (64, 64), patch_size=patch)
    assert facts.size_multiple == multiple
    assert check_for_model(ImageRequest("a", height=good, width=good), facts).height == good
    with pytest.raises(ValueError, match=f"height {bad} is not a multiple of {multiple} "):
        check_for_model(ImageRequest("a", height=bad, width=good), facts)


@pytest.mark.parametrize(("sample", "size"), [((64, 96), (512, 768)), ((3, 5), (24, 40)), (None, None)])
def test_the_default_size_is_the_sample_size_in_pixels(sample, size):
    assert ModelFacts("P", 8, sample).default_size() == size


FACTS = ModelFacts("P", 8, (4, 4))


def test_key_steps_are_checked_against_the_loop_only_when_its_length_is_known():
    req = ImageRequest("a", steps=10, key_steps=[0, 10])
    assert check_for_model(req, FACTS).key_steps == (0, 10)  # no loop length: not checked here
    with pytest.raises(ValueError) as refused:
        check_for_model(req, FACTS, 10)
    assert (
        str(refused.value) == "key_steps [10] are out of range for a sampling loop of 10 steps (valid: 0..9)."
    )
    calls = []

    def pndm(steps):  # one denoiser call more than steps
        calls.append(steps)
        return steps + 1

    assert check_for_model(req, FACTS, pndm).height == 32 and calls == [10]


def test_a_preset_built_for_the_step_count_runs_on_a_loop_one_call_longer():
    req = ImageRequest("a", steps=20, key_steps="sd-dpm-20")  # PNDM: 21 calls for 20 steps
    assert check_for_model(req, FACTS, lambda steps: steps + 1).steps == 20


def test_the_default_key_steps_are_checked_and_rescaled():
    req = ImageRequest("a", steps=10)
    with pytest.raises(ValueError, match=r"key_steps \[12\] are out of range for a sampling loop of 10"):
        check_for_model(req, FACTS, 10, key_steps=[0, 12])
    assert check_for_model(req, FACTS, 10, key_steps="sd-ddim-50") is not None  # the default: rescaled
    own = ImageRequest("a", steps=10, key_steps="sd-ddim-50")
    with pytest.raises(ValueError, match="built for 50 steps but the pipeline runs 10"):
        check_for_model(own, FACTS, 10)  # the request's own preset is not rescaled
    assert check_for_model(ImageRequest("a", steps=50, key_steps="sd-ddim-50"), FACTS, 50).steps == 50


def test_mode_off_runs_no_key_steps_so_none_are_checked():
    req = ImageRequest("a", steps=10, mode="off")
    assert check_for_model(req, FACTS, 10, key_steps=[0, 12]).height == 32
    assert check_for_model(ImageRequest("a", steps=10), FACTS, 10, key_steps=[0, 9]).height == 32
