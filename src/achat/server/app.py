"""The server's lifecycle: listen, run one session per connection, shut down cleanly.

:class:`Server` owns the listening socket, the registry and every session.
:meth:`Server.close` is idempotent: it stops accepting, tells every client
``server_shutdown``, flushes and closes each connection, waits for their
sessions to finish and closes the store.
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
from ..store.base import Store
from .config import ServerConfig
from .limits import AddressLimits
from .registry import Registry
from .session import FlushRounds, Session

__all__ = ["Server", "wall_clock_ms"]

log = logging.getLogger("achat.server")


LISTEN_BACKLOG = 4096


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch, the ``ts`` of protocol v1."""
    return time.time_ns() // 1_000_000


class Server:
    """An achat server bound to one address (or an injected listening socket)."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        *,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = Registry(
            store,
            clock=clock,
            name=config.name,
            motd=config.motd,
            max_text=config.max_text,
            max_frame=config.max_frame,
            max_clients=config.max_clients,
            password=config.password,
            defer=lambda callback: asyncio.get_running_loop().call_soon(callback),
        )
        self._addresses = AddressLimits(
            max_concurrent=config.max_per_ip,
            max_per_minute=config.max_new_per_ip,
            exempt_loopback=config.exempt_loopback,
        )
        self._sessions: set[Session] = set()
        self._rounds: FlushRounds | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closed = asyncio.Event()
        self._closing = False

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (empty before :meth:`start`)."""
        if self._server is None:
            return []
        return list(self._server.sockets)

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
        """Counters for operators (logged on SIGUSR1): connections, members, rooms, tasks, fds."""
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
        }

    async def wait_connections(self, count: int) -> None:
        """Return once exactly ``count`` connections are open (and registered, if any)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self._sessions) == count and len(self.registry.members) <= count
            )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start listening, on ``sock`` if given, else on the configured host and port."""
        self._rounds = FlushRounds(asyncio.get_running_loop())
        if sock is not None:
            self._server = await asyncio.start_server(self._on_connect, sock=sock, limit=2**16)
        else:
            self._server = await asyncio.start_server(
                self._on_connect,
                self.config.host,
                self.config.port,
                reuse_address=True,
                # A class joining at once must not overflow the accept queue (asyncio's
                # default is 100); the kernel caps this at net.core.somaxconn.
                backlog=LISTEN_BACKLOG,
            )
        addrs = ", ".join(str(s.getsockname()[:2]) for s in self.sockets)
        log.info("listening on %s name=%s", addrs, self.config.name)

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
            if self._server is not None:
                self._server.close()
            shutdown = ProtocolError("server_shutdown", message, fatal=True)
            for session in list(self._sessions):
                session.fail(shutdown)
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.config.limits.close_timeout + 1)
            if self._server is not None:
                await self._server.wait_closed()
            self.store.close()
            log.info("closed")
        finally:
            self._closed.set()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert self._rounds is not None  # set by start(), before any connection
        session = Session(reader, writer, self.registry, self.config.limits, self._rounds)
        if self._closing:
            session.fail(ProtocolError("server_shutdown", "the server is shutting down"))
            return
        host = session.host
        refused = self._addresses.admit(host, asyncio.get_running_loop().time())
        if refused is not None:
            log.info("refused addr=%s: %s", session.addr, refused)
            session.fail(ProtocolError("rate_limited", refused, fatal=True))
            return
        self._sessions.add(session)
        if task is not None:
            self._tasks.add(task)
        await self._notify()
        log.debug("connect addr=%s", session.addr)
        try:
            await session.run()
            # Let the close handshake finish so the socket is released before we forget it.
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The loop is going away without close(); this task is the top of its stack.
            session.close()
        finally:
            self._addresses.release(host)
            self._sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)
            await self._notify()
            log.debug("disconnect addr=%s", session.addr)
