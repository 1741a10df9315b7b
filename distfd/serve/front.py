"""What every image route of the service does between a client and the pool (:class:`Front`), shared
by ``/generate`` (:mod:`.app`) and the OpenAI-compatible route (:mod:`.openai`).

In order: the token (401); the service state (503); the body, at most ``max_body_bytes`` (413,
without reading the rest) within ``body_timeout_s`` (408); JSON and the request's checks
(:mod:`distfd.intake`, in a worker thread: 400); the queue (503, or the route's status, with
Retry-After). Then it waits for the images, for the deadline (``request_timeout_s`` from arrival:
504, and the images are cancelled at the ranks' next step boundary), or for the client to go away
(dropped if still queued, cancelled if running). A failed image answers 507 when memory ran out, else
500. Whatever a client can read is distfd's own text: no server path, no exception text of a backend
(those go to the log), a fixed vocabulary of reasons. Any unexpected error is a counted 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..intake import RequestRefused, decode
from ..pool.coordinator import Coordinator
from ..pool.jobs import Cancelled, Completed, GenerationFailed, QueueFull, Unavailable
from .auth import authorized
from .metrics import Metrics

logger = logging.getLogger("distfd")

DISCONNECTED = 499  # counted in the metrics only; nobody is there to read it

# What /health and a 503 say of a service that is not serving: a fixed vocabulary (details: the log).
REASONS = {
    "loading": "the model is still loading",
    "stopping": "the service is shutting down",
    "failed": "a rank failed or was lost; the service is ending (the server's log has the details)",
}


@dataclass(frozen=True)
class FrontSettings:
    """The routes' own bounds (the request limits are in ``admit``).

    Args:
        max_body_bytes: Larger bodies get 413 (``--max-body-bytes``).
        body_timeout_s: A body not received within this gets 408 (``--body-timeout``).
        request_timeout_s: From arrival to answer, else 504 (``--request-timeout``).
        token: The bearer token every route but /health needs; None for none.
        model: The served model's name, as clients see it (``/v1/models``, ``model``).
        max_images_per_request: Images one OpenAI request may ask for (``n``; ``--max-images-per-request``).
    """

    max_body_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    token: str | None = None
    model: str = "distfd"
    max_images_per_request: int = 4


class Refusal(Exception):
    """An answer other than images: status, message, the field to blame, extra headers.

    ``close``: the connection is closed after the answer (the body was not read to its end)."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


class Gone(Exception):
    """The client went away; counted as :data:`DISCONNECTED`, nothing is sent."""


def reason(coordinator: Coordinator) -> str:
    return REASONS.get(coordinator.state, "the service is not serving")


