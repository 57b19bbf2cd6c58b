"""A real server on 127.0.0.1 port 0, spoken to by real clients and raw sockets.

Every wait has a deadline (``asyncio.timeout``) so that a broken server fails a
test quickly instead of hanging it; nothing here sleeps to let things happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import msgspec
import pytest

from achat.client.connection import Client, Disconnected, Event
from achat.errors import ServerError
from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder, encode_frame
from achat.server.app import Server, memory_notice, refs_limit
from achat.server.config import ServerConfig
from achat.server.limits import FloodPolicy
from achat.server.refs import REF_BYTES
from achat.server.session import Session
from achat.store.base import RefRecord, Store
from achat.store.memory import MemoryStore
from tests.conftest import make_config
from tests.helpers.faultproxy import FaultProxy

E = TypeVar("E")

#: Seconds any single wait may take before the test fails.
WAIT = 3.0

OPEN: list[Raw] = []
SOCKETS: list[socket.socket] = []  # of slow_reader()


@pytest.fixture(autouse=True)
async def close_raw_connections() -> AsyncIterator[None]:
    yield
    while OPEN:
        raw = OPEN.pop()
        raw.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await raw.writer.wait_closed()
    while SOCKETS:
        SOCKETS.pop().close()


class Raw:
    """A hand-driven connection: write any bytes, read decoded frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(max_frame=10**7)
        self.frames: list[Any] = []

    @classmethod
    async def open(cls, port: int) -> Raw:
        raw = cls(*await asyncio.open_connection("127.0.0.1", port))
        OPEN.append(raw)
        return raw

    def send(self, obj: dict[str, Any] | bytes) -> None:
        """Send one frame: a dict is encoded as JSON, bytes are sent as the body as they are."""
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.writer.write(encode_frame(body))

    async def next(self, timeout: float = WAIT) -> Any:
        """The next frame from the server; EOFError if it closed first."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError
                self.frames += [m.decode_server(b) for b in self.decoder.receive_data(data)]
        return self.frames.pop(0)

    async def until(self, kind: type | tuple[type, ...], timeout: float = WAIT) -> Any:
        """Skip frames up to the first of type ``kind`` and return it."""
        while True:
            frame = await self.next(timeout)
            if isinstance(frame, kind):
                return frame

    async def rest(self, timeout: float = WAIT) -> list[Any]:
        """Every frame until the server closes the connection."""
        frames: list[Any] = []
        with contextlib.suppress(EOFError):
            while True:
                frames.append(await self.next(timeout))
        return frames

    async def closed(self, timeout: float = WAIT) -> bool:
        """True once the server has closed the connection (frames before it are skipped)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        return True

    async def hello(self, nick: str) -> m.Welcome:
        self.send({"type": "hello", "nick": nick, "version": 1})
        welcome = await self.next()
        assert isinstance(welcome, m.Welcome)
        return welcome


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """A factory of servers with custom SessionLimits (and store); every one is closed
    at the end. On a ``slow_link`` the accepted sockets have a 4 KiB send buffer, so the
    server's unsent output builds up in its own queue after a few kilobytes."""
    made: list[Server] = []

    async def factory(
        *, store: Store | None = None, slow_link: bool = False, **limits: Any
    ) -> Server:
        srv = Server(make_config(**limits), store if store is not None else MemoryStore())
        if slow_link:
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await srv.start(sock=listener)
        else:
            await srv.start()
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        async with asyncio.timeout(10):
            await srv.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients made by connect(); each is closed at the end of the test."""
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


async def slow_reader(server: Server, nick: str, *bodies: bytes) -> socket.socket:
    """A raw connection with a 4 KiB receive buffer: it says hello as ``nick``, sends
    ``bodies`` as frames, and reads nothing until the test does."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    SOCKETS.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    hello = b'{"type":"hello","nick":"%s","version":1}' % nick.encode()
    await loop.sock_sendall(sock, b"".join(encode_frame(b) for b in (hello, *bodies)))
    return sock


async def read_to_end(sock: socket.socket) -> list[Any]:
    """Every frame the server sends on ``sock`` until it closes it."""
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(max_frame=10**6)
    frames: list[Any] = []
    async with asyncio.timeout(WAIT):
        while data := await loop.sock_recv(sock, 65536):
            frames += [m.decode_server(b) for b in decoder.receive_data(data)]
    return frames


JOIN_A = b'{"type":"join","room":"a"}'
JOIN_A_SINCE_0 = b'{"type":"join","room":"a","since":0}'


async def room_with_a_sloth(
    server: Server, clients: list[Client]
) -> tuple[Client, Client, socket.socket]:
    """Room ``a`` with a talker, a watcher and ``sloth``, a slow reader the watcher saw join."""
    talker = await connect(server, clients, "talker")
    watcher = await connect(server, clients, "watcher")
    await talker.join("a")
    await watcher.join("a")
    sloth = await slow_reader(server, "sloth", JOIN_A)
    while (await next_of(watcher, m.Joined)).nick != "sloth":
        pass
    return talker, watcher, sloth


async def cut_off_prefix(sock: socket.socket) -> list[int]:
    """The seqs a reader cut off for reading too slowly got, read to the end: checked
    to be a gapless prefix of the room's messages, then the fatal sendq_exceeded."""
    frames = await read_to_end(sock)
    got = [f.seq for f in frames if isinstance(f, m.Message)]
    assert got == list(range(1, len(got) + 1))
    assert isinstance(frames[-1], m.Error)
    assert (frames[-1].code, frames[-1].fatal) == ("sendq_exceeded", True)
    return got


async def resume_rest(server: Server, clients: list[Client], got: list[int], sent: int) -> None:
    """The cut-off reader, back as "sloth", joins room a since its last seq: it gets the
    rest of the ``sent`` messages, in order."""
    resumed = await connect(server, clients, "sloth")
    await resumed.join("a", since=got[-1] if got else 0)
    rest = await messages(resumed, sent - len(got))
    assert [x.seq for x in rest] == list(range(len(got) + 1, sent + 1))


async def connect(server: Server, clients: list[Client], nick: str) -> Client:
    # These servers' flood limit is off (make_config): so is the clients' own.
    c = Client("127.0.0.1", server.port, nick, send_rate=0)
    await c.connect()
    clients.append(c)
    return c


async def next_of(client: Client, kind: type[E], timeout: float = WAIT) -> E:
    """Skip events up to the first of type ``kind`` and return it."""
    async with asyncio.timeout(timeout):
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event


async def messages(client: Client, count: int, timeout: float = WAIT) -> list[m.Message]:
    """The next ``count`` room messages the client receives (other events skipped)."""
    return [x for x in await events_until(client, count, timeout) if isinstance(x, m.Message)]


async def events_until(client: Client, count: int, timeout: float = WAIT) -> list[Event]:
    """Every event up to and including the ``count``-th room message."""
    got: list[Event] = []
    seen = 0
    async with asyncio.timeout(timeout):
        while seen < count:
            event = await client.next_event()
            got.append(event)
            seen += isinstance(event, m.Message)
    return got


async def nothing_pending(client: Client, kind: type) -> bool:
    """True when no event of ``kind`` reached ``client`` before the answer to a fresh ping."""
    await client.ping()
    pending: list[Event] = []
    while True:
        event = await client.next_event(WAIT)
        pending.append(event)
        if isinstance(event, m.Pong):
            return not any(isinstance(e, kind) for e in pending)


