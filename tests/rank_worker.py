"""One rank of a multi-rank test: builds a tiny pipeline, runs the cases of a JSON spec, saves latents.

Run by ``tests/multirank.py`` with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, like torchrun does.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tiny.py, and this checkout's distfd

import tiny  # noqa: E402

import distfd  # noqa: E402


def _failure_callback(fail: dict, rank: int, out: Path):
    """A step-end callback that makes this rank die or hang at a given step (its wall-clock time
    written to ``lost_at`` first)."""

    def callback(pipe, step, timestep, kwargs):
        if rank == fail["rank"] and step == fail["at_step"]:
            (out / "lost_at").write_text(repr(time.time()))
            if fail["how"] == "exit":
                os._exit(17)
            time.sleep(3600)
        return kwargs

    return callback


def _find(name: str):
    """A builder or runner: ``"sd"`` is ``tiny.sd``; ``"tiny_models.dit"`` is ``tests.tiny_models.dit``."""
    if "." not in name:
        return getattr(tiny, name)
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"tests.{module}"), attr)


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ctx = distfd.DistContext.from_env(timeout_s=spec.get("timeout_s", 60))
    out = Path(out_dir)
    try:
        for n, case in enumerate(spec["cases"]):
            pipe = _find(case.get("pipe", "sd"))(case.get("sched", "ddim"))
            config = {**case["config"], **case.get("config_by_rank", {}).get(str(ctx.rank), {})}
            handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(**config), context=ctx)
            call = dict(case.get("call", {}))
            call.update(case.get("call_by_rank", {}).get(str(ctx.rank), {}))
            if "fail" in case:
                call["callback_on_step_end"] = _failure_callback(case["fail"], ctx.rank, out)
            steps = case.get("steps_by_rank", {}).get(str(ctx.rank), case.get("steps", 10))
            latents = _find(case.get("run", "run"))(pipe, steps=steps, **call)
            torch.save({"latents": latents, "stats": handle.stats()}, out / f"case{n}_rank{ctx.rank}.pt")
            handle.remove()
    except Exception as e:  # noqa: BLE001 - the parent reads the message
        (out / f"rank{ctx.rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        sys.exit(1)
    finally:
        ctx.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
