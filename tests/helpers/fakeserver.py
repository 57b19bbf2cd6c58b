"""A one-off TCP server that runs a test's own handler: a peer that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder

__all__ = ["WELCOME", "FakeServer", "OnFrame", "answering", "fake_server", "joined", "numbered"]

FakeServer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OnFrame = Callable[[asyncio.StreamWriter, m.ClientFrame], Awaitable[None]]
Numbered = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(handler: FakeServer) -> AsyncIterator[int]:
    """A one-off server running ``handler``; every connection is closed on the way out."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await handler(reader, writer)

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        await server.wait_closed()


def numbered(handler: Numbered) -> FakeServer:
    """A server that runs ``handler`` with the number of each connection, from 1."""
    numbers = itertools.count(1)

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(next(numbers), reader, writer)

    return run


WELCOME = m.encode(m.Welcome(nick="ana", server="evil", version=1, max_frame=65536, max_text=4000))


def joined(writer: asyncio.StreamWriter, join: m.Join, seq: int = 0) -> None:
    """What a server says ana joining: joined, then names with the room at ``seq``."""
    writer.write(m.encode(m.Joined(room=join.room, nick="ana", ts=1)))
    writer.write(m.encode(m.Names(room=join.room, nicks=["ana"], topic="", seq=seq, ref=join.ref)))


def answering(on_frame: OnFrame) -> FakeServer:
    """A server that welcomes, lets ``on_frame`` answer every other frame, until bye."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for body in decoder.receive_data(data):
                frame = m.decode_client(body)
                if isinstance(frame, m.Bye):
                    writer.close()
                    return
                if isinstance(frame, m.Hello):
                    writer.write(WELCOME)
                else:
                    await on_frame(writer, frame)

    return handler
