"""Ranks as groups (``--ranks-per-image``): batches and the service over 2 and 4 gloo ranks on CPU.

Every image must be the one the same number of ranks makes alone: a group of one gives the 1-process
image byte for byte, a group of two the image of a 2-rank run byte for byte (and, like any 2-rank
run, the 1-process image within float rounding of the decoder batch).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distfd.pool.layout import SizePolicy, parse_ranks_per_image, partition

from . import cli_helpers
from .cli_helpers import SLACK_S, assert_resumed_batch, assert_same_image, spawn_ranks, subprocess_env
from .multirank import free_port
from .servers import Service, call

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(420)

ARGS = ["--steps", "6", "--key-steps", "0,2", "--timeout", "30"]
LINES = 6


# The layout and the size policy (pure).


def test_partition_and_ranks_per_image_parsing():
    assert partition(4, 2) == [(0, 1), (2, 3)] and partition(4, 1) == [(0,), (1,), (2,), (3,)]
    assert parse_ranks_per_image(None, 4) == 4 and parse_ranks_per_image("auto", 4) is None
    assert parse_ranks_per_image("2", 4) == 2
    for bad, message in [("3", "does not divide the 4 rank"), ("0", ">= 1"), ("x", "'auto' or an integer")]:
        with pytest.raises(ValueError, match=message):
            parse_ranks_per_image(bad, 4)


def test_auto_uses_all_ranks_for_a_short_queue_and_small_groups_for_a_long_one():
    auto = SizePolicy(8, None)
    assert [auto.wanted(n) for n in (0, 1, 2, 3, 4, 5, 8, 100)] == [8, 8, 4, 2, 2, 1, 1, 1]
    assert auto.pick(1, frozenset()) == tuple(range(8))
    assert auto.pick(2, frozenset()) == (0, 1, 2, 3)
    # Ranks 0-3 busy: a lone request takes the largest free group no larger than wanted.
    assert auto.pick(1, frozenset(range(4))) == (4, 5, 6, 7)
    assert auto.pick(1, frozenset(range(7))) == (7,)
    assert auto.pick(1, frozenset(range(8))) is None
    fixed = SizePolicy(4, 2)
    assert fixed.pick(1, frozenset()) == (0, 1) and fixed.pick(9, frozenset({0})) == (2, 3)
    assert fixed.pick(1, frozenset({1, 2})) is None


# Batches over groups.


def manifest(out_dir: Path) -> list[dict]:
    path = out_dir / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(json.dumps({"prompt": f"a red circle {i}", "seed": i}) for i in range(LINES)))
    return path


def batch(model_dir: Path, prompts: Path, out_dir: Path, world: int, *extra: str) -> list:
    argv = [
        "generate",
        "--model",
        str(model_dir),
        *ARGS,
        "--prompts-file",
        str(prompts),
        "--out-dir",
        str(out_dir),
    ]
    exits = spawn_ranks([[*argv, *extra]] * world, None, wait_s=300)
    for e in exits:
        assert e.returncode == 0, e.output[-3000:]
    return exits


@pytest.fixture(scope="module")
def references(model_dir, prompts, tmp_path_factory) -> dict[int, Path]:
    """The images of one process and of one group of two ranks (one thread per process, as the
    ranks run)."""
    root = tmp_path_factory.mktemp("refs")
    batch(model_dir, prompts, root / "one", 1)
    batch(model_dir, prompts, root / "two", 2)
    return {1: root / "one", 2: root / "two"}


@pytest.mark.parametrize(("world", "k"), [(4, 2), (4, 1), (2, 1)], ids=["4-as-2x2", "4-as-4x1", "2-as-2x1"])
def test_batch_over_groups_gives_the_images_of_that_many_ranks(
    model_dir, prompts, references, tmp_path, world, k
):
    exits = batch(model_dir, prompts, tmp_path, world, "--ranks-per-image", str(k))
    assert f"{k} rank(s) per image" in exits[0].output
    entries = manifest(tmp_path)
    assert sorted(e["line"] for e in entries) == list(range(1, LINES + 1))
    assert {tuple(e["ranks"]) for e in entries} == set(partition(world, k))  # every group worked
    for e in entries:
        got = (tmp_path / e["file"]).read_bytes()
        assert got == (references[k] / e["file"]).read_bytes(), (e["file"], e["ranks"])
        assert_same_image(tmp_path / e["file"], references[1] / e["file"])


@pytest.mark.parametrize(("world", "k"), [(1, 1), (2, 2)], ids=["1-process", "2-as-1x2"])
def test_max_batch_makes_lines_in_one_call_and_each_image_as_made_alone(
    model_dir, prompts, references, tmp_path, world, k
):
    batch(model_dir, prompts, tmp_path, world, "--ranks-per-image", str(k), "--max-batch", "4")
    entries = manifest(tmp_path)
    assert sorted(e["line"] for e in entries) == list(range(1, LINES + 1))
    assert max(e["batch"] for e in entries) == 4  # all lines share a key: calls of 4, then 2
    assert sorted(e["batch"] for e in entries) == [2, 2, 4, 4, 4, 4]
    # A larger decoder batch may round differently (as any change of batch rows): within 2 of 255.
    for e in entries:
        assert_same_image(tmp_path / e["file"], references[k] / e["file"])


BATCH_TIMEOUT = 20


def _start(model_dir: Path, prompts: Path, out_dir: Path, world: int, port: int) -> list[subprocess.Popen]:
    argv = ["generate", "--model", str(model_dir), "--steps", "30", "--key-steps", "0,5"]
    argv += ["--timeout", str(BATCH_TIMEOUT)]
    argv += ["--prompts-file", str(prompts), "--out-dir", str(out_dir), "--ranks-per-image", "1"]
    procs = []
    for rank in range(world):
        env = subprocess_env(
            SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        procs.append(
            subprocess.Popen([sys.executable, "-m", "distfd", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        )  # fmt: skip
    return procs


def _wait_for_entries(procs, out_dir: Path, n: int, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while len(manifest(out_dir)) < n:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no image listed in time"
        time.sleep(0.05)


def test_batch_with_groups_stops_on_sigterm_and_resumes_after_a_kill(model_dir, tmp_path):
    n, world = 16, 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(json.dumps({"prompt": "a red circle", "seed": i}) for i in range(n)))
    out_dir = tmp_path / "out"

    # 1. SIGTERM to every rank (scancel): the images in progress are finished and listed; exit 0.
    procs = _start(model_dir, prompts, out_dir, world, free_port())
    _wait_for_entries(procs, out_dir, 1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, outputs[0][-3000:]
    assert "a rerun resumes" in outputs[0]
    first = manifest(out_dir)
    assert 1 <= len(first) < n

    # 2. SIGKILL of every rank while images are being made: nothing half-written is listed.
    procs = _start(model_dir, prompts, out_dir, world, free_port())
    _wait_for_entries(procs, out_dir, len(first) + 2)
    for p in procs:
        p.kill()
    for p in procs:
        p.communicate(timeout=60)
    second = manifest(out_dir)
    assert len(first) < len(second) < n, "the kill came too late to test a resume"
    before = {e["file"]: (out_dir / e["file"]).stat().st_mtime_ns for e in second}

    # 3. The rerun makes only what is missing; every line is listed once; no temporary file is left.
    procs = _start(model_dir, prompts, out_dir, world, free_port())
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, outputs[0][-3000:]
    assert f"{len(second)} already done, {n - len(second)} to make" in outputs[0]
    done = manifest(out_dir)
    assert_resumed_batch(out_dir, done, before, n)
    assert len({tuple(e["ranks"]) for e in done}) > 1


def test_shards_split_the_lines_and_resume_from_every_manifest(model_dir, prompts, references, tmp_path):
    for i in range(2):
        batch(model_dir, prompts, tmp_path, 1, "--shard", f"{i}/2")
    shards = [
        [json.loads(line) for line in (tmp_path / f"manifest.shard-{i}-of-2.jsonl").read_text().splitlines()]
        for i in range(2)
    ]
    assert [e["line"] for e in shards[0]] == [1, 3, 5] and [e["line"] for e in shards[1]] == [2, 4, 6]
    for e in shards[0] + shards[1]:
        assert (tmp_path / e["file"]).read_bytes() == (references[1] / e["file"]).read_bytes()
    # The whole file on 2 ranks: every image is already there, so no rank loads the model.
    exits = batch(model_dir, prompts, tmp_path, 2)
    assert f"nothing left to make: {LINES} image(s)" in exits[0].output and "not loading" in exits[0].output
    assert not any("working on" in e.output or "Loading" in e.output for e in exits)


def test_ranks_per_image_that_does_not_divide_the_ranks_is_refused_before_loading(
    model_dir, prompts, tmp_path
):
    argv = ["generate", "--model", str(model_dir), *ARGS, "--prompts-file", str(prompts)]
    argv += ["--out-dir", str(tmp_path), "--ranks-per-image", "2"]
    start = time.monotonic()
    exits = spawn_ranks([argv] * 3, None, wait_s=60)
    assert time.monotonic() - start < 30
    for e in exits:
        assert e.returncode == 2, e.output[-2000:]
        assert "--ranks-per-image 2 does not divide the 3 rank(s)" in e.output
        assert "Loading" not in e.output
    serve = ["serve", "--model", str(model_dir), "--port", "0", "--ranks-per-image", "3"]
    for e in spawn_ranks([serve] * 2, None, wait_s=60):
        assert e.returncode == 2 and "--ranks-per-image 3 does not divide the 2 rank(s)" in e.output


def test_batch_options_are_refused_for_one_image_and_checked_up_front(
    model_dir, prompts, tmp_path, monkeypatch, capsys
):
    from distfd.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    one = ["generate", "--model", str(model_dir), *ARGS, "--out", str(tmp_path / "a.png")]
    lines = ["generate", "--model", str(model_dir), *ARGS, "--prompts-file", str(prompts)]
    lines += ["--out-dir", str(tmp_path / "out")]
    for argv, message in [
        ([*one, "--max-batch", "2"], "--max-batch is for batches (--prompts-file)"),
        ([*one, "--shard", "0/2"], "--shard is for batches (--prompts-file)"),
        ([*lines, "--max-batch", "0"], "--max-batch must be >= 1; got 0."),
        ([*lines, "--shard", "2/2"], "--shard must be I/N with 0 <= I < N"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_ends_a_batch_over_groups(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(json.dumps({"prompt": "a red circle", "seed": i}) for i in range(40)))
    procs = _start(model_dir, prompts, tmp_path / "out", 4, free_port())
    try:
        _wait_for_entries(procs, tmp_path / "out", 2)
        procs[3].kill()
        start = time.monotonic()
        codes = [p.wait(BATCH_TIMEOUT + SLACK_S) for p in procs]
        assert time.monotonic() - start < BATCH_TIMEOUT + SLACK_S
        assert codes[3] == -signal.SIGKILL and all(c == 1 for c in codes[:3]), codes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# The service over groups.

TINY = ["--steps", "10", "--key-steps", "0,1,3,6", "--height", "32", "--width", "32", "--timeout", "20"]
SLOW = {"prompt": "a red circle", "steps": 120, "mode": "off"}  # about a second of work per image


def span(headers: dict) -> tuple[float, float]:
    return float(headers["x-generation-start"]), float(headers["x-generation-end"])


@pytest.mark.parametrize(("world", "k"), [(4, 2), (2, 1)], ids=["4-as-2x2", "2-as-2x1"])
def test_service_over_groups_runs_requests_at_once(model_dir, tmp_path, world, k):
    args = ["--model", str(model_dir), *TINY, "--ranks-per-image", str(k), "--max-steps", "600"]
    s = Service(args, tmp_path, world)
    try:
        health = s.wait_ready()
        assert health["ranks_per_image"] == str(k)
        groups = world // k
        with ThreadPoolExecutor(groups * 2) as pool:
            answers = list(
                pool.map(lambda i: call(s.url, "/generate", {**SLOW, "seed": i}), range(groups * 2))
            )
        assert [a[0] for a in answers] == [200] * len(answers)
        assert {a[1]["x-ranks-per-image"] for a in answers} == {str(k)}
        assert {a[1]["x-ranks"] for a in answers} == {",".join(map(str, g)) for g in partition(world, k)}
        spans = sorted(span(a[1]) for a in answers)
        overlapping = sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
        assert overlapping >= 1, spans  # W/K images were being made at the same time
        # The same request gives the same PNG whichever group makes it: the policy takes the lowest
        # free group, so a long request holds the first while the second makes it.
        target = {"prompt": "a blue square", "seed": 5}
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(call, s.url, "/generate", {**SLOW, "steps": 600, "seed": 9})
            s.wait_health(lambda h: h["in_flight"] == 1)
            second = call(s.url, "/generate", target)
            assert busy.result()[0] == 200
        first = call(s.url, "/generate", target)
        assert first[0] == second[0] == 200
        assert first[1]["x-ranks"] != second[1]["x-ranks"], "both came from one group: the check is blind"
        assert first[2] == second[2]
        text = call(s.url, "/metrics")[2].decode()
        assert f'distfd_images_total{{ranks="{k}"}}' in text
    finally:
        s.signal(signal.SIGTERM)
        codes, _ = s.wait(60)
        assert codes == [0] * world, s.results()


def test_auto_switches_group_size_with_the_queue(model_dir, tmp_path):
    s = Service(
        ["--model", str(model_dir), *TINY, "--ranks-per-image", "auto", "--queue-size", "16"], tmp_path, 4
    )
    try:
        assert s.wait_ready()["ranks_per_image"] == "auto"
        status, headers, _ = call(s.url, "/generate", {**SLOW, "seed": 0})  # alone: every rank
        assert status == 200 and headers["x-ranks-per-image"] == "4"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: call(s.url, "/generate", {**SLOW, "seed": i}), range(8)))
        sizes = [int(a[1]["x-ranks-per-image"]) for a in answers]
        assert all(a[0] == 200 for a in answers) and min(sizes) < 4, sizes  # a queue: smaller groups
        status, headers, _ = call(s.url, "/generate", {**SLOW, "seed": 9})  # alone again
        assert headers["x-ranks-per-image"] == "4"
        text = call(s.url, "/metrics")[2].decode()
        assert 'distfd_images_total{ranks="4"}' in text and "distfd_ranks_per_image 4.0" in text
    finally:
        s.signal(signal.SIGTERM)
        codes, _ = s.wait(60)
        assert codes == [0] * 4, s.results()


def test_a_killed_rank_in_one_group_ends_the_whole_service(model_dir, tmp_path):
    timeout = 10
    args = ["--model", str(model_dir), *TINY, "--timeout", str(timeout), "--ranks-per-image", "2"]
    s = Service(args, tmp_path, 4)
    try:
        s.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(call, s.url, "/generate", {**SLOW, "steps": 150, "seed": i}) for i in range(2)
            ]
            s.wait_health(lambda h: h["in_flight"] == 2)
            s.signal(signal.SIGKILL, [3])
            start = time.monotonic()
            answers = [f.result(timeout + SLACK_S) for f in waiting]
        assert all(status in (200, 503) for status, _, _ in answers)
        assert any(status == 503 for status, _, _ in answers)
        codes, _ = s.wait(timeout + SLACK_S)
        assert time.monotonic() - start < timeout + SLACK_S
        assert codes[3] == -signal.SIGKILL and codes[:3] == [1, 1, 1], s.results()
    finally:
        s.kill()
