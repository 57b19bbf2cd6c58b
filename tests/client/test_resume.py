"""Reconnect and resume through a hostile network: nothing lost, nothing shown twice."""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from achat.client.connection import (
    SEND_RATE,
    Backoff,
    Client,
    ConnectionLost,
    Disconnected,
    Event,
    LocalNotice,
    Reconnected,
)
from achat.errors import ConnectionClosed, ServerError
from achat.protocol.frames import FrameDecoder
from achat.protocol.messages import (
    Ack,
    Bye,
    ClientFrame,
    Hello,
    History,
    HistoryRequest,
    Join,
    Joined,
    Message,
    Names,
    Nick,
    Part,
    Parted,
    Say,
    Who,
    decode_client,
    encode,
)
from achat.protocol.messages import (
    Error as ErrorFrame,
)
from achat.server.app import Server
from achat.server.limits import FloodPolicy
from achat.store.memory import MemoryStore
from achat.store.sqlite import SQLiteStore
from tests.conftest import make_config
from tests.helpers.fakeserver import WELCOME, FakeServer, fake_server, joined
from tests.helpers.faultproxy import FaultProxy

ROOM = "net"


async def wait_for_event(client: Client, kind: type, timeout: float = 5) -> Event:
    """The next event of ``kind`` from ``client``, skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(make_config(), SQLiteStore(tmp_path / "achat.db"))
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy("127.0.0.1", server.port, fragment=7, delay=0.001, seed=3).start()
    yield p
    await p.close()


async def test_cuts_mid_frame_lose_nothing_and_show_nothing_twice(
    server: Server, proxy: FaultProxy
) -> None:
    """Behind a proxy that fragments, delays and cuts mid-frame, every message is seen once."""
    rng = random.Random(11)
    backoff = Backoff(initial=0.01, cap=0.05, rng=random.Random(2))
    # The server's flood limit is off: so is the clients' own.
    talker = Client("127.0.0.1", server.port, "talker", send_rate=0)
    victim = Client("127.0.0.1", proxy.port, "victim", reconnect=True, backoff=backoff, send_rate=0)
    await talker.connect()
    await victim.connect()
    await talker.join(ROOM)
    await victim.join(ROOM)

    shown: list[Message] = []
    lost_events = 0
    total = 240
    all_shown = asyncio.Event()

    async def watch() -> None:
        nonlocal lost_events
        async for event in victim.events():
            if isinstance(event, Message):
                shown.append(event)
                if len(shown) >= total:
                    all_shown.set()
            elif isinstance(event, ConnectionLost):
                lost_events += 1

    watching = asyncio.create_task(watch())
    victim_acks: list[int] = []

    async def victim_talks() -> None:
        for k in range(40):
            ack = await victim.say(ROOM, f"from victim {k}", timeout=20)
            assert ack.seq is not None
            victim_acks.append(ack.seq)

    talking = asyncio.create_task(victim_talks())
    for k in range(200):
        await talker.say(ROOM, f"from talker {k}")
        if k % 20 == 10:
            if k > 10:
                # The previous cut must have happened before the next is armed.
                async with asyncio.timeout(10):
                    await proxy.cut.wait()
            # Cut the victim's connection a few bytes into the next frames.
            proxy.reset_after(rng.randint(1, 40))
    async with asyncio.timeout(20):
        await talking
    async with asyncio.timeout(20):
        await all_shown.wait()
    assert proxy.resets >= 9, "the proxy did not cut the connection"
    assert lost_events >= 5
    seqs = [m.seq for m in shown]
    assert seqs == list(range(1, total + 1)), "a message was lost, repeated or reordered"
    assert sorted(victim_acks) == sorted({*victim_acks}), "one message acked twice"
    texts = [m.text for m in shown]
    assert len(set(texts)) == total
    await talker.close()
    await victim.close()
    watching.cancel()


async def test_messages_typed_offline_are_sent_on_reconnect(
    server: Server, proxy: FaultProxy
) -> None:
    """A say sent while the connection is down is queued, sent after reconnecting, acked once."""
    victim = Client("127.0.0.1", proxy.port, "victim", reconnect=True, backoff=Backoff(0.2, 0.3))
    await victim.connect()
    await victim.join(ROOM)
    proxy.reset_all()
    await wait_for_event(victim, ConnectionLost)
    ack_task = asyncio.create_task(victim.say(ROOM, "typed while offline", timeout=10))
    await asyncio.sleep(0)
    assert victim.pending == 1
    ack = await ack_task
    assert victim.pending == 0
    history = await victim.history(ROOM)
    assert [m.text for m in history.messages] == ["typed while offline"]
    assert ack.seq == history.messages[0].seq
    reconnected = await wait_for_event(victim, Reconnected)
    assert isinstance(reconnected, Reconnected)
    assert reconnected.resent == 1
    await victim.close()


@contextlib.asynccontextmanager
async def cut_off(
    port: int, rooms: Sequence[str] = (ROOM,), *, send_burst: int, send_rate: float
) -> AsyncIterator[Client]:
    """``victim``, in ``rooms`` through a proxy to ``port``, just after the proxy cut it."""
    proxy = await FaultProxy("127.0.0.1", port).start()
    victim = Client(
        "127.0.0.1",
        proxy.port,
        "victim",
        reconnect=True,
        backoff=Backoff(0.2, 0.3),
        send_burst=send_burst,
        send_rate=send_rate,
    )
    try:
        await victim.connect()
        for room in rooms:
            await victim.join(room)
        proxy.reset_all()
        await wait_for_event(victim, ConnectionLost)
        yield victim
    finally:
        await victim.close()
        await proxy.close()


async def test_a_resume_stays_under_the_flood_limit(tmp_path: Path) -> None:
    """Twelve rooms to re-join and six lines typed offline, against a flood limit of 14
    frames at once: paced, nothing is refused, every line is stored and every room joined."""
    limits = make_config(flood=FloodPolicy(rate=50, burst=14))
    srv = Server(limits, SQLiteStore(tmp_path / "achat.db"))
    await srv.start()
    rooms = [f"r{i}" for i in range(12)]
    try:
        async with cut_off(srv.port, rooms, send_burst=8, send_rate=33) as victim:
            saying = [
                asyncio.create_task(victim.say(rooms[i], f"line {i}", timeout=10)) for i in range(6)
            ]
            events: list[Event] = []
            rejoined: set[str] = set()
            async with asyncio.timeout(10):
                while victim.pending or rejoined != set(rooms):
                    event = await victim.next_event()
                    events.append(event)
                    if isinstance(event, Names):
                        rejoined.add(event.room)
            acks = await asyncio.gather(*saying)
    finally:
        await srv.close()
    refused = [e for e in events if isinstance(e, ErrorFrame)]
    assert refused == []
    assert [a.room for a in acks] == rooms[:6]


async def test_re_joins_a_stricter_server_refuses_go_again(tmp_path: Path) -> None:
    """A server stricter than the client's budget refuses some of the re-joins: they are
    kept like any join, so they go again and the client ends up in every room."""
    limits = make_config(flood=FloodPolicy(rate=20, burst=3, strikes=100))
    srv = Server(limits, SQLiteStore(tmp_path / "achat.db"))
    await srv.start()
    rooms = [f"r{i}" for i in range(6)]
    try:
        async with cut_off(srv.port, rooms, send_burst=8, send_rate=60) as victim:
            await wait_for_event(victim, Reconnected)
            events: list[Event] = []
            async with asyncio.timeout(10):
                while victim.queued or victim._written:
                    events.append(await victim.next_event())
            member = srv.registry.member("victim")
            assert member is not None
            assert sorted(member.rooms) == rooms
            assert set(victim.rooms) == set(rooms)
    finally:
        await srv.close()
    assert [e for e in events if isinstance(e, ErrorFrame)] == []


async def test_closing_during_a_paced_resume_lets_it_finish(server: Server) -> None:
    """Closed right after reconnecting, the client still sends what the resume has queued."""
    async with cut_off(server.port, send_burst=2, send_rate=20) as victim:
        for i in range(6):
            victim.send(victim.say_frame(ROOM, f"line {i}"))
        await wait_for_event(victim, Reconnected)
        await victim.close()
        async with Client("127.0.0.1", server.port, "reader") as reader:
            await reader.join(ROOM)
            texts: list[str] = []
            async with asyncio.timeout(5):  # the store commits on its own thread
                while len(texts) < 6:
                    texts = [m.text for m in (await reader.history(ROOM)).messages]
    assert texts == [f"line {i}" for i in range(6)]


async def test_closing_can_be_cancelled_while_a_resume_is_paced(server: Server) -> None:
    """close() waits for a paced resume, but a cancellation of the closer goes through."""
    async with cut_off(server.port, send_burst=1, send_rate=1 / 60) as victim:
        try:
            victim.send(victim.say_frame(ROOM, "queued behind the re-join"))
            await wait_for_event(victim, Reconnected)
            closing = asyncio.create_task(victim.close())
            await asyncio.sleep(0)  # closing now waits for the pacer
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        finally:
            victim._stop_pacing()  # not the minute the pacer would wait


async def test_without_reconnect_a_drop_ends_the_client(server: Server, proxy: FaultProxy) -> None:
    """With reconnect off, a cut connection fails pending requests and ends the events."""
    client = Client("127.0.0.1", proxy.port, "plain")
    await client.connect()
    await client.join(ROOM)
    proxy.reset_all()
    await wait_for_event(client, Disconnected)
    assert not client.connected
    with pytest.raises(ConnectionClosed):
        client.send(client.say_frame(ROOM, "nobody will get this"))
    with pytest.raises(ConnectionClosed):
        client.send(Join(room="other", since=3, ref=client.new_ref()))
    assert client.pending == 0
    assert set(client.rooms) == {ROOM}
    await client.close()


Answer = Callable[[asyncio.StreamWriter, ClientFrame, int], bool]


def scripted(answer: Answer, seen: list[list[ClientFrame]]) -> FakeServer:
    """A server that records each connection's frames and lets ``answer`` reply to them.

    ``answer(writer, frame, connection)`` returns False to drop the connection there
    (before any answer to ``frame``); ``hello`` is welcomed and ``bye`` closes.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames: list[ClientFrame] = []
        seen.append(frames)
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for body in decoder.receive_data(data):
                frame = decode_client(body)
                frames.append(frame)
                if isinstance(frame, Hello):
                    writer.write(WELCOME)
                elif isinstance(frame, Bye) or not answer(writer, frame, len(seen)):
                    writer.close()
                    return

    return handler


