"""A real server on 127.0.0.1 port 0, spoken to by real clients and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from achat.client.connection import Client, Disconnected
from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder, encode_frame
from achat.server.app import Server
from achat.store.memory import MemoryStore
from tests.conftest import make_config
from tests.helpers.faultproxy import FaultProxy

OPEN: list[Raw] = []


@pytest.fixture(autouse=True)
async def close_raw_connections() -> AsyncIterator[None]:
    yield
    while OPEN:
        raw = OPEN.pop()
        raw.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await raw.writer.wait_closed()


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
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.writer.write(encode_frame(body))

    async def next(self, timeout: float = 3) -> Any:
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError
                self.frames += [m.decode_server(b) for b in self.decoder.receive_data(data)]
        return self.frames.pop(0)

    async def until(self, kind: type, timeout: float = 3) -> Any:
        while True:
            frame = await self.next(timeout)
            if isinstance(frame, kind):
                return frame

    async def closed(self, timeout: float = 3) -> bool:
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


async def start(**limits: Any) -> Server:
    srv = Server(make_config(**limits), MemoryStore())
    await srv.start()
    return srv


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


async def connect(server: Server, clients: list[Client], nick: str) -> Client:
    c = Client("127.0.0.1", server.port, nick)
    await c.connect()
    clients.append(c)
    return c


async def messages(client: Client, count: int) -> list[m.Message]:
    got: list[m.Message] = []
    async with asyncio.timeout(15):
        while len(got) < count:
            event = await client.next_event()
            if isinstance(event, m.Message):
                got.append(event)
    return got


async def test_broadcast_reaches_every_member_in_seq_order(
    server: Server, clients: list[Client]
) -> None:
    """Messages from several senders reach all members, each in the same seq order."""
    members = [await connect(server, clients, f"user{i}") for i in range(4)]
    for c in members:
        await c.join("general")
    await asyncio.gather(
        *(c.say("general", f"{c.nick} says {k}") for c in members for k in range(5))
    )
    streams = [await messages(c, 20) for c in members]
    for stream in streams:
        assert [x.seq for x in stream] == list(range(1, 21))
        assert stream == streams[0]


async def test_dm_rename_part_and_quit(server: Server, clients: list[Client]) -> None:
    """DMs, renames, parts and quits are seen by the right people over the wire."""
    ana = await connect(server, clients, "ana")
    bob = await connect(server, clients, "bob")
    await ana.join("a")
    await bob.join("a")
    ack = await ana.dm("BOB", "psst")
    assert ack.id is not None

    async def next_of(client: Client, kind: type) -> Any:
        async with asyncio.timeout(3):
            while True:
                event = await client.next_event()
                if isinstance(event, kind):
                    return event

    dm = await next_of(bob, m.DmEvent)
    assert (dm.sender, dm.text, dm.id) == ("ana", "psst", ack.id)
    ana.rename("anna")
    renamed = await next_of(bob, m.Renamed)
    assert (renamed.old, renamed.new) == ("ana", "anna")
    await bob.part("a", "brb")
    parted = await next_of(ana, m.Parted)
    assert (parted.nick, parted.reason) == ("bob", "brb")
    await bob.join("a")
    await bob.close()
    quit_ = await next_of(ana, m.Parted)
    assert (quit_.nick, quit_.reason) == ("bob", "quit")


async def test_who_rooms_history_and_since(server: Server, clients: list[Client]) -> None:
    """who, rooms, history and join-since answer over the wire with the ref echoed."""
    ana = await connect(server, clients, "ana")
    for k in range(5):
        await ana.join("a")
        await ana.say("a", f"m{k}")
    names = await ana.who("a")
    assert names.nicks == ["ana"]
    assert names.seq == 5
    listing = await ana.rooms_list()
    assert [(r.room, r.members) for r in listing.rooms] == [("a", 1)]
    page = await ana.history("a", before=4, limit=2)
    assert [x.text for x in page.messages] == ["m1", "m2"]
    assert page.more
    bob = await connect(server, clients, "bob")
    await bob.join("a", since=3)
    assert [x.seq for x in await messages(bob, 2)] == [4, 5]


async def test_nick_collision_over_the_wire(server: Server) -> None:
    """A second connection with the same nick in another case gets a fatal nick_taken."""
    first = await Raw.open(server.port)
    await first.hello("Ana")
    second = await Raw.open(server.port)
    second.send({"type": "hello", "nick": "aNA", "version": 1})
    error = await second.next()
    assert (error.code, error.fatal) == ("nick_taken", True)
    assert await second.closed()


async def test_first_frame_must_be_hello(server: Server) -> None:
    """Any frame before hello gets a fatal not_registered and the connection closes."""
    raw = await Raw.open(server.port)
    raw.send({"type": "join", "room": "a"})
    error = await raw.next()
    assert (error.code, error.fatal) == ("not_registered", True)
    assert await raw.closed()


async def test_content_errors_keep_the_connection(server: Server) -> None:
    """Bad JSON, unknown types and bad fields get non-fatal errors; the session goes on."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    cases = [
        (b'{"type":"ping"', "invalid_json"),
        (b'{"type":"warp","ref":"u"}', "unknown_type"),
        (b'{"type":"say","room":"a","ref":"s"}', "missing_field"),
        (b'{"type":"join","room":"NOPE","ref":"j"}', "invalid_room"),
        (b'{"type":"hello","nick":"x","version":1}', "already_registered"),
    ]
    for body, code in cases:
        raw.send(body)
        error = await raw.next()
        assert (error.code, error.fatal) == (code, False)
    raw.send({"type": "ping", "ref": "still-here"})
    assert await raw.next() == m.Pong(ref="still-here")


