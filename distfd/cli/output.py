"""Writing results: images atomically, byte counts for people."""

from __future__ import annotations

import os
from pathlib import Path

from . import checks


def save_image(image, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    fmt = checks.image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
