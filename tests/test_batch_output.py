"""Batch output that survives crashes and neighbours: temporary files per host and process, images on
disk before the manifest names them, and a resume that remakes what a crash cut short."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distfd.cli import output
from distfd.cli.batch import read_manifest
from distfd.cli.output import is_complete_png, png_bytes, remove_stale_temporaries, write_atomic

from . import tiny


def _png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("RGB", (4, 4), (1, 2, 3)))


def test_temporaries_of_other_hosts_and_live_processes_are_left_alone(tmp_path):
    host = output._owner().rsplit("-", 1)[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    mine_dead = tmp_path / f".00001-a.png.{host}-{dead_pid}.tmp"
    mine_live = tmp_path / f".00002-b.png.{host}-{os.getpid()}.tmp"
    other_host = tmp_path / f".00003-c.png.othernode-{dead_pid}.tmp"
    for f in (mine_dead, mine_live, other_host):
        f.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not mine_dead.exists() and mine_live.exists() and other_host.exists()


def test_a_durable_write_is_flushed_before_it_is_renamed(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(output.os, "fsync", fsync)
    target = tmp_path / "00001-x.png"
    write_atomic(_png(), target, durable=True)
    assert target.read_bytes() == _png()
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)  # the file, then its folder
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_missing_empty_or_cut_png_is_made_again_on_resume(tmp_path):
    png = _png()
    files = {"a": png, "b": b"", "c": png[: len(png) // 2], "d": None, "e": png}
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for name, data in files.items():
            if data is not None:
                (tmp_path / f"{name}.png").write_bytes(data)
            f.write(json.dumps({"id": name, "file": f"{name}.png"}) + "\n")
    assert read_manifest(tmp_path) == {"a", "e"}
    assert is_complete_png(tmp_path / "a.png") and not is_complete_png(tmp_path / "c.png")


def test_shards_sharing_a_folder_keep_each_others_temporaries(tmp_path):
    """A shard starting in a folder where another shard (a live process of this host) is writing."""
    model = tmp_path / "tiny-sd"
    tiny.sd().save_pretrained(model)
    host = output._owner().rsplit("-", 1)[0]
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / "out" / f".00002-x.png.{host}-{neighbour.pid}.tmp"
        theirs.parent.mkdir()
        theirs.write_bytes(b"being written")
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red circle\na blue square\n")
        argv = ["generate", "--model", str(model), "--steps", "2", "--height", "16", "--width", "16"]
        argv += ["--key-steps", "0", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "out")]
        from distfd.cli import main

        assert main([*argv, "--shard", "0/2"]) == 0
        assert theirs.read_bytes() == b"being written"
    finally:
        neighbour.kill()
        neighbour.wait()
