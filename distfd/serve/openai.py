"""The OpenAI images API on ``distfd serve``: ``POST /v1/images/generations`` and ``GET /v1/models``.

The clients people already run (the ``openai`` libraries, chat front ends, agent frameworks, proxies)
speak this API; vLLM-Omni, SGLang's diffusion server, LocalAI and NVIDIA Dynamo serve it too, with
their own sampling fields beside the standard ones. This file only translates: an OpenAI body into
the fields of :class:`~distfd.request.ImageRequest` (``num_inference_steps`` -> ``steps``, ``size``
-> ``width``/``height``, image ``i`` gets ``seed + i``), each image then goes through the same
``admit`` as ``/generate`` (every check lives in :mod:`distfd.intake`), the images go to the pool
together (:meth:`~distfd.serve.front.Front.make`), and the answer and every error take OpenAI's shapes
(``{"error": {"message", "type", "param", "code"}}``). The route's bounds, queue and token are the
front's. docs/openai.md is the user's side of this file.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..intake import RequestRefused
from ..validate import is_int, shown
from .auth import authorized
from .front import Front, Refusal, image_headers

logger = logging.getLogger("distfd")

# distfd's sampling fields under the names vLLM-Omni and SGLang give them: OpenAI name -> ours.
SAMPLING = {
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "key_steps": "key_steps",
    "mode": "mode",
}
# Fields of the standard this service cannot honour: accepted only at their neutral values.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "quality": (None, "auto", "standard"),
    "style": (None,),
    "background": (None, "auto", "opaque"),
    "moderation": (None, "low"),  # distfd filters nothing: 'low' is the nearest honest value
    "output_compression": (None,),
    "partial_images": (None, 0),
    "stream": (None, False),
    "complexity": (None,),
    "frame_count": (None,),
    "frame_duration_ms": (None,),
    "svg": (None,),
}
STANDARD = ("prompt", "model", "n", "size", "response_format", "output_format", "user", "safety_identifier")
KNOWN = (*STANDARD, *NEUTRAL, *SAMPLING)
# The OpenAI parameter to blame for a refusal of the intake, which speaks of ImageRequest's fields.
PARAM = {"steps": "num_inference_steps", "height": "size", "width": "size"}
# Status -> (OpenAI error type, code). The client picks its exception class from the status alone.
KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("server_error", "unavailable"),
    504: ("server_error", "timeout"),
    507: ("server_error", "out_of_memory"),
}
# A full queue: 429, which the client raises as RateLimitError and retries after Retry-After
# (docs/openai.md, "Errors"); /generate keeps its 503.
QUEUE_FULL = 429
# Failures a retry of the same request would only repeat (the client retries every 5xx unless told).
NO_RETRY = (500, 504, 507)


def error_response(refusal: Refusal) -> JSONResponse:
    """A refusal in OpenAI's error shape (the status, and so the client's exception class, unchanged)."""
    kind, code = KINDS.get(
        refusal.status, ("server_error" if refusal.status >= 500 else "invalid_request_error", None)
    )
    param = PARAM.get(refusal.field, refusal.field) if refusal.field else None
    body = {"error": {"message": refusal.message, "type": kind, "param": param, "code": code}}
    headers = {**refusal.headers, **({"x-should-retry": "false"} if refusal.status in NO_RETRY else {})}
    return JSONResponse(body, status_code=refusal.status, headers=headers)


def _size(value: Any, max_pixels: int | None) -> dict[str, int]:
    """``"WxH"`` as ``width``/``height``; ``"auto"`` (or null) as neither: the service's default size."""
    if value is None or value == "auto":
        return {}
    if isinstance(value, str):
        w, x, h = value.partition("x")
        if x and all(0 < len(s) <= 5 and s.isascii() and s.isdigit() for s in (w, h)):
            return {"width": int(w), "height": int(h)}
    bound = f"; at most {max_pixels} pixels (--max-pixels)" if max_pixels else ""
    raise RequestRefused(
        f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '512x512', or 'auto' (the service's default "
        f"size){bound}; got {shown(value)}.",
        "size",
    )


def translate(data: dict[str, Any], model: str, max_images: int, max_pixels: int | None) -> tuple[int, dict]:
    """An OpenAI body as (n, the fields of image 0 for ``admit``), or :class:`RequestRefused`."""
    unknown = sorted(str(k) for k in data if k not in KNOWN)
    if unknown:
        raise RequestRefused(
            f"unknown field(s) {', '.join(shown(k) for k in unknown[:10])}"
            f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}; known fields: "
            f"{', '.join(KNOWN)}.",
            unknown[0][:40],  # a client's key, echoed as param: never whole when long
        )
    for name, neutral in NEUTRAL.items():
        if data.get(name) not in neutral:
            allowed = " or ".join("null" if v is None else repr(v) for v in neutral)
            raise RequestRefused(
                f"{name} {shown(data[name])} cannot be honoured by this service (a diffusers pipeline "
                f"served by distfd); leave {name} out or give {allowed}.",
                name,
            )
    if data.get("model") not in (None, model):
        raise RequestRefused(
            f"model {shown(data['model'])} is not served here; this service serves {model!r} "
            "(GET /v1/models). Leave model out or give that name.",
            "model",
        )
    n = data.get("n")
    n = 1 if n is None else n
    if not is_int(n) or not 1 <= n <= max_images:
        raise RequestRefused(
            f"n must be an integer from 1 to {max_images} (--max-images-per-request); got {shown(n)}.", "n"
        )
    if data.get("response_format") == "url":
        raise RequestRefused(
            "response_format 'url' is not supported: this service keeps no image files to link to. "
            "Leave response_format out or give 'b64_json' (each image inline, a base64 PNG).",
            "response_format",
        )
    if data.get("response_format") not in (None, "b64_json"):
        raise RequestRefused(
            f"response_format must be 'b64_json'; got {shown(data['response_format'])}.", "response_format"
        )
    if data.get("output_format") not in (None, "png"):
        raise RequestRefused(
            f"output_format must be 'png' (the only format this service makes); got "
            f"{shown(data['output_format'])}.",
            "output_format",
        )
    for name in ("user", "safety_identifier"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise RequestRefused(f"{name} must be a string; got {shown(data[name])}.", name)
    fields = {ours: data[theirs] for theirs, ours in SAMPLING.items() if theirs in data}
    if "prompt" in data:
        fields["prompt"] = data["prompt"]
    return n, {**fields, **_size(data.get("size"), max_pixels)}


def admit_images(admit: Callable[[Any], Any], n: int, fields: dict) -> list[Any]:
    """Each image through ``admit`` (every check, in :mod:`distfd.intake`): image ``i`` with seed
    ``seed + i``, where ``seed`` is the body's or, if it gives none, the service's default."""
    first = admit(fields)
    seed = first.request.seed
    admitted = [first]
    for i in range(1, n):
        try:
            admitted.append(admit({**fields, "seed": seed + i}))
        except RequestRefused as e:
            if e.field != "seed":
                raise
            raise RequestRefused(
                f"image {i} would get seed {seed} + {i}, past 2**64-1; give a smaller seed.", "seed"
            ) from None
    return admitted


def answer_headers(results: list[Any], warnings: tuple[str, ...]) -> dict[str, str]:
    """/generate's headers for one image; for several, the span and ranks of all of them, and the
    group size and batch size of each, comma-separated in the answer's order."""
    headers = image_headers(results[0], warnings)
    if len(results) > 1:
        start = min(r.started for r in results)
        end = max(r.finished for r in results)
        headers["X-Generation-Start"] = f"{start:.6f}"
        headers["X-Generation-End"] = f"{end:.6f}"
        headers["X-Generation-Seconds"] = f"{end - start:.6f}"
        headers["X-Ranks"] = ",".join(str(r) for r in sorted({r for res in results for r in res.ranks}))
        headers["X-Ranks-Per-Image"] = ",".join(str(len(r.ranks)) for r in results)
        headers["X-Batch-Size"] = ",".join(str(r.batch) for r in results)
    return headers


def png_size(png: bytes) -> str:
    """'WxH' of a PNG, from its header chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return f"{width}x{height}"


def routes(front: Front, info: Callable[[], dict[str, Any]]) -> list[Route]:
    """The OpenAI routes on ``front`` (its token, bounds and pool); ``info`` gives the limits."""
    settings = front.settings

    def max_pixels() -> int | None:
        return info().get("limits", {}).get("max_pixels")

    def check(data: dict) -> list[Any]:
        n, fields = translate(data, settings.model, settings.max_images_per_request, max_pixels())
        return admit_images(front.admit, n, fields)

    async def generations(request: Request, arrived: float) -> Response:
        front.check_entry(request)
        data = await front.read_json(request)
        admitted = await front.check(data, check)
        if data.get("user") or data.get("safety_identifier"):
            who = str(data.get("user") or data.get("safety_identifier"))
            logger.info("images request (n=%d) for user %r", len(admitted), who[:100])
        results = await front.make(request, [a.request for a in admitted], arrived, full=QUEUE_FULL)
        warnings = tuple(dict.fromkeys(w for a in admitted for w in a.warnings))
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(r.png).decode(), "revised_prompt": None} for r in results],
            "output_format": "png",
            "size": png_size(results[0].png),
        }
        if warnings:
            body["warnings"] = list(warnings)
        return JSONResponse(body, headers=answer_headers(results, warnings))

    def model_card() -> dict[str, Any]:
        return {"id": settings.model, "object": "model", "created": 0, "owned_by": "distfd"}

    async def models(request: Request) -> Response:
        if not authorized(request.headers.get("authorization"), settings.token):
            return error_response(_unauthorized())
        wanted = request.path_params.get("model")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [model_card()]})
        if wanted != settings.model:
            refusal = Refusal(
                404, f"model {shown(wanted)} is not served here; this service serves {settings.model!r}."
            )
            return error_response(refusal)
        return JSONResponse(model_card())

    return [
        Route("/v1/images/generations", front.counted(generations, error_response), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
    ]


def _unauthorized() -> Refusal:
    return Refusal(
        401, "this service needs 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
    )


__all__ = ["error_response", "routes", "translate"]
