"""FLUX and SD3 folders as diffusers saves them, through the CLI, batch jobs and the service."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from distfd import samplers
from distfd.cli import main
from distfd.request import ModelFacts
from distfd.session import Session

from .tiny_mmdit import flux, sd3, vae


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny FLUX and SD3 folders as diffusers saves them (CLIP and T5 encoders, tokenizers), with a
    VAE of the real models' factor 8: sizes must be multiples of 16 (VAE factor x patch 2)."""
    root = tmp_path_factory.mktemp("mmdit")
    paths = {}
    for name, build in (("flux", flux), ("sd3", sd3)):
        pipe = build()
        type(pipe)(**{**pipe.components, "vae": vae(levels=4)}).save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_folder_facts_and_refusals_before_loading(folders, name, monkeypatch, capsys):
    facts = ModelFacts.from_folder(folders[name])
    assert (facts.vae_scale_factor, facts.patch_size, facts.size_multiple) == (8, 2, 16)
    assert samplers.resolve(None, facts.scheduler_config) == "flow-euler"

    def refuse(self, *a, **k):
        raise AssertionError("the pipeline was loaded although the arguments were refused")

    monkeypatch.setattr(Session, "_load", refuse)
    base = ["generate", "--model", str(folders[name]), "--steps", "6", "--width", "32"]
    assert main([*base, "--height", "40"]) == 2
    assert "height 40 is not a multiple of 16 (this model's VAE factor 8 x patch 2" in capsys.readouterr().err
    assert main([*base, "--height", "32", "--scheduler", "ddim"]) == 2
    assert "cannot sample a flow-matching model" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_folder_generates_through_the_cli(folders, name, tmp_path, capsys):
    out = tmp_path / f"{name}.png"
    argv = [
        "generate",
        "--model",
        str(folders[name]),
        "--steps",
        "6",
        "--key-steps",
        "0,2",
        "--timeout",
        "60",
    ]
    assert main([*argv, "--height", "32", "--width", "48", "--out", str(out)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "6 steps flow-euler" in text and "encoder passes 2" in text
    assert Image.open(out).size == (48, 32)


@pytest.mark.timeout(420)
def test_flux_batch_job_on_two_ranks_and_in_groups(folders, tmp_path):
    """A prompts file on the FLUX folder: 2 ranks sharing each image, and 2 groups of one rank, give
    the one-process images."""
    from .cli_helpers import assert_same_image, spawn_ranks
    from .multirank import free_port

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n{"prompt": "a blue square", "seed": 5}\n')
    argv = [
        "generate",
        "--model",
        str(folders["flux"]),
        "--steps",
        "6",
        "--key-steps",
        "0,2",
        "--timeout",
        "90",
    ]
    argv += ["--height", "32", "--width", "32", "--prompts-file", str(prompts)]
    assert main([*argv, "--out-dir", str(tmp_path / "one")]) == 0
    one = [json.loads(line) for line in (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()]
    assert len(one) == 2 and one[0]["settings"]["scheduler"] == "flow-euler"
    # A rerun finds both images made, before loading: the settings it digests name flow-euler too.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Session, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
        assert main([*argv, "--out-dir", str(tmp_path / "one")]) == 0
    for name, extra in (("shared", []), ("groups", ["--ranks-per-image", "1"])):
        exits = spawn_ranks([[*argv, *extra, "--out-dir", str(tmp_path / name)]] * 2, free_port(), wait_s=300)
        assert [e.returncode for e in exits] == [0, 0], exits[0].output[-3000:]
        made = [json.loads(line) for line in (tmp_path / name / "manifest.jsonl").read_text().splitlines()]
        assert sorted(e["file"] for e in made) == sorted(e["file"] for e in one)
        assert all(len(e["ranks"]) == (2 if name == "shared" else 1) for e in made), made
        for e in one:
            assert_same_image(tmp_path / name / e["file"], tmp_path / "one" / e["file"])


@pytest.mark.timeout(420)
def test_sd3_service_on_two_ranks_gives_the_generate_image(folders, tmp_path):
    """``distfd serve --model PATH`` on an SD3 folder, 2 gloo ranks: the one-process CLI image."""
    import io
    import signal

    import numpy as np

    pytest.importorskip("starlette")
    from .cli_helpers import pixels
    from .servers import Service, call

    args = [
        "--model",
        str(folders["sd3"]),
        "--steps",
        "6",
        "--key-steps",
        "0,2",
        "--height",
        "32",
        "--width",
        "32",
    ]
    ref = tmp_path / "ref.png"
    assert main(["generate", *args, "--prompt", "a red cube", "--seed", "3", "--out", str(ref)]) == 0
    s = Service([*args, "--timeout", "60"], tmp_path / "serve")
    try:
        s.wait_ready()
        status, _, png = call(s.url, "/generate", {"prompt": "a red cube", "seed": 3})
        assert status == 200, png[:500]
    finally:
        s.signal(signal.SIGTERM)
        codes, _ = s.wait(60)
    assert codes == [0, 0], s.results()
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert np.abs(got - pixels(ref).astype(int)).max() <= 2