def answer_any(writer: asyncio.StreamWriter, frame: ClientFrame) -> bool:
    """What a server says to ``frame`` (ana's only frames here: joins, parts, says, who);
    True: the connection stays."""
    if isinstance(frame, Join):
        joined(writer, frame)
    elif isinstance(frame, Part):
        writer.write(encode(Parted(room=frame.room, nick="ana", ts=2)))
    elif isinstance(frame, Say):
        writer.write(encode(Ack(ref=frame.ref or "", ts=3, room=frame.room, seq=1)))
    elif isinstance(frame, Who):
        writer.write(encode(Names(room=frame.room, nicks=["ana"], topic="", seq=0, ref=frame.ref)))
    return True


def dropping_at(kind: type, *, answer_first: bool = False) -> Answer:
    """Answer everything, except that the first connection drops at its first ``kind``."""

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, kind):
            if answer_first:
                answer_any(writer, frame)
            return False
        return answer_any(writer, frame)

    return answer


def quick_client(port: int, send_rate: float = SEND_RATE) -> Client:
    backoff = Backoff(initial=0.01, cap=0.05)
    return Client("127.0.0.1", port, "ana", reconnect=True, backoff=backoff, send_rate=send_rate)


def kinds(frames: list[ClientFrame]) -> list[type]:
    return [type(f) for f in frames if not isinstance(f, Hello | Bye)]


async def test_a_join_unanswered_when_the_connection_drops_is_sent_again() -> None:
    """The join goes again after reconnecting, with its ref, and its caller gets the answer."""
    seen: list[list[ClientFrame]] = []
    async with fake_server(scripted(dropping_at(Join), seen)) as port, quick_client(port) as client:
        async with asyncio.timeout(5):
            names = await client.join("general")
    assert names.room == "general"
    first = [f.ref for f in seen[0] if isinstance(f, Join)]
    again = [f.ref for f in seen[1] if isinstance(f, Join)]
    assert again == first
    assert client.rooms == {"general": 0}


async def test_a_join_half_answered_is_the_rejoin() -> None:
    """Joined came, names did not: the room's re-join carries the join's ref, once."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Join):
            writer.write(encode(Joined(room=frame.room, nick="ana", ts=1)))
            return False
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        async with asyncio.timeout(5):
            names = await client.join("general")
    assert names.room == "general"
    first = [f.ref for f in seen[0] if isinstance(f, Join)]
    assert [f.ref for f in seen[1] if isinstance(f, Join)] == first


async def test_a_room_left_just_before_the_drop_stays_left() -> None:
    """A part unanswered at the drop: the room is not joined again, and the part is
    answered by the client (the new connection is in no room)."""
    seen: list[list[ClientFrame]] = []
    async with fake_server(scripted(dropping_at(Part), seen)) as port, quick_client(port) as client:
        await client.join("general")
        await client.part("general")
        parted = await wait_for_event(client, Parted)
        await wait_for_event(client, Reconnected)
    assert isinstance(parted, Parted)
    assert (parted.room, parted.nick) == ("general", "ana")
    assert kinds(seen[1]) == []
    assert client.rooms == {}


async def test_a_line_typed_before_a_part_reaches_its_room() -> None:
    """Say, then part, both lost: after the re-join they go again in that order."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Say):
            return True  # never acked: the link is already dead
        return dropping_at(Part)(writer, frame, connection)

    # Unpaced, so the part goes without waiting for the say's ack (paced, it would wait
    # ANSWER_WAIT for it first).
    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("general")
        client.send(Say(room="general", text="bye all", ref=client.new_ref()))
        await client.part("general")
        await wait_for_event(client, Parted)
        async with asyncio.timeout(5):
            while client.pending:
                await wait_for_event(client, Ack)
    said = next(f for f in seen[0] if isinstance(f, Say))
    assert kinds(seen[1]) == [Join, Say, Part]
    assert seen[1][2] == said
    assert client.rooms == {}


