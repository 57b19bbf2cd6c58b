"""The async client API against a real server, and against a hostile fake one."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any, cast

import pytest

from achat.client import connection
from achat.client.connection import (
    MAX_PACE_BURST,
    MAX_PACE_RATE,
    MAX_RETRY_AFTER,
    SEND_BURST,
    SEND_RATE,
    SLOWEST_RATE,
    Backoff,
    Client,
    ConnectionLost,
    Disconnected,
    Event,
    LocalNotice,
    Reconnected,
    SendBudget,
    _retry_after,
    pace_under,
)
from achat.errors import ConnectionClosed, ServerError
from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder, encode_frame
from achat.server.app import Server
from achat.server.limits import FloodPolicy
from achat.store.memory import MemoryStore
from achat.store.sqlite import SQLiteStore
from tests.conftest import make_config
from tests.helpers.fakeserver import WELCOME, FakeServer, answering, fake_server, numbered
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.procs import closed_port


async def next_of(client: Client, kind: type, timeout: float = 3) -> Event:
    async with asyncio.timeout(timeout):
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event


async def test_connect_and_use_every_helper(server: Server) -> None:
    """connect returns welcome; join/say/dm/who/rooms/history/ping all get their replies."""
    async with (
        Client("127.0.0.1", server.port, "ana") as ana,
        Client("127.0.0.1", server.port, "bob") as bob,
    ):
        assert ana.welcome is not None
        assert ana.welcome.nick == "ana"
        names = await ana.join("general")
        assert names.nicks == ["ana"]
        await bob.join("general")
        ack = await ana.say("general", "hello")
        assert (ack.room, ack.seq) == ("general", 1)
        got = await next_of(bob, m.Message)
        assert isinstance(got, m.Message)
        assert got.text == "hello"
        dm_ack = await ana.dm("bob", "psst")
        assert dm_ack.id is not None
        assert (await ana.who("general")).nicks == ["ana", "bob"]
        assert [r.room for r in (await ana.rooms_list()).rooms] == ["general"]
        assert [x.text for x in (await ana.history("general")).messages] == ["hello"]
        await ana.ping()
        assert ana.rooms == {"general": 1}


async def test_refusals_raise_server_errors(server: Server) -> None:
    """A taken nick (any case) or an invalid nick makes connect raise ServerError."""
    async with Client("127.0.0.1", server.port, "Ana"):
        with pytest.raises(ServerError) as taken:
            await Client("127.0.0.1", server.port, "aNA").connect()
        assert taken.value.code == "nick_taken"
    with pytest.raises(ServerError) as bad:
        await Client("127.0.0.1", server.port, "9lives").connect()
    assert bad.value.code == "invalid_nick"


async def test_request_errors_raise(server: Server) -> None:
    """A request answered with an error raises ServerError carrying its code."""
    async with Client("127.0.0.1", server.port, "ana") as ana:
        with pytest.raises(ServerError) as exc:
            await ana.say("nowhere", "hi")
        assert exc.value.code == "not_in_room"
        assert ana.pending == 0


async def test_nothing_listening() -> None:
    """Connecting to a closed port raises ConnectionClosed quickly."""
    with closed_port() as port, pytest.raises(ConnectionClosed, match="cannot reach"):
        await Client("127.0.0.1", port, "ana", connect_timeout=2).connect()


async def test_events_end_with_disconnected(server: Server) -> None:
    """When the server goes away, pending requests fail and events end with Disconnected."""
    ana = Client("127.0.0.1", server.port, "ana")
    await ana.connect()
    await ana.join("a")
    await server.close()
    events = [e async for e in ana.events()]
    assert isinstance(events[-1], Disconnected)
    with pytest.raises(ConnectionClosed):
        await ana.request(m.Ping(ref="late"))
    await ana.close()


async def test_renamed_updates_the_client_nick(server: Server) -> None:
    """After a rename, the client knows its new nick (and reconnects with it)."""
    async with Client("127.0.0.1", server.port, "ana") as ana:
        ana.rename("anna")
        await next_of(ana, m.Renamed)
        assert ana.nick == "anna"


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    """Delays are random, grow exponentially and never pass the cap."""
    import random

    backoff = Backoff(initial=0.1, cap=2.0, rng=random.Random(5))
    delays = [backoff.delay(n) for n in range(12)]
    assert all(0.1 <= d <= 2.0 for d in delays)
    assert max(delays[:2]) <= 0.2
    assert len(set(delays)) == len(delays)
    assert max(delays[6:]) > 1.0


async def test_hostile_server_frames_are_dropped_not_raised() -> None:
    """Bad JSON and unknown types become LocalNotice; good frames still arrive; an
    oversized length ends the connection with Disconnected, not an exception."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(WELCOME)
        await reader.read(65536)  # the client's ping: it has the welcome, now the garbage
        writer.write(encode_frame(b'{"type":"message",'))
        writer.write(encode_frame(b'{"type":"teleport","x":1}'))
        writer.write(encode_frame(b'{"type":"message","room":"a","seq":1,"ts":1,"from":"x"}'))
        writer.write(m.encode(m.Message(room="a", seq=1, ts=1, sender="x", text="\x1b[2Jfine")))
        writer.write(b"\x7f\xff\xff\xff")
        await writer.drain()
        await reader.read(65536)
        writer.close()

    async with fake_server(handler) as port:
        client = Client("127.0.0.1", port, "ana")
        await client.connect()
        client.send(m.Ping(ref="go"))
        events = []
        async with asyncio.timeout(3):
            events = [e async for e in client.events()]
        await client.close()
    kinds = [type(e) for e in events]
    assert kinds == [LocalNotice, LocalNotice, LocalNotice, m.Message, Disconnected]
    message = events[3]
    assert isinstance(message, m.Message)
    assert message.text == "\x1b[2Jfine"  # delivered as data; the renderer neuters it
    last = events[-1]
    assert isinstance(last, Disconnected)
    assert "broken frame" in last.reason