@pytest.mark.parametrize(
    ("header", "code"),
    [(b"\x00\x00\x00\x00", "bad_frame"), (b"\x00\x10\x00\x01", "frame_too_large")],
)
async def test_framing_errors_are_fatal_and_hurt_nobody_else(
    server: Server, clients: list[Client], header: bytes, code: str
) -> None:
    """A bad length header closes that connection with its code; others keep chatting."""
    bystander = await connect(server, clients, "bystander")
    await bystander.join("a")
    raw = await Raw.open(server.port)
    await raw.hello("mallory")
    raw.writer.write(header)
    error = await raw.next()
    assert (error.code, error.fatal) == (code, True)
    assert await raw.closed()
    ack = await bystander.say("a", "still fine")
    assert ack.seq == 1


async def test_slow_reader_is_cut_off_alone(clients: list[Client]) -> None:
    """A member that stops reading is dropped with sendq_exceeded; the others get everything."""
    server = await start(sendq_limit=64 * 1024)
    try:
        talker = await connect(server, clients, "talker")
        listener = await connect(server, clients, "listener")
        await talker.join("a")
        await listener.join("a")
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(encode_frame(b'{"type":"hello","nick":"sloth","version":1}'))
        sock.sendall(encode_frame(b'{"type":"join","room":"a"}'))
        count = 1500
        got = asyncio.create_task(messages(listener, count))
        for k in range(count):
            await talker.say("a", f"{k:04d} " + "x" * 3500)
        received = await got
        assert [x.seq for x in received] == list(range(1, count + 1))
        assert server.registry.member("sloth") is None
        sock.close()
    finally:
        await server.close()


async def test_hello_timeout() -> None:
    """A connection that never says hello is closed with not_registered."""
    server = await start(hello_timeout=0.2)
    try:
        raw = await Raw.open(server.port)
        error = await raw.next()
        assert (error.code, error.fatal) == ("not_registered", True)
    finally:
        await server.close()


async def test_idle_timeout() -> None:
    """A registered connection that ignores the keepalive ping is closed with idle_timeout."""
    server = await start(idle_timeout=0.3)
    try:
        raw = await Raw.open(server.port)
        await raw.hello("quiet")
        error = await raw.until(m.Error)
        assert (error.code, error.fatal) == ("idle_timeout", True)
    finally:
        await server.close()


async def test_half_sent_frame_times_out() -> None:
    """A frame that starts but never completes (slowloris) is closed with idle_timeout."""
    server = await start(frame_timeout=0.2)
    try:
        raw = await Raw.open(server.port)
        await raw.hello("slow")
        raw.writer.write(b"\x00\x00\x00\x20{")
        error = await raw.next()
        assert (error.code, error.fatal) == ("idle_timeout", True)
    finally:
        await server.close()


async def test_shutdown_tells_everyone_and_frees_the_port(clients: list[Client]) -> None:
    """close() sends a fatal server_shutdown to every client and releases the port."""
    server = await start()
    port = server.port
    ana = Client("127.0.0.1", port, "ana")
    await ana.connect()
    await server.close()
    await server.close()  # idempotent
    events = []
    async with asyncio.timeout(3):
        async for event in ana.events():
            events.append(event)
    error = next(e for e in events if isinstance(e, m.Error))
    assert (error.code, error.fatal) == ("server_shutdown", True)
    assert isinstance(events[-1], Disconnected)
    again = Server(make_config(port), MemoryStore())
    await again.start()
    assert again.port == port
    await again.close()


async def test_a_burst_is_coalesced_into_few_writes(server: Server) -> None:
    """Many frames in one read are answered together, in one write, not one write each."""
    raw = await Raw.open(server.port)
    await raw.hello("ana")
    raw.writer.write(b"".join(encode_frame(b'{"type":"ping","ref":"%d"}' % i) for i in range(200)))
    first = await raw.reader.read(1 << 20)
    # All 200 pongs were written at once, so one read sees (nearly) all of them.
    assert len(raw.decoder.receive_data(first)) >= 150


async def test_server_pings_a_quiet_client_and_keeps_it_if_it_answers() -> None:
    """Half-way to idle_timeout the server pings; a pong resets the clock; silence closes."""
    server = await start(idle_timeout=0.4)
    try:
        raw = await Raw.open(server.port)
        await raw.hello("quiet")
        ping = await raw.next()
        assert ping == m.Ping(ref="keepalive")
        raw.send({"type": "pong", "ref": "keepalive"})
        again = await raw.next()
        assert again == m.Ping(ref="keepalive")  # still connected: pinged a second time
        error = await raw.next()
        assert (error.code, error.fatal) == ("idle_timeout", True)
    finally:
        await server.close()


async def test_client_answers_server_pings() -> None:
    """The Client answers the server's keepalive pings, so a silent reader stays connected."""
    server = await start(idle_timeout=0.3)
    try:
        async with Client("127.0.0.1", server.port, "lurker") as lurker:
            # Nothing may happen for well over idle_timeout: no error, no disconnect.
            with pytest.raises(TimeoutError):
                await lurker.next_event(timeout=0.9)
            assert lurker.connected
            assert server.registry.member("lurker") is not None
    finally:
        await server.close()


async def test_fragmented_slow_link_is_served_correctly(
    server: Server, clients: list[Client]
) -> None:
    """Through a proxy that cuts traffic into 1-7 byte pieces, delays and throttles it,
    the server parses every frame and the client receives every reply."""
    proxy = await FaultProxy(
        "127.0.0.1", server.port, fragment=7, delay=0.001, bandwidth=200_000, seed=5
    ).start()
    try:
        far = Client("127.0.0.1", proxy.port, "faraway")
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
