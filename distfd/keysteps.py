"""Key steps as one immutable value: parsed once where the config is built, resolved once per run.

Every way of giving key steps (a list, a preset name, ``"uniform-K"``, a preset ``.json`` file, a CLI
string ``"0,1,5"``, a JSON request field) goes through :meth:`KeySteps.parse`, so the same value meets
the same rules whichever way it arrives. A file is read there, once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .presets import PRESETS, Preset, preset_names
from .schedule import rescale
from .validate import is_int

_UNIFORM = re.compile(r"uniform-(.*)")
_INDEX_LIST = re.compile(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*")

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
        raise TypeError(f"{where} must hold ints (0-based loop indices); got {bad[0]!r}.")
    negative = [k for k in steps if k < 0]
    if negative:
        raise ValueError(f"{where} must be non-negative loop indices; got {negative}.")
    dupes = sorted(k for k, n in Counter(steps).items() if n > 1)  # linear: lists may come from clients
    if dupes:
        raise ValueError(f"{where} has duplicates {dupes}; list each loop index once.")
    if 0 not in steps:
        raise ValueError(f"{where} {steps} lacks index 0: the encoder must run at the first step. Add 0.")
    return tuple(sorted(steps))


def names_a_file(text: str) -> bool:
    """Whether key steps written as ``text`` would be read from a file: anything but indices
    ('0,1,5'), 'uniform-K', a preset name or 'auto'. Decided without touching the file system."""
    text = text.strip()
    return bool(text) and not (
        _INDEX_LIST.fullmatch(text) or _UNIFORM.fullmatch(text) or text in PRESETS or text == "auto"
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
        if _INDEX_LIST.fullmatch(text):
            return cls("list", check_indices([int(k) for k in text.split(",") if k.strip()], "key_steps"))
        if (m := _UNIFORM.fullmatch(text)) is not None:
            if not m.group(1).isdigit() or int(m.group(1)) < 1:
                raise ValueError(f"bad uniform preset {text!r}: use 'uniform-K' with an integer K >= 1.")
            return cls(text, every=int(m.group(1)))
        if text in PRESETS:
            preset = PRESETS[text]
            return cls(text, preset.key_steps, preset.num_steps)
        if text.endswith(".json"):
            preset = read_preset_file(text)
            return cls(text, preset.key_steps, preset.num_steps)
        raise ValueError(
            f"unknown key-step preset {text!r}; known: {', '.join(preset_names())}, or a .json file."
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
                f"key steps {bad} are out of range for a sampling loop of {loop_length} steps "
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
