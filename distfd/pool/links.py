"""Control links: one authenticated connection between rank 0's coordinator and each rank's worker.

Images are made with collectives inside a group; the pool's own messages (which group makes which
image, results, stops) go over these links instead, so that groups work independently and a lost
rank is noticed at once (its connection closes). They are ``multiprocessing.connection`` objects:
pickled messages, HMAC-authenticated with a random key that only the ranks learn (through a
collective of the world, which they already trust). Rank 0 listens on the address it uses to reach
``MASTER_ADDR`` (``DISTFD_CONTROL_HOST`` overrides it; IPv4 or IPv6), on a free port; each connection
there has :data:`HANDSHAKE_S` to prove the key, so a stranger's connection is dropped, not waited on.
Rank 0's own worker talks to the coordinator (a thread of the same process) over a pipe. With one
rank there is no socket at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Pipe, answer_challenge, deliver_challenge

from ..runtime import DistContext, DistributedError

logger = logging.getLogger("distfd")

HANDSHAKE_S = 5.0  # a connection to the control port must prove itself within this


def connect(world: DistContext) -> tuple[dict[int, Connection] | None, Connection]:
    """Collective. Rank 0 gets (a link to every rank's worker, its own worker's end); every other
    rank gets (None, its link to rank 0). Bounded by ``world.timeout_s``."""
    coordinator_end, own_end = Pipe()
    if world.world_size == 1:
        return {0: coordinator_end}, own_end
    server = None
    if world.is_main:
        key = os.urandom(32)
        host = control_host()
        server = socket.create_server((host, 0), family=_family(host), backlog=64)
        offer = ((host, server.getsockname()[1]), key)
    else:
        offer = None
    address, key = world.broadcast_object(offer, src=0)
    if not world.is_main:
        coordinator_end.close()
        own_end.close()
        try:
            link = dial(tuple(address), key, world.rank, min(world.timeout_s, 60.0))
        except (OSError, EOFError, AuthenticationError) as e:
            raise DistributedError(
                f"rank {world.rank} cannot reach rank 0's control link at {address[0]}:{address[1]} ({e}); "
                "set DISTFD_CONTROL_HOST on rank 0 to an address the other ranks reach."
            ) from e
        return None, link
    try:
        links = accept_ranks(server, key, world.world_size, world.timeout_s)
    finally:
        server.close()
    links[0] = coordinator_end
    return links, own_end


def dial(address: tuple[str, int], key: bytes, rank: int, timeout_s: float) -> Connection:
    """A rank's side: connect (IPv4 or IPv6), prove the key, say which rank this is."""
    sock = socket.create_connection(address, timeout=timeout_s)
    conn = _connection(sock, timeout_s)
    answer_challenge(conn, key)
    deliver_challenge(conn, key)
    conn.send(rank)
    _set_timeout(conn, None)
    return conn


def accept_ranks(
    server: socket.socket, key: bytes, world_size: int, timeout_s: float, handshake_s: float = HANDSHAKE_S
) -> dict[int, Connection]:
    """Rank 0's side: a link from each of ranks 1..world_size-1 within ``timeout_s``. Each connection
    gets its own thread and ``handshake_s`` to prove the key and name its rank; one that sends
    garbage, stays silent or names a wrong rank is dropped and logged, and the real ranks still
    join (a stranger on the control port cannot stall start-up)."""
    links: dict[int, Connection] = {}
    lock = threading.Lock()
    joined = threading.Event()
    deadline = time.monotonic() + timeout_s

    def handshake(sock: socket.socket, peer: object) -> None:
        conn = None
        try:
            conn = _connection(sock, handshake_s)
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
            rank = conn.recv()
            if not (isinstance(rank, int) and 0 < rank < world_size):
                raise ValueError(f"it named rank {rank!r}")
            _set_timeout(conn, None)
            with lock:
                if rank in links:
                    raise ValueError(f"rank {rank} has a link already")
                links[rank] = conn
                if len(links) == world_size - 1:
                    joined.set()
        except Exception as e:  # noqa: BLE001 - anything a stranger sends ends its connection only
            logger.warning("control link: dropped a connection from %s (%s: %s)", peer, type(e).__name__, e)
            if conn is not None:
                conn.close()
            else:
                sock.close()

    server.settimeout(0.2)
    while not joined.is_set() and time.monotonic() < deadline:
        try:
            sock, peer = server.accept()
        except TimeoutError:
            continue
        except OSError as e:
            logger.warning("control link: accept failed (%s)", e)
            time.sleep(0.1)
            continue
        threading.Thread(target=handshake, args=(sock, peer), name="distfd-handshake", daemon=True).start()
    joined.wait(max(0.0, min(handshake_s, deadline - time.monotonic())))
    with lock:
        if len(links) < world_size - 1:
            missing = sorted(set(range(1, world_size)) - set(links))
            for conn in links.values():
                conn.close()
            raise DistributedError(
                f"rank 0: ranks {missing} did not open their control link within {timeout_s:.0f}s."
            )
        return dict(links)


def _connection(sock: socket.socket, timeout_s: float) -> Connection:
    """A ``multiprocessing`` connection over ``sock`` whose reads and writes give up after
    ``timeout_s`` (the socket's own timeouts: the connection reads the descriptor directly)."""
    sock.settimeout(None)
    conn = Connection(sock.detach())
    _set_timeout(conn, timeout_s)
    return conn


def _set_timeout(conn: Connection, seconds: float | None) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO on the link's socket (None: block, as the pool's links do)."""
    import struct

    whole = int(seconds or 0)
    value = struct.pack("ll", whole, int(((seconds or 0) - whole) * 1e6))
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.detach()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def control_host() -> str:
    """The address rank 0 listens on: ``DISTFD_CONTROL_HOST``, else its own address on the route to
    ``MASTER_ADDR`` (IPv4 or IPv6; no packet is sent), else the loopback address."""
    if os.environ.get("DISTFD_CONTROL_HOST"):
        return os.environ["DISTFD_CONTROL_HOST"].strip("[]")
    master = os.environ.get("MASTER_ADDR", "127.0.0.1").strip("[]")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(master, 1, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


__all__ = ["accept_ranks", "connect", "control_host", "dial"]