# -- rooms and messages ---------------------------------------------------------------


async def test_broadcast_reaches_every_member_and_nobody_else(
    server: Server, clients: list[Client]
) -> None:
    """A message reaches every member of the room, the sender included, and no outsider."""
    ana, bob, carol = [await connect(server, clients, n) for n in ("ana", "bob", "carol")]
    outsider = await connect(server, clients, "zed")
    for c in (ana, bob, carol):
        await c.join("general")
    await outsider.join("elsewhere")
    ack = await ana.say("general", "hello everyone")
    assert (ack.room, ack.seq) == ("general", 1)
    for c in (ana, bob, carol):
        [message] = await messages(c, 1)
        assert (message.room, message.seq, message.sender, message.text) == (
            "general",
            1,
            "ana",
            "hello everyone",
        )
        assert message.ts == ack.ts
    assert await nothing_pending(outsider, m.Message)


async def test_several_senders_are_seen_in_one_seq_order(
    server: Server, clients: list[Client]
) -> None:
    """Messages from several concurrent senders reach all members in the same gapless seq order."""
    members = [await connect(server, clients, f"user{i}") for i in range(4)]
    for c in members:
        await c.join("general")
    acks = await asyncio.gather(
        *(c.say("general", f"{c.nick} says {k}") for c in members for k in range(10))
    )
    assert sorted(a.seq or 0 for a in acks) == list(range(1, 41))
    streams = [await messages(c, 40) for c in members]
    for stream in streams:
        assert [x.seq for x in stream] == list(range(1, 41))
        assert stream == streams[0]
    # Each sender's own messages keep the order they were sent in.
    for c in members:
        own = [x.text for x in streams[0] if x.sender == c.nick]
        assert own == [f"{c.nick} says {k}" for k in range(10)]


async def test_dm_reaches_only_the_recipient(server: Server, clients: list[Client]) -> None:
    """A DM (to a nick in any case) reaches only its recipient; an unknown nick is refused."""
    ana = await connect(server, clients, "ana")
    bob = await connect(server, clients, "Bob")
    carol = await connect(server, clients, "carol")
    ack = await ana.dm("BOB", "psst")
    dm = await next_of(bob, m.DmEvent)
    assert (dm.sender, dm.to, dm.text, dm.id, dm.ts) == ("ana", "Bob", "psst", ack.id, ack.ts)
    assert await nothing_pending(carol, m.DmEvent)
    with pytest.raises(ServerError) as refused:
        await ana.dm("nobody", "hello?")
    assert (refused.value.code, refused.value.fatal) == ("no_such_nick", False)
    await ana.ping()  # still connected


async def test_rename_is_seen_by_room_sharers(server: Server, clients: list[Client]) -> None:
    """A rename reaches the user and everyone sharing a room with them, and later frames use it."""
    ana = await connect(server, clients, "ana")
    bob = await connect(server, clients, "bob")
    loner = await connect(server, clients, "loner")
    await ana.join("a")
    await bob.join("a")
    ana.rename("Anna")
    for c in (ana, bob):
        renamed = await next_of(c, m.Renamed)
        assert (renamed.old, renamed.new) == ("ana", "Anna")
    assert ana.nick == "Anna"
    await ana.say("a", "new name")
    [message] = await messages(bob, 1)
    assert message.sender == "Anna"
    assert (await bob.who("a")).nicks == ["Anna", "bob"]
    assert await nothing_pending(loner, m.Renamed)


async def test_part_and_quit_notices(server: Server, clients: list[Client]) -> None:
    """part tells the room with its reason; a client that closes is seen leaving with quit."""
    ana = await connect(server, clients, "ana")
    bob = await connect(server, clients, "bob")
    await ana.join("a")
    await bob.join("a")
    await bob.part("a", "brb")
    for c in (ana, bob):
        parted = await next_of(c, m.Parted)
        assert (parted.room, parted.nick, parted.reason) == ("a", "bob", "brb")
    await bob.join("a")
    await bob.close()
    quit_ = await next_of(ana, m.Parted)
    assert (quit_.room, quit_.nick, quit_.reason) == ("a", "bob", "quit")
    assert (await ana.who("a")).nicks == ["ana"]


async def test_dropped_connection_quits_every_room(server: Server, clients: list[Client]) -> None:
    """A connection that is reset, with no bye, leaves each of its rooms with reason quit."""
    ana = await connect(server, clients, "ana")
    await ana.join("a")
    await ana.join("b")
    raw = await Raw.open(server.port)
    await raw.hello("mallory")
    raw.send({"type": "join", "room": "a"})
    raw.send({"type": "join", "room": "b", "ref": "last"})
    await raw.until(m.Names)
    await raw.until(m.Names)
    raw.writer.transport.abort()
    first = await next_of(ana, m.Parted)
    second = await next_of(ana, m.Parted)
    assert {(p.room, p.nick, p.reason) for p in (first, second)} == {
        ("a", "mallory", "quit"),
        ("b", "mallory", "quit"),
    }


async def test_bye_flushes_then_closes(server: Server, clients: list[Client]) -> None:
    """bye after a say: the say is answered, then the server closes; the room sees the reason."""
    ana = await connect(server, clients, "ana")
    await ana.join("a")
    raw = await Raw.open(server.port)
    await raw.hello("bob")
    raw.send({"type": "join", "room": "a"})
    raw.send({"type": "say", "room": "a", "text": "bye all", "ref": "s"})
    raw.send({"type": "bye", "reason": "off to bed"})
    frames = await raw.rest()
    assert [type(f) for f in frames] == [m.Joined, m.Names, m.Message, m.Ack]
    parted = await next_of(ana, m.Parted)
    assert (parted.nick, parted.reason) == ("bob", "off to bed")


async def test_who_rooms_history_and_since(server: Server, clients: list[Client]) -> None:
    """who, rooms, history (latest, before, after) and join-since answer over the wire."""
    ana = await connect(server, clients, "ana")
    await ana.join("a")
    for k in range(5):
        await ana.say("a", f"m{k}")
    ana.set_topic("a", "the topic")
    await next_of(ana, m.TopicEvent)
    names = await ana.who("a")
    assert (names.nicks, names.seq, names.topic) == (["ana"], 5, "the topic")
    listing = await ana.rooms_list()
    assert [(r.room, r.members, r.topic) for r in listing.rooms] == [("a", 1, "the topic")]
    latest = await ana.history("a", limit=2)
    assert ([x.text for x in latest.messages], latest.more) == (["m3", "m4"], True)
    before = await ana.history("a", before=4, limit=2)
    assert ([x.text for x in before.messages], before.more) == (["m1", "m2"], True)
    after = await ana.history("a", after=3)
    assert ([x.seq for x in after.messages], after.more) == ([4, 5], False)
    bob = await connect(server, clients, "bob")
    joined = await bob.join("a", since=3)
    assert (joined.nicks, joined.seq) == (["ana", "bob"], 5)
    assert [x.seq for x in await messages(bob, 2)] == [4, 5]
    await ana.say("a", "live")
    [live] = await messages(bob, 1)
    assert (live.seq, live.text) == (6, "live")


