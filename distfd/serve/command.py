"""distfd serve: load the pipeline once on every rank, then answer image requests over HTTP.

Rank 0 listens (127.0.0.1:8000 by default) and queues requests, first in, first out; each request is
made by a group of ranks (--ranks-per-image: all of them by default; K for W/K images at once; auto
by queue length) exactly as distfd generate makes it on that many ranks. The generate options are the
defaults of every request. Routes: GET /health, POST /generate (a JSON body with any of prompt,
negative_prompt, seed, steps, guidance_scale, height, width, key_steps, mode; answers image/png),
POST /v1/images/generations and GET /v1/models (the OpenAI images API, n images per request:
docs/openai.md), GET /metrics (Prometheus). Every route but /health needs the bearer token when one
is set.

Each request is bounded before it is queued (--max-pixels, --max-steps, --max-prompt-chars,
--max-body-bytes) and in time (--request-timeout: 504, the image is stopped at the next step).
SIGTERM or Ctrl-C: the images in flight finish (at most --grace seconds), queued requests get 503,
every rank exits 0. A lost rank: waiting and later requests get 503, every rank exits 1 within
--timeout. Needs the serve extra: pip install 'distfd[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from ..cli.options import (
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
    world_from_env,
)

logger = logging.getLogger("distfd")

DEFAULT_MAX_IMAGES = 4  # --max-images-per-request: n of an OpenAI request (docs/openai.md)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``serve`` subcommand: every ``generate`` image and model option, plus the service's."""
    p = subparsers.add_parser(
        "serve",
        help="load the pipeline once and answer image requests over HTTP",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_request_options(p)
    add_session_options(p)
    s = p.add_argument_group("service")
    s.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on")
    s.add_argument("--port", type=int, default=8000, help="port rank 0 listens on; 0 picks a free one")
    s.add_argument(
        "--queue-size", type=int, default=16, help="requests waiting at most; more get 503 with Retry-After"
    )
    add_ranks_per_image_option(s)
    add_max_batch_option(s)
    s.add_argument(
        "--max-images-per-request",
        type=int,
        default=None,
        metavar="N",
        help="images one OpenAI request may ask for (n, each bounded like a /generate request); "
        "at most --queue-size; default: 4, or --queue-size if smaller",
    )
    s.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="a file holding the bearer token that every route but /health requires (or set $DISTFD_TOKEN)",
    )
    s.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a --host other than loopback without a token",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds from a request's arrival to its answer; past it 504, and the image stops",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="after SIGTERM, seconds the images in flight may take to finish before they are stopped",
    )
    add_limit_options(p, "each request")
    g = p.add_argument_group("limits on each request (HTTP)")
    g.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies get 413")
    g.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds to receive a request body; past it 408"
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds for a request head to arrive on a connection; past it the connection closes",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at most; a new one evicts the oldest that has sent no request yet",
    )
    add_common_options(p)
    p.set_defaults(run=run)
    return p