async def test_server_that_never_welcomes() -> None:
    """A server that accepts but never answers hello makes connect fail after its timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await reader.read(65536)  # until the client gives up and closes

    async with fake_server(handler) as port:
        with pytest.raises(ConnectionClosed, match="no welcome"):
            await Client("127.0.0.1", port, "ana", connect_timeout=0.3).connect()


async def test_silent_server_is_dropped_and_retried() -> None:
    """A server that stops answering (even pings) is dropped after 2x keepalive; the client
    then tries to connect again."""
    hellos = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hellos
        await reader.read(65536)
        hellos += 1
        writer.write(WELCOME)
        while await reader.read(65536):  # reads pings, never answers
            pass

    async with fake_server(handler) as port:
        client = Client(
            "127.0.0.1",
            port,
            "ana",
            keepalive=0.2,
            reconnect=True,
            backoff=Backoff(initial=0.01, cap=0.02),
        )
        await client.connect()
        lost = await next_of(client, ConnectionLost, timeout=3)
        assert isinstance(lost, ConnectionLost)
        back = await next_of(client, Reconnected, timeout=3)
        assert isinstance(back, Reconnected)
        assert hellos == 2
        await client.close()


async def test_a_frame_that_cannot_be_encoded_is_refused_and_not_kept(server: Server) -> None:
    """A lone surrogate cannot be UTF-8: send raises, and nothing waits to be resent."""
    async with Client("127.0.0.1", server.port, "ana", reconnect=True) as ana:
        await ana.join("general")
        with pytest.raises(ValueError, match="surrogate"):
            ana.send(m.Say(room="general", text="caf\udce9", ref=ana.new_ref()))
        assert ana.pending == 0
        ack = await ana.say("general", "fine")
        assert ack.seq == 1


def test_the_send_budget_gives_a_burst_then_its_rate() -> None:
    budget = SendBudget(burst=3, rate=4.0, now=100.0)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.wait(100.0) == pytest.approx(0.25)
    assert not budget.take(100.2)
    assert budget.wait(100.2) == pytest.approx(0.05)
    assert budget.take(100.25)
    # Refilled over a long pause, but never beyond the burst.
    assert sum(budget.take(200.0) for _ in range(10)) == 3
    budget.fill(200.0)
    assert sum(budget.take(200.0) for _ in range(10)) == 3


def test_the_send_budget_slows_down_once_per_episode_of_refusals() -> None:
    budget = SendBudget(burst=8, rate=4.0, now=0.0)
    assert budget.slow_down(10.0)
    assert (budget.burst, budget.rate) == (4, 2.0)
    assert not budget.take(10.0)  # emptied
    # Within one new interval (0.5 s): refusals of frames written before the slow-down.
    assert not budget.slow_down(10.4)
    assert (budget.burst, budget.rate) == (4, 2.0)
    assert budget.take(10.5)
    assert budget.slow_down(10.5)
    assert (budget.burst, budget.rate) == (2, 1.0)
    for k in range(1, 12):
        budget.slow_down(10.5 + 100 * k)
    assert (budget.burst, budget.rate) == (1, SLOWEST_RATE)


def test_the_send_budget_never_speeds_up_or_counts_a_pause_twice() -> None:
    slow = SendBudget(burst=1, rate=SLOWEST_RATE / 2, now=0.0)
    assert slow.slow_down(100.0)
    assert slow.rate == SLOWEST_RATE / 2  # a refusal never raises the rate to the floor
    budget = SendBudget(burst=5, rate=1.0, now=10.0)
    assert sum(budget.take(10.0) for _ in range(5)) == 5
    budget.wait(12.0)  # two tokens back
    budget.wait(11.0)  # a clock that stepped back does not credit the second again
    assert sum(budget.take(12.0) for _ in range(5)) == 2


def test_a_send_budget_of_rate_0_is_no_limit_until_a_refusal() -> None:
    budget = SendBudget(burst=1, rate=0, now=0.0)
    assert all(budget.take(0.0) for _ in range(1000))
    assert budget.wait(0.0) == 0
    assert budget.slow_down(1.0)
    assert budget.rate == SEND_RATE
    with pytest.raises(ValueError, match="burst"):
        SendBudget(burst=0, rate=1, now=0.0)
    with pytest.raises(ValueError, match="rate"):
        SendBudget(burst=1, rate=-1, now=0.0)


def test_a_deferred_send_budget_sends_nothing_until_then_at_the_same_pace() -> None:
    """A busy server's retry_after holds the next frame back, and changes no pace."""
    budget = SendBudget(burst=3, rate=2.0, now=0.0)
    budget.defer(0.5)
    budget.defer(0.2)  # an earlier time does not shorten the wait
    assert not budget.take(0.4)
    assert budget.wait(0.4) == pytest.approx(0.1)
    assert [budget.take(0.5) for _ in range(4)] == [True, True, True, False]
    assert (budget.burst, budget.rate) == (3, 2.0)
    unpaced = SendBudget(burst=1, rate=0, now=0.0)
    unpaced.defer(1.0)
    assert not unpaced.take(0.9)
    assert unpaced.wait(0.9) == pytest.approx(0.1)
    assert unpaced.take(1.0)
    unpaced.defer(9.0)
    unpaced.restart(burst=1, rate=0, now=2.0)  # a new connection: no wait carried over
    assert unpaced.take(2.0)


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(None, None), (0.5, 0.5), (0.0, 0.0), (1e9, MAX_RETRY_AFTER), (-1.0, None), (math.inf, None)],
)
def test_a_busy_servers_retry_after_is_taken_within_reason(
    asked: float | None, waited: float | None
) -> None:
    error = m.Error(code="rate_limited", message="busy", fatal=False, ref="r", retry_after=asked)
    assert _retry_after(error) == waited


