"""uvicorn in a background thread of rank 0, on a socket bound before the ranks join (a taken port is
known before any model loads)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

logger = logging.getLogger("distfd")

START_WAIT_S = 30.0
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this


class HttpServer:
    """uvicorn serving an app from a daemon thread (uvicorn leaves signals alone off the main thread)."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot listen on {host}:{port} ({e}); choose another --port or --host.") from e
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, app: Starlette) -> None:
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=KEEP_ALIVE_S
        )
        self.server = uvicorn.Server(config)
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


__all__ = ["HttpServer"]
