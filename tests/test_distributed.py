"""N ranks equal one process; lost, hung and disagreeing ranks end with an error in bounded time."""

from __future__ import annotations

import pytest
import torch

from . import tiny
from .cli_helpers import SLACK_S
from .multirank import launch, load
from .reference import reference

KEYS = [0, 1, 3, 6]  # groups of 1, 2, 3 and 4 steps over a 10-step loop

CASES = [
    # rank 0 encodes; CFG on: 2 rows per step, groups of 2..8 rows (uneven for 3 ranks)
    {
        "config": {"key_steps": KEYS, "mode": "parallel", "encoder": "rank0"},
        "call": {"negative_prompt": "blue"},
    },
    {"config": {"key_steps": KEYS, "mode": "parallel", "encoder": "replicated"}, "call": {}},
    # CFG off: 1 row per step, so the first groups leave ranks idle
    {"config": {"key_steps": KEYS, "mode": "parallel", "encoder": "rank0"}, "call": {"guidance_scale": 1.0}},
    {
        "config": {"key_steps": KEYS, "mode": "parallel", "encoder": "replicated"},
        "call": {"guidance_scale": 1.0},
    },
    {"config": {"key_steps": KEYS, "mode": "parallel"}, "call": {"num_images_per_prompt": 2}},
    {"config": {"key_steps": KEYS, "mode": "propagate"}, "call": {}},
    {"pipe": "sdxl", "config": {"key_steps": KEYS, "mode": "parallel"}, "call": {}},
]


def independent(case: dict) -> torch.Tensor:
    """The case's result by tests/reference.py (one process, no distfd)."""
    pipe = getattr(tiny, case.get("pipe", "sd"))(case.get("sched", "ddim"))
    call = lambda p: tiny.run(p, steps=case.get("steps", 10), **case.get("call", {}))  # noqa: E731
    return reference(pipe, call, case["config"]["key_steps"], alpha=0.003).output


@pytest.fixture(scope="module")
def references() -> list[torch.Tensor]:
    return [independent(c) for c in CASES]


@pytest.mark.parametrize("world_size", [2, 3])
def test_n_ranks_equal_one_process(world_size, references, tmp_path):
    results = launch({"cases": CASES, "timeout_s": 120}, world_size, tmp_path)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.error or r.log[-3000:]}"
    for n, ref in enumerate(references):
        ranks = [load(tmp_path, n, rank) for rank in range(world_size)]
        for rank, got in enumerate(ranks):
            tiny.assert_close(got["latents"], ref, msg=f"case {n} rank {rank}")
        # rank 0's latents are every rank's
        for got in ranks[1:]:
            assert torch.equal(got["latents"], ranks[0]["latents"])
        stats = ranks[0]["stats"]
        assert stats["collectives"] > 0 and stats["bytes_sent"] > 0
    # the rank0 placement broadcasts encoder features; replicated sends only latents + predictions
    rank0_bytes = load(tmp_path, 0, 0)["stats"]["bytes_sent"]
    replicated_bytes = load(tmp_path, 1, 0)["stats"]["bytes_sent"]
    assert rank0_bytes > replicated_bytes
    # the work is shared: each rank decodes only part of the rows
    rows = [load(tmp_path, 0, rank)["stats"]["decoder_rows"] for rank in range(world_size)]
    assert sum(rows) == 2 * 10 and max(rows) < 2 * 10


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_lost_rank_ends_the_others(how, tmp_path):
    timeout = 15
    case = {"config": {"key_steps": KEYS, "mode": "parallel"}, "fail": {"rank": 1, "at_step": 3, "how": how}}
    results = launch({"cases": [case], "timeout_s": timeout}, 2, tmp_path, wait_s=180, grace_s=5)
    rank0 = results[0]
    assert rank0.returncode not in (0, None), rank0.log[-2000:]
    assert "DistributedError" in rank0.error and "peer rank" in rank0.error
    # From the moment rank 1 died or hung: the timeout at most, plus the slack for a process to exit.
    lost_at = float((tmp_path / "lost_at").read_text())
    assert rank0.ended_at - lost_at < timeout + SLACK_S, rank0.ended_at - lost_at


@pytest.mark.parametrize(
    ("by_rank", "what"),
    [
        ({"call_by_rank": {"1": {"prompt": "a blue square"}}}, "prompt embedding"),
        ({"steps_by_rank": {"1": 8}}, "step count"),
        ({"call_by_rank": {"1": {"height": 64, "width": 64}}}, "latent shape"),
        ({"config_by_rank": {"1": {"key_steps": [0, 2, 5]}}}, "key steps"),
    ],
)
def test_disagreeing_ranks_get_a_clear_error(by_rank, what, tmp_path):
    case = {"config": {"key_steps": KEYS, "mode": "parallel"}, **by_rank}
    results = launch({"cases": [case], "timeout_s": 60}, 2, tmp_path, wait_s=180)
    for r in results:
        assert r.returncode not in (0, None), r.log[-2000:]
        assert "ranks disagree on " + what in r.error, r.error
