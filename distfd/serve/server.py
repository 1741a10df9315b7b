"""uvicorn in a background thread of rank 0, on a socket bound before the ranks join (a taken port is
known before any model loads), with bounds on every connection that uvicorn alone does not give.

uvicorn closes idle kept-alive connections but has no deadline for a request head or body, and no
cap on connections that send nothing. :class:`BoundedH11Protocol` (its h11 protocol, extended) adds:

- a request head must arrive within ``header_timeout_s`` of the connection (or of the previous
  answer); a client sending a byte now and then does not extend it;
- a request body must arrive within ``body_timeout_s`` of its head (the route answers 408 first when
  it reads the body; a body nobody reads, after a 401, say, ends with the connection);
- at most ``max_connections`` open connections: a new one evicts the oldest that has not sent a
  whole request head, so a flood of silent connections cannot lock out /health; when every
  connection is busy with a request, the new one is closed at once.

The process's soft limit on open files is raised to its hard limit at start, and the event loop's
error reports (``accept() out of system resource`` when descriptors run out) are logged at most once
a second, with a count of those left out.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("distfd")

START_WAIT_S = 30.0
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
BODY_GRACE_S = 1.0  # the route's own 408 comes first; the connection closes this much later
LOG_EVERY_S = 1.0


@dataclass(frozen=True)
class ConnectionBounds:
    """Bounds on each connection to the service.

    Args:
        header_timeout_s: Seconds for a request head to arrive (``--header-timeout``).
        body_timeout_s: Seconds for a request body to arrive after its head (``--body-timeout``).
        max_connections: Open connections at most (``--max-connections``).
        keep_alive_s: Seconds an idle kept-alive connection stays open.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256
    keep_alive_s: float = KEEP_ALIVE_S


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and body and a cap on connections
    (module docstring). ``bounds`` is set on a subclass made for each server (:func:`protocol_for`)."""

    bounds = ConnectionBounds()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for = ""
        self._arm("head", self.bounds.header_timeout_s)
        if len(self.connections) > self.bounds.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow()

    def _follow(self) -> None:
        """The deadline that applies to where the client is in its request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for != "head":
                self._arm("head", self.bounds.header_timeout_s)
        elif state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._arm("body", self.bounds.body_timeout_s + BODY_GRACE_S)
        else:  # the request is complete (the answer is the route's business) or the client closed
            self._disarm()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = ""

    def _expired(self, what: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request %s did not arrive in time", what)
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No request head received yet on this connection (or since its last answer)."""
        return self._waiting_for == "head"

    def _make_room(self) -> None:
        """Over the cap: close the oldest connection that has not sent a request head, else this one."""
        candidates = [c for c in self.connections if c is not self and getattr(c, "idle", False)]
        victim = min(candidates, key=lambda c: c.opened) if candidates else self
        if victim is self:
            logger.debug("connection cap reached with every connection busy; refusing a new one")
        victim.transport.close()


def protocol_for(bounds: ConnectionBounds) -> type[BoundedH11Protocol]:
    """A protocol class with these bounds (uvicorn builds protocols from a class)."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"bounds": bounds})


class _Server(uvicorn.Server):
    """uvicorn's server with the event loop's error reports rate-limited."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(RateLimitedReports())
        await super().serve(sockets)


class RateLimitedReports:
    """An event-loop exception handler that logs at most one report per ``every_s`` seconds."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s, self.last, self.skipped = every_s, float("-inf"), 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.skipped += 1
            return
        more = (
            f" ({self.skipped} more such reports in the last {now - self.last:.0f} s)" if self.skipped else ""
        )
        self.last, self.skipped = now, 0
        error = context.get("exception")
        logger.error(
            "HTTP server: %s%s%s", context.get("message", "error"), f": {error}" if error else "", more
        )


def raise_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. an unlimited hard limit on macOS
            logger.debug("could not raise the open-file limit to %s: %s", hard, e)
    return soft, hard


class HttpServer:
    """uvicorn serving an app from a daemon thread (uvicorn leaves signals alone off the main thread)."""

    def __init__(self, host: str, port: int, bounds: ConnectionBounds | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port} ({e}); choose another --port or --host.") from e
        self.host, self.port = host, self.sock.getsockname()[1]
        self.bounds = bounds or ConnectionBounds()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, app: Starlette) -> None:
        soft, _ = raise_file_limit()
        if soft < 2 * self.bounds.max_connections + 64:
            logger.warning(
                "the open-file limit is %d, close to --max-connections %d; raise it (ulimit -n) or lower "
                "--max-connections",
                soft,
                self.bounds.max_connections,
            )
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ws="none",
            http=protocol_for(self.bounds),
            timeout_keep_alive=self.bounds.keep_alive_s,
            backlog=min(2048, 4 * self.bounds.max_connections),
        )
        self.server = _Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="distfd-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + START_WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}.")
            time.sleep(0.02)
        logger.info("listening on %s", self.url)

    def stop(self) -> None:
        """Finish the responses under way, then close."""
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.sock.close()


__all__ = ["BoundedH11Protocol", "ConnectionBounds", "HttpServer", "raise_file_limit"]