@pytest.mark.parametrize(("first", "second"), [("Ana", "aNA"), ("aoe", "аое")])
async def test_nick_collision_over_the_wire(server: Server, first: str, second: str) -> None:
    """A second connection whose nick differs only in case or by look-alikes gets nick_taken."""
    holder = await Raw.open(server.port)
    await holder.hello(first)
    raw = await Raw.open(server.port)
    raw.send({"type": "hello", "nick": second, "version": 1})
    error = await raw.next()
    assert (error.code, error.fatal) == ("nick_taken", True)
    assert await raw.closed()
    holder.send({"type": "ping", "ref": "p"})
    assert await holder.next() == m.Pong(ref="p")


async def test_client_reports_a_refused_hello(server: Server, clients: list[Client]) -> None:
    """Client.connect raises ServerError(nick_taken) for a nick in use in another case."""
    await connect(server, clients, "ana")
    with pytest.raises(ServerError) as refused:
        await connect(server, clients, "ANA")
    assert refused.value.code == "nick_taken"


# -- limits and errors -------------------------------------------------------------------


class HeldStore(MemoryStore):
    """Stores at once, but while ``holding`` tells the server only when released: a
    commit that lands exactly when a test says, as the SQLite writer's can."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        # Each held commit: how many messages it stored, and its callback.
        self.held: list[tuple[int, Callable[[], None]]] = []
        self.arrived = asyncio.Event()

    def append_many(
        self,
        messages: Sequence[m.Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        if not self.holding:
            super().append_many(messages, refs, on_stored)
            return
        count = len(messages)
        super().append_many(messages, refs, lambda: self.held.append((count, on_stored)))
        self.arrived.set()

    async def wait_held(self, count: int) -> None:
        """Until ``count`` messages are held."""
        async with asyncio.timeout(WAIT):
            while sum(n for n, _ in self.held) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def release(self) -> None:
        """Let every commit held so far land."""
        done, self.held = self.held, []
        for _, on_stored in done:
            on_stored()


async def test_a_busy_server_refuses_says_and_serves_everything_else(
    start: Callable[..., Awaitable[Server]],
) -> None:
    """While its writing is too far behind (FlushRounds.busy) a server refuses says with a
    non-fatal rate_limited that says when to send them again: nothing is stored or
    delivered, and every other frame is served, in order, whether frames come many in a
    read or one at a time."""
    server = await start(write_lag=0.25)
    assert server.rounds is not None
    talker, listener = await Raw.open(server.port), await Raw.open(server.port)
    await talker.hello("talker")
    await listener.hello("listener")
    for raw in (talker, listener):
        raw.send({"type": "join", "room": "r", "ref": "j"})
        await raw.until(m.Names)
    assert (await talker.until(m.Joined)).nick == "listener"
    server.rounds.busy = True
    frames = [{"type": "say", "room": "r", "text": f"no {i}", "ref": f"s{i}"} for i in range(8)]
    frames.insert(3, {"type": "ping", "ref": "p1"})
    frames.insert(5, {"type": "say", "room": "r", "text": "no ref"})
    talker.writer.write(b"".join(encode_frame(json.dumps(f).encode()) for f in frames))
    for frame in frames:
        reply = await talker.next()
        if frame["type"] == "ping":
            assert reply == m.Pong(ref="p1")
        else:
            assert (reply.code, reply.fatal, reply.ref) == ("rate_limited", False, frame.get("ref"))
            assert "busy" in reply.message
            assert reply.retry_after == 0.25  # the server's --write-lag
    server.rounds.busy = True  # the error frames were written: a pass, which ended it
    talker.send({"type": "say", "room": "r", "text": "alone", "ref": "s8"})
    reply = await talker.next()
    assert (reply.code, reply.ref) == ("rate_limited", "s8")
    assert server.rounds.refused == 10
    assert not server.rounds.busy
    talker.send({"type": "say", "room": "r", "text": "now", "ref": "a"})
    ack = await talker.until(m.Ack)
    assert (ack.ref, ack.seq) == ("a", 1)  # none of the refused was stored
    message = await listener.until(m.Message)
    assert (message.seq, message.text) == (1, "now")
    assert server.stats()["busy_refused"] == 10


async def test_a_busy_server_still_holds_a_flooder_to_the_flood_limit(
    start: Callable[..., Awaitable[Server]],
) -> None:
    """A say refused because the server is busy costs a token like any frame: a client
    that sends on regardless is refused for flooding, and then dropped, as ever."""
    server = await start(flood=FloodPolicy(rate=0.001, burst=3, strikes=2, strike_window=60))
    assert server.rounds is not None
    raw = await Raw.open(server.port)
    await raw.hello("flooder")
    raw.send({"type": "join", "room": "r", "ref": "j"})
    await raw.until(m.Names)
    server.rounds.busy = True
    says = [{"type": "say", "room": "r", "text": "x", "ref": f"s{i}"} for i in range(4)]
    raw.writer.write(b"".join(encode_frame(json.dumps(f).encode()) for f in says))
    busy = [await raw.next(), await raw.next()]  # the last two tokens
    assert [(e.code, e.ref, e.retry_after is not None) for e in busy] == [
        ("rate_limited", "s0", True),
        ("rate_limited", "s1", True),
    ]
    flooded = await raw.next()
    assert (flooded.code, flooded.fatal, flooded.retry_after) == ("rate_limited", False, None)
    assert "frames a second" in flooded.message
    dropped = await raw.next()
    assert (dropped.code, dropped.fatal) == ("rate_limited", True)
    assert await raw.closed()


async def test_the_client_says_again_what_a_busy_server_refused(
    clients: list[Client], start: Callable[..., Awaitable[Server]]
) -> None:
    """achat's client sends a say a busy server refused again once the refusal's
    retry_after has passed, at the pace it had: it was not sending too fast."""
    # A lag the two members' writes never fall behind by, even on a busy machine.
    server = await start(write_lag=0.3, flood=FloodPolicy(rate=5, burst=10))
    assert server.rounds is not None
    assert server.rounds.busy_after == 0.3  # --write-lag
    alice = Client("127.0.0.1", server.port, "alice")  # paced by the server's limit
    await alice.connect()
    clients.append(alice)
    bob = Client("127.0.0.1", server.port, "bob")
    await bob.connect()
    clients.append(bob)
    await alice.join("r")
    await bob.join("r")
    pace = (alice.budget.burst, alice.budget.rate)
    loop = asyncio.get_running_loop()
    server.rounds.busy = True
    began = loop.time()
    async with asyncio.timeout(WAIT):
        ack = await alice.say("r", "hello")
    assert loop.time() - began >= 0.3  # sent again no sooner than it was asked to
    assert server.rounds.refused == 1
    assert ack.seq == 1
    assert (alice.budget.burst, alice.budget.rate) == pace
    (message,) = await messages(bob, 1)
    assert (message.seq, message.text) == (1, "hello")
    assert await nothing_pending(bob, m.Message)  # delivered once


async def test_slow_reader_is_cut_off_alone(
    clients: list[Client], start: Callable[..., Awaitable[Server]], caplog: pytest.LogCaptureFixture
) -> None:
    """A member that stops reading gets sendq_exceeded and is dropped; the others get everything.

    It loses nothing either: what it missed comes back with join since. The server
    counts the cut and warns of it, with what the member left unread.
    """
    server = await start(sendq_limit=32 * 1024, slow_link=True)
    talker, watcher, sloth = await room_with_a_sloth(server, clients)
    sent = 0
    with caplog.at_level(logging.WARNING, logger="achat.server"):
        async with asyncio.timeout(WAIT):
            while server.registry.member("sloth") is not None:
                sent += 1
                await talker.say("a", f"{sent:04d} " + "x" * 1000)
    assert sent < 1000
    assert server.stats()["sendq_cut"] == 1
    [warning] = [r.getMessage() for r in caplog.records if "sendq_exceeded" in r.getMessage()]
    unread = int(warning.split("unread=")[1].split()[0])
    assert warning.startswith("sendq exceeded addr=127.0.0.1:")
    assert " nick=sloth unread=" in warning
    assert unread > 0  # the sloth left it unread: the server was not the slow one
    seen = await events_until(watcher, sent)
    assert [x.seq for x in seen if isinstance(x, m.Message)] == list(range(1, sent + 1))
    # The cut happens while a message fans out, so the part notice may follow it.
    left = [x for x in seen if isinstance(x, m.Parted)] or [await next_of(watcher, m.Parted)]
    assert [(p.nick, p.reason) for p in left] == [("sloth", "quit")]
    # The slow reader finally reads: a gapless prefix of the room, then the fatal error.
    got = await cut_off_prefix(sloth)
    assert len(got) < sent
    await resume_rest(server, clients, got, sent)


async def burst_of_says(talker: Raw, count: int, fill: str) -> list[int]:
    """``count`` says of 505 characters to room ``a``, pipelined in one write so that the
    server takes many at once; the seqs of those acked. The others must have been
    refused with a non-fatal rate_limited (the server busy), not lost."""
    talker.writer.write(
        b"".join(
            encode_frame(
                json.dumps(
                    {"type": "say", "room": "a", "text": f"{i:04d} " + fill * 500, "ref": str(i)}
                ).encode()
            )
            for i in range(count)
        )
    )
    answers = [await talker.until((m.Ack, m.Error)) for _ in range(count)]
    assert all(
        (a.code, a.fatal) == ("rate_limited", False) for a in answers if isinstance(a, m.Error)
    )
    acked = [a.seq for a in answers if isinstance(a, m.Ack)]
    assert None not in acked  # acks of room messages
    return cast(list[int], acked)


async def test_a_burst_over_the_send_limit_cuts_off_no_member_that_reads(
    clients: list[Client], start: Callable[..., Awaitable[Server]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Says taken all at once (pipelined by a talker, or what everyone said while the
    server was stopped) can queue more than the send limit for every member before
    one write: that is the server's backlog, not the members' slowness. Every member
    that reads gets all of it, nobody is cut off, and says are refused, not lost, while
    it is written."""
    limit = 16 * 1024
    server = await start(sendq_limit=limit)
    assert server.rounds is not None
    swamped, queued = server.rounds.swamped, []

    def seen(why: str) -> None:  # what was queued for one connection at once, seen
        queued.append(int(why.split(" bytes")[0].replace(",", "")))
        swamped(why)

    monkeypatch.setattr(server.rounds, "swamped", seen)
    watchers = [await connect(server, clients, f"w{i}") for i in range(3)]
    for watcher in watchers:
        await watcher.join("a")
    talker = await Raw.open(server.port)
    await talker.hello("talker")
    talker.send({"type": "join", "room": "a"})
    await talker.until(m.Names)
    count = 4 * limit // 500
    acked = await burst_of_says(talker, count, "x")
    for watcher in watchers:
        got = await messages(watcher, len(acked))
        assert [x.seq for x in got] == acked
        assert await nothing_pending(watcher, m.Error)
    assert server.stats()["sendq_cut"] == 0
    assert max(queued) > limit  # more than the limit was queued for one connection at once


