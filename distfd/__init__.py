"""distfd: FasterDiffusion encoder propagation and parallel decoding across GPUs.

>>> handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps="sd-ddim-50", mode="parallel"))
>>> image = pipe(prompt, num_inference_steps=50).images[0]
>>> handle.remove()
"""

from .adapters import supported
from .apply import Handle, apply
from .autokey import Calibration, calibrate
from .config import FasterDiffusionConfig
from .runtime import DistContext, DistributedError
from .schedule import PRESETS, Preset, resolve_key_steps

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Calibration",
    "DistContext",
    "DistributedError",
    "FasterDiffusionConfig",
    "Handle",
    "Preset",
    "__version__",
    "apply",
    "calibrate",
    "resolve_key_steps",
    "supported",
]
