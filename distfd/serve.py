"""``distfd serve``: load the pipeline once on every rank, answer image requests over HTTP.

Rank 0 listens (``--host``/``--port``, 127.0.0.1 by default) and queues requests, first in, first
out; each request is handed to every rank and run exactly as ``distfd generate`` runs it (the same
:class:`distfd.session.Session`). How the ranks stay together while idle, and how they stop, is in
:mod:`distfd.serve_loop`; the routes are in :mod:`distfd.serve_http`.
"""

from __future__ import annotations

import argparse
import logging
import signal

logger = logging.getLogger("distfd")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``serve`` subcommand: every ``generate`` option (the defaults of requests) plus the service's."""
    from .cli import add_generate_options

    p = subparsers.add_parser(
        "serve",
        help="load the pipeline once and answer image requests over HTTP",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_generate_options(p, serve=True)
    s = p.add_argument_group("service")
    s.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on")
    s.add_argument("--port", type=int, default=8000, help="port rank 0 listens on (0: any free port)")
    s.add_argument(
        "--queue-size", type=int, default=16, help="requests waiting at most; more get 503 with Retry-After"
    )
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 on every rank) or a lost rank (exit 1 on every rank)."""
    import distfd

    from .request import ImageRequest
    from .serve_loop import Dispatcher, RankLoop, StopFlag
    from .session import Session

    if args.queue_size < 1:
        raise SystemExit(f"distfd serve: --queue-size must be >= 1; got {args.queue_size}.")
    if not 0 <= args.port < 65536:
        raise SystemExit(f"distfd serve: --port must be in 0..65535; got {args.port}.")
    stop = StopFlag()
    # Every rank waits for rank 0's stop message, so the request in flight finishes on all of them.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    device = None if args.device == "auto" else args.device
    ctx = distfd.DistContext.from_env(timeout_s=args.timeout, device=device)
    http = dispatcher = metrics = None
    code = 1
    try:
        if ctx.is_main:
            from .serve_http import HttpServer, build_app
            from .serve_metrics import Metrics

            dispatcher = Dispatcher(args.queue_size)
            metrics = Metrics(dispatcher.depth, ctx.world_size)
            session_box: list = []
            defaults = ImageRequest.from_args(args)

            def validate(data: dict):
                req = ImageRequest.from_mapping(data, defaults)
                session_box[0].check(req)
                return req

            info = {"world_size": ctx.world_size, "model": args.model or "embedded:tiny-shapes"}
            # Listen before loading, so /health says "loading" and a taken port fails at once.
            http = HttpServer(build_app(dispatcher, metrics, validate, info), args.host, args.port)
            http.start()
        session = Session(args, ctx)
        if ctx.is_main:
            session_box.append(session)
        code = RankLoop(ctx, session, stop, dispatcher, metrics).serve()
        return code
    finally:
        if http is not None:
            http.stop()
        if code == 0:
            ctx.close()
