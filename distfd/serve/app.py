"""Rank 0's HTTP routes: Starlette, run by uvicorn in a background thread (:mod:`.server`).

The routes only check, queue and wait; images are made by the ranks (:mod:`distfd.pool`), and what
every image route does on the way is :class:`.front.Front`'s. Nothing a client sends can block the
event loop, and /health and /metrics do constant work: /health answers with a fixed vocabulary of
reasons. ``POST /generate`` answers a PNG; ``POST /v1/images/generations`` and ``GET /v1/models``
are the OpenAI-compatible routes (:mod:`.openai`). Every error is JSON, 404 and 405 included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..pool.coordinator import Coordinator
from .auth import authorized
from .front import Front, FrontSettings, Refusal, image_headers, reason
from .metrics import Metrics
from .openai import error_response
from .openai import routes as openai_routes


def build_app(
    coordinator: Coordinator,
    metrics: Metrics,
    admit: Callable[[Any], Any],
    info: Callable[[], dict[str, Any]],
    settings: FrontSettings,
) -> Starlette:
    """The routes. ``admit`` turns a decoded JSON body into an :class:`~distfd.intake.Admitted`
    request or raises :class:`~distfd.intake.RequestRefused` (it runs in a worker thread); ``info``
    is what /health reports besides the state and queue."""
    front = Front(coordinator, metrics, admit, settings)

    async def health(request: Request) -> JSONResponse:
        state = coordinator.state
        body = {
            "status": "ok" if state == "serving" else state,
            **info(),
            "queue": coordinator.depth(),
            "in_flight": coordinator.in_flight,
        }
        if state != "serving":
            body["reason"] = reason(coordinator)
        return JSONResponse(body, status_code=200 if state == "serving" else 503)

    async def generate(request: Request, arrived: float) -> Response:
        front.check_entry(request)
        admitted = await front.check(await front.read_json(request))
        (result,) = await front.make(request, [admitted.request], arrived)
        headers = image_headers(result, admitted.warnings)
        return Response(result.png, media_type="image/png", headers=headers)

    async def prometheus(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), settings.token):
            return _error(Refusal(401, "this service needs 'Authorization: Bearer <token>'", close=True))
        return Response(metrics.render(), media_type=metrics.content_type)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/generate", front.counted(generate, _error), methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]

    routes += openai_routes(front, info)  # POST /v1/images/generations, GET /v1/models (docs/openai.md)
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """404 and 405 (an unknown path or method) in JSON like every other error."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail)
    )
    if request.url.path.startswith("/v1/"):  # the OpenAI API's paths answer in its error shape
        return error_response(Refusal(exc.status_code, message, headers=exc.headers))
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def _error(refusal: Refusal) -> JSONResponse:
    return JSONResponse({"error": refusal.message}, status_code=refusal.status, headers=refusal.headers)