async def test_the_rest_of_a_burst_is_a_readers_to_read_not_to_be_cut_off_for(
    clients: list[Client], start: Callable[..., Awaitable[Server]]
) -> None:
    """On links whose kernel takes little (4 KiB send buffers), a burst of three times
    the send limit mostly waits in the server's buffers. A member that reads is given
    the time to read it: the talker and the watcher get everything. The sloth, which
    reads nothing, is cut off, with a gapless prefix."""
    limit = 16 * 1024
    server = await start(sendq_limit=limit, slow_link=True)
    talker, watcher, sloth = await room_with_a_sloth(server, clients)
    burst = 3 * limit // 500  # said at once
    await asyncio.gather(*(talker.say("a", f"{i:04d} " + "x" * 500) for i in range(burst)))
    sent = burst
    async with asyncio.timeout(10 * WAIT):  # says refused meanwhile are sent again later
        while server.registry.member("sloth") is not None:
            sent += 1
            await talker.say("a", f"{sent:04d} " + "y" * 500)
    assert server.stats()["sendq_cut"] == 1
    seen = await events_until(watcher, sent)
    assert [x.seq for x in seen if isinstance(x, m.Message)] == list(range(1, sent + 1))
    got = await cut_off_prefix(sloth)
    assert len(got) < sent