def header_text(text: str, limit: int = 1000) -> str:
    """``text`` as an HTTP header value: printable ASCII only (no CR/LF can split the header)."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return safe + ("..." if len(text) > limit else "")


class Front:
    """What every image route does between the client and the pool (module docstring)."""

    def __init__(
        self,
        coordinator: Coordinator,
        metrics: Metrics | None,
        admit: Callable[[Any], Any],
        settings: FrontSettings,
    ) -> None:
        self.coordinator, self.metrics, self.admit, self.settings = coordinator, metrics, admit, settings

    def check_entry(self, request: Request) -> None:
        """The token, then the service's state."""
        if not authorized(request.headers.get("authorization"), self.settings.token):
            raise Refusal(
                401,
                "this service needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
                close=True,
            )
        state = self.coordinator.state
        if state != "serving":  # loading, stopping or failed: say why, whatever the body
            retry = {"Retry-After": "5"} if state == "loading" else None
            raise Refusal(503, reason(self.coordinator), headers=retry, close=True)

    async def read_json(self, request: Request) -> Any:
        """The body, bounded in size and time, decoded in a worker thread (strict JSON)."""
        body = await _read_body(request, self.settings)
        try:
            data = await run_in_threadpool(decode, body)
        except RequestRefused as e:
            raise Refusal(400, e.message, e.field) from None
        if not isinstance(data, dict):
            raise Refusal(400, f"the request body must be a JSON object; got {type(data).__name__}.")
        return data

    async def check(self, data: Any, to_request: Callable[[Any], Any] | None = None) -> Any:
        """``admit`` (the request's checks) in a worker thread; 400 naming the field if refused."""
        try:
            return await run_in_threadpool(to_request or self.admit, data)
        except RequestRefused as e:
            raise Refusal(400, e.message, e.field) from None

    async def make(
        self, request: Request, requests: list[Any], arrived: float, full: int = 503
    ) -> list[Completed]:
        """Queue ``requests`` (all or none) and wait for every image, the deadline or the client.
        A full queue answers ``full`` (the route's status for it) with Retry-After."""
        try:
            jobs = self.coordinator.submit_many(requests)
        except QueueFull as e:
            raise Refusal(
                full, str(e), headers={"Retry-After": str(self.coordinator.retry_after_s())}
            ) from None
        except Unavailable:
            raise Refusal(503, reason(self.coordinator)) from None
        left = self.settings.request_timeout_s - (time.monotonic() - arrived)
        images = [asyncio.wrap_future(job.future) for job in jobs]
        for image in images:
            image.add_done_callback(lambda f: f.cancelled() or f.exception())  # read here or below
        outcome = await _wait(request, images, left)
        if outcome != "done":
            why = "its deadline passed" if outcome == "timeout" else "its client disconnected"
            for job in jobs:
                self.coordinator.cancel(job, why)
            if outcome == "gone":
                raise Gone()
            raise Refusal(
                504,
                f"no image within {self.settings.request_timeout_s:g} s of the request's arrival "
                "(--request-timeout); it was cancelled. Retry later or ask for less work.",
            )
        return [_result(job.future, job.request, reason(self.coordinator)) for job in jobs]

    def counted(
        self,
        route: Callable[[Request, float], Awaitable[Response]],
        render: Callable[[Refusal], Response],
    ) -> Callable[[Request], Awaitable[Response]]:
        """An image route whose every answer is counted in the metrics (latency of its images too),
        with any refusal rendered by ``render`` and any unexpected error a logged, counted 500."""

        async def endpoint(request: Request) -> Response:
            arrived = time.monotonic()
            try:
                response = await route(request, arrived)
            except Refusal as e:
                response = render(e)
            except (Gone, ClientDisconnect):
                response = Response(status_code=DISCONNECTED)
            except Exception:  # noqa: BLE001 - a bug of ours: the client still gets JSON
                logger.exception("%s %s failed", request.method, request.url.path)
                response = render(Refusal(500, "the server failed on this request; its log has the details."))
            if self.metrics is not None:
                self.metrics.count(response.status_code)
                if response.status_code == 200:
                    self.metrics.latency.observe(time.monotonic() - arrived)
            return response

        return endpoint


def image_headers(result: Completed, warnings: tuple[str, ...] = ()) -> dict[str, str]:
    """Timing, group and key-step headers of an image, and the warnings the request earned."""
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
    if warnings:
        headers["X-Distfd-Warning"] = header_text(" | ".join(warnings))
    return headers


async def _read_body(request: Request, settings: FrontSettings) -> bytes:
    limit = settings.max_body_bytes
    too_large = Refusal(413, f"the request body is larger than {limit} bytes (--max-body-bytes).", close=True)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise Refusal(400, "the Content-Length header is not a number.", close=True)
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
    except TimeoutError:  # asyncio.TimeoutError is this builtin from 3.11, the oldest Python supported
        raise Refusal(
            408,
            f"the request body did not arrive within {settings.body_timeout_s:g} s (--body-timeout).",
            close=True,
        ) from None
    return bytes(body)


async def _wait(request: Request, images: list[asyncio.Future], seconds: float) -> str:
    """'done' (every image), 'timeout' or 'gone' (the client disconnected), whichever comes first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    every = asyncio.ensure_future(asyncio.wait(images))
    try:
        done, _ = await asyncio.wait({every, watch}, timeout=max(0.0, seconds), return_when="FIRST_COMPLETED")
    finally:
        watch.cancel()
        every.cancel()
    if every in done:
        return "done"
    return "gone" if watch in done else "timeout"


def _result(future: Any, req: Any, unavailable: str) -> Completed:
    """The image of a finished job, or the :class:`Refusal` its failure answers."""
    try:
        return future.result()
    except Cancelled as e:
        raise Refusal(503, f"the image was stopped: {e.reason}.") from None
    except Unavailable:
        raise Refusal(503, unavailable) from None
    except GenerationFailed as e:
        if e.out_of_memory:
            raise Refusal(
                507,
                f"out of memory while generating {req.width}x{req.height} with {req.steps} steps; "
                "ask for a smaller image or fewer steps, or retry later.",
            ) from None
        logger.error("an image failed: %s", e)
        raise Refusal(500, "generation failed; the server's log has the details.") from None
