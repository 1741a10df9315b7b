"""Every launch recipe in launch/ with 2 CPU processes gives the 1-process image; a taken MASTER_PORT
ends every rank within --timeout; ranks started with different arguments are stopped before loading."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from distfd.cli import main

from . import cli_helpers
from .cli_helpers import ROOT, SLACK_S, TINY_RUN, assert_same_image, spawn_ranks, subprocess_env
from .multirank import port_taken, retry_on_taken_port

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> Path:
    """The image of one process."""
    out = tmp_path_factory.mktemp("ref") / "one.png"
    assert main(["generate", "--model", str(model_dir), *TINY_RUN, "--out", str(out)]) == 0
    return out


def _recipe(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``launch/SCRIPT 2 ARGS``; the launchers that read MASTER_PORT get a free one, and another if a
    process took it before the launcher bound it (torchrun --standalone picks its own)."""
    cmd = ["bash", str(ROOT / "launch" / script), "2", *args]

    def run(port: int) -> subprocess.CompletedProcess:
        env = subprocess_env(MASTER_PORT=str(port))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    return retry_on_taken_port(
        run, lambda done: done.returncode != 0 and port_taken(done.stdout + done.stderr)
    )


@pytest.mark.parametrize(
    ("script", "tool"),
    [("torchrun.sh", "torchrun"), ("accelerate.sh", "accelerate"), ("deepspeed.sh", "deepspeed")],
)
def test_launcher_recipe_two_cpu_processes_give_the_one_process_image(
    model_dir, reference, tmp_path, script, tool
):
    if tool == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed launcher is the optional [deepspeed] extra")
    env_path = subprocess_env()["PATH"]
    if shutil.which(tool, path=env_path) is None:
        pytest.skip(f"{tool} is not installed")
    out = tmp_path / "two.png"
    proc = _recipe(script, ["--model", str(model_dir), *TINY_RUN, "--out", str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 rank(s)" in proc.stdout and "collectives" in proc.stdout
    assert_same_image(out, reference)


@pytest.mark.parametrize(
    ("script", "tool"),
    [("torchrun.sh", "torchrun"), ("accelerate.sh", "accelerate"), ("deepspeed.sh", "deepspeed")],
)
def test_launcher_recipe_runs_a_batch_as_groups_of_one(model_dir, tmp_path, script, tool):
    """``--ranks-per-image 1`` under each launcher: both ranks make images, each the 1-process one."""
    if tool == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed launcher is the optional [deepspeed] extra")
    if shutil.which(tool, path=subprocess_env()["PATH"]) is None:
        pytest.skip(f"{tool} is not installed")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f'{{"prompt": "a red circle", "seed": {i}}}' for i in range(4)))
    args = ["--model", str(model_dir), *TINY_RUN, "--prompts-file", str(prompts)]
    one = spawn_ranks([["generate", *args, "--out-dir", str(tmp_path / "one")]], None, wait_s=120)
    assert one[0].returncode == 0, one[0].output[-3000:]
    proc = _recipe(script, [*args, "--out-dir", str(tmp_path / "two"), "--ranks-per-image", "1"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    entries = [json.loads(line) for line in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["line"] for e in entries) == [1, 2, 3, 4]
    assert {tuple(e["ranks"]) for e in entries} == {(0,), (1,)}
    for e in entries:
        assert (tmp_path / "two" / e["file"]).read_bytes() == (tmp_path / "one" / e["file"]).read_bytes()


def test_srun_style_environment_gives_the_one_process_image(model_dir, reference, tmp_path):
    # What launch/slurm/generate-srun.sbatch does: one task per rank, SLURM_* and MASTER_* set.
    out = tmp_path / "srun.png"
    argv = ["generate", "--model", str(model_dir), *TINY_RUN, "--out", str(out)]
    exits = spawn_ranks([argv, argv], None, wait_s=240)
    for e in exits:
        assert e.returncode == 0, e.output[-3000:]
    assert "2 rank(s)" in exits[0].output
    assert not [e.output for e in exits if "Warning" in e.output or "WARN" in e.output]
    assert_same_image(out, reference)


def test_taken_master_port_ends_every_rank_within_the_timeout(model_dir, tmp_path):
    timeout = 10
    with socket.socket() as holder:  # another process's server on MASTER_PORT
        holder.bind(("127.0.0.1", 0))
        holder.listen(16)
        port = holder.getsockname()[1]
        argv = ["generate", "--model", str(model_dir), *TINY_RUN, "--timeout", str(timeout)]
        argv += ["--out", str(tmp_path / "x.png")]
        # Without the bound, rank 1 waits for the handshake forever; the wait ends well past the bound.
        exits = spawn_ranks([argv, argv], port, wait_s=90)
    for e in exits:
        assert e.returncode not in (0, None), f"rank {e.rank} exit {e.returncode}: {e.output[-2000:]}"
        assert "Traceback" not in e.output
        assert f"{port}" in e.output and f"rank {e.rank}/2 could not start" in e.output
    assert "already in use" in exits[0].output
    assert "no rendezvous" in exits[1].output and f"within {timeout}s" in exits[1].output
    # Both ranks start together and import the same; rank 0 fails as soon as it tries to bind the
    # port, so its exit marks when the ranks reached the rendezvous. From there, each rank ends
    # within the timeout (docs/multi-gpu.md), plus the slack for a process to exit.
    reached = exits[0].elapsed_s
    assert all(e.elapsed_s - reached < timeout + SLACK_S for e in exits), [e.elapsed_s for e in exits]
    # Rank 1 does wait for the rendezvous the whole timeout (rank 0 told it nothing), no less.
    assert exits[1].elapsed_s - reached > timeout - SLACK_S, [e.elapsed_s for e in exits]


def test_ranks_with_different_arguments_are_stopped_before_loading(model_dir, tmp_path):
    base = ["generate", "--model", str(model_dir), *TINY_RUN, "--out", str(tmp_path / "x.png")]
    exits = spawn_ranks([[*base, "--seed", "1"], [*base, "--seed", "2", "--guidance-scale", "3"]], None, 120)
    for e in exits:
        assert e.returncode == 1, e.output[-2000:]
        assert "DistributedError: the ranks were given different arguments" in e.output
        assert "seed: rank 0 has 1, rank 1 has 2" in e.output
        assert "guidance_scale: rank 0 has 7.5, rank 1 has 3.0" in e.output
        assert "Traceback" not in e.output


def test_a_check_failing_on_one_rank_stops_all_ranks_with_exit_2(model_dir, tmp_path):
    base = ["generate", "--model", str(model_dir), *TINY_RUN, "--out", str(tmp_path / "x.png")]
    exits = spawn_ranks([base, [*base, "--height", "44"]], None, 120)
    assert [e.returncode for e in exits] == [2, 2], [e.output[-1500:] for e in exits]
    assert "rank 1 refused the arguments: height 44 is not a multiple of 8" in exits[0].output
    assert "height 44 is not a multiple of 8" in exits[1].output