async def test_a_reader_cut_off_gets_nothing_after_what_was_dropped(
    clients: list[Client], start: Callable[..., Awaitable[Server]]
) -> None:
    """The output dropped for sendq_exceeded ends the stream: no message stored meanwhile
    is written after it, so what the slow reader got is still a gapless prefix.

    The order is made exact: a commit lands between the fan-out that queues a big
    piece for the reader and the write that finds it over the limit. The close that
    follows must not write that commit to the reader (it once did: a stream jumped
    over the dropped piece, as seen under load by achat-bench's checking clients).
    """
    store = HeldStore()
    limit = 64 * 1024
    server = await start(store=store, sendq_limit=limit, slow_link=True)
    talker, watcher, sloth = await room_with_a_sloth(server, clients)
    member = server.registry.member("sloth")
    assert member is not None
    peer = cast(Session, member.peer)
    said = 0
    while peer.unsent < limit // 2:  # the reader's backlog, short of the limit
        said += 1
        await talker.say("a", f"{said:04d} " + "x" * 1000)
    store.holding = True
    big = [asyncio.create_task(talker.say("a", "y" * 1000)) for _ in range(limit // 2000)]
    await store.wait_held(len(big))
    big_ones = store.held
    store.held = []
    late = asyncio.create_task(talker.say("a", "the late one"))
    await store.wait_held(1)
    # Their fan-out at once, this tick, whatever the last one took (no pacing wait).
    server.registry._fan_out_ready = float("-inf")
    for _, on_stored in big_ones:  # the fan-out of these is due...
        on_stored()
    await asyncio.sleep(0)  # ...and done: the reader's write of them is due next
    assert server.registry.rooms["a"].stored_seq == said + len(big)
    assert server.registry.member("sloth") is not None
    store.release()  # a commit lands before that write
    sent = said + len(big) + 1
    assert (await late).seq == sent
    seen = await events_until(watcher, sent)
    assert [x.seq for x in seen if isinstance(x, m.Message)] == list(range(1, sent + 1))
    assert server.registry.member("sloth") is None
    got = await cut_off_prefix(sloth)
    assert len(got) <= said
    await resume_rest(server, clients, got, sent)


async def test_a_backlog_larger_than_the_send_limit_reaches_a_slow_resuming_reader(
    clients: list[Client], start: Callable[..., Awaitable[Server]]
) -> None:
    """join since, with five times the send limit stored since: the backlog is read from
    the store as the reader reads it, then come the live messages, all in seq order."""
    limit = 64 * 1024
    server = await start(sendq_limit=limit, slow_link=True)
    loop = asyncio.get_running_loop()
    talker = await connect(server, clients, "talker")
    await talker.join("a")
    stored = 5 * limit // 1000
    for i in range(stored):
        await talker.say("a", f"{i:04d} " + "x" * 1000)
    late = await slow_reader(server, "late", JOIN_A_SINCE_0)
    for i in range(5):  # live, while the backlog is still on its way
        await talker.say("a", f"live {i}")
    decoder = FrameDecoder(max_frame=10**6)
    frames: list[Any] = []
    async with asyncio.timeout(WAIT):
        while sum(isinstance(f, m.Message) for f in frames) < stored + 5:
            data = await loop.sock_recv(late, 4096)
            assert data, "closed"
            frames += [m.decode_server(b) for b in decoder.receive_data(data)]
    assert not [f for f in frames if isinstance(f, m.Error)]
    got = [f.seq for f in frames if isinstance(f, m.Message)]
    assert got == list(range(1, stored + 6))
    assert server.registry.member("late") is not None


async def test_a_burst_that_lands_while_a_reader_catches_up_is_read_after_its_backlog(
    clients: list[Client], start: Callable[..., Awaitable[Server]]
) -> None:
    """join since, with three times the send limit stored since, read slowly: a burst of
    over twice the limit, said at once while the backlog is on its way, waits behind
    it. It is the server's backlog, not the reader's slowness: the reader gets the
    backlog, then every message of the burst that was acked, all in seq order, and
    nobody is cut off."""
    limit = 64 * 1024
    server = await start(sendq_limit=limit, slow_link=True)
    loop = asyncio.get_running_loop()
    talker = await Raw.open(server.port)
    await talker.hello("talker")
    talker.send({"type": "join", "room": "a"})
    await talker.until(m.Names)
    stored = 3 * limit // 500
    for i in range(stored):
        talker.send({"type": "say", "room": "a", "text": f"{i:04d} " + "x" * 500})
        await talker.until(m.Ack)
    late = await slow_reader(server, "late", JOIN_A_SINCE_0)
    while (await talker.until(m.Joined)).nick != "late":
        pass
    member = server.registry.member("late")
    assert member is not None
    peer = cast(Session, member.peer)
    count = 2 * limit // 500
    acked = await burst_of_says(talker, count, "y")
    assert len(acked) * 500 > limit
    assert peer._sources  # the backlog is still on its way, the burst behind it
    decoder = FrameDecoder(max_frame=10**6)
    frames: list[Any] = []
    async with asyncio.timeout(WAIT):
        while sum(isinstance(f, m.Message) for f in frames) < stored + len(acked):
            data = await loop.sock_recv(late, 4096)
            assert data, "closed"
            frames += [m.decode_server(b) for b in decoder.receive_data(data)]
    assert not [f for f in frames if isinstance(f, m.Error)]
    got = [f.seq for f in frames if isinstance(f, m.Message)]
    assert got == list(range(1, stored + 1)) + acked
    assert server.stats()["sendq_cut"] == 0
    assert server.registry.member("late") is not None


@pytest.mark.parametrize("ending", ["bye", "end of stream"])
async def test_a_reader_that_ends_its_session_during_a_backlog_still_gets_all_of_it(
    clients: list[Client], start: Callable[..., Awaitable[Server]], ending: str
) -> None:
    """bye flushes what is queued, a backlog too, however far behind the reader is."""
    server = await start(slow_link=True)
    talker = await connect(server, clients, "talker")
    await talker.join("a")
    for i in range(300):
        await talker.say("a", f"{i:04d} " + "x" * 1000)
    bye = [b'{"type":"bye"}'] if ending == "bye" else []
    late = await slow_reader(server, "late", JOIN_A_SINCE_0, *bye)
    if ending != "bye":
        late.shutdown(socket.SHUT_WR)
    while server.registry.member("late") is not None:  # it leaves at once...
        await next_of(talker, m.Parted)
    frames = await read_to_end(late)  # ...and its backlog follows it out
    assert [f.seq for f in frames if isinstance(f, m.Message)] == list(range(1, 301))
    assert not [f for f in frames if isinstance(f, m.Error)]


class FailingHistory(MemoryStore):
    """A store whose history fails after ``pages`` more reads (a disk error)."""

    pages: int | None = None

    def history(self, room: str, **kwargs: Any) -> Any:
        if self.pages is not None:
            if self.pages == 0:
                raise OSError("disk I/O error")
            self.pages -= 1
        return super().history(room, **kwargs)


@pytest.mark.parametrize("pages", [0, 3])
async def test_a_backlog_the_store_cannot_read_ends_in_an_error_after_a_gapless_prefix(
    clients: list[Client], start: Callable[..., Awaitable[Server]], pages: int
) -> None:
    store = FailingHistory()
    server = await start(store=store)
    talker = await connect(server, clients, "talker")
    await talker.join("a")
    for i in range(100):
        await talker.say("a", f"{i:04d} " + "x" * 100)
    store.pages = pages
    frames = await read_to_end(await slow_reader(server, "late", JOIN_A_SINCE_0))
    assert isinstance(frames[0], m.Welcome)
    got = [f.seq for f in frames if isinstance(f, m.Message)]
    assert got == list(range(1, len(got) + 1))
    assert len(got) < 100
    assert isinstance(frames[-1], m.Error)
    assert (frames[-1].code, frames[-1].fatal) == ("unavailable", True)


async def test_first_frame_must_be_hello(server: Server) -> None:
    """Any frame before hello gets a fatal not_registered and the connection closes."""
    raw = await Raw.open(server.port)
    raw.send({"type": "join", "room": "a"})
    error = await raw.next()
    assert (error.code, error.fatal) == ("not_registered", True)
    assert await raw.closed()
    assert server.registry.members == []


async def test_hello_timeout(start: Callable[..., Awaitable[Server]]) -> None:
    """A connection that never says hello gets a fatal not_registered and is closed."""
    server = await start(hello_timeout=0.2)
    raw = await Raw.open(server.port)
    error = await raw.next()
    assert (error.code, error.fatal) == ("not_registered", True)
    assert await raw.closed()


async def test_idle_timeout(start: Callable[..., Awaitable[Server]]) -> None:
    """A registered connection that sends nothing (not even a pong) gets idle_timeout."""
    server = await start(idle_timeout=0.3)
    raw = await Raw.open(server.port)
    await raw.hello("quiet")
    frames = await raw.rest()
    assert frames[:-1] == [m.Ping(ref="keepalive")]
    assert isinstance(frames[-1], m.Error)
    assert (frames[-1].code, frames[-1].fatal) == ("idle_timeout", True)
    assert server.registry.member("quiet") is None


async def test_server_pings_a_quiet_client_and_keeps_it_if_it_answers(
    start: Callable[..., Awaitable[Server]],
) -> None:
    """Half-way to idle_timeout the server pings; a pong resets the clock; silence closes."""
    server = await start(idle_timeout=1.0)  # half a second to answer each ping in
    raw = await Raw.open(server.port)
    await raw.hello("quiet")
    ping = await raw.next()
    assert ping == m.Ping(ref="keepalive")
    raw.send({"type": "pong", "ref": "keepalive"})
    again = await raw.next()
    assert again == m.Ping(ref="keepalive")  # still connected: pinged a second time
    error = await raw.next()
    assert (error.code, error.fatal) == ("idle_timeout", True)


async def test_client_answers_server_pings(start: Callable[..., Awaitable[Server]]) -> None:
    """The Client answers the server's keepalive pings, so a silent reader stays connected."""
    server = await start(idle_timeout=1.0)  # half a second to answer each ping in
    async with Client("127.0.0.1", server.port, "lurker", send_rate=0) as lurker:
        # Nothing may happen for over two idle_timeouts: no error, no disconnect.
        with pytest.raises(TimeoutError):
            await lurker.next_event(timeout=2.2)
        assert lurker.connected
        assert server.registry.member("lurker") is not None


async def test_half_sent_frame_times_out(start: Callable[..., Awaitable[Server]]) -> None:
    """A frame that starts but never completes (slowloris) is closed with idle_timeout."""
    server = await start(frame_timeout=0.2)
    raw = await Raw.open(server.port)
    await raw.hello("slow")
    raw.writer.write(b"\x00\x00\x00\x20{")
    error = await raw.next()
    assert (error.code, error.fatal) == ("idle_timeout", True)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"\x00\x00\x00\x00", "bad_frame"),
        (b"\x00\x01\x00\x01", "frame_too_large"),
        (b"\xff\xff\xff\xff", "frame_too_large"),
    ],
)
async def test_framing_errors_are_fatal_and_hurt_nobody_else(
    server: Server, clients: list[Client], header: bytes, code: str
) -> None:
    """A bad length header closes that connection with its code; others keep chatting."""
    bystander = await connect(server, clients, "bystander")
    await bystander.join("a")
    raw = await Raw.open(server.port)
    await raw.hello("mallory")
    raw.send({"type": "join", "room": "a"})
    await raw.until(m.Names)
    raw.writer.write(header)
    error = await raw.next()
    assert (error.code, error.fatal) == (code, True)
    assert await raw.closed()
    parted = await next_of(bystander, m.Parted)
    assert (parted.nick, parted.reason) == ("mallory", "quit")
    ack = await bystander.say("a", "still fine")
    assert ack.seq == 1
    newcomer = await connect(server, clients, "newcomer")
    await newcomer.ping()


