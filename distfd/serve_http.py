"""Rank 0's HTTP front of ``distfd serve``: Starlette routes run by uvicorn in a background thread.

The routes only validate, queue and wait: generation happens on the main thread's rank loop
(:mod:`distfd.serve_loop`), which the other ranks follow.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .serve_loop import Dispatcher, QueueFull, Unavailable
from .serve_metrics import Metrics

logger = logging.getLogger("distfd")

START_WAIT_S = 30.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_app(
    dispatcher: Dispatcher,
    metrics: Metrics,
    validate: Callable[[dict], Any],
    info: dict[str, Any],
) -> Starlette:
    """The routes. ``validate`` turns a JSON object into a request or raises ValueError/TypeError with
    the message the CLI gives; ``info`` is what /health reports besides state and queue."""

    async def health(request: Request) -> JSONResponse:
        state = dispatcher.state
        body = {
            "status": "ok" if state == "serving" else state,
            **info,
            "queue": dispatcher.depth(),
            "in_flight": dispatcher.in_flight,
        }
        if state != "serving":
            body["reason"] = dispatcher.reason
        return JSONResponse(body, status_code=200 if state == "serving" else 503)

    async def generate(request: Request) -> Response:
        arrived = time.perf_counter()
        response = await _generate(request)
        metrics.count(response.status_code)
        if response.status_code == 200:
            metrics.latency.observe(time.perf_counter() - arrived)
        return response

    async def _generate(request: Request) -> Response:
        if dispatcher.state != "serving":  # loading, stopping or failed: say why, whatever the body
            retry = {"Retry-After": "5"} if dispatcher.state == "loading" else None
            return _error(503, dispatcher.reason, retry)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON ({e}); send a JSON object.")
        if not isinstance(data, dict):
            return _error(400, f"the request body must be a JSON object; got {type(data).__name__}.")
        try:
            req = validate(data)
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        try:
            job = dispatcher.submit(req)
        except QueueFull as e:
            return _error(503, str(e), {"Retry-After": str(dispatcher.retry_after_s())})
        except Unavailable as e:
            return _error(503, str(e))
        try:
            result = await asyncio.wrap_future(job.future)
        except Unavailable as e:
            return _error(503, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client; the service goes on
            return _error(500, f"generation failed: {type(e).__name__}: {e}")
        png = await run_in_threadpool(_png, result.image)
        headers = {"X-Generation-Seconds": f"{result.seconds:.6f}"}
        if result.key_steps is not None:  # None: mode 'off', the vanilla pipeline
            headers["X-Key-Steps"] = ",".join(str(k) for k in result.key_steps)
        return Response(png, media_type="image/png", headers=headers)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ]
    )


class HttpServer:
    """uvicorn on a socket bound up front (so a taken port is known before the model loads)."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port} ({e}); choose another --port or --host.") from e
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, app: Starlette) -> None:
        """Serve ``app`` from a daemon thread (uvicorn leaves signals alone off the main thread)."""
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="distfd-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + START_WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}.")
            time.sleep(0.02)
        logger.info("listening on %s", self.url)

    def stop(self) -> None:
        """Finish the responses under way, then close."""
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.sock.close()
