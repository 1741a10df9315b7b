"""SIGTERM/SIGINT as a flag: the pool stops between images (or at a step boundary past its grace)."""

from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger("distfd")


class StopFlag:
    """Set by SIGTERM/SIGINT while the block runs (the handlers are restored after it).

    The handler only writes an attribute, which is safe in a signal handler; the coordinator and the
    worker read it. A second Ctrl-C raises KeyboardInterrupt (stop at once).

    Args:
        notice: Logged (as a warning) at the first signal, e.g. what will happen now.
    """

    def __init__(self, notice: str | None = None) -> None:
        self.set_by: str | None = None
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __call__(self, signum: int, frame: Any) -> None:  # the signal handler
        if self.set_by is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.set_by is None and self.notice:
            logger.warning("received %s: %s", signal.Signals(signum).name, self.notice)
        self.set_by = self.set_by or f"signal {signum}"

    def __bool__(self) -> bool:
        return self.set_by is not None


__all__ = ["StopFlag"]
