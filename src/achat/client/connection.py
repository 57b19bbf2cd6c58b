"""The public async client API: connect, send frames, and iterate over what the server says.

A :class:`Client` opens one TCP connection, says ``hello`` and waits for
``welcome``. A reader task then decodes every frame the server sends (the
server is treated as untrusted: bad frames are dropped and reported, never
raised into the caller) and puts it on the queue that :meth:`Client.events`
iterates. Replies that echo a ``ref`` also resolve the future of
:meth:`Client.request`, so a bot can write ``ack = await client.request(...)``.

Example::

    async with Client("127.0.0.1", 7777, "bot") as client:
        await client.join("ops")
        await client.request(client.say_frame("ops", "deploy finished"))
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

from ..errors import ConnectionClosed, FrameError, ProtocolError, ServerError
from ..protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder
from ..protocol.names import nick_key
from ..protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ClientFrame,
    Dm,
    Error,
    Hello,
    History,
    HistoryRequest,
    Join,
    Names,
    Nick,
    Part,
    Ping,
    Pong,
    Renamed,
    Rooms,
    RoomsRequest,
    Say,
    ServerFrame,
    Topic,
    Welcome,
    Who,
    decode_server,
    encode,
)

__all__ = ["Client", "Disconnected", "LocalNotice"]

log = logging.getLogger("achat.client")

#: The largest frame the client accepts whatever the server announces.
CLIENT_FRAME_CAP = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024

_REPLY_TYPES = (Ack, Error, Names, History, Rooms, Pong)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Event: the connection ended; ``reason`` says why in plain words."""

    reason: str


@dataclass(frozen=True, slots=True)
class LocalNotice:
    """Event: something the client noticed itself (a frame from the server it refused)."""

    text: str


Event = ServerFrame | Disconnected | LocalNotice


