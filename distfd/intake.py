"""The one entry for a request from someone else: an HTTP body (any route) or a line of a prompts file.

:meth:`Intake.admit` runs every check a request meets, in one place and in this order, each linear
in the request's size and none touching the file system (unless the operator allows key-step files):

1. the raw JSON values against the operator's limits (:meth:`RequestLimits.check_fields`: prompt
   length, step count, the length of a key-step list, key steps that would name a file);
2. the request's own checks (:class:`~distfd.request.ImageRequest`: types, ranges, unknown fields);
3. the model's (``Session.check``: size multiples, step count, key steps inside the sampling loop);
4. the limits on the request as it will run (:meth:`RequestLimits.check_request`: pixels, steps).

A refusal is a :class:`RequestRefused` naming the field where one is to blame; any other exception
out of here is a bug of distfd's, not the client's. What a request earns besides its image (a prompt
the embedded model cannot read) comes back as warnings, for the client as well as the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .limits import RequestLimits
from .request import ImageRequest

logger = logging.getLogger("distfd")

MAX_MESSAGE_CHARS = 400  # a refusal never echoes a client's megabytes back


class RequestRefused(ValueError):
    """A request that cannot run as asked: ``field`` (None: the body as a whole) and why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 5] + " ..."
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check: as it will run, and the warnings it earned."""

    request: ImageRequest
    warnings: tuple[str, ...] = ()


class Intake:
    """Checks a request from someone else against the operator's defaults, limits and model.

    Args:
        defaults: The values of fields a request leaves out (the command line's).
        limits: The operator's bounds (:class:`RequestLimits`); completed from the model's facts here.
        check: The model's checks (``Session.check``): returns the request as it will run.
        facts: The model's :class:`~distfd.request.ModelFacts` (for the pixel limit's default).
        warn: Returns a warning for a request (e.g. words the embedded model never saw), or None.
    """

    def __init__(
        self,
        defaults: ImageRequest,
        limits: RequestLimits,
        check: Callable[[ImageRequest], ImageRequest],
        facts: Any = None,
        warn: Callable[[ImageRequest], str | None] | None = None,
    ) -> None:
        self.defaults = defaults
        self.limits = limits.for_model(facts) if facts is not None else limits
        self._check, self._warn = check, warn

    def admit(self, data: Any) -> Admitted:
        """A decoded JSON object as a request ready to queue, or :class:`RequestRefused`."""
        if not isinstance(data, Mapping):
            raise RequestRefused(f"a request must be a JSON object; got {_json_type(data)}.")
        try:
            self.limits.check_fields(data, self.defaults)
            req = ImageRequest.from_mapping(data, self.defaults)
            req = self._check(req)
            self.limits.check_request(req)
        except RequestRefused:
            raise
        except (ValueError, TypeError) as e:
            raise RequestRefused(str(e), field_of(str(e))) from None
        except RecursionError:
            raise RequestRefused("the request nests too deeply; send a flat JSON object.") from None
        warning = self._warn(req) if self._warn is not None else None
        return Admitted(req, (warning,) if warning else ())

    def admit_json(self, body: bytes | str) -> Admitted:
        """A request body (or a JSON line) as a request: :func:`decode` then :meth:`admit`."""
        return self.admit(decode(body))

    def admit_line(self, text: str) -> Admitted | None:
        """A line of a prompts file: None for a blank or ``#`` line, a JSON object when it starts with
        ``{``, else the whole line as the prompt."""
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            return None
        if stripped.startswith("{"):
            return self.admit_json(stripped)
        return self.admit({"prompt": stripped})


def decode(body: bytes | str) -> Any:
    """Strict JSON: a field given twice, ``NaN``/``Infinity`` and nesting deeper than the interpreter's
    limit are refused (json would keep the last duplicate silently)."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RequestRefused:
        raise
    except RecursionError:
        raise RequestRefused("the JSON nests too deeply; send a flat JSON object.") from None
    except json.JSONDecodeError as e:
        raise RequestRefused(f"not valid JSON ({e.msg} at column {e.colno}); send a JSON object.") from None
    except (ValueError, UnicodeDecodeError) as e:  # e.g. an integer of more digits than Python reads
        raise RequestRefused(f"not valid JSON ({e}); send a JSON object.") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RequestRefused(f"field {twice!r} is given more than once; give each field once.", twice)
    return data


def _no_constant(name: str) -> Any:
    raise RequestRefused(f"{name} is not a JSON number; give a finite number.")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def field_of(message: str) -> str | None:
    """The request field a check's message is about (its messages start with, or name, the field)."""
    head = message.split(";", 1)[0]
    found = [f for f in ImageRequest.fields() if _names(head, f)]
    if "steps" in found and "key_steps" in found:
        found.remove("steps")
    if "steps" not in found and "key" in head and "step" in head:
        return "key_steps"
    return found[0] if found else None


def _names(text: str, field: str) -> bool:
    """Whether ``field`` occurs in ``text`` as a word of its own (one pass; no regular expression)."""
    start = text.find(field)
    while start >= 0:
        before = text[start - 1] if start else " "
        after = text[start + len(field)] if start + len(field) < len(text) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return True
        start = text.find(field, start + 1)
    return False


__all__ = ["Admitted", "Intake", "RequestRefused", "decode", "field_of"]