async def test_a_room_left_and_joined_again_before_the_drop_is_joined() -> None:
    """Part, then join of the same room, both lost: the client ends in the room."""
    seen: list[list[ClientFrame]] = []
    async with fake_server(scripted(dropping_at(Part), seen)) as port, quick_client(port) as client:
        await client.join("general")
        await client.part("general")
        async with asyncio.timeout(5):
            names = await client.join("general")
    assert names.room == "general"
    assert kinds(seen[1]) == [Join]
    assert client.rooms == {"general": 0}


async def test_an_answered_question_is_not_asked_again() -> None:
    """Only what was unanswered at the drop goes again: a who answered before it does not."""
    seen: list[list[ClientFrame]] = []
    answer = dropping_at(Part)
    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("general")
        await client.who("general")
        await client.part("general")
        await wait_for_event(client, Reconnected)
    assert Who not in kinds(seen[1])


async def test_a_question_unanswered_when_the_connection_drops_is_asked_again() -> None:
    """A history request lost with the connection goes again; its caller gets the answer."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, HistoryRequest):
            if connection == 1:
                return False
            writer.write(encode(History(room=frame.room, messages=[], more=False, ref=frame.ref)))
        return True

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        async with asyncio.timeout(5):
            reply = await client.request(HistoryRequest(room="general", ref=client.new_ref()))
    assert isinstance(reply, History)
    asked = [f for f in seen[0] if isinstance(f, HistoryRequest)]
    assert [f for f in seen[1] if isinstance(f, HistoryRequest)] == asked


async def test_a_question_given_up_on_is_not_asked_again() -> None:
    """A request that timed out is forgotten: the next connection is not asked it."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Who):
            return True  # never answered
        return dropping_at(Part)(writer, frame, connection)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("general")
        with pytest.raises(TimeoutError):
            await client.request(Who(room="general", ref=client.new_ref()), timeout=0.05)
        await client.part("general")
        await wait_for_event(client, Reconnected)
    assert Who in kinds(seen[0])
    assert Who not in kinds(seen[1])


async def test_a_line_resent_on_resume_is_kept_when_its_caller_gives_up() -> None:
    """A say written on the lost connection (maybe stored, its ack lost) waits behind a
    slow re-join; its caller times out, but it still goes again with its ref."""
    said: list[tuple[int, str]] = []
    release, resaid = asyncio.Event(), asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Say):
            said.append((connection, frame.ref or ""))
            if connection == 1:
                return False  # stored, then the connection drops with its ack
            resaid.set()
        if isinstance(frame, Join) and connection == 2:
            return answer_when(release, writer, frame)
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, [])) as port, quick_client(port) as client:
        await client.join("general")
        with pytest.raises(TimeoutError):
            await client.say("general", "deploy done", timeout=0.3)
        release.set()
        async with asyncio.timeout(5):
            await resaid.wait()
    assert [c for c, _ in said] == [1, 2]
    assert said[0][1] == said[1][1]


def refusal(frame: ClientFrame, code: str = "rate_limited") -> bytes:
    """A non-fatal error answering ``frame``."""
    ref = getattr(frame, "ref", None)
    return encode(ErrorFrame(code=code, message="refused", fatal=False, ref=ref))


async def test_a_resent_line_refused_then_given_up_still_goes_again() -> None:
    """A say written on the lost connection is refused once when resent, and its caller
    gives up meanwhile: the server may have the first copy, so it goes again, its ref
    unchanged, and the server answers it."""
    seen: list[list[ClientFrame]] = []
    resent = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Say) and connection == 1:
            return False  # maybe stored; the ack is lost with the connection
        if isinstance(frame, Say):
            if sum(isinstance(f, Say) for f in seen[1]) == 1:
                writer.write(refusal(frame))
                return True
            resent.set()
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("general")
        with pytest.raises(TimeoutError):
            await client.say("general", "deploy done", timeout=0.3)
        async with asyncio.timeout(5):
            await resent.wait()
    says = [f for f in seen[0] + seen[1] if isinstance(f, Say)]
    assert len(says) == 3
    assert len({f.ref for f in says}) == 1


async def test_a_line_sent_as_the_connection_comes_back_follows_the_rejoin() -> None:
    """The client is online again and resumed in one step: a line sent at the first
    moment it is connected goes after the re-join, not before it (not_in_room)."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Nick) and connection == 1:
            return False  # the connection drops with nothing kept in flight
        if isinstance(frame, Say) and not any(isinstance(f, Join) for f in seen[-1]):
            writer.write(refusal(frame, "not_in_room"))
            return True
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("general")
        client.rename("ana2")
        await wait_for_event(client, ConnectionLost)
        async with asyncio.timeout(5):
            while not client.connected:  # noqa: ASYNC110 - the first moment it is online
                await asyncio.sleep(0)
        ack = await client.say("general", "typed just as it came back", timeout=5)
    assert ack.seq == 1
    assert kinds(seen[1]) == [Join, Say]


async def test_a_question_given_up_during_a_resume_is_not_asked() -> None:
    """A who written on the lost connection waits behind a slow re-join; its caller gives
    up: it is not asked on the new connection."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Who) and connection == 1:
            return False
        if isinstance(frame, Join) and connection == 2:
            return answer_when(release, writer, frame)
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("general")
        with pytest.raises(TimeoutError):
            await client.request(Who(room="general", ref=client.new_ref()), timeout=0.3)
        release.set()
        await client.who("general")  # asked after the given-up one would have been
    assert kinds(seen[1]) == [Join, Who]


async def test_a_line_given_up_while_offline_is_not_sent() -> None:
    """say() while disconnected times out before the line was ever written: it is not
    sent when the connection comes back."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Who) and connection == 1:
            return False
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port:
        backoff = Backoff(initial=0.3, cap=0.3)
        async with Client("127.0.0.1", port, "ana", reconnect=True, backoff=backoff) as client:
            await client.join("general")
            client.send(Who(room="general", ref=client.new_ref()))
            await wait_for_event(client, ConnectionLost)
            with pytest.raises(TimeoutError):
                await client.say("general", "given up offline", timeout=0.05)
            await wait_for_event(client, Reconnected)
            await client.who("general")  # asked after the line would have been sent
    assert Say not in kinds(seen[1])


def when_set(release: asyncio.Event, act: Callable[[], object]) -> bool:
    """Do ``act`` (an answer held back) once ``release`` is set; the connection stays."""

    async def later() -> None:
        await release.wait()
        act()

    asyncio.get_running_loop().create_task(later())
    return True


def answer_when(release: asyncio.Event, writer: asyncio.StreamWriter, frame: ClientFrame) -> bool:
    """Answer ``frame`` once ``release`` is set (a slow re-join: a long backlog)."""
    return when_set(release, lambda: answer_any(writer, frame))


async def test_a_rejoin_reusing_a_given_up_join_still_goes() -> None:
    """A join answered by joined, its names lost with the connection: the room is the
    client's, and that join is its re-join. Its caller giving up during the resume does
    not stop the re-join."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b" and connection == 1:
            writer.write(encode(Joined(room="b", nick="ana", ts=1)))  # its names is lost
            return False
        if isinstance(frame, Join) and frame.room == "a" and connection == 2:
            return answer_when(release, writer, frame)
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        with pytest.raises(TimeoutError):
            await client.request(Join(room="b", ref=client.new_ref()), timeout=0.4)
        assert len(seen) == 2  # it timed out during the resume
        release.set()
        await client.who("a")  # asked after the re-join of b would have gone
    assert "b" in client.rooms
    assert [f.room for f in seen[1] if isinstance(f, Join)] == ["a", "b"]


