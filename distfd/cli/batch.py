"""Batch jobs: ``distfd generate --prompts-file FILE --out-dir DIR`` on one loaded Session.

- A line is a prompt, or a JSON object of ImageRequest fields; the command-line values are the
  defaults. Blank lines and lines starting with ``#`` are skipped. A bad line is reported with its
  number and skipped; the job goes on.
- Image ``NNNNN-<digest>.png`` for line NNNNN (the digest covers the request and the session settings,
  so an edited line or another model makes a new image); ``manifest.jsonl`` gets one JSON line per
  image written: request, settings, seconds, key steps, bytes sent by rank 0.
- Resumable: an image already in the manifest (and on disk) is skipped. An image is written to a
  temporary file and renamed, then listed, so the manifest never lists a half-written file.
- SIGTERM (Slurm preemption or time limit, ``scancel``): the current image is finished and listed,
  then every rank exits with 0; a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..request import ImageRequest
from . import checks
from .options import UsageError, request_from_args
from .output import save_image

logger = logging.getLogger("distfd")

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Item:
    line: int
    request: ImageRequest
    id: str

    @property
    def file(self) -> str:
        return f"{self.id}.png"


def parse_line(text: str, defaults: ImageRequest) -> ImageRequest | None:
    """One line of a prompts file: None for a blank or ``#`` line; ValueError/TypeError if bad."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from e
        return ImageRequest.from_mapping(data, defaults)
    return ImageRequest.from_mapping({"prompt": stripped}, defaults)


def read_items(path: Path, defaults: ImageRequest, session) -> tuple[list[Item], list[str]]:
    """The file's requests, checked against the model; and one message per bad line."""
    items, problems = [], []
    settings = session.settings()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --prompts-file {path}: {e}") from e
    for number, text in enumerate(lines, start=1):
        try:
            req = parse_line(text, defaults)
            if req is None:
                continue
            req = session.check(req)
        except (ValueError, TypeError) as e:
            problems.append(f"{path}:{number}: {e} (line skipped)")
            continue
        items.append(Item(number, req, f"{number:05d}-{req.digest(settings)[:10]}"))
    return items, problems


def read_manifest(out_dir: Path) -> set[str]:
    """Ids of images listed in the manifest whose file is on disk."""
    done: set[str] = set()
    path = out_dir / MANIFEST
    if not path.is_file():
        return done
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(text)
            if (out_dir / entry["file"]).is_file():
                done.add(entry["id"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: unreadable manifest line ignored (its image will be redone)", path, number)
    return done


def append_manifest(out_dir: Path, entry: dict[str, Any]) -> None:
    with open(out_dir / MANIFEST, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


class StopFlag:
    """Set by SIGTERM/SIGINT; the ranks agree after each image, so all stop at the same one."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        if self.signal is None:
            logger.warning(
                "received %s: finishing the current image, then stopping (Ctrl-C again stops at once)",
                signal.Signals(signum).name,
            )
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_batch(session, args) -> int:
    from tqdm.auto import tqdm

    ctx = session.ctx
    out_dir: Path = args.out_dir
    defaults = request_from_args(args)
    items, problems = read_items(args.prompts_file, defaults, session)
    if ctx.is_main:
        for text in problems:
            logger.warning("%s", text)
        if args.model is None:
            for item in items:
                checks.warn_vocabulary(
                    item.request.prompt, item.request.negative_prompt, f"{args.prompts_file}:{item.line}: "
                )
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a killed run
            stale.unlink(missing_ok=True)
    # Rank 0's view of what is done decides for every rank (only rank 0 writes).
    done = ctx.broadcast_object(read_manifest(out_dir) if ctx.is_main else None)
    todo = [item for item in items if item.id not in done]
    if ctx.is_main:
        logger.info(
            "%d image(s) in %s: %d already done, %d to make, %d bad line(s)",
            len(items),
            args.prompts_file,
            len(items) - len(todo),
            len(todo),
            len(problems),
        )
    made, stopped = 0, False
    with StopFlag() as stop, tqdm(total=len(todo), unit="image", disable=not ctx.is_main) as bar:
        for item in todo:
            if any(ctx.all_gather_object(stop.signal is not None)):
                stopped = True
                break
            result = session.run(item.request)
            if ctx.is_main:
                save_image(result.image, out_dir / item.file)
                append_manifest(
                    out_dir,
                    {
                        "id": item.id,
                        "file": item.file,
                        "line": item.line,
                        "request": result.request.to_dict(),
                        "settings": session.settings(),
                        "seconds": round(result.seconds, 6),
                        "key_steps": result.key_steps,
                        "bytes_sent": result.stats.get("bytes_sent", 0),
                        "world_size": ctx.world_size,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
            made += 1
            bar.update(1)
    if ctx.is_main:
        left = len(todo) - made
        if stopped:
            logger.info("stopped after %d image(s); %d left, a rerun resumes", made, left)
        else:
            logger.info(
                "done: %d image(s) made, %d in the manifest (%s)",
                made,
                len(items) - left,
                out_dir / MANIFEST,
            )
    return 0
