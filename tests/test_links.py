"""Control links at start-up: a stranger on rank 0's control port cannot stall or break the join."""

from __future__ import annotations

import os
import socket
import threading
import time
from multiprocessing import AuthenticationError

import pytest

from distfd.pool.links import accept_ranks, dial


def _server(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, 0), family=family)


def _join_in_background(server, key, world, timeout_s, handshake_s=0.5):
    out: dict = {}

    def run() -> None:
        try:
            out["links"] = accept_ranks(server, key, world, timeout_s, handshake_s)
        except Exception as e:  # noqa: BLE001 - the test reads it
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_silent_and_garbage_connections_are_dropped_and_the_ranks_still_join():
    key = os.urandom(32)
    server = _server("127.0.0.1")
    address = server.getsockname()[:2]
    start = time.monotonic()
    thread, out = _join_in_background(server, key, world=3, timeout_s=20)
    silent = socket.create_connection(address)  # connects and says nothing
    garbage = socket.create_connection(address)
    garbage.sendall(b"\xff\xff\xff\xff" + b"not a frame" * 100)  # a malformed frame
    try:
        with pytest.raises(AuthenticationError):  # a stranger without the key
            dial(address, os.urandom(32), 1, 2.0)
        links = [dial(address, key, rank, 5.0) for rank in (1, 2)]
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in out, out.get("error")
        assert sorted(out["links"]) == [1, 2]
        assert time.monotonic() - start < 5  # not held until the timeout by the silent one
        out["links"][1].send("hello")  # the links work, and block again (no handshake timeout left)
        assert links[0].recv() == "hello"
    finally:
        for s in (silent, garbage):
            s.close()
        server.close()


def test_a_missing_rank_is_named_within_the_timeout():
    key = os.urandom(32)
    server = _server("127.0.0.1")
    thread, out = _join_in_background(server, key, world=3, timeout_s=1.5)
    dial(server.getsockname()[:2], key, 1, 5.0)
    thread.join(10)
    server.close()
    assert "ranks [2] did not open their control link" in str(out["error"])


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_links_over_ipv6():
    key = os.urandom(32)
    try:
        server = _server("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    thread, out = _join_in_background(server, key, world=2, timeout_s=10)
    link = dial(("::1", server.getsockname()[1]), key, 1, 5.0)
    thread.join(10)
    server.close()
    assert sorted(out["links"]) == [1]
    link.send(7)
    assert out["links"][1].recv() == 7