@pytest.mark.parametrize(
    ("code", "late"), [("rate_limited", False), ("invalid_room", False), ("invalid_room", True)]
)
async def test_a_refused_join_since_leaves_no_room_behind(code: str, late: bool) -> None:
    """A join with since, refused on the only connection it was written to: for good (at
    once, or after its caller gave up), or for flooding until its caller gave up. The
    room is not the client's, and the next resume does not join it."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b" and connection == 1:
            if late:
                return refused_when(release, writer, frame)
            writer.write(refusal(frame, code))
            return True
        if isinstance(frame, Who) and connection == 1:
            return False  # a drop, to see what the resume joins
        return answer_any(writer, frame)

    given_up = late or code == "rate_limited"
    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        join = Join(room="b", since=7, ref=client.new_ref())
        with pytest.raises(TimeoutError if given_up else ServerError):
            await client.request(join, timeout=0.1 if given_up else 5)
        release.set()
        if late:
            await wait_for_event(client, ErrorFrame)
        assert set(client.rooms) == {"a"}
        client.send(Who(room="a", ref=client.new_ref()))
        await wait_for_event(client, Reconnected)
        await client.who("a")
    assert [f.room for f in seen[1] if isinstance(f, Join)] == ["a"]


def refused_when(release: asyncio.Event, writer: asyncio.StreamWriter, frame: ClientFrame) -> bool:
    """Refuse ``frame`` for good (invalid_room) once ``release`` is set."""
    return when_set(release, lambda: writer.write(refusal(frame, "invalid_room")))


async def test_a_line_refused_on_its_only_connection_and_given_up_is_not_sent() -> None:
    """Refused, the line was never stored; its caller gave up: it is not sent again."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Say):
            writer.write(refusal(frame))
            return True
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        with pytest.raises(TimeoutError):
            await client.say("a", "refused", timeout=0.1)
        await client.who("a")  # asked after the line would have gone again
        assert client.queued == 0
    assert kinds(seen[0]) == [Join, Say, Who]


async def test_a_part_answered_by_the_resume_is_forgotten() -> None:
    """The resume answers a part written on the lost connection; nothing about it stays."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Part) and connection == 1:
            return False
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        await client.part("a")
        await wait_for_event(client, Reconnected)
        assert client._sent == set()
        assert client._outbox == {}


async def test_queued_does_not_count_a_question_given_up_in_the_queue() -> None:
    """A who written on the lost connection and given up during the resume will not be
    asked: the queue's count leaves it out at once."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Who) and connection == 1:
            return False
        if isinstance(frame, Join) and frame.room == "a" and connection == 2:
            return answer_when(release, writer, frame)
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        await client.join("b")
        with pytest.raises(TimeoutError):
            await client.request(Who(room="a", ref=client.new_ref()), timeout=0.4)
        assert len(seen) == 2
        assert client.queued == 1  # the re-join of b
        release.set()
        await client.who("b")
    assert kinds(seen[1]) == [Join, Join, Who]


async def test_a_join_given_up_after_a_part_is_not_sent_on_resume() -> None:
    """/part a, then a /join a that times out, neither answered, then a drop: the resume
    answers the part; the given-up join is not a's re-join, and is not sent."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Join) and kinds(seen[0]).count(Join) > 1:
            return True  # no answer to the second join
        if connection == 1 and isinstance(frame, Part):
            return True  # nor to the part
        if connection == 1 and isinstance(frame, Who):
            return False  # the drop
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("a")
        await client.part("a")
        given_up = Join(room="a", ref=client.new_ref())
        with pytest.raises(TimeoutError):
            await client.request(given_up, timeout=0.2)
        client.send(Who(room="x", ref=client.new_ref()))
        await wait_for_event(client, Reconnected)
        await client.who("x")
    assert given_up.ref not in [f.ref for f in seen[1] if isinstance(f, Join)]
    assert "a" not in client.rooms


async def test_a_join_given_up_in_a_room_already_joined_holds_nothing_up() -> None:
    """/join of a room the client is in, its answer slow; its caller gives up: the next
    question does not wait ANSWER_WAIT (5 s) for that answer."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and kinds(seen[0]).count(Join) == 2:
            return True  # never answered
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        with pytest.raises(TimeoutError):
            await client.request(Join(room="a", ref=client.new_ref()), timeout=0.2)
        async with asyncio.timeout(1):
            await client.who("a")


async def test_a_rejoin_never_written_goes_even_when_its_caller_gives_up() -> None:
    """A /join a queued (behind an unanswered who) when the connection drops becomes a's
    re-join; its caller gives up while it waits: it still goes, so the client is where
    it thinks it is."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Who):
            return False
        if connection == 2 and isinstance(frame, Join) and frame.room == "b":
            return answer_when(release, writer, frame)
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("b")
        await client.join("a")
        client.send(Who(room="a", ref=client.new_ref()))  # in flight: the join waits
        with pytest.raises(TimeoutError):
            await client.request(Join(room="a", ref=client.new_ref()), timeout=0.5)
        assert len(seen) == 2
        release.set()
        await client.who("b")
    assert "a" in client.rooms
    assert [f.room for f in seen[1] if isinstance(f, Join)] == ["b", "a"]


async def test_a_join_since_given_up_in_a_room_joined_keeps_its_last_seq() -> None:
    """In a at seq 5, a join(a, since=9) waits in the queue and is given up: the room's
    last seq is 5 again, so message 6 is delivered, not dropped as already seen."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.since is None:
            joined(writer, frame, 5)
            return True
        if isinstance(frame, Who) and frame.room == "slow":
            return answer_when(release, writer, frame)
        if isinstance(frame, Who):
            writer.write(encode(Message(room="a", seq=6, ts=9, sender="bo", text="new")))
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        client.send(Who(room="slow", ref=client.new_ref()))  # in flight: the join waits
        with pytest.raises(TimeoutError):
            await client.request(Join(room="a", since=9, ref=client.new_ref()), timeout=0.2)
        assert client.rooms["a"] == 5
        release.set()
        await client.who("a")
        got = [e.seq for e in client.received() if isinstance(e, Message)]
    assert got == [6]
    assert [f.since for f in seen[0] if isinstance(f, Join)] == [None]  # never written


