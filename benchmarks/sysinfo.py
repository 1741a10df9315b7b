"""Host/device facts and a background GPU utilisation sampler (nvidia-ml-py)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

try:  # nvidia-ml-py
    import pynvml
except ImportError:  # pragma: no cover - listed as a dependency
    pynvml = None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import distfd

        out["distfd"] = getattr(distfd, "__version__", "unknown")
    except ImportError:
        out["distfd"] = "not installed"
    try:
        from importlib.metadata import version

        out["DeepCache"] = version("DeepCache")
    except Exception:  # noqa: BLE001 - optional package
        out["DeepCache"] = "not installed"
    return out


def _nvml_device_facts(index: int) -> dict[str, Any]:
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(h)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else name,
        "memory_total_bytes": int(mem.total),
        "memory_used_bytes": int(mem.used),
    }


def host_facts(
    device: torch.device, argv: list[str] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Everything recorded with every result: versions, command, time, CPU and GPU facts."""
    facts: dict[str, Any] = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *(argv if argv is not None else sys.argv)]),
        "seed": seed,
        "versions": _versions(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "hostname": platform.node(),
        "load_average_1_5_15": list(os.getloadavg()),
        "device": str(device),
        "gpu_present": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["cuda"] = {"torch_cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name(device)}
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            facts["nvml"] = {
                "driver": drv.decode() if isinstance(drv, bytes) else drv,
                "devices": [_nvml_device_facts(i) for i in range(pynvml.nvmlDeviceGetCount())],
            }
        except pynvml.NVMLError as e:
            facts["nvml"] = {"error": f"NVML unavailable: {e}"}
    else:
        facts["nvml"] = {"error": "nvidia-ml-py not installed"}
    return facts


class GpuSampler:
    """Samples GPU utilisation and memory in use every ``interval`` s in a daemon thread."""

    def __init__(self, index: int = 0, interval: float = 0.1):
        self.index, self.interval = index, interval
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> GpuSampler:
        """Start sampling; re-entering appends to the same sample list."""
        self._stop.clear()
        if pynvml is None:
            self.error = "nvidia-ml-py not installed"
            return self
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except pynvml.NVMLError as e:
            self.error = f"NVML unavailable: {e}"
            return self
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
                self.samples.append((int(util.gpu), int(mem.used)))
            except pynvml.NVMLError as e:  # pragma: no cover - hardware dependent
                self.error = str(e)
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"available": False, "reason": self.error or "no samples (no GPU present)"}
        util = [s[0] for s in self.samples]
        mem = [s[1] for s in self.samples]
        return {
            "available": True,
            "n_samples": len(util),
            "interval_s": self.interval,
            "util_pct_mean": sum(util) / len(util),
            "util_pct_max": max(util),
            "memory_used_bytes_max": max(mem),
        }
