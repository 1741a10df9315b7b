"""Key steps as one immutable value: parsed once where the config is built, resolved once per run.

Every way of giving key steps (a list, a preset name, ``"uniform-K"``, a preset ``.json`` file, a CLI
string ``"0,1,5"``, a JSON request field) goes through :meth:`KeySteps.parse`, so the same value meets
the same rules whichever way it arrives. A file is read there, once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .presets import PRESETS, Preset, preset_names
from .schedule import rescale
from .validate import is_int, shorten

UNIFORM_PREFIX = "uniform-"

AUTO_HINT = (
    "key_steps='auto' needs a calibration run: cal = distfd.calibrate(pipe, num_inference_steps, "
    "budget=K), then FasterDiffusionConfig(key_steps=cal.key_steps) (or cal.save('keys.json') and "
    "key_steps='keys.json'; on the command line: distfd calibrate)."
)


def check_indices(values: Any, where: str) -> tuple[int, ...]:
    """Loop indices as given by a user: ints, non-negative, each once, 0 among them; sorted."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{where} must be a list of ints; got {type(values).__name__}.")
    steps = list(values)
    if not steps:
        raise ValueError(f"{where} is empty; give at least [0] or a preset name such as 'sd-ddim-50'.")
    bad = [k for k in steps if not is_int(k)]
    if bad:
        raise TypeError(f"{where} must hold ints (0-based loop indices); got {shorten(repr(bad[0]))}.")
    negative = [k for k in steps if k < 0]
    if negative:
        raise ValueError(f"{where} must be non-negative loop indices; got {shorten(str(negative))}.")
    dupes = sorted(k for k, n in Counter(steps).items() if n > 1)  # linear: lists may come from clients
    if dupes:
        raise ValueError(f"{where} has duplicates {shorten(str(dupes))}; list each loop index once.")
    if 0 not in steps:
        raise ValueError(
            f"{where} {shorten(str(steps))} lacks index 0: the encoder must run at the first step. Add 0."
        )
    return tuple(sorted(steps))


MAX_INDEX_DIGITS = 18  # an index written with more digits is out of any loop's range


def split_indices(text: str) -> list[Any] | None:
    """``text`` read as a comma-separated list (``'0,1,5'``; spaces and one trailing comma allowed),
    or None when it is not one (no comma and not a single integer). Each item becomes an int where it
    is written as one and is kept as written otherwise, so that :func:`check_indices` gives the very
    message a JSON list with the same items gets (``'0,-3'``, ``'0,2.7'``, ``'0,3,3'``). One pass over
    the text, no regular expression: request text may come from anyone."""
    parts = text.split(",")
    if len(parts) == 1 and _as_int(parts[0].strip()) is None:
        return None
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()  # '0,1,' as written by hand
    values: list[Any] = []
    for part in parts:
        item = part.strip()
        value = _as_int(item)
        values.append(item if value is None else value)
    return values


def _as_int(item: str) -> int | None:
    body = item[1:] if item[:1] in ("+", "-") else item
    if not (body.isascii() and body.isdigit()):
        return None
    if len(body) > MAX_INDEX_DIGITS:
        raise ValueError(
            f"key_steps holds an index of {len(body)} digits; loop indices are below the step count."
        )
    return int(item)


def _uniform_every(text: str) -> str | None:
    """The ``K`` of ``'uniform-K'`` as written (unchecked), or None if ``text`` is not of that form."""
    return text[len(UNIFORM_PREFIX) :] if text.startswith(UNIFORM_PREFIX) else None


def names_a_file(text: str) -> bool:
    """Whether key steps written as ``text`` would be read from a file: anything but indices
    ('0,1,5'), 'uniform-K', a preset name or 'auto'. Decided without touching the file system."""
    text = text.strip()
    try:
        listed = split_indices(text) is not None
    except ValueError:  # an index too long to be one: still the list form, refused when parsed
        listed = True
    return bool(text) and not (
        listed or _uniform_every(text) is not None or text in PRESETS or text == "auto"
    )


