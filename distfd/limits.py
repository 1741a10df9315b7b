"""Bounds on the work one request may ask for: the service's requests and a batch file's lines.

A request from someone else (an HTTP client, a line of a prompts file) is checked against
:class:`RequestLimits` before it is queued: its size, step count, prompt length and key steps. The
checks on the raw JSON values (:meth:`RequestLimits.check_fields`) run first and are linear in the
body, so a huge key-step list is refused before anything parses it; key steps that would name a file
on the server are refused without touching the file system. Every message names the limit and the
option that raises it. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .keysteps import names_a_file
from .request import ImageRequest, ModelFacts
from .validate import is_int

DEFAULT_MAX_STEPS = 150
DEFAULT_MAX_PROMPT_CHARS = 2000
PIXELS_PER_DEFAULT_AREA = 4  # --max-pixels defaults to 4x the model's default image area
FALLBACK_DEFAULT_AREA = 1024 * 1024  # a model with no default size


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for.

    Args:
        max_pixels: Height x width at most; None until the model is known (:meth:`for_model` sets
            4x its default image area).
        max_steps: Sampling steps at most.
        max_prompt_chars: Characters in ``prompt`` and in ``negative_prompt`` at most (the tokenizer
            truncates beyond its window anyway).
        key_step_files: Whether ``key_steps`` may name a preset file on this machine (batch files
            only, when the operator allows it; never over HTTP).
    """

    max_pixels: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    key_step_files: bool = False

    def __post_init__(self) -> None:
        for name, flag in (
            ("max_pixels", "--max-pixels"),
            ("max_steps", "--max-steps"),
            ("max_prompt_chars", "--max-prompt-chars"),
        ):
            v = getattr(self, name)
            if v is None and name == "max_pixels":
                continue
            if not is_int(v) or v < 1:
                raise ValueError(f"{flag} must be an integer >= 1; got {v!r}.")

    def for_model(self, facts: ModelFacts) -> RequestLimits:
        """These limits with ``max_pixels`` set (when unset) to 4x the model's default image area."""
        if self.max_pixels is not None:
            return self
        size = facts.default_size()
        area = size[0] * size[1] if size else FALLBACK_DEFAULT_AREA
        return dataclasses.replace(self, max_pixels=PIXELS_PER_DEFAULT_AREA * area)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_fields(self, data: Mapping[str, Any], defaults: ImageRequest) -> None:
        """Checks on the raw values of a JSON request, before it is parsed (linear in its size)."""
        for field in ("prompt", "negative_prompt"):
            text = data.get(field)
            if isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise ValueError(
                    f"{field} has {len(text)} characters; the limit is {self.max_prompt_chars} "
                    "(--max-prompt-chars). Shorten it; the text encoder reads only its first tokens anyway."
                )
        steps = data.get("steps", defaults.steps)
        if is_int(steps) and steps > self.max_steps:
            raise ValueError(self._steps_message(steps))
        keys = data.get("key_steps")
        if isinstance(keys, str):
            if not self.key_step_files and names_a_file(keys):
                raise ValueError(
                    "key_steps must be a list of loop indices, a preset name (see distfd.PRESETS) or "
                    "'uniform-K' here; a request cannot name a file on the server (a batch job's lines may, "
                    "with --allow-key-step-files)."
                )
            count = keys.count(",") + 1
        elif isinstance(keys, list | tuple):
            count = len(keys)
        else:
            count = 0
        if is_int(steps) and count > max(steps, 1):
            raise ValueError(
                f"key_steps lists {count} entries for {steps} steps; give at most one per step "
                "(0-based loop indices, each once)."
            )

    def check_request(self, req: ImageRequest) -> None:
        """Checks on a request as it will run (both sides of the size known: after ``Session.check``)."""
        self.check_fields({"prompt": req.prompt, "negative_prompt": req.negative_prompt}, req)
        if req.steps > self.max_steps:
            raise ValueError(self._steps_message(req.steps))
        if self.max_pixels is not None and req.height is not None and req.width is not None:
            pixels = req.height * req.width
            if pixels > self.max_pixels:
                raise ValueError(
                    f"width x height {req.width}x{req.height} is {pixels} pixels; "
                    f"the limit is {self.max_pixels} "
                    "(--max-pixels, by default 4x the model's default image area). Ask for a smaller image."
                )
        if isinstance(req.key_steps, tuple) and len(req.key_steps) > req.steps:
            raise ValueError(f"key_steps lists {len(req.key_steps)} entries for {req.steps} steps.")

    def _steps_message(self, steps: int) -> str:
        return f"steps {steps} exceeds the limit of {self.max_steps} (--max-steps); use fewer steps."


def parse_request(data: Any, defaults: ImageRequest, limits: RequestLimits) -> ImageRequest:
    """A JSON object from someone else: the limits on its raw values first, then the request's own
    checks (the model's come after, in ``Session.check``, then :meth:`RequestLimits.check_request`)."""
    if isinstance(data, Mapping):
        limits.check_fields(data, defaults)
    return ImageRequest.from_mapping(data, defaults)


__all__ = ["DEFAULT_MAX_PROMPT_CHARS", "DEFAULT_MAX_STEPS", "RequestLimits", "parse_request"]
