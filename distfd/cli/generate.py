"""distfd generate: one image (optionally timed against vanilla), or a batch from a prompts file.

Order of work: every argument is checked (request, output path, model folder, device, sizes against
the model's configs) before the ranks join; the ranks then compare their arguments and anyone's
failed check, so all of them stop together; only then is the pipeline loaded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

from .. import compiling, samplers
from ..embedded import is_embedded
from . import checks
from .options import (
    HelpFormatter,
    UsageError,
    add_common_options,
    add_limit_options,
    add_max_batch_option,
    add_ranks_per_image_option,
    add_request_options,
    add_session_options,
    context_from_args,
    limits_from_args,
    max_batch_from_args,
    rank_from_env,
    request_from_args,
    session_from_args,
    session_kwargs,
    world_from_env,
)
from .output import fmt_bytes, save_image

logger = logging.getLogger("distfd")


def add_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "generate",
        help="make one image (or a batch from --prompts-file) with FasterDiffusion or vanilla",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_request_options(g)
    add_session_options(g)
    out = g.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("out.png"), help="image file (one image)")
    out.add_argument(
        "--compare",
        action="store_true",
        help="also time the vanilla pipeline with the same seed: each method's first (cold) call, "
        "then --reps calls of each, interleaved",
    )
    out.add_argument("--reps", type=int, default=3, help="timed calls per method with --compare")
    batch = g.add_argument_group("batch (one image per line of a prompts file)")
    batch.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="one prompt per line, or JSON objects with per-image fields (prompt, negative_prompt, "
        "seed, steps, guidance_scale, height, width, key_steps, mode); the options above are defaults",
    )
    batch.add_argument("--out-dir", type=Path, default=None, help="where the PNGs and manifest.jsonl go")
    add_ranks_per_image_option(batch)
    add_max_batch_option(batch)
    batch.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="make only lines I, I+N, I+2N, ... (0-based), e.g. one task of a Slurm job array",
    )
    batch.add_argument(
        "--allow-key-step-files",
        action="store_true",
        help="let key_steps in a line name a preset .json file on this machine",
    )
    add_limit_options(g, "each line of --prompts-file")
    add_common_options(g)
    g.set_defaults(run=run)
    return g


def _up_front(args) -> tuple[Any, Path | None]:
    """Every check that needs no loaded model; returns the request (sizes filled where known)."""
    from ..pool import parse_ranks_per_image
    from ..request import ModelFacts
    from .batch import parse_shard

    request = request_from_args(args)
    if args.reps < 1:
        raise UsageError(f"--reps must be >= 1; got {args.reps}.")
    limits_from_args(args)
    checks.check_engine_options(args)
    if args.prompts_file is None:
        given_flags = (
            ("--ranks-per-image", args.ranks_per_image),
            ("--shard", args.shard),
            ("--max-batch", args.max_batch),
        )
        for flag, given in given_flags:
            if given is not None:
                raise UsageError(
                    f"{flag} is for batches (--prompts-file); drop it for one image (which uses every rank)."
                )
    else:
        try:
            parse_ranks_per_image(args.ranks_per_image, world_from_env())
        except ValueError as e:
            raise UsageError(str(e)) from e
        parse_shard(args.shard)
        max_batch_from_args(args)
    if args.prompts_file is not None:
        if args.out_dir is None:
            raise UsageError("--prompts-file needs --out-dir (where the images and manifest.jsonl go).")
        if args.compare:
            raise UsageError("--compare times one image; drop it with --prompts-file.")
    if args.compare and request.mode == "off":
        raise UsageError("--compare times distfd against vanilla; drop --mode off.")
    if (problem := compiling.check_arguments(args)) is not None:
        raise UsageError(problem)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise UsageError(f"--prompts-file {args.prompts_file}: no such file.")
        if rank_from_env() == 0:
            checks.writable_dir(args.out_dir, "--out-dir")
    elif args.out_dir is not None:
        raise UsageError("--out-dir is for --prompts-file; for one image use --out FILE.")
    elif rank_from_env() == 0:
        checks.check_output_file(args.out)
    folder = checks.check_model(args.model)
    checks.check_device(args.device)
    if is_embedded(args.model) and args.prompts_file is None:
        checks.warn_vocabulary(request.prompt, request.negative_prompt)
    if folder is None:  # a hub id: the model's checks run once it is loaded
        return request, None
    try:
        facts = ModelFacts.from_folder(folder)
        # No --scheduler: the model's default (flow-euler for FLUX/SD3), fixed before the settings
        # that name it are digested (batch image names) or compared across ranks.
        args.scheduler = samplers.resolve(args.scheduler, facts.scheduler_config)
        request = folder_check(args, facts)(request)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    return request, folder


def folder_check(args, facts):
    """The model's checks of a request from its folder's configs, before any weight loads (what
    ``Session.check`` does once the model is loaded)."""
    from .. import samplers
    from ..request import check_for_model
    from ..session import default_key_steps

    length = None
    scheduler = samplers.resolve(args.scheduler, facts.scheduler_config)
    if facts.scheduler_config is not None:

        def length(steps: int) -> int:
            return samplers.loop_length(scheduler, facts.scheduler_config, steps)

    def check(request):
        spec = request.key_steps
        if spec is None and request.mode != "off":
            spec = default_key_steps(args.model, scheduler, request.steps)[0]
        return check_for_model(request, facts, loop_length=length, key_steps=spec)

    return check


def batch_intake(args, check, facts):
    """The one entry (:mod:`distfd.intake`) for the lines of ``--prompts-file``: the command line's
    values as defaults, its limits, ``check`` the model's checks; on the embedded model a prompt it
    cannot read earns a warning."""
    from ..intake import Intake

    limits = limits_from_args(args, key_step_files=args.allow_key_step_files)
    return Intake(request_from_args(args), limits, check, facts, checks.request_warning(args.model))


def _plan_before_loading(args, folder: Path | None):
    """Rank 0, batches on a local model folder: the batch's plan (:func:`.batch.plan`), made from the
    folder's configs before any weight loads and used as it is once the model has loaded; None where
    the plan needs the loaded model (a hub id), and on the other ranks."""
    if args.prompts_file is None or folder is None or rank_from_env() != 0:
        return None
    from ..request import ModelFacts
    from ..session import settings_of
    from .batch import plan

    facts = ModelFacts.from_folder(folder)
    intake = batch_intake(args, folder_check(args, facts), facts)
    planned = plan(args, intake, settings_of(**session_kwargs(args)))
    items, todo, problems = planned
    if not todo:
        for text in problems:
            logger.warning("%s", text)
        logger.info(
            "nothing left to make: %d image(s) of %s already done, %d bad line(s); not loading the model",
            len(items),
            args.prompts_file,
            len(problems),
        )
    return planned


def _left_to_make(planned) -> int | None:
    """Images still to make in rank 0's plan, or minus the number of bad lines when nothing else is;
    None without a plan."""
    if planned is None:
        return None
    _, todo, problems = planned
    return len(todo) if todo or not problems else -len(problems)


def _join(args, problem: str | None, left: int | None = None):
    """Join the ranks; every rank learns of any rank's failed check and of differing arguments, and
    of rank 0's count of images left to make (a batch)."""
    from ..session import check_same_on_all_ranks

    ctx = context_from_args(args)
    try:
        if ctx.world_size > 1:
            problems = ctx.all_gather_object(problem)
            bad = [(r, p) for r, p in enumerate(problems) if p]
            if bad:
                rank, text = bad[0]
                raise UsageError(text if rank == ctx.rank else f"rank {rank} refused the arguments: {text}")
            fingerprint = {**request_from_args(args).to_dict(), **session_kwargs(args)}
            fingerprint.update(prompts_file=str(args.prompts_file) if args.prompts_file else None)
            check_same_on_all_ranks(ctx, fingerprint, "arguments")
            if args.prompts_file is not None:
                left = ctx.broadcast_object(left, src=0)
    except BaseException:
        ctx.close()
        raise
    return ctx, left