def test_a_send_budget_restarts_at_a_new_pace_with_a_whole_burst() -> None:
    """A new connection: the new pace, a whole burst, and a slow-down counts as new."""
    budget = SendBudget(burst=8, rate=4.0, now=0.0)
    assert budget.slow_down(1.0)
    budget.restart(burst=2, rate=1.0, now=5.0)
    assert (budget.burst, budget.rate) == (2, 1.0)
    assert [budget.take(5.0) for _ in range(3)] == [True, True, False]
    assert budget.slow_down(5.1)  # a new episode, however recent the last slow-down
    budget.restart(burst=3, rate=0.0, now=6.0)
    assert all(budget.take(6.0) for _ in range(100))
    with pytest.raises(ValueError, match="burst"):
        budget.restart(burst=0, rate=1.0, now=7.0)


def test_a_frame_spent_without_a_token_is_owed_up_to_a_burst() -> None:
    """A ping or pong goes whether or not there is a token: what waits then waits longer,
    as the server's bucket makes it, but never for more than a burst's worth of them."""
    budget = SendBudget(burst=2, rate=1.0, now=0.0)
    budget.spend(0.0)
    budget.spend(0.0)
    budget.spend(0.0)  # one owed
    assert budget.wait(0.0) == pytest.approx(2.0)
    for _ in range(10):
        budget.spend(0.0)
    assert budget.wait(0.0) == pytest.approx(3.0)  # two owed at most
    unlimited = SendBudget(burst=1, rate=0.0, now=0.0)
    unlimited.spend(0.0)
    assert unlimited.take(0.0)


def welcome_limit(rate: object, burst: object) -> m.Welcome:
    return m.Welcome(
        nick="a", server="s", version=1, max_frame=1, max_text=1, send_rate=rate, send_burst=burst
    )


def test_the_pace_under_an_announced_limit_leaves_a_margin() -> None:
    """80 % of the announced burst and rate, at least one frame, and bounded."""
    # The server's default limit gives the client's default pace.
    assert pace_under(welcome_limit(5, 10)) == (SEND_BURST, SEND_RATE)
    assert pace_under(welcome_limit(1.0, 3)) == (2, 0.8)
    assert pace_under(welcome_limit(1, 1)) == (1, 0.8)
    assert pace_under(welcome_limit(0, 10)) == (8, 0.0)  # no limit stays none
    huge = pace_under(welcome_limit(1e300, 1e300))  # bounded, so that a budget can hold it
    assert huge == (MAX_PACE_BURST, MAX_PACE_RATE)
    assert SendBudget(MAX_PACE_BURST, MAX_PACE_RATE, now=0.0).take(0.0)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        (None, None),
        (5, None),
        (None, 10),
        ("5/s", 10),
        (5, [10]),
        (True, 10),
        (-1, 10),
        (5, 0.5),
        (float("nan"), 10),
        (5, float("inf")),
    ],
)
def test_a_limit_the_client_cannot_use_is_not_followed(rate: object, burst: object) -> None:
    """Anything but two finite numbers, a rate of 0 or more and a burst of 1 or more."""
    assert pace_under(welcome_limit(rate, burst)) is None


async def flood_limited_server(tmp_path: Path, policy: FloodPolicy) -> Server:
    srv = Server(make_config(flood=policy), SQLiteStore(tmp_path / "achat.db"))
    await srv.start()
    return srv


async def acked_in_order(client: Client, room: str, count: int) -> tuple[list[Event], list[str]]:
    """``count`` lines sent at once, as fast as typing allows; the events until all are
    acked, and the room's history."""
    refs = []
    for i in range(count):
        frame = client.say_frame(room, f"line {i}")
        refs.append(frame.ref)
        client.send(frame)
    events: list[Event] = []
    waiting = set(refs)
    async with asyncio.timeout(10):
        while waiting:
            event = await client.next_event()
            events.append(event)
            if isinstance(event, m.Ack):
                waiting.discard(event.ref)
    texts = [x.text for x in (await client.history(room)).messages]
    return events, texts


