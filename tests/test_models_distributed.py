"""N ranks equal one process for DiT and ControlNet (gloo ranks on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch

from . import tiny
from .multirank import launch, load
from .reference import reference

KEYS = [0, 1, 3]  # groups of 1, 2 and 3 steps over a 6-step loop
STEPS = 6
CASES = [
    {
        "pipe": "tiny_models.dit",
        "run": "tiny_models.run_dit",
        "config": {"key_steps": KEYS, "encoder_blocks": 3},
    },
    {
        "pipe": "tiny_models.dit",
        "run": "tiny_models.run_dit",
        "config": {"key_steps": KEYS, "encoder": "replicated", "encoder_blocks": 3},
        "call": {"labels": [5]},  # one image: 2 CFG rows per step
    },
    {"pipe": "tiny_models.sd_controlnet", "run": "tiny_models.run_controlnet", "config": {"key_steps": KEYS}},
    {
        "pipe": "tiny_models.sd_multicontrolnet",
        "run": "tiny_models.run_controlnet",
        "config": {"key_steps": KEYS, "encoder": "replicated"},
    },
]


def find(name: str):
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"tests.{module}"), attr)


def independent(case: dict) -> torch.Tensor:
    """The case's result by tests/reference.py (one process, no distfd)."""
    pipe = find(case["pipe"])("ddim")
    call = lambda p: find(case["run"])(p, steps=STEPS, **case.get("call", {}))  # noqa: E731
    blocks = case["config"].get("encoder_blocks")
    return reference(pipe, call, case["config"]["key_steps"], alpha=0.003, encoder_blocks=blocks).output


@pytest.mark.parametrize("world_size", [2])
def test_n_ranks_equal_one_process(world_size, tmp_path):
    cases = [{**c, "steps": STEPS} for c in CASES]
    results = launch({"cases": cases, "timeout_s": 120}, world_size, tmp_path, wait_s=420)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.error or r.log[-3000:]}"
    for n, case in enumerate(CASES):
        ref = independent(case)
        ranks = [load(tmp_path, n, rank) for rank in range(world_size)]
        for rank, got in enumerate(ranks):
            tiny.assert_close(got["latents"], ref, msg=f"case {n} ({case['pipe']}) rank {rank}")
        assert ranks[0]["stats"]["collectives"] > 0
        # Both ranks decode: the work was shared.
        assert all(got["stats"]["decoder_rows"] > 0 for got in ranks)
