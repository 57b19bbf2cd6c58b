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

import contextlib
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


#: A socket() that fails so says the host has no such family (IPv6 switched off, say),
#: though getaddrinfo names addresses of it: asyncio skips those addresses, and so do we.
_NO_FAMILY = (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


def bind_one_port(
    addresses: Sequence[Address],
    backlog: int,
    attempts: int = BIND_ATTEMPTS,
    new_socket: Callable[[int], socket.socket] = _socket,
) -> list[socket.socket]:
    """Listening, non-blocking sockets, one for each of ``addresses`` whose family the
    host has, all on the port the kernel picks for the first (the addresses' own ports
    are ignored). Options as ``loop.create_server`` sets them: ``SO_REUSEADDR``, and an
    IPv6 socket for IPv6 only, so that ``::`` leaves 0.0.0.0 to its own socket.

    OSError, naming the address, if a bind or listen fails for another reason than
    the port being taken, if the port is taken on some address ``attempts`` times
    running, or if the host has the family of none of them.
    """
    if not addresses:
        raise ValueError("no address to listen on")
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for _ in range(attempts - 1):
        # That port was free on the first address; another may be free on all.
        with contextlib.suppress(_TakenElsewhere):
            return _bind_all(addresses, backlog, new_socket)
    return _bind_all(addresses, backlog, new_socket)


class _TakenElsewhere(OSError):
    """The port the first address got is taken on a later one."""


def _bind_all(
    addresses: Sequence[Address], backlog: int, new_socket: Callable[[int], socket.socket]
) -> list[socket.socket]:
    """One attempt of bind_one_port: every socket it made is closed if it fails."""
    made: list[socket.socket] = []
    port = 0
    try:
        for family, sockaddr in addresses:
            try:
                sock = new_socket(family)
            except OSError as exc:
                if exc.errno in _NO_FAMILY:
                    continue
                raise
            made.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            address = (sockaddr[0], port, *sockaddr[2:])
            try:
                sock.bind(address)
                # Two sockets with SO_REUSEADDR may bind one address and port while
                # neither listens: the clash shows here, and is retried as a bind's.
                sock.listen(backlog)
            except OSError as exc:
                # Taken on the first address (port 0): no port is free at all.
                taken = exc.errno == errno.EADDRINUSE and port != 0
                raise (_TakenElsewhere if taken else OSError)(
                    exc.errno, f"cannot listen on {address[:2]}: {exc.strerror}"
                ) from exc
            port = port or sock.getsockname()[1]
        if not made:
            raise OSError(errno.EAFNOSUPPORT, "no address of a family this host has")
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made
