"""Configuration, presets, grouping and sharding; clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import distfd
from distfd.presets import PRESETS
from distfd.schedule import chunk_after, groups, shard

from . import tiny


def test_paper_presets():
    # sd-ddim-50 and uniform-K, as resolved for a loop: test_keysteps.py::test_resolution_against_the_loop
    assert PRESETS["sd-dpm-20"].key_steps == (0, 1, 2, 3, 5, 10, 15)
    assert PRESETS["sd-personalized-50"].key_steps == (0, 1, 2, 3, 5, 10, 15, 25, 35, 40)


def test_groups_and_chunks():
    assert groups((0, 1, 3, 6), 10) == [range(0, 1), range(1, 3), range(3, 6), range(6, 10)]
    assert chunk_after(6, (0, 1, 3, 6), 10, 3) == range(6, 9)
    assert chunk_after(9, (0, 1, 3, 6), 10, 3) == range(9, 10)


@pytest.mark.parametrize(("rows", "world"), [(8, 2), (8, 3), (2, 3), (1, 2), (7, 7)])
def test_shard_is_even_contiguous_and_complete(rows, world):
    shares = shard(rows, world)
    assert len(shares) == world and sum(len(s) for s in shares) == rows
    assert [i for s in shares for i in s] == list(range(rows))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    assert len(shares[0]) == min(len(s) for s in shares)  # rank 0 also encodes


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # The key-step rules themselves are tested in test_keysteps.py; one shows the config applies them.
        ({"key_steps": [1, 2]}, ValueError, "lacks index 0"),
        ({"key_steps": 5}, TypeError, "preset name, a preset .json file or a list"),
        ({"mode": "fast"}, ValueError, "mode must be one of"),
        ({"encoder": "gpu0"}, ValueError, "encoder must be one of"),
        ({"noise_alpha": -0.1}, ValueError, "noise_alpha must be >= 0"),
        ({"noise_below": 2}, ValueError, "noise_below"),
        ({"max_parallel_steps": 0}, ValueError, "max_parallel_steps"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        distfd.FasterDiffusionConfig(**kwargs)


def test_out_of_range_and_mismatched_presets_fail_at_call():
    pipe = tiny.sd()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=[0, 12]))
    with pytest.raises(ValueError, match=r"out of range for a sampling loop of 10 steps"):
        tiny.run(pipe)
    handle.remove()
    distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps="sd-ddim-50"))
    with pytest.raises(ValueError, match="built for 50 steps but the pipeline runs 10"):
        tiny.run(pipe)


def test_unsupported_models_and_pipelines_are_named():
    class FooPipeline:
        unet = torch.nn.Linear(2, 2)
        scheduler = tiny.scheduler()

    with pytest.raises(ValueError, match="Linear is not supported by distfd"):
        distfd.apply(FooPipeline(), distfd.FasterDiffusionConfig())

    pipe = tiny.sd()

    class MyPipeline:
        unet, scheduler = pipe.unet, pipe.scheduler

    with pytest.raises(ValueError, match="MyPipeline is not supported by distfd.*StableDiffusionPipeline"):
        distfd.apply(MyPipeline(), distfd.FasterDiffusionConfig())

    class NoDenoiser:
        scheduler = tiny.scheduler()

    with pytest.raises(ValueError, match="NoDenoiser is not supported"):
        distfd.apply(NoDenoiser())
    with pytest.raises(TypeError, match="FasterDiffusionConfig"):
        distfd.apply(pipe, {"key_steps": [0]})
