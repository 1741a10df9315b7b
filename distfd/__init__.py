"""distfd: FasterDiffusion encoder propagation and parallel decoding across GPUs.

>>> with distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps="sd-ddim-50", mode="parallel")):
...     image = pipe(prompt, num_inference_steps=50).images[0]
"""

from .adapters import supported
from .apply import Handle, apply, is_applied
from .autokey import Calibration, calibrate
from .config import FasterDiffusionConfig
from .keysteps import KeySteps, resolve_key_steps
from .presets import PRESETS, Preset
from .runtime import DistContext, DistributedError

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Calibration",
    "DistContext",
    "DistributedError",
    "FasterDiffusionConfig",
    "Handle",
    "KeySteps",
    "Preset",
    "__version__",
    "apply",
    "calibrate",
    "is_applied",
    "resolve_key_steps",
    "supported",
]
