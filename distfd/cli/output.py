"""Writing results: images atomically and durably, byte counts for people."""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from . import checks

logger = logging.getLogger("distfd")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk that closes every PNG


def _owner() -> str:
    """This process on this host, as written in its temporary files' names."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return f"{host}-{os.getpid()}"


def _atomically(path: Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write`` a temporary file in the same folder (named after this host and process, so that
    processes sharing the folder never touch each other's), then rename it to ``path``. ``durable``:
    the file and then its folder are flushed to disk, so a crash after return cannot leave it empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_owner()}.tmp")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files that processes of this host left in ``folder`` when they were killed
    (others' files, of other hosts or of live processes, are left alone); how many were deleted."""
    host = _owner().rsplit("-", 1)[0]
    removed = 0
    for tmp in folder.glob(f".*.{host}-*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_complete_png(path: Path) -> bool:
    """Whether ``path`` is a PNG written to its end (signature first, the IEND chunk last)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def save_image(image, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    fmt = checks.image_format(path)
    _atomically(path, lambda tmp: image.save(tmp, format=fmt))


def png_bytes(image) -> bytes:
    """The image as PNG, the very bytes ``save_image`` writes to a .png file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_atomic(data: bytes, path: Path, durable: bool = False) -> None:
    """Write ``data`` atomically: a temporary file in the same folder, then a rename (``durable``:
    flushed to disk with its folder before this returns)."""
    _atomically(path, lambda tmp: tmp.write_bytes(data), durable)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
