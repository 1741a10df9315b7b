"""Control links: one authenticated connection between rank 0's coordinator and each rank's worker.

Images are made with collectives inside a group; the pool's own messages (which group makes which
image, results, stops) go over these links instead, so that groups work independently and a lost
rank is noticed at once (its connection closes). They are ``multiprocessing.connection`` objects:
pickled messages, HMAC-authenticated with a random key that only the ranks learn (through a
collective of the world, which they already trust). Rank 0 listens on the address it uses to reach
``MASTER_ADDR`` (``DISTFD_CONTROL_HOST`` overrides it), on a free port. Rank 0's own worker talks to
the coordinator (a thread of the same process) over a pipe. With one rank there is no socket at all.
"""

from __future__ import annotations

import os
import socket
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, Pipe

from ..runtime import DistContext, DistributedError


def connect(world: DistContext) -> tuple[dict[int, Connection] | None, Connection]:
    """Collective. Rank 0 gets (a link to every rank's worker, its own worker's end); every other
    rank gets (None, its link to rank 0). Bounded by ``world.timeout_s``."""
    coordinator_end, own_end = Pipe()
    if world.world_size == 1:
        return {0: coordinator_end}, own_end
    listener = None
    if world.is_main:
        key = os.urandom(32)
        listener = Listener((control_host(), 0), authkey=key)
        offer = (listener.address, key)
    else:
        offer = None
    address, key = world.broadcast_object(offer, src=0)
    if not world.is_main:
        coordinator_end.close()
        own_end.close()
        try:
            link = Client(tuple(address), authkey=key)
            link.send(world.rank)
        except OSError as e:
            raise DistributedError(
                f"rank {world.rank} cannot reach rank 0's control link at {address[0]}:{address[1]} ({e}); "
                "set DISTFD_CONTROL_HOST on rank 0 to an address the other ranks reach."
            ) from e
        return None, link
    links = _accept_all(listener, world)
    links[0] = coordinator_end
    return links, own_end


def _accept_all(listener: Listener, world: DistContext) -> dict[int, Connection]:
    links: dict[int, Connection] = {}
    failure: list[BaseException] = []

    def accept() -> None:
        while len(links) < world.world_size - 1:
            try:
                conn = listener.accept()
                rank = conn.recv()
            except (AuthenticationError, EOFError) as e:  # not one of the ranks: ignored
                failure.append(e)
                continue
            except OSError as e:  # the listener was closed (timeout)
                failure.append(e)
                return
            if isinstance(rank, int) and 0 < rank < world.world_size and rank not in links:
                links[rank] = conn
            else:
                conn.close()

    thread = threading.Thread(target=accept, name="distfd-links", daemon=True)
    thread.start()
    thread.join(world.timeout_s)
    listener.close()
    if len(links) < world.world_size - 1:
        missing = sorted(set(range(1, world.world_size)) - set(links))
        why = f" ({failure[0]})" if failure else ""
        raise DistributedError(
            f"rank 0: ranks {missing} did not open their control link within {world.timeout_s:.0f}s{why}."
        )
    return links


def control_host() -> str:
    """The address rank 0 listens on: ``DISTFD_CONTROL_HOST``, else its own address on the route to
    ``MASTER_ADDR`` (no packet is sent), else the loopback address."""
    if os.environ.get("DISTFD_CONTROL_HOST"):
        return os.environ["DISTFD_CONTROL_HOST"]
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(master, 1, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


__all__ = ["connect", "control_host"]
