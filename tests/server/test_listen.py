"""Several addresses bound on one port the kernel picks, with real sockets on loopback.

127.0.0.1 and 127.0.0.2 are both loopback on Linux, so two IPv4 addresses need no
IPv6; the tests of ``::`` beside 0.0.0.0 are skipped where the host has no IPv6.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from achat.server.listen import Address, bind_one_port, passive_addresses

V4 = socket.AF_INET
V6 = socket.AF_INET6
TWO_LOOPBACKS: list[Address] = [(V4, ("127.0.0.1", 0)), (V4, ("127.0.0.2", 0))]
BACKLOG = 16


def ipv6_works() -> bool:
    try:
        with socket.socket(V6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Sockets:
    """A socket factory for bind_one_port that keeps what it made, and can take the
    port the first address got on the second address before that one binds.

    The kernel may give the first address a port taken on the second in an earlier
    attempt (only the second address has it taken): that attempt fails as well,
    with no new blocker."""

    def __init__(self, block_second: int = 0) -> None:
        self.made: list[socket.socket] = []
        self.blockers: list[socket.socket] = []
        self.block_second = block_second  # attempts whose second address finds its port taken
        self.attempts = 0
        self.picked: list[int] = []  # the port the first address got, in each attempt

    @property
    def taken(self) -> set[int]:
        """The ports the blockers hold on the second address."""
        return {b.getsockname()[1] for b in self.blockers}

    def __call__(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.made.append(sock)
        if family == V4 and len(self.made) % 2 == 0:  # the second address of an attempt
            self.attempts += 1
            picked = self.made[-2].getsockname()[1]
            self.picked.append(picked)
            if self.attempts <= self.block_second and picked not in self.taken:
                blocker = socket.socket(V4, socket.SOCK_STREAM)
                blocker.bind(("127.0.0.2", picked))
                blocker.listen()
                self.blockers.append(blocker)
        return sock

    def close(self) -> None:
        for sock in self.made + self.blockers:
            sock.close()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


def ports(socks: list[socket.socket]) -> set[int]:
    return {s.getsockname()[1] for s in socks}


def test_every_address_gets_the_port_the_first_one_got(sockets: Sockets) -> None:
    socks = bind_one_port(TWO_LOOPBACKS, BACKLOG, new_socket=sockets)
    assert [s.getsockname()[0] for s in socks] == ["127.0.0.1", "127.0.0.2"]
    (port,) = ports(socks)
    assert port != 0
    for sock in socks:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    for host in ("127.0.0.1", "127.0.0.2"):
        with socket.create_connection((host, port), timeout=3):
            pass


def test_a_port_taken_on_a_later_address_is_given_up_for_another(sockets: Sockets) -> None:
    sockets.block_second = 3
    socks = bind_one_port(TWO_LOOPBACKS, BACKLOG, new_socket=sockets)
    # The first three attempts find their port taken, and so does any later one given
    # a port taken before; the first that is given a free one is kept.
    taken = sockets.taken
    assert sockets.attempts >= 4
    assert all(picked in taken for picked in sockets.picked[:-1])
    (port,) = ports(socks)
    assert port == sockets.picked[-1]
    assert port not in taken
    # What the failed attempts made is closed; only the last attempt's sockets are open.
    assert [s for s in sockets.made if s.fileno() != -1] == socks


def test_a_port_taken_every_time_ends_in_the_bind_error(sockets: Sockets) -> None:
    sockets.block_second = 4
    with pytest.raises(OSError, match="in use") as raised:
        bind_one_port(TWO_LOOPBACKS, BACKLOG, attempts=4, new_socket=sockets)
    assert raised.value.errno == errno.EADDRINUSE
    assert sockets.attempts == 4
    assert all(s.fileno() == -1 for s in sockets.made)


def _nonlocal_bind() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


@pytest.mark.skipif(_nonlocal_bind(), reason="this host binds addresses it does not have")
def test_an_address_that_cannot_be_bound_fails_at_once_naming_it(sockets: Sockets) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: EADDRNOTAVAIL, not a taken port.
    with pytest.raises(OSError, match=r"cannot listen on \('192\.0\.2\.1', \d+\)") as raised:
        bind_one_port([TWO_LOOPBACKS[0], (V4, ("192.0.2.1", 0))], BACKLOG, new_socket=sockets)
    assert raised.value.errno == errno.EADDRNOTAVAIL
    assert len(sockets.made) == 2  # no second attempt
    assert all(s.fileno() == -1 for s in sockets.made)


def test_an_address_of_a_family_the_host_lacks_is_left_out(sockets: Sockets) -> None:
    """IPv6 switched off: getaddrinfo still names ``::``, and socket() says no."""

    def no_ipv6(family: int) -> socket.socket:
        if family == V6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return sockets(family)

    everywhere: list[Address] = [(V6, ("::", 0, 0, 0)), (V4, ("127.0.0.1", 0))]
    [sock] = bind_one_port(everywhere, BACKLOG, new_socket=no_ipv6)
    assert sock.family == V4
    with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=3):
        pass
    with pytest.raises(OSError, match="no address of a family"):
        bind_one_port(everywhere[:1], BACKLOG, new_socket=no_ipv6)


def test_nothing_to_bind_is_an_error() -> None:
    with pytest.raises(ValueError, match="no address"):
        bind_one_port([], BACKLOG)
    with pytest.raises(ValueError, match="attempts"):
        bind_one_port(TWO_LOOPBACKS, BACKLOG, attempts=0)


@pytest.mark.skipif(not ipv6_works(), reason="no IPv6 on this host")
def test_every_interface_of_both_families_on_one_port() -> None:
    # Without IPV6_V6ONLY the socket on :: would take the port on 0.0.0.0 as well, and
    # the bind of the other one would fail.
    socks = bind_one_port([(V4, ("0.0.0.0", 0)), (V6, ("::", 0, 0, 0))], BACKLOG)
    try:
        (port,) = ports(socks)
        assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=3):
                pass
    finally:
        for sock in socks:
            sock.close()


def test_passive_addresses_keeps_each_address_once_in_order() -> None:
    infos = [
        (V6, socket.SOCK_STREAM, 6, "", ("::", 0, 0, 0)),
        (V4, socket.SOCK_STREAM, 6, "", ("0.0.0.0", 0)),
        (V6, socket.SOCK_STREAM, 6, "", ("::", 0, 0, 0)),
    ]
    assert passive_addresses(infos) == [(V6, ("::", 0, 0, 0)), (V4, ("0.0.0.0", 0))]
