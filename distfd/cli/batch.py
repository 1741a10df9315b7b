"""Batch jobs: ``distfd generate --prompts-file FILE --out-dir DIR`` on one loaded pipeline per rank.

- A line is a prompt, or a JSON object of ImageRequest fields; the command-line values are the
  defaults. Blank lines and lines starting with ``#`` are skipped. A bad line (or one over the limits,
  :mod:`distfd.limits`) is reported with its number and skipped; the job goes on and exits 1 at the
  end. Every line is checked by :class:`distfd.intake.Intake`, as a service's request is. Key steps in a line
  may name a file only with ``--allow-key-step-files``.
- The images are made by the pool (:mod:`distfd.pool`): with ``--ranks-per-image K`` the ranks work as
  W/K groups, each line handed to the next free group (not a static split, so a slow group holds no
  one up); by default every image uses all ranks. ``--max-batch N`` lets a group make up to N waiting
  lines that share every field but prompt, negative prompt (all or none have one) and seed
  (``session.batch_key``) in one pipeline call. ``--shard I/N``
  takes only lines I, I+N, I+2N, ... (0-based over the file's lines), for Slurm job arrays.
- Image ``NNNNN-<digest>.png`` for line NNNNN (the digest covers the request and the session settings,
  so an edited line or another model makes a new image); rank 0 alone writes the images and the
  manifest (``manifest.jsonl``, or ``manifest.shard-I-of-N.jsonl`` for a shard), one JSON line per
  image in the order they finish: request, settings, seconds, key steps, the ranks that made it.
- Resumable: an image listed in any manifest of the folder, and on disk as a complete PNG, is
  skipped; one whose file is missing, empty or cut short is made again. An image is written to a
  temporary file named after this host and process, flushed to disk with its folder, renamed, and
  only then listed, so no manifest lists a file a crash could leave empty. Shards sharing
  ``--out-dir`` never touch each other's temporary files. With a local model folder, a rerun that
  finds nothing left to make says so and every rank exits 0 before loading the model.
- SIGTERM (Slurm preemption or time limit, ``scancel``): the images in progress are finished and
  listed, then every rank exits with 0; a rerun resumes. A failed image is reported with its line and
  left for a rerun; the job then exits 1.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..intake import Intake
from ..request import ImageRequest
from ..session import batch_key
from .options import UsageError, max_batch_from_args
from .output import is_complete_png, png_bytes, remove_stale_temporaries, write_atomic

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


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` as (I, N), 0 <= I < N; None for no shard."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise UsageError(
            f"--shard must be I/N with 0 <= I < N (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT for "
            f"an array 0..N-1); got {text!r}."
        )
    return int(i), int(n)


def manifest_name(shard: tuple[int, int] | None) -> str:
    return MANIFEST if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_items(
    path: Path, intake: Intake, settings: dict, shard: tuple[int, int] | None = None
) -> tuple[list[Item], list[str]]:
    """The file's requests (this shard's lines), each admitted by ``intake`` (the one entry for a
    request from someone else: limits, request and model checks); and one message per bad line.
    Warnings a line earns (a prompt the embedded model cannot read) are logged with its number."""
    from ..intake import RequestRefused

    items, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --prompts-file {path}: {e}") from e
    for number, text in enumerate(lines, start=1):
        if shard is not None and (number - 1) % shard[1] != shard[0]:
            continue
        try:
            admitted = intake.admit_line(text)
        except RequestRefused as e:
            problems.append(f"{path}:{number}: {e} (line skipped)")
            continue
        if admitted is None:
            continue
        for warning in admitted.warnings:
            logger.warning("%s:%d: %s", path, number, warning)
        req = admitted.request
        items.append(Item(number, req, f"{number:05d}-{req.digest(settings)[:10]}"))
    return items, problems


def read_manifest(out_dir: Path) -> set[str]:
    """Ids of images listed in any manifest of ``out_dir`` (every shard's) whose file is a complete
    PNG; an entry whose file is missing, empty or cut short (a crash) is left to be made again."""
    done: set[str] = set()
    for path in sorted(out_dir.glob("manifest*.jsonl")):
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entry = json.loads(text)
                if is_complete_png(out_dir / entry["file"]):
                    done.add(entry["id"])
                else:
                    logger.warning(
                        "%s:%d: %s is missing or incomplete; it is made again", path, number, entry["file"]
                    )
            except (ValueError, KeyError, TypeError):
                logger.warning(
                    "%s:%d: unreadable manifest line ignored (its image will be redone)", path, number
                )
    return done


def append_manifest(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Writer:
    """Rank 0's front on the pool: submits the images to make, writes each as it finishes."""

    todo: list[Item]
    out_dir: Path
    manifest: Path
    settings: dict
    world: int
    made: int = 0
    failed: int = 0
    dropped: int = 0

    def __call__(self, coordinator) -> None:
        why = "every image is done"
        try:
            self._write_all(coordinator)
        except BaseException:  # noqa: BLE001 - e.g. the disk is full: the job must end, not idle on
            logger.exception("writing the results failed; stopping")
            self.failed += 1
            why = "writing the results failed"
        finally:
            coordinator.finish(why)

    def _write_all(self, coordinator) -> None:
        from tqdm.auto import tqdm

        from ..pool import Cancelled, GenerationFailed, Unavailable

        try:  # the whole list at once: the first dispatch sees every line (--max-batch)
            submitted = coordinator.submit_many([item.request for item in self.todo])
        except Unavailable:  # stopping already
            submitted = []
        jobs = {job.future: item for job, item in zip(submitted, self.todo, strict=False)}
        with tqdm(total=len(self.todo), unit="image") as bar:
            for future in as_completed(jobs):
                item = jobs[future]
                try:
                    self._write(item, future.result())
                    self.made += 1
                except GenerationFailed as e:
                    logger.error("line %d: the image failed (%s); a rerun retries it", item.line, e)
                    self.failed += 1
                except (Unavailable, Cancelled):  # stopped before it ran
                    self.dropped += 1
                bar.update(1)
        self.dropped += len(self.todo) - len(jobs)

    def _write(self, item: Item, done) -> None:
        write_atomic(done.png, self.out_dir / item.file, durable=True)  # on disk before it is listed
        append_manifest(
            self.manifest,
            {
                "id": item.id,
                "file": item.file,
                "line": item.line,
                "request": done.request,
                "settings": self.settings,
                "seconds": round(done.seconds, 6),
                "key_steps": done.key_steps,
                "bytes_sent": done.stats.get("bytes_sent", 0),
                "world_size": self.world,
                "ranks": list(done.ranks),
                "batch": done.batch,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


def plan(args, intake: Intake, settings: dict) -> tuple[list[Item], list[Item], list[str]]:
    """Rank 0: (this shard's good lines, those still to make, one message per bad line)."""
    shard = parse_shard(args.shard)
    items, problems = read_items(args.prompts_file, intake, settings, shard)
    done = read_manifest(args.out_dir) if args.out_dir.is_dir() else set()
    return items, [item for item in items if item.id not in done], problems


def run_batch(session, args, ranks_per_image: int | None, planned) -> int:
    """Every rank: the pool over the ranks; rank 0 makes its :func:`plan` (``planned``: read once,
    None on the other ranks) and writes the results."""
    from ..pool import Pool, StopFlag

    ctx = session.ctx
    out_dir: Path = args.out_dir
    shard = parse_shard(args.shard)
    stop = StopFlag("finishing the images in progress, then stopping (Ctrl-C again stops at once)")
    pool = Pool.open(
        ctx, ranks_per_image, stop=stop, max_batch=max_batch_from_args(args), batch_key=batch_key
    )
    writer, problems = None, []
    if ctx.is_main:
        items, todo, problems = planned
        for text in problems:
            logger.warning("%s", text)
        remove_stale_temporaries(out_dir)  # this host's, of processes that are gone
        logger.info(
            "%d image(s) in %s%s: %d already done, %d to make, %d bad line(s); %s rank(s) per image",
            len(items),
            args.prompts_file,
            f" (shard {shard[0]}/{shard[1]})" if shard else "",
            len(items) - len(todo),
            len(todo),
            len(problems),
            pool.policy.label,
        )
        writer = Writer(todo, out_dir, out_dir / manifest_name(shard), session.settings(), ctx.world_size)
    with stop:
        code = pool.work(session, stop, png_bytes, writer)
    if writer is None:
        return code
    left = len(writer.todo) - writer.made
    if stop or writer.dropped:
        logger.info("stopped after %d image(s); %d left, a rerun resumes", writer.made, left)
    else:
        logger.info("done: %d image(s) made, %d failed", writer.made, writer.failed)
    if problems:
        logger.warning(
            "%d bad line(s) skipped (listed above); exiting 1 once the rest is made", len(problems)
        )
    return max(code, 1 if writer.failed or problems else 0)