def read_preset_file(path: str | Path) -> Preset:
    """A preset saved as JSON, ``{"num_steps": N, "key_steps": [...], ...}``, checked like a list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read key-step preset file {path}: {e}") from e
    if not isinstance(data, dict) or "num_steps" not in data or "key_steps" not in data:
        raise ValueError(f"key-step preset file {path} must hold {{'num_steps': N, 'key_steps': [...]}}.")
    if not is_int(data["num_steps"]) or data["num_steps"] < 1:
        raise ValueError(
            f"key-step preset file {path}: num_steps must be an int >= 1; got {data['num_steps']!r}."
        )
    return Preset(
        data["num_steps"], check_indices(data["key_steps"], f"key_steps in preset file {path}"), str(path)
    )


def save_preset_file(path: str | Path, num_steps: int, key_steps: Sequence[int], **meta: Any) -> Path:
    """Write a preset file that ``key_steps=`` and ``--key-steps`` accept (``meta``: provenance)."""
    path = Path(path)
    check_indices(list(key_steps), f"key_steps in preset file {path}")
    path.write_text(
        json.dumps({"num_steps": num_steps, "key_steps": list(key_steps), **meta}, indent=2) + "\n"
    )
    return path


@dataclass(frozen=True)
class KeySteps:
    """Where the encoder runs, as given by the user (FasterDiffusion Sec. 3.3, "key time-steps").

    Exactly one of ``indices`` (with ``built_for`` for a preset), or ``every`` (``uniform-K``) is set.

    Args:
        source: What the user gave, for messages: a preset name, a file path, ``uniform-K`` or ``list``.
        indices: Sorted 0-based loop indices, starting with 0.
        built_for: The step count a preset was built for; ``None`` for a plain list.
        every: ``K`` of ``uniform-K``: every K-th step is a key step.
    """

    source: str
    indices: tuple[int, ...] | None = None
    built_for: int | None = None
    every: int | None = None

    @classmethod
    def parse(cls, value: Any) -> KeySteps:
        """One parser for every form; raises ``ValueError``/``TypeError`` naming the problem and the fix."""
        if isinstance(value, KeySteps):
            return value
        if isinstance(value, str):
            return cls._parse_text(value.strip())
        if isinstance(value, Sequence) and not isinstance(value, bytes):
            return cls("list", check_indices(value, "key_steps"))
        raise TypeError(
            f"key_steps must be a preset name, a preset .json file or a list of ints; got {type(value).__name__}."
        )

    @classmethod
    def _parse_text(cls, text: str) -> KeySteps:
        if not text:
            raise ValueError("key_steps is an empty string; give a preset name such as 'sd-ddim-50'.")
        if text == "auto":
            raise ValueError(AUTO_HINT)
        if (indices := split_indices(text)) is not None:
            return cls("list", check_indices(indices, "key_steps"))
        if (every := _uniform_every(text)) is not None:
            if not (every.isascii() and every.isdigit()) or int(every) < 1:
                raise ValueError(
                    f"bad uniform preset {shorten(text)!r}: use 'uniform-K' with an integer K >= 1."
                )
            return cls(text, every=int(every))
        if text in PRESETS:
            preset = PRESETS[text]
            return cls(text, preset.key_steps, preset.num_steps)
        if text.endswith(".json"):
            preset = read_preset_file(text)
            return cls(text, preset.key_steps, preset.num_steps)
        raise ValueError(
            f"unknown key-step preset {shorten(text)!r}; known: {', '.join(preset_names())}, "
            "indices such as '0,1,5', or a .json file."
        )

    def resolve(
        self, num_steps: int, loop_length: int | None = None, allow_rescale: bool = False
    ) -> tuple[int, ...]:
        """The loop indices for a run of ``num_steps`` steps whose loop makes ``loop_length`` calls.

        ``loop_length`` defaults to ``num_steps`` (PNDM makes one call more); every index must be below it.
        A preset built for another step count is an error unless ``allow_rescale``.
        """
        loop_length = num_steps if loop_length is None else loop_length
        if self.every is not None:
            steps = tuple(range(0, loop_length, self.every))
        else:
            steps = self.indices
            if self.built_for is not None and self.built_for != num_steps:
                if not allow_rescale:
                    raise ValueError(
                        f"key-step preset {self.source!r} is built for {self.built_for} steps but the pipeline "
                        f"runs {num_steps}; use num_inference_steps={self.built_for}, pick another preset, or "
                        "set rescale_key_steps=True to rescale it."
                    )
                steps = rescale(steps, self.built_for, num_steps)
        bad = [k for k in steps if k >= loop_length]
        if bad:
            raise ValueError(
                f"key_steps {bad} are out of range for a sampling loop of {loop_length} steps "
                f"(valid: 0..{loop_length - 1})."
            )
        return steps

    def describe(self) -> str:
        """As printed: the source, and the indices where they are known without a run."""
        if self.every is not None:
            return self.source
        if self.source == "list":
            return str(list(self.indices))
        return f"{list(self.indices)} ({self.source})"


def resolve_key_steps(
    spec: Any, num_steps: int, loop_length: int | None = None, allow_rescale: bool = False
) -> tuple[int, ...]:
    """``KeySteps.parse(spec).resolve(...)`` in one call."""
    return KeySteps.parse(spec).resolve(num_steps, loop_length, allow_rescale)
