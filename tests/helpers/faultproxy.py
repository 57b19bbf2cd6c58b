"""A TCP proxy for tests that misbehaves on purpose: delay, fragmentation, slow links, resets.

Listen on ``127.0.0.1:0`` in front of a real server and point a client at
:attr:`FaultProxy.port`. Faults can be changed while traffic flows:

- ``delay``: seconds to hold every chunk before forwarding it;
- ``fragment``: forward in pieces of 1 to ``fragment`` bytes (each written separately);
- ``bandwidth``: bytes per second per direction (0 = unlimited);
- :meth:`FaultProxy.reset_after`: abort every connection once that many more bytes
  have gone from server to client, which cuts a frame in the middle;
- :meth:`FaultProxy.reset_all`: abort every connection now.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

__all__ = ["FaultProxy"]


class FaultProxy:
    """A misbehaving TCP proxy bound to 127.0.0.1 on a free port."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay: float = 0.0,
        fragment: int = 0,
        bandwidth: int = 0,
        seed: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.fragment = fragment
        self.bandwidth = bandwidth
        self.random = random.Random(seed)
        self.resets = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reset_budget: int | None = None
        #: Set whenever the proxy cuts its connections (cleared by reset_after).
        self.cut = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all(count=False)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def reset_all(self, *, count: bool = True) -> None:
        """Abort every proxied connection at once (both sides see a reset)."""
        for downstream, upstream in list(self._pairs):
            downstream.transport.abort()
            upstream.transport.abort()
            if count:
                self.resets += 1
        self._pairs.clear()
        if count:
            self.cut.set()

    def reset_after(self, nbytes: int) -> None:
        """Abort every connection after ``nbytes`` more bytes flow from server to client."""
        self.cut.clear()
        self._reset_budget = nbytes

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        to_server = asyncio.create_task(self._pump(reader, up_writer, downstream=False))
        to_client = asyncio.create_task(self._pump(up_reader, writer, downstream=True))
        self._tasks.update((to_server, to_client))
        try:
            await asyncio.wait((to_server, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pairs.discard(pair)
            for task in (to_server, to_client):
                task.cancel()
                self._tasks.discard(task)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            if downstream and self._reset_budget is not None:
                if len(data) >= self._reset_budget:
                    cut = self._reset_budget
                    self._reset_budget = None
                    writer.write(data[:cut])
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    self.reset_all()
                    return
                self._reset_budget -= len(data)
            for piece in self._pieces(data):
                writer.write(piece)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if self.bandwidth:
                    await asyncio.sleep(len(piece) / self.bandwidth)

    def _pieces(self, data: bytes) -> list[bytes]:
        if not self.fragment:
            return [data]
        pieces = []
        pos = 0
        while pos < len(data):
            size = self.random.randint(1, self.fragment)
            pieces.append(data[pos : pos + size])
            pos += size
        return pieces