async def paced_lines(
    tmp_path: Path, policy: FloodPolicy, count: int, **options: Any
) -> tuple[tuple[int, float], list[Event], list[str]]:
    """``count`` lines sent at once in #general by a client of a server with ``policy``:
    the client's pace once connected, the events until all are acked, and the history."""
    srv = await flood_limited_server(tmp_path, policy)
    try:
        async with Client("127.0.0.1", srv.port, "ana", **options) as ana:
            pace = (ana.budget.burst, ana.budget.rate)
            await ana.join("general")  # one of the server's tokens
            events, texts = await acked_in_order(ana, "general", count)
    finally:
        await srv.close()
    return pace, events, texts


async def test_lines_sent_faster_than_the_flood_limit_wait_their_turn(tmp_path: Path) -> None:
    """Twenty lines at once against a limit of 6 at once: the client's own budget (under
    the server's) holds them back, so none is refused and all arrive in order."""
    policy = FloodPolicy(rate=60, burst=6)
    _, events, texts = await paced_lines(tmp_path, policy, 20, send_burst=5, send_rate=50)
    assert [e for e in events if isinstance(e, m.Error | LocalNotice)] == []
    assert texts == [f"line {i}" for i in range(20)]


async def test_a_client_paces_itself_under_the_limit_its_server_announces(
    tmp_path: Path,
) -> None:
    """A server stricter than the client's default pace (3 at once, where the client would
    write 8): the client takes the limit from its welcome, so a burst of lines is held
    back, not refused, and all arrive in order, with no notice."""
    policy = FloodPolicy(rate=10, burst=3, strikes=100)
    pace, events, texts = await paced_lines(tmp_path, policy, 8)
    assert pace == (2, 8.0)
    assert [e for e in events if isinstance(e, m.Error | LocalNotice)] == []
    assert texts == [f"line {i}" for i in range(8)]


async def test_a_client_of_a_server_without_a_flood_limit_does_not_pace(
    server: Server,
) -> None:
    """Flood limit off (announced as a rate of 0): fifty lines pasted at once are all
    written at once, where the default pace would hold back all but a burst of 8."""
    async with Client("127.0.0.1", server.port, "ana") as ana:
        await ana.join("general")
        for i in range(50):
            ana.send(ana.say_frame("general", f"line {i}"))
        assert ana.queued == 0
        async with asyncio.timeout(10):
            while ana.pending:
                await ana.next_event()
        texts = [x.text for x in (await ana.history("general", limit=50)).messages]
    assert texts == [f"line {i}" for i in range(50)]


async def test_each_connection_takes_its_servers_pace(tmp_path: Path) -> None:
    """Reconnected to another server, one with its flood limit off: the client stops
    pacing, and twenty lines pasted at once are all written at once (the strict server's
    pace would have held back all but 2)."""
    strict = await flood_limited_server(tmp_path, FloodPolicy(rate=2, burst=3, strikes=100))
    free = Server(make_config(), MemoryStore())
    await free.start()
    proxy = await FaultProxy("127.0.0.1", strict.port).start()
    backoff = Backoff(initial=0.01, cap=0.05)
    try:
        async with Client("127.0.0.1", proxy.port, "ana", reconnect=True, backoff=backoff) as ana:
            proxy.target = ("127.0.0.1", free.port)
            proxy.reset_all()
            async with asyncio.timeout(10):
                while not isinstance(await ana.next_event(), Reconnected):
                    pass
            await ana.join("general")
            for i in range(20):
                ana.send(ana.say_frame("general", f"line {i}"))
            assert ana.queued == 0
    finally:
        await proxy.close()
        await free.close()
        await strict.close()


