"""Writing results: images atomically, byte counts for people."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

from . import checks


def _atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file in the same folder, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_image(image, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    fmt = checks.image_format(path)
    _atomically(path, lambda tmp: image.save(tmp, format=fmt))


def png_bytes(image) -> bytes:
    """The image as PNG, the very bytes ``save_image`` writes to a .png file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` atomically: a temporary file in the same folder, then a rename."""
    _atomically(path, lambda tmp: tmp.write_bytes(data))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