@pytest.mark.parametrize("code", ["unavailable", "rate_limited"])
async def test_a_refused_join_since_of_a_room_joined_keeps_its_last_seq(code: str) -> None:
    """In a at seq 5, join(a, since=2) refused, for good or for flooding until its caller
    gives up: still in a, at seq 5, so message 6 is delivered and the resume asks from 6."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.since == 2:
            writer.write(refusal(frame, code))
            return True
        if isinstance(frame, Join) and connection == 1:
            joined(writer, frame, 5)
            return True
        if isinstance(frame, Who) and connection == 1:
            writer.write(encode(Message(room="a", seq=6, ts=9, sender="bo", text="new")))
            return False  # then a drop, to see what the resume asks for
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        join = Join(room="a", since=2, ref=client.new_ref())
        with pytest.raises(ServerError if code == "unavailable" else TimeoutError):
            await client.request(join, timeout=5 if code == "unavailable" else 0.2)
        assert client.rooms == {"a": 5}
        client.send(Who(room="a", ref=client.new_ref()))
        got: list[int] = []
        async with asyncio.timeout(5):
            while not isinstance(event := await client.next_event(), Reconnected):
                if isinstance(event, Message):
                    got.append(event.seq)
        await client.who("a")
    assert got == [6]
    assert [(f.room, f.since) for f in seen[1] if isinstance(f, Join)] == [("a", 6)]


async def test_a_rejoin_the_server_refuses_leaves_the_room() -> None:
    """After a drop the server will not have the client back in b: the client says so
    (the error, then that it left b), is no longer in b, and does not ask again."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b" and connection > 1:
            writer.write(refusal(frame, "invalid_room"))
            return True
        if isinstance(frame, Who) and connection < 3:
            return False  # two drops: the second shows what the next resume joins
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        await client.join("b")
        client.send(Who(room="a", ref=client.new_ref()))
        await wait_for_event(client, Reconnected)
        before: list[Event] = []
        async with asyncio.timeout(5):
            while not isinstance(parted := await client.next_event(), Parted):
                before.append(parted)
        assert client.rooms == {"a": 0}
        await wait_for_event(client, Reconnected)  # the who goes again, and drops again
        await client.who("a")
    assert (parted.room, parted.nick) == ("b", "ana")
    refused = [e for e in before if isinstance(e, ErrorFrame)]
    rejoin_b = [f.ref for f in seen[1] if isinstance(f, Join) and f.room == "b"]
    assert [(e.code, e.ref) for e in refused] == [("invalid_room", *rejoin_b)]
    assert [f.room for f in seen[1] if isinstance(f, Join)] == ["a", "b"]
    assert [f.room for f in seen[2] if isinstance(f, Join)] == ["a"]


async def test_a_join_since_of_a_new_room_refused_on_resume_is_no_room_left() -> None:
    """join(b, since=7), b new to the client, unanswered when the connection drops, then
    refused for good when sent again: the client was never in b, so it says only the
    error (not that it left b), and b is not its room."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b":
            if connection == 1:
                return False  # the drop, before any answer
            writer.write(refusal(frame, "invalid_room"))
            return True
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        with pytest.raises(ServerError):
            await client.request(Join(room="b", since=7, ref=client.new_ref()), timeout=5)
        await client.who("a")  # what followed the refusal has come
        events = client.received()
    assert set(client.rooms) == {"a"}
    assert [e for e in events if isinstance(e, Parted)] == []
    assert [(f.room, f.since) for f in seen[1] if isinstance(f, Join)] == [("a", 0), ("b", 7)]


async def test_a_join_since_behind_a_refused_rejoin_gets_its_backlog() -> None:
    """In b at seq 5, a drop; b's re-join is in flight when join(b, since=2) is asked, and
    is refused. The join then goes, and what since=2 asked for is delivered: 3, 4, 5."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and connection == 2 and frame.since == 5:
            return refused_when(release, writer, frame)  # the re-join
        if isinstance(frame, Join):
            writer.write(encode(Joined(room="b", nick="ana", ts=1)))
            writer.write(encode(Names(room="b", nicks=["ana"], topic="", seq=5, ref=frame.ref)))
            for seq in range((frame.since or 5) + 1, 6):
                writer.write(encode(Message(room="b", seq=seq, ts=9, sender="bo", text="x")))
            return True
        if isinstance(frame, Who) and connection == 1:
            return False
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("b")
        client.send(Who(room="b", ref=client.new_ref()))
        await wait_for_event(client, Reconnected)
        asking = asyncio.ensure_future(client.join("b", since=2))
        await asyncio.sleep(0)  # sent: it waits behind the re-join in flight
        assert client.queued == 2  # the who asked again, and this join
        release.set()
        await asking
        await client.who("b")
        got = [e.seq for e in client.received() if isinstance(e, Message)]
    assert got == [3, 4, 5]
    assert client.rooms == {"b": 5}


def joined_with_backlog(writer: asyncio.StreamWriter, join: Join, last: int) -> None:
    """What a server says to ``join`` in a room at seq ``last``: joined, names, and the
    messages after the join's since."""
    joined(writer, join, last)
    start = last if join.since is None else join.since
    for seq in range(start + 1, last + 1):
        writer.write(encode(Message(room=join.room, seq=seq, ts=1, sender="bo", text="x")))


def answer_at(writer: asyncio.StreamWriter, frame: ClientFrame, last: int) -> bool:
    """Answer ``frame`` as a server whose rooms are at seq ``last``."""
    if isinstance(frame, Join):
        joined_with_backlog(writer, frame, last)
        return True
    return answer_any(writer, frame)


def joined_then_drop(writer: asyncio.StreamWriter, room: str) -> Callable[[], None]:
    """Say the client joined ``room``, then drop: its names is lost with the connection."""

    def act() -> None:
        writer.write(encode(Joined(room=room, nick="ana", ts=1)))
        writer.close()

    return act


async def test_a_join_since_given_up_then_joined_and_dropped_is_not_asked_again() -> None:
    """join(b, since=2) written, its caller gives up, then joined comes and the connection
    drops before names: b is the client's and is re-joined, from where its names puts it;
    the since its caller gave up on is not asked again."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b" and connection == 1:
            return when_set(release, joined_then_drop(writer, "b"))
        return answer_at(writer, frame, 5)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        with pytest.raises(TimeoutError):
            await client.request(Join(room="b", since=2, ref=client.new_ref()), timeout=0.1)
        release.set()
        await wait_for_event(client, Reconnected)
        await client.who("a")  # answered after the re-joins
        got = [e.seq for e in client.received() if isinstance(e, Message)]
        assert client.rooms == {"a": 5, "b": 5}
    assert [(f.room, f.since) for f in seen[1] if isinstance(f, Join)] == [("a", 5), ("b", None)]
    assert got == []


async def test_a_join_since_in_flight_at_a_drop_gets_its_backlog() -> None:
    """In a at seq 3 with none of its messages had, join(a, since=0) is lost with the
    connection: the re-join asks from 0, and 1-3 are delivered."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and connection == 1 and frame.since == 0:
            return False
        return answer_at(writer, frame, 3)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        assert client.rooms == {"a": 3}
        await client.join("a", since=0)  # answered after the reconnect
        await client.who("a")
        got = [e.seq for e in client.received() if isinstance(e, Message)]
    assert [(f.room, f.since) for f in seen[1] if isinstance(f, Join)] == [("a", 0)]
    assert got == [1, 2, 3]


