"""distfd: FasterDiffusion encoder propagation and parallel decoding across GPUs.

>>> with distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps="sd-ddim-50", mode="parallel")):
...     image = pipe(prompt, num_inference_steps=50).images[0]

The names below load on first use, so ``import distfd.cli`` (and ``distfd --help``) stay fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "PRESETS": ".presets",
    "Calibration": ".autokey",
    "DistContext": ".runtime",
    "DistributedError": ".runtime",
    "FasterDiffusionConfig": ".config",
    "Handle": ".apply",
    "KeySteps": ".keysteps",
    "Preset": ".presets",
    "apply": ".apply",
    "calibrate": ".autokey",
    "is_applied": ".apply",
    "resolve_key_steps": ".keysteps",
    "supported": ".adapters",
}

if TYPE_CHECKING:
    from .adapters import supported
    from .apply import Handle, apply, is_applied
    from .autokey import Calibration, calibrate
    from .config import FasterDiffusionConfig
    from .keysteps import KeySteps, resolve_key_steps
    from .presets import PRESETS, Preset
    from .runtime import DistContext, DistributedError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distfd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package: ``distfd.apply`` must stay the function even
    after ``distfd/apply.py`` is imported (by ``from distfd.apply import Handle``, say)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