async def test_frames_before_a_bad_header_are_still_served(
    server: Server, clients: list[Client]
) -> None:
    """Complete frames that arrived in the same read as a bad header are handled before closing."""
    ana = await connect(server, clients, "ana")
    await ana.join("a")
    raw = await Raw.open(server.port)
    raw.writer.write(
        encode_frame(b'{"type":"hello","nick":"bob","version":1}')
        + encode_frame(b'{"type":"join","room":"a"}')
        + encode_frame(b'{"type":"say","room":"a","text":"last words","ref":"s"}')
        + b"\x00\x00\x00\x00"
    )
    frames = await raw.rest()
    assert [type(f) for f in frames] == [m.Welcome, m.Joined, m.Names, m.Message, m.Ack, m.Error]
    assert (frames[-1].code, frames[-1].fatal) == ("bad_frame", True)
    [message] = await messages(ana, 1)
    assert (message.sender, message.text) == ("bob", "last words")


async def test_the_log_names_what_ended_a_connection_for_a_bad_frame(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's log says which bad frame closed a connection: an undecodable one
    before hello, or a bad header after the frames before it were served; never a
    header read after a frame that had already ended the connection."""
    caplog.set_level(logging.INFO, logger="achat.server")
    # A frame that cannot be decoded before hello, then a header too large for any frame.
    raw = await Raw.open(server.port)
    raw.writer.write(encode_frame(b'{"type":"hello"') + b"\x7f\xff\xff\xff")
    [error] = await raw.rest()
    assert (error.code, error.fatal) == ("invalid_json", True)
    bad = [r.getMessage() for r in caplog.records if "bad frame" in r.getMessage()]
    assert len(bad) == 1
    assert bad[0].endswith("code=invalid_json")
    # A good hello, then the same header: that header is what ends this one.
    caplog.clear()
    raw = await Raw.open(server.port)
    raw.writer.write(
        encode_frame(b'{"type":"hello","nick":"ana","version":1}') + b"\x7f\xff\xff\xff"
    )
    frames = await raw.rest()
    assert [type(f) for f in frames] == [m.Welcome, m.Error]
    bad = [r.getMessage() for r in caplog.records if "bad frame" in r.getMessage()]
    assert len(bad) == 1
    assert bad[0].endswith("code=frame_too_large")


@pytest.mark.parametrize(
    ("body", "code", "ref"),
    [
        (b'{"type":"ping"', "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b'{"type":"ping","ref":"d","ref":"d"}', "invalid_json", None),
        (b'{"type":"warp","ref":"u"}', "unknown_type", "u"),
        (b'{"ref":"n"}', "unknown_type", "n"),
        (b'{"type":"say","room":"a","ref":"s"}', "missing_field", "s"),
        (b'{"type":"history","room":"a","limit":"ten","ref":"h"}', "missing_field", "h"),
        (b'{"type":"join","room":"NOPE","ref":"j"}', "invalid_room", "j"),
        (b'{"type":"say","room":"a","text":"x","ref":"r"}', "not_in_room", "r"),
        (b'{"type":"hello","nick":"x","version":1,"ref":"a"}', "already_registered", "a"),
    ],
)
async def test_content_errors_keep_the_connection(
    server: Server, body: bytes, code: str, ref: str | None
) -> None:
    """A frame with bad content gets a non-fatal error (echoing a ref); the session goes on."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    raw.send(body)
    error = await raw.next()
    assert isinstance(error, m.Error)
    assert (error.code, error.fatal) == (code, False)
    if ref is not None:
        assert error.ref == ref
    raw.send({"type": "join", "room": "a", "ref": "j2"})
    assert isinstance(await raw.next(), m.Joined)
    assert (await raw.next()).ref == "j2"
    raw.send({"type": "say", "room": "a", "text": "still here", "ref": "s2"})
    assert isinstance(await raw.next(), m.Message)
    assert (await raw.next()).ref == "s2"


async def test_already_registered_keeps_the_first_nick(server: Server) -> None:
    """A second hello on a registered connection is refused without changing the nick."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    raw.send({"type": "hello", "nick": "bob", "version": 1})
    error = await raw.next()
    assert (error.code, error.fatal) == ("already_registered", False)
    assert server.registry.member("ana") is not None
    assert server.registry.member("bob") is None


# -- lifecycle ---------------------------------------------------------------------------


async def test_shutdown_tells_everyone_and_frees_the_port(
    start: Callable[..., Awaitable[Server]],
) -> None:
    """close() sends a fatal server_shutdown to every connection, closes them, frees the port."""
    server = await start()
    port = server.port
    users = [Client("127.0.0.1", port, nick, send_rate=0) for nick in ("ana", "bob")]
    for c in users:
        await c.connect()
        await c.join("a")
    registered = await Raw.open(port)
    await registered.hello("carol")
    unregistered = await Raw.open(port)
    async with asyncio.timeout(WAIT):
        await server.wait_connections(4)
    async with asyncio.timeout(WAIT):
        await server.close()
        await server.close()  # idempotent
    for c in users:
        events: list[Event] = []
        async with asyncio.timeout(WAIT):
            async for event in c.events():
                events.append(event)
        errors = [e for e in events if isinstance(e, m.Error)]
        assert [(e.code, e.fatal) for e in errors] == [("server_shutdown", True)]
        assert isinstance(events[-1], Disconnected)
        await c.close()
    for raw in (registered, unregistered):
        [error] = await raw.rest()
        assert (error.code, error.fatal) == ("server_shutdown", True)
    assert server.connections == 0
    again = Server(make_config(port), MemoryStore())
    await again.start()
    try:
        assert again.port == port
        async with Client("127.0.0.1", port, "ana", send_rate=0) as ana:
            await ana.ping()
    finally:
        await again.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 on this host")
async def test_port_0_on_every_interface_is_one_port_for_both_families() -> None:
    """``--host "" --port 0`` listens on 0.0.0.0 and :: on the port it tells (asyncio
    would pick one for each), serves a client of each family, and stops both."""
    server = Server(replace(make_config(), host=""), MemoryStore())
    await server.start()
    port = server.port
    try:
        assert sorted(s.family for s in server.sockets) == [socket.AF_INET, socket.AF_INET6]
        assert {s.getsockname()[1] for s in server.sockets} == {port}
        for nick, host in (("four", "127.0.0.1"), ("six", "::1")):
            async with Client(host, port, nick, send_rate=0) as client:
                await client.ping()
    finally:
        async with asyncio.timeout(10):
            await server.close()
    for host in ("127.0.0.1", "::1"):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, port)


async def test_a_burst_is_coalesced_into_few_writes(server: Server) -> None:
    """Many frames in one read are answered together, in one write, not one write each."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    raw.writer.write(b"".join(encode_frame(b'{"type":"ping","ref":"%d"}' % i) for i in range(200)))
    async with asyncio.timeout(WAIT):
        first = await raw.reader.read(1 << 20)
    # All 200 pongs were written at once, so one read sees (nearly) all of them.
    pongs = raw.decoder.receive_data(first)
    assert len(pongs) >= 150
    assert [m.decode_server(b) for b in pongs[:3]] == [m.Pong(ref=str(i)) for i in range(3)]


async def test_fragmented_slow_link_is_served_correctly(
    server: Server, clients: list[Client]
) -> None:
    """Through a proxy that cuts traffic into 1-7 byte pieces, delays and throttles it,
    the server parses every frame and the client receives every reply."""
    proxy = await FaultProxy(
        "127.0.0.1", server.port, fragment=7, delay=0.001, bandwidth=200_000, seed=5
    ).start()
    try:
        far = Client("127.0.0.1", proxy.port, "faraway", send_rate=0)
        await far.connect()
        clients.append(far)
        near = await connect(server, clients, "near")
        await far.join("a")
        await near.join("a")
        for k in range(20):
            ack = await far.say("a", f"over a bad link {k} " + "é" * 50)
            assert ack.seq == k + 1
        got = await messages(near, 20)
        assert [x.text.split(" ")[4] for x in got] == [str(k) for k in range(20)]
        page = await far.history("a", limit=20)
        assert len(page.messages) == 20
    finally:
        await proxy.close()


async def test_a_bug_in_a_handler_closes_only_that_connection_after_its_replies(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception is logged; replies already queued still go out; others go on."""

    def broken(member: object, frame: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setitem(server.registry._handlers, m.Ping, broken)
    bystander = await Raw.open(server.port)
    await bystander.hello("bystander")
    raw = await Raw.open(server.port)
    raw.writer.write(
        encode_frame(json.dumps({"type": "hello", "nick": "victim", "version": 1}).encode())
        + encode_frame(b'{"type":"join","room":"lobby"}')
        + encode_frame(b'{"type":"ping","ref":"p"}')
    )
    frames = await raw.rest()
    assert [type(f) for f in frames] == [m.Welcome, m.Joined, m.Names]
    assert "error serving" in caplog.text
    await server.wait_connections(1)
    assert server.registry.member("victim") is None
    bystander.send({"type": "join", "room": "lobby"})
    assert isinstance(await bystander.until(m.Names), m.Names)


async def test_a_connection_is_forgotten_even_if_leaving_the_registry_fails(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(member: object, reason: str = "quit") -> None:
        raise RuntimeError("a bug")

    raw = await Raw.open(server.port)
    await raw.hello("ana")
    monkeypatch.setattr(server.registry, "unregister", broken)
    raw.writer.close()
    # The loop logs the callback's exception; the session is still dropped and released.
    async with asyncio.timeout(WAIT):
        await server.wait_for(lambda: server.connections == 0)
    assert server._addresses.connections("127.0.0.1") == 0


# -- a read of many frames --------------------------------------------------------------

_END = "the end"


def _random_frame(rng: random.Random) -> dict[str, Any]:
    """Mostly says, some refused (a room ana is not in, a bad text), some resent, among
    every other kind of frame, a few ending the connection."""
    kind = rng.choices(
        ["say", "ping", "who", "join", "part", "dm", "nick", "hello", "history", "bye", "x"],
        [80, 4, 3, 3, 2, 4, 2, 1, 2, 1, 2],
    )[0]
    obj: dict[str, Any] = {"type": kind}
    if kind == "say":
        obj["room"] = rng.choice(["a"] * 8 + ["c", "B!"])
        obj["text"] = rng.choice(["hi"] * 6 + ["yo", " ", "\x01", "{x}", "x" * 5000])
    elif kind in ("who", "join", "part", "history"):
        obj["room"] = rng.choice(["a", "c"])
    elif kind == "dm":
        obj |= {"to": rng.choice(["bob", "nobody"]), "text": "psst"}
    elif kind == "nick":
        obj["nick"] = rng.choice(["ana", "Ana", "ana2"])
    elif kind == "hello":
        obj |= {"nick": "x", "version": 1}
    ref = rng.choice([None, "r1", "r2", "r3", ""])
    if ref is not None and kind not in ("hello", "bye", "x"):
        obj["ref"] = ref
    return obj


async def _answers(bodies: list[bytes], *, one_read: bool, flood: FloodPolicy) -> list[Any]:
    """What ana and bob (in #a) get when ana's session reads ``bodies`` at once or one by
    one (times left out), up to the answer to the ping each sends last."""
    server = Server(make_config(flood=flood), MemoryStore())
    await server.start()
    try:
        ana, bob = await Raw.open(server.port), await Raw.open(server.port)
        for raw, nick in ((bob, "bob"), (ana, "ana")):
            await raw.hello(nick)
            raw.send({"type": "join", "room": "a"})
            await raw.until(m.Names)
        await bob.until(m.Joined)
        [session] = [s for s in server._sessions if s.nick == "ana"]
        frames = [encode_frame(body) for body in bodies]
        for data in [b"".join(frames)] if one_read else frames:
            session.data_received(data)
        seen = []
        for raw in (ana, bob):
            raw.send({"type": "ping", "ref": _END})
            got: list[Any] = []
            with contextlib.suppress(EOFError, ConnectionError):  # ana may have been closed
                # Its pong, or its refusal under the flood limit.
                while not (got and isinstance(got[-1], m.Pong | m.Error) and got[-1].ref == _END):
                    got.append(await raw.next())
            seen.append([_timeless(frame) for frame in got])
        return seen
    finally:
        await server.close()


def _timeless(frame: Any) -> Any:
    plain = msgspec.to_builtins(frame)
    plain.pop("ts", None)
    for message in plain.get("messages", ()):
        message.pop("ts", None)
    return plain


@pytest.mark.parametrize("seed", range(100))
async def test_a_read_of_many_frames_is_answered_as_one_read_a_frame(seed: int) -> None:
    """A session hands a read's says to the registry as runs: what every member gets is
    still what it gets when each frame comes in a read of its own, with or without a
    flood limit, whatever the other frames, refusals and resends among them."""
    rng = random.Random(seed)
    bodies = [json.dumps(_random_frame(rng)).encode() for _ in range(rng.randint(2, 25))]
    flood = rng.choice(
        [FloodPolicy(rate=0), FloodPolicy(rate=0.001, burst=6, strikes=4, strike_window=100)]
    )
    assert await _answers(bodies, one_read=True, flood=flood) == await _answers(
        bodies, one_read=False, flood=flood
    )


def test_the_refs_limit_is_half_the_memory_unless_set() -> None:
    defaults = ServerConfig()
    assert refs_limit(defaults, 8 * 2**30) == 4 * 2**30 // REF_BYTES
    assert refs_limit(defaults, None) == 0  # the memory unknown: no limit
    assert refs_limit(replace(defaults, max_refs=1_000), 8 * 2**30) == 1_000
    assert refs_limit(replace(defaults, max_refs=0), 8 * 2**30) == 0


def test_the_memory_notice_warns_when_a_full_server_would_keep_more_than_it_may() -> None:
    defaults = ServerConfig()
    estimate = defaults.refs_memory_estimate()
    assert estimate is not None
    # With a limit: nothing to say while a full server stays under it.
    room = -(-estimate // REF_BYTES)
    assert memory_notice(defaults, None, room) is None
    level, line = memory_notice(defaults, None, room - 1) or (None, "")
    assert level == logging.WARNING
    assert line.startswith("10000 clients at --rate 5 would keep about 6.7 GiB of refs")
    assert f"more than the {room - 1:,} refs" in line
    assert "refuses says with rate_limited" in line
    # Without one (--max-refs 0): over half the memory is warned of.
    assert memory_notice(defaults, 2 * estimate, 0) is None
    assert memory_notice(defaults, None, 0) is None
    level, line = memory_notice(defaults, 2 * estimate - 1, 0) or (None, "")
    assert level == logging.WARNING
    assert f"of the {(2 * estimate - 1) / 2**30:.1f} GiB this server may use" in line
    assert "--max-refs 0 sets no limit" in line
    # A limit set by hand that half the memory cannot hold, with a flood limit or not.
    for config in (defaults, make_config()):
        level, line = memory_notice(config, 8 * 2**30, 4 * 2**30 // REF_BYTES + 1) or (None, "")
        assert level == logging.WARNING
        assert "GiB, over half of the 8.0 GiB this server may use" in line
        _, line = memory_notice(config, 8 * 2**30, 4 * 2**30 // REF_BYTES) or (None, "")
        assert "over half" not in line  # exactly what half holds: the default
    # No flood limit: a note of what bounds the refs, if anything.
    for max_refs, bound in ((0, "as many as messages come"), (1_000, "at most 1,000 refs")):
        level, line = memory_notice(make_config(), None, max_refs) or (None, "")
        assert level == logging.INFO
        assert line.startswith(f"no flood limit (--rate 0): the server remembers {bound}")


@pytest.mark.parametrize(("gib", "warned"), [(4, True), (64, False)])
async def test_a_server_says_at_start_when_its_limits_could_outgrow_its_memory(
    caplog: pytest.LogCaptureFixture, gib: int, warned: bool
) -> None:
    """It starts and serves all the same; the warning is for its operator."""
    caplog.set_level(logging.INFO, logger="achat.server")
    config = replace(make_config(flood=FloodPolicy(rate=5)), max_clients=10_000)
    srv = Server(config, MemoryStore(), memory=lambda: gib * 2**30)
    await srv.start()
    try:
        assert srv.max_refs == gib * 2**30 // 2 // REF_BYTES
        lines = [r for r in caplog.records if "refs of the last ten minutes" in r.message]
        assert [r.levelno for r in lines] == ([logging.WARNING] if warned else [])
        async with Client("127.0.0.1", srv.port, "ana") as ana:  # it serves
            assert ana.welcome is not None
    finally:
        async with asyncio.timeout(10):
            await srv.close()


async def three_says(server: Server) -> list[Any]:
    """ana joins #a and says r0, r1 and r2; every frame she gets until all three are
    answered (with an ack or an error)."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    raw.send({"type": "join", "room": "a"})
    for i in range(3):
        raw.send({"type": "say", "room": "a", "text": f"t{i}", "ref": f"r{i}"})
    frames: list[Any] = []
    while sum(isinstance(f, (m.Ack, m.Error)) for f in frames) < 3:
        frames.append(await raw.next())
    return frames


async def test_past_max_refs_a_say_is_refused_with_when_to_send_it_again() -> None:
    srv = Server(replace(make_config(), max_refs=2), MemoryStore())
    await srv.start()
    try:
        frames = await three_says(srv)
        acks = [f.ref for f in frames if isinstance(f, m.Ack)]
        [error] = [f for f in frames if isinstance(f, m.Error)]
        assert acks == ["r0", "r1"]
        assert (error.code, error.fatal, error.ref) == ("rate_limited", False, "r2")
        assert error.retry_after is not None
        assert 599 <= error.retry_after <= 601
        stats = srv.stats()
        assert (stats["refs"], stats["max_refs"], stats["refs_refused"]) == (2, 2, 1)
    finally:
        async with asyncio.timeout(10):
            await srv.close()


async def test_a_server_that_loads_as_many_refs_as_its_limit_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Restarted with a lower --max-refs than the refs its store hands back, it says that
    messages with new refs are refused until they expire."""
    store = MemoryStore()
    srv = Server(make_config(), store)
    await srv.start()
    try:
        frames = await three_says(srv)
        assert [f.ref for f in frames if isinstance(f, m.Ack)] == ["r0", "r1", "r2"]
    finally:
        async with asyncio.timeout(10):
            await srv.close()
    caplog.set_level(logging.WARNING, logger="achat.server")
    for max_refs, warned in ((4, False), (3, True)):
        caplog.clear()
        again = Server(replace(make_config(), max_refs=max_refs), store)
        await again.start()
        try:
            assert again.registry.refs_in_force == 3
            lines = [r.message for r in caplog.records if "loaded from the store" in r.message]
            assert lines == (
                [
                    "3 refs of the last ten minutes loaded from the store, --max-refs 3: "
                    "messages with new refs are refused until they expire (ten minutes at most)"
                ]
                if warned
                else []
            )
        finally:
            async with asyncio.timeout(10):
                await again.close()
