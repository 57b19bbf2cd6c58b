"""The server's lifecycle: listen, run one session per connection, shut down cleanly.

:class:`Server` owns the listening socket, the registry and every session.
Each accepted connection gets a :class:`~achat.server.session.Session` as
its protocol (``loop.create_server``, the layer under
``asyncio.start_server``: a connection costs no task and no stream
objects). :meth:`Server.close` is idempotent: it stops accepting, tells every
client ``server_shutdown``, flushes and closes each connection, waits for
them to be gone and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Callable

from ..errors import ProtocolError
from ..protocol.names import preload as preload_names
from ..store.base import Store
from .alarms import Alarms
from .config import ServerConfig
from .limits import AddressLimits
from .listen import Address, bind_one_port, passive_addresses
from .refs import REF_BYTES
from .registry import Registry
from .runtime import memory_limit
from .session import FlushRounds, Session

__all__ = ["Server", "memory_notice", "refs_limit", "wall_clock_ms"]

log = logging.getLogger("achat.server")


LISTEN_BACKLOG = 4096


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch, the ``ts`` of protocol v1."""
    return time.time_ns() // 1_000_000


def refs_limit(config: ServerConfig, memory: int | None) -> int:
    """The most refs the server remembers at once: ``--max-refs``, or what half of
    ``memory`` (the bytes this server may use) holds at REF_BYTES a ref; 0: no limit
    (``--max-refs 0``, or the memory unknown)."""
    if config.max_refs is not None:
        return config.max_refs
    return memory // 2 // REF_BYTES if memory else 0


def memory_notice(
    config: ServerConfig, memory: int | None, max_refs: int
) -> tuple[int, str] | None:
    """What to tell the operator at start about the memory of the refs of the last ten
    minutes (a logging level and a line), given ``memory``, the bytes this server may
    use (None if unknown), and ``max_refs``, the most it remembers (0: no limit).

    A warning when ``max_refs`` refs would take over half of ``memory`` (a limit set by
    hand), when a full server at its flood limit would keep more refs than
    ``max_refs`` (its says past them refused), or, with no limit, when its refs would
    take over half of ``memory``; a note when there is no flood limit; else nothing."""
    if max_refs and memory is not None and max_refs * REF_BYTES > memory // 2:
        return logging.WARNING, (
            f"--max-refs {max_refs} lets the refs of the last ten minutes take about "
            f"{max_refs * REF_BYTES / 2**30:.1f} GiB, over half of the "
            f"{memory / 2**30:.1f} GiB this server may use (the README's Sizing a server)"
        )
    estimate = config.refs_memory_estimate()
    held = f"{max_refs:,} refs (about {max_refs * REF_BYTES / 2**30:.1f} GiB)"
    if estimate is None:
        bound = f"at most {held}" if max_refs else "as many as messages come"
        return logging.INFO, (
            f"no flood limit (--rate 0): the server remembers {bound} of the last ten "
            f"minutes, about {REF_BYTES} B each"
        )
    full = (
        f"{config.max_clients} clients at --rate {config.limits.flood.rate:g} would keep "
        f"about {estimate / 2**30:.1f} GiB of refs of the last ten minutes"
    )
    if max_refs:
        if estimate <= max_refs * REF_BYTES:
            return None
        return logging.WARNING, (
            f"{full}, more than the {held} this server remembers at most (--max-refs): "
            "past them it refuses says with rate_limited until old ones expire"
        )
    if memory is None or estimate <= memory // 2:
        return None
    return logging.WARNING, (
        f"{full}, over half of the {memory / 2**30:.1f} GiB this server may use, and "
        "--max-refs 0 sets no limit: lower --max-clients or --rate, or set --max-refs "
        "(the README's Sizing a server)"
    )


def defer_on_loop(callback: Callable[[], None], delay: float) -> None:
    """Run ``callback`` on the running loop ``delay`` seconds from now (0: this tick)."""
    loop = asyncio.get_running_loop()
    if delay > 0:
        loop.call_later(delay, callback)
    else:
        loop.call_soon(callback)


