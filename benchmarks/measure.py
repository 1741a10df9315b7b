"""Timing, memory and FLOP measurement primitives (no CLI, no I/O besides /proc)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleTimer:
    """Accumulates wall time spent inside ``module.__call__`` (forward pre/post hooks).

    Re-entrant calls are counted once (outermost call only). On CUDA the device is synchronised
    at entry and exit so the time covers the kernels launched by the forward.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._t0 = self._c0 = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, *_: Any) -> None:
        if self._depth == 0:
            sync(self.device)
            self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._depth += 1

    def _post(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync(self.device)
            self.seconds += time.perf_counter() - self._t0
            self.cpu_seconds += time.process_time() - self._c0
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.cpu_seconds, self.calls, self._depth = 0.0, 0.0, 0, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _read_vmhwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory between ``reset()`` and ``read()``.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: process peak RSS (VmHWM), reset through
    ``/proc/self/clear_refs`` (Linux >= 4.0); if the reset is not permitted the reading is the
    process-lifetime peak and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "cpu_peak_rss_process_lifetime"

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _read_vmhwm()


def _sdpa_cpu_flop(
    query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU flash-attention kernel.

    torch registers FLOP formulas for the CUDA SDPA kernels (flash, efficient, cuDNN) but not for
    ``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU attention matmuls would be
    silently missing; the same formula as the CUDA kernels is used for it here.
    """
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under ``FlopCounterMode`` and return (total FLOPs, result).

    FlopCounterMode counts one multiply-add as 2 FLOPs (matmul, conv, SDPA); elementwise ops
    (norms, activations, scheduler arithmetic) are not counted.
    """
    mode = flop_counter()
    with mode:
        out = fn()
    return int(mode.get_total_flops()), out


def summarize(samples: list[float]) -> dict[str, float | int]:
    """Median, quartiles, min/max, mean of a non-empty sample list."""
    if not samples:
        raise ValueError("no samples")
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "mean": statistics.fmean(xs),
        "n": len(xs),
        "samples": list(samples),
    }


def timed_call(run: Callable[[], Any], timer: ModuleTimer, device: torch.device) -> dict[str, Any]:
    """One timed call of ``run``: wall and process-CPU seconds, whole call and inside the denoiser.

    Process CPU time (``time.process_time``) is reported next to wall time because on a shared,
    oversubscribed CPU host the wall time mostly measures the other jobs; on GPU only wall time
    (with synchronisation) is meaningful.
    """
    mem = PeakMemory(device)
    mem.reset()
    before = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    timer.reset()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    sync(device)
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "den_wall_s": timer.seconds,
        "den_cpu_s": timer.cpu_seconds,
        "calls": timer.calls,
        "peak_memory_bytes": mem.read(),
        "peak_memory_kind": mem.kind,
        "memory_before_bytes": before,
        "output": out,
    }


def summarize_calls(calls: list[dict[str, Any]], images_per_call: int = 1) -> dict[str, Any]:
    """Per-image summaries of a list of ``timed_call`` results."""
    per = lambda key: summarize([c[key] / images_per_call for c in calls])  # noqa: E731
    peaks = [c["peak_memory_bytes"] for c in calls if c["peak_memory_bytes"] is not None]
    return {
        "pipeline_s": per("wall_s"),
        "denoiser_s": per("den_wall_s"),
        "pipeline_cpu_s": per("cpu_s"),
        "denoiser_cpu_s": per("den_cpu_s"),
        "denoiser_calls": calls[-1]["calls"],
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": calls[-1]["peak_memory_kind"],
    }