async def given_up_then_joined(
    client: Client, release: asyncio.Event, given_up: Join, *, since: int
) -> list[int]:
    """``given_up`` times out once written; then a join of its room
    with ``since``, written at once (unpaced), before the server's held answer is
    ``release``d. Returns the seqs delivered, once all is answered."""
    with pytest.raises(TimeoutError):
        await client.request(given_up, timeout=0.1)
    asking = asyncio.ensure_future(client.join(given_up.room, since=since))
    await asyncio.sleep(0)  # written
    release.set()
    await asking
    await client.who("a")
    return [e.seq for e in client.received() if isinstance(e, Message)]


async def test_a_rejoin_asks_from_the_lowest_since_its_joins_asked() -> None:
    """b joined, its names lost: join(b, since=8) given up once written, join(b, since=2)
    waiting. The re-join asks from 2, so 3-10 are delivered, once each."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b" and connection == 1:
            if frame.since == 8:
                return when_set(release, joined_then_drop(writer, "b"))
            return True  # not answered before the drop
        return answer_at(writer, frame, 10)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("a")
        given_up = Join(room="b", since=8, ref=client.new_ref())
        got = await given_up_then_joined(client, release, given_up, since=2)
    assert [(f.room, f.since) for f in seen[1] if isinstance(f, Join)] == [("a", 10), ("b", 2)]
    assert got == list(range(3, 11))


async def test_a_join_without_a_ref_is_kept_and_answered_like_any() -> None:
    """send(Join) without a ref: it gets one, so a refusal is known for what it answers
    (the room is not the client's, and the next resume does not join it)."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Join) and frame.room == "b":
            writer.write(refusal(frame, "invalid_room"))
            return True
        if isinstance(frame, Who) and connection == 1 and frame.room == "a":
            return False
        return answer_any(writer, frame)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port) as client:
        await client.join("a")
        client.send(Join(room="b", since=3))
        refused = await wait_for_event(client, ErrorFrame)
        assert set(client.rooms) == {"a"}
        await client.who("a")  # drops, then is asked again
    assert isinstance(refused, ErrorFrame)
    assert [refused.ref] == [f.ref for f in seen[0] if isinstance(f, Join) and f.room == "b"]
    assert [f.room for f in seen[1] if isinstance(f, Join)] == ["a"]


async def test_a_client_connects_once() -> None:
    """connect() on a client that is connected, or whose connection has ended, raises:
    state kept for one connection is not carried into another behind the caller's back."""
    async with fake_server(scripted(dropping_at(Say), [])) as port:
        client = Client("127.0.0.1", port, "ana", send_rate=0)
        await client.connect()
        with pytest.raises(RuntimeError):
            await client.connect()
        await client.join("a")
        with pytest.raises(ConnectionClosed):
            await client.say("a", "hello")
        await wait_for_event(client, Disconnected)
        with pytest.raises(RuntimeError):
            await client.connect()


