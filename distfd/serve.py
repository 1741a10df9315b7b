"""distfd serve: load the pipeline once on every rank, then answer image requests over HTTP.

Rank 0 listens (127.0.0.1:8000 by default) and queues requests, first in, first out; each request is
handed to every rank and run exactly as distfd generate runs it (the same Session). The generate
options are the defaults of every request. Routes: GET /health, POST /generate (a JSON body with any
of prompt, negative_prompt, seed, steps, guidance_scale, height, width, key_steps, mode; answers
image/png with the X-Generation-Seconds header), GET /metrics (Prometheus).

SIGTERM or Ctrl-C: the request in flight finishes, the queued ones get 503, every rank exits 0.
A lost rank: waiting and later requests get 503, every rank exits 1 within --timeout.
Needs the serve extra: pip install 'distfd[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys

from .cli.options import (
    HelpFormatter,
    UsageError,
    add_common_options,
    add_request_options,
    add_session_options,
    context_from_args,
    rank_from_env,
    request_from_args,
    session_from_args,
)

logger = logging.getLogger("distfd")


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
    add_common_options(p)
    p.set_defaults(run=run)
    return p


def _up_front(args):
    """Checks before the ranks join: the default request, the service options, the model folder."""
    from .cli import checks

    missing = [
        m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UsageError(
            f"distfd serve needs {', '.join(missing)}; install the serve extra: pip install 'distfd[serve]'."
        )
    defaults = request_from_args(args)
    if args.queue_size < 1:
        raise UsageError(f"--queue-size must be >= 1; got {args.queue_size}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535; got {args.port}.")
    checks.check_model(args.model)
    checks.check_device(args.device)
    return defaults


def _listen(args):
    """Rank 0 binds its socket before the ranks join, so a taken port stops every rank at once."""
    from .serve_http import HttpServer

    try:
        return HttpServer(args.host, args.port), None
    except OSError as e:
        return None, str(e)


def run(args) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 on every rank) or a lost rank (exit 1 on every rank)."""
    from .cli import checks
    from .request import ImageRequest
    from .serve_loop import Dispatcher, RankLoop, StopFlag

    defaults = _up_front(args)
    http, problem = _listen(args) if rank_from_env() == 0 else (None, None)
    ctx = context_from_args(args)
    session = None
    code = 1
    previous: dict = {}
    try:
        problems = ctx.all_gather_object(problem)
        if problems[0]:
            raise UsageError(problems[0] if ctx.is_main else f"rank 0 cannot serve: {problems[0]}")
        dispatcher = metrics = None
        if ctx.is_main:
            from .serve_http import build_app
            from .serve_metrics import Metrics

            dispatcher = Dispatcher(args.queue_size)
            metrics = Metrics(dispatcher.depth, ctx.world_size)

            def validate(data: dict):
                # Only called while serving, so after the session below exists.
                req = session.check(ImageRequest.from_mapping(data, defaults))
                if args.model is None:
                    checks.warn_vocabulary(req.prompt, req.negative_prompt, where="a request: ")
                return req

            info = {"world_size": ctx.world_size, "model": args.model or "embedded:tiny-shapes"}
            http.start(build_app(dispatcher, metrics, validate, info))  # /health: "loading" till ready
        session = session_from_args(args, ctx)
        try:
            defaults = session.check(defaults)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        session.warmup()
        # From here SIGTERM/SIGINT only set a flag: every rank waits for rank 0's stop message, so the
        # request in flight finishes on all of them. (While loading, they stop the process as usual.)
        stop = StopFlag()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = RankLoop(ctx, session, stop, dispatcher, metrics).serve()
    finally:
        if http is not None:
            http.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