async def test_a_server_that_announces_no_limit_gets_the_clients_own_pace() -> None:
    """After a server without a flood limit, one that says nothing of its limit (an older
    server, another implementation): the client goes back to its own 8 at once, then 4
    a second, instead of writing everything at once to a server that may limit it."""
    unlimited = m.encode(welcome_limit(0, 10))

    async def handler(
        number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(65536)  # hello
        if number == 1:
            writer.write(unlimited)
            writer.close()
            return
        writer.write(WELCOME)
        while await reader.read(65536):
            pass

    backoff = Backoff(initial=0.01, cap=0.05)
    async with fake_server(numbered(handler)) as port:
        client = Client("127.0.0.1", port, "ana", reconnect=True, backoff=backoff)
        await client.connect()
        assert client.budget.rate == 0
        async with asyncio.timeout(5):
            while not isinstance(await client.next_event(), Reconnected):
                pass
        for i in range(20):
            client.rename(f"ana{i}")
        assert client.queued == 20 - SEND_BURST
        client._stop_pacing()  # not the 3 s the rest would take
        await client.close()


async def test_a_slow_down_lasts_while_the_server_says_nothing_of_its_limit() -> None:
    """Refused by a server that says nothing of its limit, the client halves its pace and
    keeps it on the next connection to such a server (likely the same, with the same
    limit); a server that announces its limit gets a pace under it instead."""

    async def handler(
        number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for body in decoder.receive_data(data):
                frame = m.decode_client(body)
                if isinstance(frame, m.Hello):
                    writer.write(m.encode(welcome_limit(5, 10)) if number == 3 else WELCOME)
                elif isinstance(frame, m.Say) and frame.ref is not None:
                    if number == 1:  # refused: the client slows down, then the link drops
                        error = m.Error(
                            code="rate_limited", message="slow", fatal=False, ref=frame.ref
                        )
                        writer.write(m.encode(error))
                    else:
                        writer.write(m.encode(m.Ack(ref=frame.ref, ts=1, room="a", seq=1)))
                    writer.close()
                    return

    backoff = Backoff(initial=0.01, cap=0.05)
    paces = []
    async with fake_server(numbered(handler)) as port:
        client = Client("127.0.0.1", port, "ana", reconnect=True, backoff=backoff)
        await client.connect()
        paces.append((client.budget.burst, client.budget.rate))
        client.send(client.say_frame("a", "hello"))
        async with asyncio.timeout(10):
            while len(paces) < 3:
                if isinstance(await client.next_event(), Reconnected):
                    paces.append((client.budget.burst, client.budget.rate))
        await client.close()
    assert paces == [(8, 4.0), (4, 2.0), (8, 4.0)]


async def test_frames_a_stricter_server_refuses_go_again_more_slowly(tmp_path: Path) -> None:
    """A server stricter than the client's budget refuses part of a burst: the client
    slows down and sends the refused lines again, ahead of those still waiting, so every
    line is stored once and in order, and the caller sees no refusal."""
    srv = await flood_limited_server(tmp_path, FloodPolicy(rate=25, burst=3, strikes=100))
    try:
        async with Client("127.0.0.1", srv.port, "ana", send_burst=8, send_rate=60) as ana:
            await ana.join("general")  # one of the server's 3
            events, texts = await acked_in_order(ana, "general", 12)
            assert ana.budget.rate < 60
    finally:
        await srv.close()
    assert [e for e in events if isinstance(e, m.Error)] == []
    notices = [e.text for e in events if isinstance(e, LocalNotice)]
    assert len(notices) >= 1
    assert "sending it again" in notices[0]
    assert texts == [f"line {i}" for i in range(12)]


async def test_over_a_slow_link_refused_lines_still_arrive_in_order(tmp_path: Path) -> None:
    """With a round trip longer than the client's interval, a line written after a refused
    one could overtake it: paced, a kept frame waits for the answer to the one before."""
    srv = await flood_limited_server(tmp_path, FloodPolicy(rate=10, burst=3, strikes=100))
    proxy = await FaultProxy("127.0.0.1", srv.port, delay=0.03).start()  # 60 ms round trip
    try:
        async with Client("127.0.0.1", proxy.port, "ana", send_burst=8, send_rate=50) as ana:
            await ana.join("general")
            events, texts = await acked_in_order(ana, "general", 10)
    finally:
        await proxy.close()
        await srv.close()
    assert [e for e in events if isinstance(e, m.Error)] == []
    assert texts == [f"line {i}" for i in range(10)]


async def test_closing_waits_for_refused_lines_to_go_again(tmp_path: Path) -> None:
    """close() right after a burst: the lines the server refused go again before bye."""
    srv = await flood_limited_server(tmp_path, FloodPolicy(rate=30, burst=3, strikes=100))
    try:
        ana = Client("127.0.0.1", srv.port, "ana", send_burst=8, send_rate=0)
        await ana.connect()
        await ana.join("general")
        for i in range(6):
            ana.send(ana.say_frame("general", f"line {i}"))
        await ana.close()
        async with Client("127.0.0.1", srv.port, "reader", send_rate=0) as reader:
            await reader.join("general")
            texts = [x.text for x in (await reader.history("general")).messages]
    finally:
        await srv.close()
    assert texts == [f"line {i}" for i in range(6)]


async def test_disconnected_is_last_even_with_frames_queued() -> None:
    """A drop with frames still queued: their notice comes before Disconnected."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(WELCOME)
        await reader.read(65536)  # the first renames
        writer.close()

    async with fake_server(handler) as port:
        client = Client("127.0.0.1", port, "ana", send_burst=2, send_rate=0.1)
        await client.connect()
        for i in range(5):
            client.rename(f"ana{i}")  # two written, three queued
        events: list[Event] = []
        async for event in client.events():
            events.append(event)
        await client.close()
    assert isinstance(events[-1], Disconnected)
    assert [e.text for e in events if isinstance(e, LocalNotice)] == [
        "3 command(s) not sent: the connection was lost"
    ]
    assert client.queued == 0


class StoppedClock:
    """A monotonic clock that moves only when a test moves it: a client paced by it gets
    its next token when the test says, however long the machine takes meanwhile."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def token(self, rate: float) -> None:
        """Let a token come at ``rate`` a second: twice its interval, as ``1 / rate``
        added to the clock may come to a hair less than one token (a bucket of one
        holds no more)."""
        self.now += 2 / rate


async def test_a_line_that_times_out_while_queued_is_not_sent(server: Server) -> None:
    """say() gives up on a line still waiting for its turn: it is not sent after all."""
    clock = StoppedClock()
    async with Client(
        "127.0.0.1", server.port, "ana", send_burst=1, send_rate=4, clock=clock
    ) as ana:
        await ana.join("general")  # the only token
        with pytest.raises(TimeoutError):
            await ana.say("general", "gave up", timeout=0.05)
        assert ana.queued == 0
        assert ana.pending == 0
        clock.token(4)
        await ana.say("general", "after", timeout=5)  # goes when "gave up" would have
        clock.token(4)
        texts = [x.text for x in (await ana.history("general")).messages]
    assert texts == ["after"]


async def test_pacing_slower_than_the_keepalive_keeps_the_connection_up() -> None:
    """The rename waits 100 s for a token, far longer than the keepalive interval: the
    client does not take the server for dead meanwhile, nor does the server the client
    (it pings the quiet client, which answers)."""
    srv = Server(make_config(idle_timeout=0.6), MemoryStore())
    await srv.start()
    try:
        async with Client(
            "127.0.0.1", srv.port, "ana", keepalive=0.1, send_burst=1, send_rate=0.01
        ) as ana:
            await ana.join("general")  # spends the only token
            ana.rename("ana2")
            events: list[Event] = []
            with contextlib.suppress(TimeoutError):
                # Over two of the server's idle timeouts and seven of the client's
                # keepalive intervals: either's silence would have ended the connection.
                async with asyncio.timeout(1.5):
                    while True:
                        events.append(await ana.next_event())
            assert ana.connected
            assert ana.queued == 1
            ana._stop_pacing()  # not the 100 s the rename would wait
    finally:
        await srv.close()
    assert [e for e in events if isinstance(e, ConnectionLost | Disconnected | m.Error)] == []


async def test_keepalive_pings_leave_a_waiting_frame_its_token(tmp_path: Path) -> None:
    """A keepalive shorter than the pace's interval (0.2 s against 1 frame in 0.625 s): the
    line waiting for its token gets it, not a ping, so it is neither refused nor put off."""
    policy = FloodPolicy(rate=2, burst=1, strikes=100)
    _, events, texts = await paced_lines(tmp_path, policy, 2, keepalive=0.2)
    assert [e for e in events if isinstance(e, m.Error | LocalNotice)] == []
    assert texts == ["line 0", "line 1"]


async def test_a_line_given_up_while_its_turn_came_does_not_hold_up_the_next(
    server: Server,
) -> None:
    """A say that times out while the pacer waits for a token is skipped, and the line
    after it goes in its place: nothing waits for an answer to a line never sent."""
    clock = StoppedClock()
    async with Client(
        "127.0.0.1", server.port, "ana", send_burst=1, send_rate=10, clock=clock
    ) as ana:
        await ana.join("general")  # the only token
        with pytest.raises(TimeoutError):
            await ana.say("general", "given up", timeout=0.01)
        clock.token(10)
        await ana.say("general", "kept", timeout=2)  # would wait ANSWER_WAIT (5 s) for it
        clock.token(10)
        texts = [x.text for x in (await ana.history("general")).messages]
    assert texts == ["kept"]


async def test_a_question_given_up_while_queued_is_not_asked(server: Server) -> None:
    """A ping (not kept) whose request times out in the queue is not sent later."""
    clock = StoppedClock()
    async with Client(
        "127.0.0.1", server.port, "ana", send_burst=1, send_rate=20, clock=clock
    ) as ana:
        await ana.join("general")  # the only token
        given_up = ana.new_ref()
        with pytest.raises(TimeoutError):
            await ana.request(m.Ping(ref=given_up), timeout=0.01)
        clock.token(20)
        await ana.ping()  # answered after the given-up one would have been
        events = ana.received()
    assert [e for e in events if isinstance(e, m.Pong) and e.ref == given_up] == []


async def test_a_join_since_given_up_while_queued_leaves_no_room_behind(server: Server) -> None:
    clock = StoppedClock()
    async with Client(
        "127.0.0.1", server.port, "ana", send_burst=1, send_rate=20, clock=clock
    ) as ana:
        await ana.join("general")  # the only token
        with pytest.raises(TimeoutError):
            await ana.request(m.Join(room="other", since=3, ref=ana.new_ref()), timeout=0.01)
        assert set(ana.rooms) == {"general"}


async def said(client: Client, room: str, texts: list[str]) -> None:
    for text in texts:
        await client.say(room, text)


async def test_a_join_since_delivers_the_backlog_of_a_room_new_to_the_client(
    server: Server,
) -> None:
    """A bot that kept its last seq joins with since after a restart: it gets what came
    after, once each, then live messages."""
    async with Client("127.0.0.1", server.port, "bob", send_rate=0) as bob:
        await bob.join("a")
        await said(bob, "a", ["one", "two", "three", "four"])
        async with Client("127.0.0.1", server.port, "ana", send_rate=0) as ana:
            names = await ana.join("a", since=2)
            assert names.seq == 4
            await said(bob, "a", ["five"])
            await next_of(ana, m.Joined)  # ana's own, then the backlog and "five"
            got = [cast(m.Message, await next_of(ana, m.Message)) for _ in range(3)]
            assert ana.rooms == {"a": 5}
    assert [(x.seq, x.text) for x in got] == [(3, "three"), (4, "four"), (5, "five")]


async def test_a_join_since_in_a_room_joined_delivers_nothing_twice(server: Server) -> None:
    """ana has had messages 1-3 of a; a join of a with since=1 does not deliver 2 and 3
    again (each message reaches the caller once), and 4 comes as usual."""
    async with (
        Client("127.0.0.1", server.port, "ana", send_rate=0) as ana,
        Client("127.0.0.1", server.port, "bob", send_rate=0) as bob,
    ):
        await ana.join("a")
        await bob.join("a")
        await said(bob, "a", ["one", "two", "three"])
        got = [cast(m.Message, await next_of(ana, m.Message)).seq for _ in range(3)]
        await ana.join("a", since=1)
        await said(bob, "a", ["four"])
        got.append(cast(m.Message, await next_of(ana, m.Message)).seq)
        await ana.who("a")
        assert [e for e in ana.received() if isinstance(e, m.Message)] == []
        assert ana.rooms == {"a": 4}
    assert got == [1, 2, 3, 4]


async def test_a_join_since_in_a_room_with_nothing_delivered_yet_delivers_its_backlog(
    server: Server,
) -> None:
    """ana joined a at seq 3 and has had none of its messages: a join of a since 0 delivers
    1-3 (new to her), then 4 live."""
    async with (
        Client("127.0.0.1", server.port, "bob", send_rate=0) as bob,
        Client("127.0.0.1", server.port, "ana", send_rate=0) as ana,
    ):
        await bob.join("a")
        await said(bob, "a", ["one", "two", "three"])
        assert (await ana.join("a")).seq == 3
        await ana.join("a", since=0)
        await said(bob, "a", ["four"])
        got = [cast(m.Message, await next_of(ana, m.Message)).seq for _ in range(4)]
    assert got == [1, 2, 3, 4]


async def test_a_join_since_past_the_rooms_last_message_misses_nothing_after_it(
    server: Server,
) -> None:
    """join(a, since=10) when a's last seq is 3: nothing to deliver from before, and message
    4, said next, is delivered (not dropped as if already seen)."""
    async with (
        Client("127.0.0.1", server.port, "bob", send_rate=0) as bob,
        Client("127.0.0.1", server.port, "ana", send_rate=0) as ana,
    ):
        await bob.join("a")
        await said(bob, "a", ["one", "two", "three"])
        assert (await ana.join("a", since=10)).seq == 3
        await said(bob, "a", ["four"])
        got = cast(m.Message, await next_of(ana, m.Message))
        assert ana.rooms == {"a": 4}
    assert got.seq == 4


async def test_a_join_without_a_ref_past_the_rooms_last_message_misses_nothing(
    server: Server,
) -> None:
    """The same for a join sent as a bare frame, with no ref of the caller's."""
    async with (
        Client("127.0.0.1", server.port, "bob", send_rate=0) as bob,
        Client("127.0.0.1", server.port, "ana", send_rate=0) as ana,
    ):
        await bob.join("a")
        await said(bob, "a", ["one", "two", "three"])
        ana.send(m.Join(room="a", since=10))
        assert cast(m.Names, await next_of(ana, m.Names)).seq == 3
        await said(bob, "a", ["four"])
        got = cast(m.Message, await next_of(ana, m.Message))
    assert got.seq == 4


async def test_with_reconnect_what_is_asked_before_connecting_goes_on_connecting(
    server: Server,
) -> None:
    """reconnect=True keeps what is sent offline: before the first connection too, so a
    join asked before connect() is answered once connected, its backlog following."""
    async with Client("127.0.0.1", server.port, "bob", send_rate=0) as bob:
        await bob.join("a")
        await said(bob, "a", ["one", "two"])
        ana = Client("127.0.0.1", server.port, "ana", reconnect=True)
        asking = asyncio.ensure_future(ana.join("a", since=1))
        await asyncio.sleep(0)  # asked: kept until connected
        try:
            await ana.connect()
            names = await asking
            got = cast(m.Message, await next_of(ana, m.Message))
        finally:
            await ana.close()
    assert (names.room, got.seq) == ("a", 2)


def refusing_the_first_say(order: list[str]) -> FakeServer:
    """A server that refuses the first say (rate_limited) and records the other frames."""

    async def on_frame(writer: asyncio.StreamWriter, frame: m.ClientFrame) -> None:
        if isinstance(frame, m.Say) and not order:
            order.append("refused")
            writer.write(
                m.encode(m.Error(code="rate_limited", message="slow", fatal=False, ref=frame.ref))
            )
        elif isinstance(frame, m.Say):
            order.append(f"say {frame.text}")
            writer.write(m.encode(m.Ack(ref=frame.ref or "", room=frame.room, seq=1, ts=0)))
        elif isinstance(frame, m.Nick):
            order.append(f"nick {frame.nick}")

    return answering(on_frame)


async def test_a_command_typed_after_a_refused_line_does_not_overtake_it() -> None:
    order: list[str] = []
    async with fake_server(refusing_the_first_say(order)) as port:
        async with Client("127.0.0.1", port, "ana", send_rate=50) as ana:
            ana.send(ana.say_frame("general", "hello"))  # refused once, then sent again
            ana.rename("ana2")
            await next_of(ana, m.Ack)
        # close() has let the rename go out
        assert order == ["refused", "say hello", "nick ana2"]


async def test_a_frame_unanswered_for_long_stops_holding_up_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waiting for an answer is bounded, and once given up on, each later frame goes at
    its own pace instead of waiting as long again."""
    monkeypatch.setattr(connection, "ANSWER_WAIT", 0.05)
    said: list[str] = []

    async def on_frame(writer: asyncio.StreamWriter, frame: m.ClientFrame) -> None:
        if isinstance(frame, m.Say):
            said.append(frame.text)
            if frame.text != "never acked":
                writer.write(m.encode(m.Ack(ref=frame.ref or "", room=frame.room, seq=1, ts=0)))

    async with (
        fake_server(answering(on_frame)) as port,
        Client("127.0.0.1", port, "ana", send_rate=50) as ana,
    ):
        ana.send(ana.say_frame("general", "never acked"))
        texts = [f"line {i}" for i in range(3)]
        async with asyncio.timeout(0.5):  # each would wait ANSWER_WAIT after the last
            await asyncio.gather(*(ana.say("general", t) for t in texts))
    assert said == ["never acked", *texts]


async def test_closing_while_reconnecting_sends_nothing_more() -> None:
    """close() while a new connection is opening: it is closed, nothing is resent on it,
    and the client ends at once."""
    connections: list[list[str]] = []
    reopened, welcomed = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames: list[str] = []
        connections.append(frames)
        decoder = FrameDecoder()
        await reader.read(65536)  # hello
        if len(connections) == 2:
            reopened.set()
            await welcomed.wait()  # a slow welcome: close() comes first
        writer.write(WELCOME)
        while data := await reader.read(65536):
            for body in decoder.receive_data(data):
                frames.append(type(m.decode_client(body)).__name__)
                if len(connections) == 1:
                    writer.close()  # the say is never acked
                    return

    async with fake_server(handler) as port:
        client = Client(
            "127.0.0.1", port, "ana", reconnect=True, backoff=Backoff(initial=0.01, cap=0.01)
        )
        await client.connect()
        client.send(client.say_frame("general", "hello"))
        await next_of(client, ConnectionLost)
        async with asyncio.timeout(3):
            await reopened.wait()
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)
        welcomed.set()
        async with asyncio.timeout(1):
            await closing
        events = client.received()
    assert [f for f in connections[1] if f != "Bye"] == []
    assert isinstance(events[-1], Disconnected)
    assert not any(isinstance(e, Reconnected) for e in events)


async def test_a_drop_while_closing_ends_the_wait_and_names_the_lost_message() -> None:
    """close() waits for an ack; the connection drops instead: close() ends at once, and
    says the message was not acknowledged, before Disconnected."""

    async def on_frame(writer: asyncio.StreamWriter, frame: m.ClientFrame) -> None:
        if isinstance(frame, m.Say):
            writer.transport.abort()  # never acked: the server goes away

    async with fake_server(answering(on_frame)) as port:
        client = Client("127.0.0.1", port, "ana")
        await client.connect()
        client.send(client.say_frame("ops", "hi"))
        async with asyncio.timeout(2):  # not CLOSE_PACING_WAIT (5 s)
            await client.close()
        events = client.received()
    assert client.pending == 1
    assert [type(e) for e in events[-2:]] == [LocalNotice, Disconnected]
    assert "1 message(s) not acknowledged" in cast(LocalNotice, events[-2]).text


async def closing_while_reconnecting(backoff: Backoff, hold_welcome: bool) -> list[Event]:
    """A client whose connection drops; close() while it backs off or waits for the new
    connection's welcome must end at once and close that connection."""
    second_closed = asyncio.Event()
    reopened = asyncio.Event()

    async def handler(
        number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(65536)  # hello
        if number == 1:
            writer.write(WELCOME)
            await reader.read(65536)  # the say: the connection drops
            writer.close()
            return
        reopened.set()
        while await reader.read(65536):  # no welcome: a slow server
            pass
        second_closed.set()

    async with fake_server(numbered(handler)) as port:
        client = Client("127.0.0.1", port, "ana", reconnect=True, backoff=backoff)
        await client.connect()
        client.send(client.say_frame("ops", "hi"))
        await next_of(client, ConnectionLost)
        if hold_welcome:
            await reopened.wait()
        async with asyncio.timeout(1):  # not close()'s 2 s for the supervisor
            await client.close()
        if hold_welcome:
            async with asyncio.timeout(1):
                await second_closed.wait()
        return client.received()


async def test_closing_while_backing_off_ends_at_once() -> None:
    events = await closing_while_reconnecting(Backoff(initial=30, cap=30), hold_welcome=False)
    assert isinstance(events[-1], Disconnected)
    assert events[-1].reason == "closed"


async def test_closing_while_waiting_for_welcome_closes_that_connection() -> None:
    events = await closing_while_reconnecting(Backoff(initial=0.01, cap=0.01), hold_welcome=True)
    assert isinstance(events[-1], Disconnected)
    assert events[-1].reason == "closed"
