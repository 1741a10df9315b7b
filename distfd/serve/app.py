"""Rank 0's HTTP routes: Starlette, run by uvicorn in a background thread (:mod:`.server`).

The routes only check, queue and wait; images are made by the ranks (:mod:`distfd.pool`). Nothing a
client sends can block the event loop: the body is read with a size bound and a deadline, parsing
and validation run in a worker thread, and /health and /metrics do constant work.

``POST /generate``, in order: the token (401); the service state (503); the body, at most
``max_body_bytes`` (413, without reading the rest) within ``body_timeout_s`` (408); JSON and the
request's checks (400); the queue (503 with Retry-After). Then it waits for the image, for the
deadline (``request_timeout_s`` from arrival: 504, and the image is cancelled at the ranks' next step
boundary), or for the client to go away (the image is dropped if still queued, cancelled if running).
A failed image answers 507 when memory ran out, else 500; the details of a 500 go to the log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..pool.coordinator import Coordinator
from ..pool.jobs import Cancelled, Completed, GenerationFailed, QueueFull, Unavailable
from .auth import authorized
from .metrics import Metrics

logger = logging.getLogger("distfd")

DISCONNECTED = 499  # counted in the metrics only; nobody is there to read it


@dataclass(frozen=True)
class FrontSettings:
    """The routes' own bounds (the request limits are in ``validate``).

    Args:
        max_body_bytes: Larger bodies get 413 (``--max-body-bytes``).
        body_timeout_s: A body not received within this gets 408 (``--body-timeout``).
        request_timeout_s: From arrival to answer, else 504 (``--request-timeout``).
        token: The bearer token every route but /health needs; None for none.
    """

    max_body_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    token: str | None = None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(
    coordinator: Coordinator,
    metrics: Metrics,
    validate: Callable[[Any], Any],
    info: Callable[[], dict[str, Any]],
    settings: FrontSettings,
) -> Starlette:
    """The routes. ``validate`` turns a parsed JSON body into a request or raises ValueError/TypeError
    with the message the CLI gives (it runs in a worker thread); ``info`` is what /health reports
    besides the state and queue."""

    def unauthorized(request: Request) -> Response | None:
        if authorized(request.headers.get("authorization"), settings.token):
            return None
        return _error(
            401, "this service needs 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )

    async def health(request: Request) -> JSONResponse:
        state = coordinator.state
        body = {
            "status": "ok" if state == "serving" else state,
            **info(),
            "queue": coordinator.depth(),
            "in_flight": coordinator.in_flight,
        }
        if state != "serving":
            body["reason"] = coordinator.reason
        return JSONResponse(body, status_code=200 if state == "serving" else 503)

    async def generate(request: Request) -> Response:
        arrived = time.monotonic()
        response = await _generate(request, arrived)
        metrics.count(response.status_code)
        if response.status_code == 200:
            metrics.latency.observe(time.monotonic() - arrived)
        return response

    async def _generate(request: Request, arrived: float) -> Response:
        if (refusal := unauthorized(request)) is not None:
            return refusal
        if coordinator.state != "serving":  # loading, stopping or failed: say why, whatever the body
            retry = {"Retry-After": "5"} if coordinator.state == "loading" else None
            return _error(503, coordinator.reason, retry)
        try:
            body = await _read_body(request, settings)
            req = await run_in_threadpool(_parse, body, validate)
        except _Refused as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            return Response(status_code=DISCONNECTED)
        try:
            job = coordinator.submit(req)
        except QueueFull as e:
            return _error(503, str(e), {"Retry-After": str(coordinator.retry_after_s())})
        except Unavailable as e:
            return _error(503, str(e))
        left = settings.request_timeout_s - (time.monotonic() - arrived)
        image = asyncio.wrap_future(job.future)
        image.add_done_callback(lambda f: f.cancelled() or f.exception())  # read here or in _answer
        outcome = await _wait(request, image, left)
        if outcome == "timeout":
            coordinator.cancel(job, "its deadline passed")
            return _error(
                504,
                f"no image within {settings.request_timeout_s:g} s of the request's arrival "
                "(--request-timeout); it was cancelled. Retry later or ask for less work.",
            )
        if outcome == "gone":
            coordinator.cancel(job, "its client disconnected")
            return Response(status_code=DISCONNECTED)
        return _answer(job.future, req)

    async def prometheus(request: Request) -> Response:
        if (refusal := unauthorized(request)) is not None:
            return refusal
        return Response(metrics.render(), media_type=metrics.content_type)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ]
    )


async def _read_body(request: Request, settings: FrontSettings) -> bytes:
    limit = settings.max_body_bytes
    too_large = _Refused(413, f"the request body is larger than {limit} bytes (--max-body-bytes).")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _Refused(400, "the Content-Length header is not a number.")
        if int(declared) > limit:
            raise too_large
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), settings.body_timeout_s)
    except TimeoutError:
        raise _Refused(
            408, f"the request body did not arrive within {settings.body_timeout_s:g} s (--body-timeout)."
        ) from None
    return bytes(body)


def _parse(body: bytes, validate: Callable[[Any], Any]) -> Any:
    """JSON and the request's checks (in a worker thread: linear in the body, bounded by its size)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise _Refused(400, "the request body nests too deeply; send a flat JSON object.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _Refused(400, f"the request body is not valid JSON ({e}); send a JSON object.") from None
    if not isinstance(data, dict):
        raise _Refused(400, f"the request body must be a JSON object; got {type(data).__name__}.")
    try:
        return validate(data)
    except (ValueError, TypeError) as e:
        raise _Refused(400, str(e)) from None
    except RecursionError:
        raise _Refused(400, "the request nests too deeply; send a flat JSON object.") from None


async def _wait(request: Request, image: asyncio.Future, seconds: float) -> str:
    """'done', 'timeout' or 'gone' (the client disconnected), whichever comes first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({image, watch}, timeout=max(0.0, seconds), return_when="FIRST_COMPLETED")
    finally:
        watch.cancel()
    if image in done:
        return "done"
    return "gone" if watch in done else "timeout"


def _answer(future: Any, req: Any) -> Response:
    try:
        result: Completed = future.result()
    except Cancelled as e:
        return _error(503, f"the image was stopped: {e.reason}.")
    except Unavailable as e:
        return _error(503, str(e))
    except GenerationFailed as e:
        if e.out_of_memory:
            return _error(
                507,
                f"out of memory while generating {req.width}x{req.height} with {req.steps} steps; "
                "ask for a smaller image or fewer steps, or retry later.",
            )
        logger.error("an image failed: %s", e)
        return _error(500, "generation failed; the server's log has the details.")
    headers = {
        "X-Generation-Seconds": f"{result.seconds:.6f}",
        "X-Ranks-Per-Image": str(len(result.ranks)),
        "X-Ranks": ",".join(str(r) for r in result.ranks),
        "X-Generation-Start": f"{result.started:.6f}",
        "X-Generation-End": f"{result.finished:.6f}",
        "X-Batch-Size": str(result.batch),
    }
    if result.key_steps is not None:  # None: mode 'off', the vanilla pipeline
        headers["X-Key-Steps"] = ",".join(str(k) for k in result.key_steps)
    return Response(result.png, media_type="image/png", headers=headers)