async def test_after_the_end_a_reconnecting_client_keeps_nothing_more() -> None:
    """With reconnect, the server refuses to take the client back for good (bad_password):
    Disconnected. A frame sent then is refused at once, not kept for a connection that
    will not come."""
    seen: list[list[ClientFrame]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append([])
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for body in decoder.receive_data(data):
                frame = decode_client(body)
                if isinstance(frame, Hello) and len(seen) == 1:
                    writer.write(WELCOME)
                    continue
                if isinstance(frame, Hello):
                    refused = ErrorFrame(code="bad_password", message="no", fatal=True)
                    writer.write(encode(refused))
                elif not isinstance(frame, Bye):
                    answer_any(writer, frame)
                writer.close()  # the first connection drops at its first frame
                return

    async with fake_server(handler) as port:
        client = quick_client(port, 0)
        await client.connect()
        await client.join("a")
        await wait_for_event(client, Disconnected)
        with pytest.raises(ConnectionClosed):
            client.send(Say(room="a", text="too late", ref=client.new_ref()))
        assert client.pending == 0
    assert len(seen) == 2


async def test_a_bare_join_then_a_bare_part_while_offline_leave_no_room() -> None:
    """While offline, send(Join(b)) then send(Part(b)), neither with a ref: both go, in
    that order, and the client is not in b."""
    seen: list[list[ClientFrame]] = []
    async with fake_server(scripted(dropping_at(Who), seen)) as port, quick_client(port) as client:
        await client.join("a")
        client.send(Who(room="a", ref=client.new_ref()))  # the connection drops there
        await wait_for_event(client, ConnectionLost)
        client.send(Join(room="b"))
        client.send(Part(room="b"))
        await wait_for_event(client, Reconnected)
        await client.who("a")
    assert [(type(f), f.room) for f in seen[1] if isinstance(f, Join | Part)] == [
        (Join, "a"),
        (Join, "b"),
        (Part, "b"),
    ]
    assert set(client.rooms) == {"a"}


async def test_a_join_since_after_a_part_does_not_start_the_rejoin() -> None:
    """In a at seq 3, none of its messages had: a say, a part of a and join(a, since=0),
    the connection dropping at the say. The re-join asks from 3 (the join since is for
    after the part); the part goes, then the join, which delivers 1-3, once."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Say) and connection == 1:
            return False
        return answer_at(writer, frame, 3)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("a")
        client.send(Say(room="a", text="hi", ref=client.new_ref()))
        client.send(Part(room="a", ref=client.new_ref()))
        client.send(Join(room="a", since=0, ref=client.new_ref()))
        await wait_for_event(client, Reconnected)
        await client.who("a")
        got = [e.seq for e in client.received() if isinstance(e, Message)]
    assert [f.since for f in seen[1] if isinstance(f, Join)] == [3, 0]
    assert got == [1, 2, 3]


async def test_a_join_since_given_up_after_a_part_does_not_start_the_rejoin() -> None:
    """In a at seq 3, none of its messages had: a say, a part of a, a join(a, since=0)
    given up once written and another waiting, when the connection drops. The re-join
    asks from 3; the part goes, then the waiting join, which delivers 1-3, once."""
    seen: list[list[ClientFrame]] = []
    release = asyncio.Event()

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1 and isinstance(frame, Say | Part):
            return True  # not answered before the drop
        if connection == 1 and isinstance(frame, Join) and frame.since == 0:
            return when_set(release, writer.close)
        return answer_at(writer, frame, 3)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("a")
        client.send(Say(room="a", text="hi", ref=client.new_ref()))
        client.send(Part(room="a", ref=client.new_ref()))
        given_up = Join(room="a", since=0, ref=client.new_ref())
        got = await given_up_then_joined(client, release, given_up, since=0)
    assert [f.since for f in seen[1] if isinstance(f, Join)] == [3, 0]
    assert got == [1, 2, 3]


async def test_a_server_that_lost_its_messages_is_followed_from_where_it_is() -> None:
    """Delivered up to seq 2, the client re-joins a server that has only seq 1 (a restart
    without its store, and one message since): it says so, and what the server says from
    then on (seq 2 again) is delivered, not dropped as seen."""
    seen: list[list[ClientFrame]] = []

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if isinstance(frame, Who) and connection == 1:
            for seq in (1, 2):
                writer.write(encode(Message(room="a", seq=seq, ts=1, sender="bo", text="old")))
            return False
        if isinstance(frame, Who):
            writer.write(encode(Message(room="a", seq=2, ts=1, sender="bo", text="new")))
        return answer_at(writer, frame, 0 if connection == 1 else 1)

    async with fake_server(scripted(answer, seen)) as port, quick_client(port, 0) as client:
        await client.join("a")
        client.send(Who(room="a", ref=client.new_ref()))  # two messages, then the drop
        await wait_for_event(client, Reconnected)
        await client.who("a")
        events = [e for e in client.received() if isinstance(e, Message | LocalNotice)]
    assert [e.text for e in events] == [
        "the server now has 1 message(s) of #a, where 2 were known here: it has lost its "
        "messages and numbers them again; its first 1 are in its history",
        "new",  # with the who asked again after the drop (the second who's is seen)
    ]
    assert [f.since for f in seen[1] if isinstance(f, Join)] == [2]
    assert client.rooms == {"a": 2}


def restarted(live_after_rejoin: bool) -> Answer:
    """Connection 1: room a at seq 3, its messages sent with the first who's answer; a
    say drops the connection unacked. Then a server restarted without its store, whose a
    holds seq 1 only, and which stores what is said (and, with ``live_after_rejoin``,
    has cy speak right after answering the re-join)."""
    log = [Message(room="a", seq=1, ts=1, sender="cy", text="said after the restart")]

    def names(frame: ClientFrame) -> bytes:
        ref = getattr(frame, "ref", None)
        return encode(Names(room="a", nicks=["ana"], topic="", seq=log[-1].seq, ref=ref))

    def answer(writer: asyncio.StreamWriter, frame: ClientFrame, connection: int) -> bool:
        if connection == 1:
            if isinstance(frame, Who):
                for seq in (1, 2, 3):
                    writer.write(encode(Message(room="a", seq=seq, ts=1, sender="bo", text="old")))
            if isinstance(frame, Say):
                return False
            return answer_at(writer, frame, 0)
        if isinstance(frame, Join):
            writer.write(encode(Joined(room="a", nick="ana", ts=1)))
            writer.write(names(frame))
            for message in log:
                if frame.since is not None and message.seq > frame.since:
                    writer.write(encode(message))
        elif isinstance(frame, Say):
            log.append(Message(room="a", seq=len(log) + 1, ts=2, sender="ana", text=frame.text))
            writer.write(encode(log[-1]))
            writer.write(encode(Ack(ref=frame.ref or "", ts=2, room="a", seq=log[-1].seq)))
        elif isinstance(frame, Who):
            writer.write(names(frame))
        if isinstance(frame, Join) and live_after_rejoin and len(log) == 1:
            log.append(Message(room="a", seq=2, ts=2, sender="cy", text="live"))
            writer.write(encode(log[-1]))
        return True

    return answer


@pytest.mark.parametrize(("live", "shown"), [(False, ["mine"]), (True, ["live", "mine"])])
async def test_what_a_restarted_server_says_next_is_delivered(live: bool, shown: list[str]) -> None:
    """Delivered up to seq 3, the client re-joins a server that lost its messages and has
    seq 1 since: what comes next (someone's live message, the line resent after the drop)
    is delivered once each, in the server's order; seq 1 is left to the history."""
    async with fake_server(scripted(restarted(live), [])) as port, quick_client(port) as client:
        await client.join("a")
        await client.who("a")  # 1-3 delivered
        saying = asyncio.ensure_future(client.say("a", "mine", timeout=10))  # drops, unacked
        await wait_for_event(client, Reconnected)
        await saying
        await client.who("a")
        texts = [e.text for e in client.received() if isinstance(e, Message | LocalNotice)]
    assert texts[0] == (
        "the server now has 1 message(s) of #a, where 3 were known here: it has lost its "
        "messages and numbers them again; its first 1 are in its history"
    )
    assert texts[1:] == shown


async def test_closing_a_client_that_never_connected_ends_what_waits() -> None:
    """With reconnect, a join asked before connecting waits for the connection; closing
    the client instead ends it at once (ConnectionClosed), and the events end too."""
    client = quick_client(1)  # never connected: the port is not used
    asking = asyncio.ensure_future(client.join("a"))
    await asyncio.sleep(0)  # asked: kept until connected
    async with asyncio.timeout(2):  # not the join's own timeout (30 s)
        await client.close()
        with pytest.raises(ConnectionClosed):
            await asking
    assert [type(e) for e in client.received()] == [Disconnected]
    await client.close()  # idempotent: nothing more
    assert client.received() == []


@contextlib.asynccontextmanager
async def two_histories() -> AsyncIterator[tuple[Server, Server, FaultProxy, Client]]:
    """Two servers with memory stores, each its own history; a proxy to the first, and
    ana connected through it, reconnecting."""
    first, second = Server(make_config(), MemoryStore()), Server(make_config(), MemoryStore())
    await first.start()
    await second.start()
    proxy = await FaultProxy("127.0.0.1", first.port).start()
    backoff = Backoff(initial=0.01, cap=0.05)
    try:
        async with Client("127.0.0.1", proxy.port, "ana", reconnect=True, backoff=backoff) as ana:
            yield first, second, proxy, ana
    finally:
        await proxy.close()
        await first.close()
        await second.close()


async def test_a_server_with_a_new_history_is_followed_from_its_first_message() -> None:
    """The server lost its messages (a memory store, replaced) and has since stored more
    of the room than the client had seen, so counting cannot tell: its welcome's history
    id says the numbering started again, and the client shows what the server has from
    its first message, instead of taking seqs it has seen for messages it has."""
    async with two_histories() as (first, second, proxy, ana):
        async with Client("127.0.0.1", first.port, "bob") as bob:
            await ana.join(ROOM)
            await bob.join(ROOM)
            for text in ("old 1", "old 2"):
                await bob.say(ROOM, text)
            async with asyncio.timeout(5):
                while ana.rooms[ROOM] != 2:
                    await ana.next_event()
        async with Client("127.0.0.1", second.port, "cy") as cy:
            await cy.join(ROOM)
            for text in ("new 1", "new 2", "new 3"):
                await cy.say(ROOM, text)
        proxy.target = ("127.0.0.1", second.port)
        proxy.reset_all()
        events: list[Event] = []
        async with asyncio.timeout(5):
            while not events or getattr(events[-1], "text", "") != "new 3":
                events.append(await ana.next_event())
    assert [e.text for e in events if isinstance(e, Message)] == ["new 1", "new 2", "new 3"]
    notices = [e.text for e in events if isinstance(e, LocalNotice)]
    assert notices == [
        f"the server has lost its messages and numbers them again from 1: what it has of "
        f"#{ROOM} is shown from its first message"
    ]


async def test_what_asks_by_seq_offline_is_of_the_old_numbering_on_a_new_history() -> None:
    """Asked while offline: a join of #x since 3 and a page of #y's history before 3. The
    server comes back with a new history: the join asks from its first message (the
    notice names the room), and the page, whose seqs mean other messages now, is answered
    here with an error instead of showing them; a page from the first (after 0) is not."""
    async with two_histories() as (first, second, proxy, ana):
        await first.close()
        await wait_for_event(ana, ConnectionLost)
        joining = asyncio.create_task(ana.join("x", since=3))
        paging = asyncio.create_task(ana.history("y", before=3))
        from_first = asyncio.create_task(ana.history("x", after=0))
        async with Client("127.0.0.1", second.port, "cy") as cy:
            await cy.join("x")
            for text in ("new 1", "new 2", "new 3", "new 4"):
                await cy.say("x", text)
        proxy.target = ("127.0.0.1", second.port)
        events: list[Event] = []
        async with asyncio.timeout(5):
            while not events or getattr(events[-1], "text", "") != "new 4":
                events.append(await ana.next_event())
            await joining
            with pytest.raises(ServerError) as refused:
                await paging
            first_page = await from_first
    assert [e.text for e in events if isinstance(e, Message)] == [f"new {i}" for i in range(1, 5)]
    assert refused.value.code == "unavailable"
    assert [m.text for m in first_page.messages] == [f"new {i}" for i in range(1, 5)]
    assert [e.text for e in events if isinstance(e, LocalNotice)] == [
        "the server has lost its messages and numbers them again from 1: what it has of #x "
        "is shown from its first message"
    ]


# -- random scenarios: joins, parts, lines and cuts ------------------------------------

ROOMS = ("a", "b", "c")
_OPS = st.one_of(
    st.tuples(st.just("say"), st.sampled_from(ROOMS)),
    st.tuples(st.just("join"), st.sampled_from(ROOMS)),
    st.tuples(st.just("part"), st.sampled_from(ROOMS)),
    st.tuples(st.just("other"), st.sampled_from(ROOMS)),  # someone else says a line there
    st.tuples(st.just("cut"), st.integers(1, 80)),  # after that many bytes to the client
    st.tuples(st.just("pause"), st.integers(0, 20)),  # milliseconds
    st.tuples(st.just("restart"), st.just(0)),  # the server, on its SQLite file
)


async def random_scenario(ops: list[tuple[str, object]], flood: FloodPolicy, db: Path) -> None:
    """Run ``ops`` against a real server (SQLite in ``db``) behind a proxy that cuts its
    clients off, then check what they and the server ended with against the ops."""
    srv = Server(make_config(flood=flood), SQLiteStore(db))
    await srv.start()
    proxy = await FaultProxy("127.0.0.1", srv.port, fragment=5, seed=1).start()
    backoff = Backoff(initial=0.01, cap=0.05, rng=random.Random(1))
    ana = Client("127.0.0.1", proxy.port, "ana", reconnect=True, backoff=backoff)
    bob = Client("127.0.0.1", proxy.port, "bob", reconnect=True, backoff=backoff)
    delivered: dict[str, list[int]] = {room: [] for room in ROOMS}
    stretch: dict[str, int | None] = {}  # room: the first seq delivered since ana joined
    changed = asyncio.Event()

    async def watch() -> None:
        async for event in ana.events():
            if isinstance(event, Message):
                delivered[event.room].append(event.seq)
                if stretch.get(event.room, 0) is None:
                    stretch[event.room] = event.seq
            elif isinstance(event, Joined) and event.nick == "ana":
                stretch[event.room] = None
            changed.set()

    try:
        await ana.connect()
        await bob.connect()
        for room in ROOMS:
            await bob.join(room)
        watching = asyncio.create_task(watch())
        member: set[str] = set()
        said: dict[str, bool] = {}  # ana's lines: stored (said in a room she was in) or not
        bob_said: set[str] = set()  # bob is in every room
        for n, (kind, arg) in enumerate(ops):
            if kind == "say":
                room = str(arg)
                said[f"ana {n}"] = room in member
                ana.send(ana.say_frame(room, f"ana {n}"))
            elif kind == "join":
                member.add(str(arg))
                ana.send(Join(room=str(arg), ref=ana.new_ref()))
            elif kind == "part":
                member.discard(str(arg))
                ana.send(Part(room=str(arg), ref=ana.new_ref()))
            elif kind == "other":
                bob_said.add(f"bob {n}")
                bob.send(bob.say_frame(str(arg), f"bob {n}"))
            elif kind == "cut":
                proxy.reset_after(int(str(arg)))
            elif kind == "restart":
                await srv.close()
                srv = Server(make_config(flood=flood), SQLiteStore(db))
                await srv.start()
                proxy.target = ("127.0.0.1", srv.port)
            else:
                await asyncio.sleep(int(str(arg)) / 1000)

        def last_seq(room: str) -> int:
            return srv.registry.rooms[room].stored_seq if room in srv.registry.rooms else 0

        def settled() -> bool:
            # Everything ana sent answered (her outbox: lines, joins and parts alike).
            if ana._outbox or ana.queued or bob._outbox or bob.queued:
                return False
            if not (ana.connected and bob.connected):
                return False
            # Every message of a room ana is in has reached her (or came before her join).
            return all(seq == last_seq(room) for room, seq in ana.rooms.items())

        async with asyncio.timeout(20):
            while not settled():
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):  # bob's acks do not wake ana's watcher
                        await changed.wait()
        watching.cancel()
        rooms = set(ana.rooms)
        stored = {
            m.text: m.room
            for room in ROOMS
            for m in srv.store.history(room, before=None, after=0, limit=500).messages
        }
        texts = [
            m.text
            for room in ROOMS
            for m in srv.store.history(room, before=None, after=0, limit=500).messages
        ]
    finally:
        await ana.close()
        await bob.close()
        await proxy.close()
        await srv.close()
    assert len(texts) == len(set(texts)), "a line was stored twice"
    assert {t for t, ok in said.items() if ok} == {t for t in stored if t.startswith("ana")}
    assert bob_said == {t for t in stored if t.startswith("bob")}
    assert rooms == member
    for room, seqs in delivered.items():
        assert seqs == sorted(set(seqs)), f"#{room}: a message shown twice or out of order"
    for room in member:
        first = stretch.get(room)
        if first is not None:  # since ana last joined, every message reached her once
            tail = [s for s in delivered[room] if s >= first]
            assert tail == list(range(first, last_seq(room) + 1)), f"#{room}: a gap"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, min_size=1, max_size=30))
def test_random_joins_parts_lines_cuts_and_restarts_keep_every_promise(
    ops: list[tuple[str, object]],
) -> None:
    """Whatever the order of joins, parts, lines, cuts of the connections and restarts of
    the server: each line said in a room the client was in is stored once and the others
    not at all (another member's too), the client ends in the rooms the ops leave it in,
    and in each room every message reaches it once, in order, with no gap since it last
    joined. The clients pace (a flood limit)."""
    with tempfile.TemporaryDirectory() as tmp:
        policy = FloodPolicy(rate=200, burst=5, strikes=1000)
        asyncio.run(random_scenario(ops, policy, Path(tmp) / "achat.db"))
