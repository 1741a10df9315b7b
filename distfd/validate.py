"""Small type-and-range checks shared by configs and requests; each error names the field and the fix."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is not a step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def shorten(text: str, limit: int = 60) -> str:
    """``text`` as quoted in a message: a client's long string is never echoed back whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any, limit: int = 40) -> str:
    """A client's value as quoted in a message (its repr, shortened); an integer too long to quote is
    described by its number of digits."""
    if isinstance(value, int) and abs(value) >= 10**limit:
        return f"a {len(str(value))}-digit number"
    return shorten(repr(value), limit)


def positive_int(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return value


def optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` or an int >= 1."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1; got {value!r}.")
    return value


def number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (not a bool, not a string) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number; got {value!r} ({type(value).__name__}).")
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}]; got {value}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low:g}; got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}; got {value}.")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """A real ``bool``: the string ``"False"`` is true in Python, so strings are refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).")
    return value


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}; got {value!r}.")
    return value