def _up_front(args):
    """Checks before the ranks join: options, the default request, the model folder, the token."""
    from ..cli import checks
    from ..pool import parse_ranks_per_image
    from .auth import check_exposure, load_token

    missing = [
        m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UsageError(
            f"distfd serve needs {', '.join(missing)}; install the serve extra: "
            "pip install 'distfd[serve]' (from a checkout: pip install -e \".[serve]\")."
        )
    defaults = request_from_args(args)
    if args.queue_size < 1:
        raise UsageError(f"--queue-size must be >= 1; got {args.queue_size}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535; got {args.port}.")
    max_images_from_args(args)
    if args.max_body_bytes < 1:
        raise UsageError(f"--max-body-bytes must be >= 1; got {args.max_body_bytes}.")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be >= 1; got {args.max_connections}.")
    checks.check_seconds("--request-timeout", args.request_timeout)
    checks.check_seconds("--body-timeout", args.body_timeout)
    checks.check_seconds("--header-timeout", args.header_timeout)
    checks.check_seconds("--grace", args.grace, allow_zero=True)
    limits = limits_from_args(args)
    max_batch_from_args(args)
    try:
        ranks_per_image = parse_ranks_per_image(args.ranks_per_image, world_from_env())
        token = load_token(args.token_file)
        check_exposure(args.host, token, args.insecure_no_auth)
    except ValueError as e:
        raise UsageError(str(e)) from e
    checks.check_engine_options(args)
    checks.check_model(args.model)
    checks.check_device(args.device)
    return hide_preset_path(defaults), limits, ranks_per_image, token


def hide_preset_path(defaults):
    """The operator's ``--key-steps FILE``, read once at start, named in clients' messages without
    its path (a request with other steps is refused naming 'the service's default key steps')."""
    import dataclasses

    from ..keysteps import KeySteps

    if isinstance(defaults.key_steps, KeySteps):
        hidden = dataclasses.replace(
            defaults.key_steps, source="the service's default key steps (--key-steps)"
        )
        return dataclasses.replace(defaults, key_steps=hidden)
    return defaults


def max_images_from_args(args) -> int:
    """``--max-images-per-request`` (None: 4, or ``--queue-size`` if smaller); at most the queue."""
    if args.max_images_per_request is None:
        return min(DEFAULT_MAX_IMAGES, args.queue_size)
    if not 1 <= args.max_images_per_request <= args.queue_size:
        raise UsageError(
            f"--max-images-per-request must be from 1 to --queue-size ({args.queue_size}); "
            f"got {args.max_images_per_request}."
        )
    return args.max_images_per_request


def _listen(args):
    """Rank 0 binds its socket before the ranks join, so a taken port stops every rank at once."""
    from .server import ConnectionBounds, HttpServer

    bounds = ConnectionBounds(args.header_timeout, args.body_timeout, args.max_connections)
    try:
        return HttpServer(args.host, args.port, bounds), None
    except OSError as e:
        return None, str(e)


def _model_name(model: str | None) -> str:
    """What /health says of the model: a hub id, or a local folder's name only (no server paths)."""
    from ..embedded import MODELS

    if model is None or model in MODELS:
        return f"embedded:{MODELS[model or 'embedded']}"
    return Path(model).name if Path(model).expanduser().exists() else model


def intake_for(session, defaults, limits, model: str | None):
    """The one entry for requests from others (:mod:`distfd.intake`) on a loaded ``session``: on the
    embedded model, a prompt it cannot read earns a warning for the client and the log."""
    from ..cli import checks
    from ..intake import Intake

    earned = checks.request_warning(model)

    def warn(req):
        warning = earned(req)
        if warning:
            logger.warning("a request: %s", warning)
        return warning

    return Intake(defaults, limits, session.check, session.facts, warn if earned else None)


def run(args) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 on every rank) or a lost rank (exit 1 on every rank)."""
    from ..cli.output import png_bytes
    from ..pool import Pool, StopFlag
    from ..session import batch_key

    problem = None
    try:
        defaults, limits, ranks_per_image, token = _up_front(args)
    except UsageError as e:
        if world_from_env() == 1:
            raise
        problem, defaults = str(e), None
    http = None
    if rank_from_env() == 0 and problem is None:
        http, problem = _listen(args)
    ctx = context_from_args(args)
    code = 1
    try:
        problems = ctx.all_gather_object(problem)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            rank, text = next(((r, p) for r, p in bad if r == ctx.rank), bad[0])
            ctx.close()  # every rank stops here, together
            raise UsageError(text if rank == ctx.rank else f"rank {rank} cannot serve: {text}")
        stop = StopFlag()
        metrics = None
        if ctx.is_main:
            from .metrics import Metrics

            metrics = Metrics(
                lambda: pool.coordinator.depth(), lambda: pool.coordinator.in_flight, ctx.world_size
            )
        pool = Pool.open(
            ctx,
            ranks_per_image,
            stop=stop,
            queue_size=args.queue_size,
            grace_s=args.grace,
            hooks=metrics,
            max_batch=max_batch_from_args(args),
            batch_key=batch_key,
        )
        session = intake = None
        if ctx.is_main:
            from .app import build_app
            from .front import FrontSettings

            def admit(data: dict):
                return intake.admit(data)  # only called while serving, so after the intake below exists

            def info() -> dict:
                return {
                    "world_size": ctx.world_size,
                    "model": _model_name(args.model),
                    "ranks_per_image": pool.policy.label,
                    "last_ranks_per_image": pool.coordinator.last_size,
                    "max_batch": max_batch_from_args(args),
                    "limits": {
                        **limits.as_dict(),
                        "max_body_bytes": args.max_body_bytes,
                        "body_timeout_s": args.body_timeout,
                        "header_timeout_s": args.header_timeout,
                        "max_connections": args.max_connections,
                        "request_timeout_s": args.request_timeout,
                        "queue_size": args.queue_size,
                        "max_images_per_request": max_images_from_args(args),
                    },
                }

            settings = FrontSettings(
                args.max_body_bytes,
                args.body_timeout,
                args.request_timeout,
                token,
                model=_model_name(args.model),
                max_images_per_request=max_images_from_args(args),
            )
            http.start(build_app(pool.coordinator, metrics, admit, info, settings))  # /health: "loading"
        session = session_from_args(args, ctx, bound_parallel=True)
        try:
            defaults = session.check(defaults)
            limits = limits.for_model(session.facts)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        intake = intake_for(session, defaults, limits, args.model)
        session.warmup()
        # From here SIGTERM/SIGINT only set a flag (while loading they stop the process as usual).
        with stop:
            code = pool.work(session, stop, png_bytes)
    finally:
        if http is not None:
            http.stop()
        if code == 0 and ctx.world_size == 1:
            ctx.close()
    if ctx.world_size > 1:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a rank of several at once, once its loop has ended (stopped or a rank lost).

    The ranks leave at slightly different moments, and gloo's worker threads can then abort a process
    while it tears the group down or finalises the interpreter (SIGABRT, "terminate called without an
    active exception"), turning a clean exit 0, or the intended exit 1, into -6. Every collective of the
    service has completed (or failed) by now, so nothing is lost by leaving without that teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