def run(args) -> int:
    problem, planned = None, None
    try:
        request, folder = _up_front(args)
        planned = _plan_before_loading(args, folder)
    except UsageError as e:
        if world_from_env() == 1:
            raise
        problem, request = str(e), None
    ctx, left = _join(args, problem, _left_to_make(planned))
    try:
        batch = args.prompts_file is not None
        if batch and left is not None and left <= 0:  # a rerun with nothing left: no rank loads the model
            return 1 if left < 0 and ctx.is_main else 0  # < 0: only bad lines are left
        session = session_from_args(
            args, ctx, step_progress=not (batch or args.compare), bound_parallel=batch
        )
        if batch:
            from ..pool import parse_ranks_per_image
            from .batch import plan, run_batch

            if ctx.is_main and planned is None:  # a hub model: its lines are checked once it is loaded
                planned = plan(args, batch_intake(args, session.check, session.facts), session.settings())
            return run_batch(
                session, args, parse_ranks_per_image(args.ranks_per_image, ctx.world_size), planned
            )
        try:
            request = session.check(request)  # a hub model's checks, now that it is loaded
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        if args.compare:
            return _compare(session, request, args)
        session.warmup()
        compiling.warm_compiled(session, request, args)  # --compile: every pass shape before timing
        result = session.run(request)
        if ctx.is_main:
            save_image(result.image, args.out)
            print(_summary(session, result, args))
        return 0
    finally:
        ctx.close()


