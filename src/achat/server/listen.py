"""Listening on every address of a host on one port that the kernel picks.

``loop.create_server(host, 0)`` binds each address the host resolves to on
its own free port: ``--host ""`` (every interface) listens on 0.0.0.0 and
``::`` on two different ports, and a ``localhost`` that names both ::1 and
127.0.0.1 does the same. A server has one port to tell (its log, its
``--port-file``), so :func:`bind_one_port` binds the first address on port 0
and the others on the port that one got, starting over on another port
when that one is taken on some other address.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BIND_ATTEMPTS", "Address", "bind_one_port", "passive_addresses"]

#: Ports tried before giving up: each is free on the first address, so it is taken on
#: another only by chance.
BIND_ATTEMPTS = 32

#: A family and a socket address as ``getaddrinfo`` gives them (port included).
Address = tuple[int, tuple[Any, ...]]


def passive_addresses(infos: Sequence[tuple[Any, ...]]) -> list[Address]:
    """The distinct (family, address) of ``getaddrinfo`` results, in their order."""
    seen: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        address = (int(family), tuple(sockaddr))
        if address not in seen:
            seen.append(address)
    return seen


def _socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


def bind_one_port(
    addresses: Sequence[Address],
    attempts: int = BIND_ATTEMPTS,
    new_socket: Callable[[int], socket.socket] = _socket,
) -> list[socket.socket]:
    """Bound, non-blocking, not yet listening sockets, one for each of ``addresses``,
    all on the port the kernel picks for the first (the addresses' own ports are
    ignored). Options as ``loop.create_server`` sets them: ``SO_REUSEADDR``, and an
    IPv6 socket for IPv6 only, so that ``::`` leaves 0.0.0.0 to its own socket.

    OSError if a bind fails for another reason than the port being taken, or if it
    is taken on some address ``attempts`` times running.
    """
    if not addresses:
        raise ValueError("no address to listen on")
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        bound: list[socket.socket] = []
        port = 0
        try:
            for family, sockaddr in addresses:
                sock = new_socket(family)
                bound.append(sock)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
                port = port or sock.getsockname()[1]
        except OSError as exc:
            for sock in bound:
                sock.close()
            # Taken on a later address: that port was free on the first, another may be
            # free on all. On the first address (port 0) it means none is free at all.
            if exc.errno != errno.EADDRINUSE or len(bound) == 1 or attempt == attempts - 1:
                raise
            continue
        return bound
    raise AssertionError("unreachable: the last attempt returns or raises")