class Client:
    """One connection to an achat server, as one nick."""

    def __init__(
        self,
        host: str,
        port: int,
        nick: str,
        *,
        password: str | None = None,
        client_name: str = "achat",
        connect_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.nick = nick
        self.password = password
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.welcome: Welcome | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[ServerFrame]] = {}
        self._refs = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._closed = False

    # -- connecting -----------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.welcome is not None and not self._closed

    async def connect(self) -> Welcome:
        """Connect, say ``hello`` and return the ``welcome``.

        Raises :class:`ServerError` when the server refuses (``nick_taken``,
        ``invalid_nick`` …), :class:`ConnectionClosed` when it cannot be reached.
        """
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionClosed(f"cannot reach {self.host}:{self.port}: {exc}") from None
        self._reader, self._writer = reader, writer
        self._closed = False
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        writer.write(
            encode(
                Hello(
                    nick=self.nick,
                    version=PROTOCOL_VERSION,
                    password=self.password,
                    client=self.client_name,
                )
            )
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                first = await self._read_first(reader, decoder)
        except (TimeoutError, ConnectionClosed) as exc:
            writer.close()
            raise ConnectionClosed(f"no welcome from the server: {exc}") from None
        if isinstance(first, Error):
            writer.close()
            raise ServerError(first.code, first.message, fatal=True)
        if not isinstance(first, Welcome):
            writer.close()
            raise ConnectionClosed(f"the server answered hello with {type(first).__name__}")
        self.welcome = first
        self.nick = first.nick
        decoder.max_frame = min(max(first.max_frame, DEFAULT_MAX_FRAME), CLIENT_FRAME_CAP)
        self._reader_task = asyncio.create_task(self._read_loop(reader, decoder))
        return first

    async def _read_first(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> ServerFrame:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                raise ConnectionClosed("the server closed the connection")
            try:
                bodies = decoder.receive_data(data)
            except FrameError as exc:
                raise ConnectionClosed(f"bad frame from the server: {exc}") from None
            if bodies:
                frame = decode_server(bodies[0])
                # Frames after welcome in the same chunk are not lost.
                for body in bodies[1:]:
                    self._deliver_body(body)
                return frame

    # -- sending --------------------------------------------------------------

    def new_ref(self) -> str:
        """A fresh ``ref``, unique for this client object."""
        return next(self._refs)

    def send(self, frame: ClientFrame) -> None:
        """Queue ``frame`` for the server. Raises :class:`ConnectionClosed` when not connected."""
        if self._writer is None or self._closed or self._writer.is_closing():
            raise ConnectionClosed("not connected")
        self._writer.write(encode(frame))

    async def request(self, frame: ClientFrame, timeout: float = 30.0) -> ServerFrame:
        """Send ``frame`` (which must carry a ``ref``) and return the server's direct reply.

        Raises :class:`ServerError` if the reply is an ``error`` other than
        ``history_gap``, and :class:`ConnectionClosed` if the connection ends first.
        """
        ref = getattr(frame, "ref", None)
        if not ref:
            raise ValueError("request() needs a frame with a ref")
        future: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            self.send(frame)
            async with asyncio.timeout(timeout):
                reply = await future
        finally:
            self._pending.pop(ref, None)
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message, fatal=reply.fatal, ref=reply.ref)
        return reply

    def say_frame(self, room: str, text: str) -> Say:
        return Say(room=room, text=text, ref=self.new_ref())

    async def join(self, room: str, since: int | None = None) -> Names:
        """Join ``room`` and return its first ``names`` (messages after ``since`` follow as events)."""
        reply = await self.request(Join(room=room, since=since, ref=self.new_ref()))
        assert isinstance(reply, Names)
        return reply

    async def part(self, room: str, reason: str | None = None) -> None:
        self.send(Part(room=room, reason=reason, ref=self.new_ref()))

    async def say(self, room: str, text: str) -> Ack:
        """Send a message and wait until the server has stored it."""
        reply = await self.request(self.say_frame(room, text))
        assert isinstance(reply, Ack)
        return reply

    async def dm(self, to: str, text: str) -> Ack:
        reply = await self.request(Dm(to=to, text=text, ref=self.new_ref()))
        assert isinstance(reply, Ack)
        return reply

    async def who(self, room: str) -> Names:
        reply = await self.request(Who(room=room, ref=self.new_ref()))
        assert isinstance(reply, Names)
        return reply

    async def rooms(self) -> Rooms:
        reply = await self.request(RoomsRequest(ref=self.new_ref()))
        assert isinstance(reply, Rooms)
        return reply

    async def history(
        self, room: str, *, before: int | None = None, after: int | None = None, limit: int = 100
    ) -> History:
        reply = await self.request(
            HistoryRequest(room=room, before=before, after=after, limit=limit, ref=self.new_ref())
        )
        assert isinstance(reply, History)
        return reply

    def rename(self, nick: str) -> None:
        self.send(Nick(nick=nick, ref=self.new_ref()))

    def set_topic(self, room: str, topic: str) -> None:
        self.send(Topic(room=room, topic=topic, ref=self.new_ref()))

    async def ping(self) -> None:
        await self.request(Ping(ref=self.new_ref()))

    async def close(self, reason: str | None = None) -> None:
        """Say ``bye`` (if connected), wait for the server to close, release everything."""
        writer = self._writer
        if writer is not None and not writer.is_closing() and not self._closed:
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode(Bye(reason=reason)))
        self._closed = True
        if self._reader_task is not None:
            try:
                async with asyncio.timeout(2):
                    await asyncio.shield(self._reader_task)
            except (TimeoutError, asyncio.CancelledError):
                self._reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader_task
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    # -- receiving ------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every frame from the server, then one :class:`Disconnected`, then the end."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Disconnected):
                return

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event (for tests and simple bots)."""
        async with asyncio.timeout(timeout):
            return await self._events.get()

    async def _read_loop(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    bodies = decoder.receive_data(data)
                except FrameError as exc:
                    reason = f"the server sent a broken frame ({exc.message})"
                    break
                for body in bodies:
                    self._deliver_body(body)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
            closed = ConnectionClosed(reason)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(closed)
            self._events.put_nowait(Disconnected(reason))

    def _deliver_body(self, body: bytes) -> None:
        try:
            frame = decode_server(body)
        except ProtocolError as exc:
            log.warning("dropped a bad frame from the server: %s", exc)
            self._events.put_nowait(LocalNotice(f"ignored a bad frame from the server ({exc.code})"))
            return
        if isinstance(frame, _REPLY_TYPES):
            ref = frame.ref
            future = self._pending.get(ref) if ref else None
            if future is not None and not future.done():
                is_partial = isinstance(frame, Names | Rooms) and frame.more
                is_gap = isinstance(frame, Error) and frame.code == "history_gap"
                if not is_partial and not is_gap:
                    future.set_result(frame)
        if isinstance(frame, Renamed) and nick_key(frame.old) == nick_key(self.nick):
            self.nick = frame.new
        self._events.put_nowait(frame)