def _header(session, req, args) -> str:
    ctx = session.ctx
    return (
        f"wrote {args.out}  ({req.width}x{req.height}, {req.steps} steps {session.scheduler}, "
        f"{ctx.world_size} rank(s) on {ctx.device})"
    )


def _comm(result) -> list[str]:
    s = result.stats
    lines = [
        f"key steps {result.key_steps}; encoder passes {s['encoder_passes']}, decoder passes "
        f"{s['decoder_passes']}, collectives {s['collectives']}, sent by rank 0 "
        f"{fmt_bytes(s['bytes_sent'])} per image"
    ]
    if s.get("bytes_per_key_step"):
        lines.append(
            "bytes per key step (rank 0): "
            + ", ".join(f"{k}: {fmt_bytes(v)}" for k, v in s["bytes_per_key_step"].items())
        )
    return lines


def _summary(session, result, args) -> str:
    req = result.request
    label = "vanilla" if req.mode == "off" else f"distfd {req.mode}"
    lines = [_header(session, req, args), f"{label}: {result.seconds:.3f} s (one call after a warm-up)"]
    if req.mode != "off":
        lines += _comm(result)
    return "\n".join(lines)


def _compare(session, request, args) -> int:
    """Vanilla against distfd on the same seed: cold first calls apart, then interleaved reps."""
    import dataclasses

    import torch

    ctx = session.ctx
    fast = request if request.mode != "off" else dataclasses.replace(request, mode="parallel")
    vanilla = dataclasses.replace(fast, mode="off", key_steps=None)
    methods = {"vanilla": vanilla, f"distfd {fast.mode}": fast}
    cold = {name: session.run(req).seconds for name, req in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    last = None
    for rep in range(args.reps):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))
        for name in order:
            result = session.run(methods[name])
            times[name].append(result.seconds)
            if name != "vanilla":
                last = result
    if not ctx.is_main:
        return 0
    save_image(last.image, args.out)
    med = {name: statistics.median(t) for name, t in times.items()}
    lines = [_header(session, fast, args), f"seconds per image, median of {args.reps} calls (range):"]
    for name, t in times.items():
        lines.append(f"  {name:<16} {med[name]:8.3f} s  ({min(t):.3f} .. {max(t):.3f})")
    v, f = med["vanilla"], med[f"distfd {fast.mode}"]
    ratio = v / f if f > 0 else float("inf")
    verdict = "faster" if ratio >= 1 else "slower"
    lines.append(f"  speed-up: {ratio:.2f}x ({verdict}: distfd took {f / v:.0%} of vanilla's time)")
    # The figure moves with the threads per rank and with whatever else the machine runs.
    lines.append(
        f"  torch threads per rank: {torch.get_num_threads()} (the speed-up depends on threads and load)"
    )
    lines.append(
        "first (cold) calls, not in the figures above: "
        + ", ".join(f"{name} {s:.3f} s" for name, s in cold.items())
    )
    lines += _comm(last)
    print("\n".join(lines))
    return 0