class Server:
    """An achat server bound to one address (or an injected listening socket)."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        memory: Callable[[], int | None] = memory_limit,
    ) -> None:
        self.config = config
        self.store = store
        self._memory = memory()  # what the server may use, bytes (None: unknown)
        #: The most refs the registry remembers at once (0: no limit).
        self.max_refs = refs_limit(config, self._memory)
        # Now, not at the first hello (and before the caller freezes startup objects).
        preload_names()
        self.registry = Registry(
            store,
            clock=clock,
            name=config.name,
            motd=config.motd,
            max_text=config.max_text,
            max_frame=config.max_frame,
            max_clients=config.max_clients,
            password=config.password,
            flood=config.limits.flood,
            defer=defer_on_loop,
            max_refs=self.max_refs,
        )
        self._addresses = AddressLimits(
            max_concurrent=config.max_per_ip,
            max_per_minute=config.max_new_per_ip,
            exempt_loopback=config.exempt_loopback,
        )
        self._sessions: set[Session] = set()
        #: What writes every connection (made by :meth:`start`).
        self.rounds: FlushRounds | None = None
        self._changed = asyncio.Event()
        # Usually one; one for each address with --port 0 and a host of several (_listen).
        self._servers: list[asyncio.Server] = []
        self._closed = asyncio.Event()
        self._closing = False

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (empty before :meth:`start`)."""
        return [sock for server in self._servers for sock in server.sockets]

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        for sock in self.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("server not started")

    @property
    def connections(self) -> int:
        return len(self._sessions)

    def stats(self) -> dict[str, int]:
        """Counters for operators (logged on SIGUSR1): connections, members, rooms, tasks, fds,
        the times the server was too busy writing to take says, the connections cut off
        for their send queue, and the refs remembered, their limit and the messages
        refused for it."""
        fds = rss_kb = -1
        with contextlib.suppress(OSError, ValueError, IndexError):
            fds = len(os.listdir("/proc/self/fd"))
            with open("/proc/self/statm") as statm:
                rss_kb = int(statm.read().split()[1]) * resource.getpagesize() // 1024
        return {
            "connections": len(self._sessions),
            "members": len(self.registry.members),
            "rooms": len(self.registry.rooms),
            "tasks": len(asyncio.all_tasks()),
            "rss_kb": rss_kb,
            "fds": fds,
            # Times writing fell so far behind that says were refused, and how many.
            "busy_spells": self.rounds.spells if self.rounds is not None else 0,
            "busy_refused": self.rounds.refused if self.rounds is not None else 0,
            # Connections cut off with sendq_exceeded.
            "sendq_cut": self.rounds.cut_off if self.rounds is not None else 0,
            "refs": self.registry.refs_in_force,
            "max_refs": self.max_refs,
            "refs_refused": self.registry.refs_refused,
        }

    async def wait_connections(self, count: int) -> None:
        """Return once exactly ``count`` connections are open (and registered, if any)."""
        await self.wait_for(
            lambda: len(self._sessions) == count and len(self.registry.members) <= count
        )

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is checked whenever a connection comes or goes."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        # Wake everyone waiting on a change; the next wait uses a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start listening, on ``sock`` if given, else on the configured host and port."""
        loop = asyncio.get_running_loop()
        self.rounds = rounds = FlushRounds(loop, busy_after=self.config.limits.write_lag)
        alarms: Alarms[Session] = Alarms(loop)
        registry, limits = self.registry, self.config.limits

        def session() -> Session:
            return Session(self, registry, limits, rounds, alarms)

        if sock is not None:
            self._servers = [await loop.create_server(session, sock=sock)]
        else:
            self._servers = await self._listen(loop, session)
        addrs = ", ".join(str(s.getsockname()[:2]) for s in self.sockets)
        log.info("listening on %s name=%s", addrs, self.config.name)
        notice = memory_notice(self.config, self._memory, self.max_refs)
        if notice is not None:
            log.log(*notice)
        loaded = self.registry.refs_in_force
        if 0 < self.max_refs <= loaded:
            log.warning(
                "%d refs of the last ten minutes loaded from the store, --max-refs %d: "
                "messages with new refs are refused until they expire (ten minutes at most)",
                loaded,
                self.max_refs,
            )

    async def _listen(
        self, loop: asyncio.AbstractEventLoop, session: Callable[[], Session]
    ) -> list[asyncio.Server]:
        """Listen on the configured host and port: with port 0 and a host of several
        addresses, on one port for all of them (:mod:`.listen`)."""
        host, port = self.config.host, self.config.port
        # A class joining at once must not overflow the accept queue (asyncio's default
        # is 100); the kernel caps this at net.core.somaxconn.
        backlog = LISTEN_BACKLOG
        addresses: list[Address] = []
        if port == 0:
            infos = await loop.getaddrinfo(
                host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            addresses = passive_addresses(infos)
        if len(addresses) < 2:
            server = await loop.create_server(
                session, host, port, reuse_address=True, backlog=backlog
            )
            return [server]
        servers: list[asyncio.Server] = []
        socks = bind_one_port(addresses, backlog)
        try:
            for sock in socks:
                servers.append(
                    await loop.create_server(
                        session, sock=sock, backlog=backlog, start_serving=False
                    )
                )
            for server in servers:
                await server.start_serving()
        except BaseException:
            for server in servers:
                server.close()
            for sock in socks[len(servers) :]:
                sock.close()
            raise
        return servers

    async def serve_until_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        await self._closed.wait()

    async def close(self, message: str = "the server is shutting down") -> None:
        """Stop accepting, tell everyone ``server_shutdown``, close every connection. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for server in self._servers:
                server.close()
            shutdown = ProtocolError("server_shutdown", message, fatal=True)
            for session in list(self._sessions):
                session.fail(shutdown)
            # Each connection is gone once its peer has read the goodbye, or close_timeout
            # later (the session aborts it then); the extra second is the safety net.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.limits.close_timeout + 1):
                    while self._sessions:
                        await self._changed.wait()
            for server in self._servers:
                await server.wait_closed()
            self.store.close()
            log.info("closed")
        finally:
            self._closed.set()

    # -- SessionOwner -------------------------------------------------------

    def opened(self, session: Session) -> ProtocolError | None:
        """Admit a new connection, or say why it is refused."""
        if self._closing:
            return ProtocolError("server_shutdown", "the server is shutting down")
        refused = self._addresses.admit(session.host, asyncio.get_running_loop().time())
        if refused is not None:
            log.info("refused addr=%s: %s", session.addr, refused)
            return ProtocolError("rate_limited", refused, fatal=True)
        self._sessions.add(session)
        self._notify()
        log.debug("connect addr=%s", session.addr)
        return None

    def closed(self, session: Session) -> None:
        """Forget a connection that is gone (refused ones were never counted)."""
        if session in self._sessions:
            self._sessions.discard(session)
            self._addresses.release(session.host)
            self._notify()
            log.debug("disconnect addr=%s", session.addr)
