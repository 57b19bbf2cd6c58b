"""The session's deadlines and write pacing (pure, or on a fake loop and clock).

The session itself is driven for real in test_app.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from achat.protocol.frames import FrameDecoder
from achat.protocol.messages import Error, decode_server
from achat.server.alarms import Alarms
from achat.server.session import (
    FlushRounds,
    Session,
    SessionLimits,
    WriteBudget,
    _CatchUp,
    deadline,
)

LIMITS = SessionLimits(hello_timeout=10.0, frame_timeout=5.0, idle_timeout=120.0)


def at(
    *, registered: bool = True, pinged: bool = False, frame_started: float | None = None
) -> tuple[float, str]:
    """The deadline of a connection made at 100.0 whose last frame came at 200.0."""
    return deadline(
        LIMITS,
        connected=100.0,
        registered=registered,
        last_frame=200.0,
        pinged=pinged,
        frame_started=frame_started,
    )


def test_before_hello_only_the_hello_deadline_counts() -> None:
    assert at(registered=False) == (110.0, "no hello")


def test_a_quiet_member_is_pinged_half_way_then_dropped_at_idle() -> None:
    assert at() == (260.0, "ping")
    assert at(pinged=True) == (320.0, "idle")


def test_a_frame_in_progress_brings_the_deadline_forward() -> None:
    assert at(frame_started=250.0) == (255.0, "frame")
    assert at(registered=False, frame_started=101.0) == (106.0, "frame")


def test_a_frame_deadline_later_than_the_others_does_not_count() -> None:
    assert at(registered=False, frame_started=108.0) == (110.0, "no hello")
    assert at(pinged=True, frame_started=318.0) == (320.0, "idle")


# -- write pacing ----------------------------------------------------------------------


def test_a_budget_with_credit_lets_the_next_round_run_at_once() -> None:
    budget = WriteBudget(share=0.5, burst=0.010)
    assert budget.ready_at() == float("-inf")
    # 1 ms of writing every 3 ms is a third of the time: never a wait.
    for k in range(1000):
        budget.spent(k * 0.003, k * 0.003 + 0.001)
        assert budget.ready_at() < k * 0.003 + 0.001


def test_a_spent_budget_makes_the_next_round_wait_until_paid_back() -> None:
    budget = WriteBudget(share=0.5, burst=0.010)
    budget.spent(0.0, 0.030)  # 10 ms of credit, 30 ms taken, 15 ms earned meanwhile
    assert budget.ready_at() == pytest.approx(0.040)  # 5 ms owed, earned back at half speed


def test_a_stalled_slice_is_not_paid_back_beyond_the_debt_cap() -> None:
    """A slice stretched to 2 s by a stall holds later writes back 20 ms, not 2 s."""
    budget = WriteBudget(share=0.5, burst=0.010, max_debt=0.010)
    budget.spent(0.0, 2.0)
    assert budget.ready_at() == pytest.approx(2.0 + 0.010 / 0.5)
    # Paid back, it is back to normal: a slice within its credit waits for nothing.
    budget.spent(2.030, 2.031)
    assert budget.ready_at() == float("-inf")


def test_without_burst_every_slice_is_paid_back_after_it() -> None:
    """No credit saved up: each slice waits its own cost, up to the debt cap."""
    budget = WriteBudget(share=0.5, burst=0.0, max_debt=0.010)
    budget.spent(0.0, 0.004)
    assert budget.ready_at() == pytest.approx(0.008)
    budget.spent(0.008, 1.0)
    assert budget.ready_at() == pytest.approx(1.0 + 0.010 / 0.5)


def test_a_saturated_writer_pauses_as_long_as_it_writes() -> None:
    budget = WriteBudget(share=0.5, burst=0.010)
    now = 0.0
    for _ in range(100):
        start = max(now, budget.ready_at())
        now = start + 0.012
        budget.spent(start, now)
    pause = budget.ready_at() - now
    assert pause == pytest.approx(0.012)


def test_credit_saved_while_idle_is_capped_at_the_burst() -> None:
    budget = WriteBudget(share=0.5, burst=0.010)
    budget.spent(0.0, 0.001)
    budget.spent(100.0, 100.030)  # a long idle time earns no more than the burst
    assert budget.ready_at() == pytest.approx(100.040)


def test_a_share_must_leave_time_for_reading() -> None:
    with pytest.raises(ValueError, match="share"):
        WriteBudget(share=1.0)


def test_the_debt_cap_must_leave_room_for_debt() -> None:
    """A cap of 0 would mean writing never waits, whatever it took."""
    with pytest.raises(ValueError, match="max_debt"):
        WriteBudget(max_debt=0.0)


class FakeLoop:
    """Records what the rounds schedule instead of running it."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append((delay, callback))


class FakeSession:
    """A connection whose write takes ``cost`` seconds of the fake clock."""

    def __init__(self, name: str, clock: list[float], log: list[str], cost: float) -> None:
        self.name, self.clock, self.log, self.cost = name, clock, log, cost
        self.fail = False
        self.then: Callable[[], None] | None = None

    def _flush(self) -> None:
        self.clock[0] += self.cost
        if self.fail:
            raise RuntimeError("a bug in this connection's write")
        self.log.append(self.name)
        if self.then is not None:
            self.then()


def rounds(cost: float, count: int) -> tuple[FlushRounds, FakeLoop, list[Any], list[str]]:
    loop, clock, log = FakeLoop(), [0.0], list[str]()
    flush = FlushRounds(
        cast(Any, loop), WriteBudget(0.5, 0.010), clock=lambda: clock[0], slice_seconds=0.0002
    )
    sessions = [FakeSession(f"s{i}", clock, log, cost) for i in range(count)]
    return flush, loop, sessions, log


def test_queued_connections_are_written_in_slices_in_order() -> None:
    flush, loop, sessions, log = rounds(cost=0.00001, count=100)
    for s in sessions:
        flush.mark(cast(Session, s))
    assert len(loop.soon) == 1  # one pass scheduled, not one per connection
    loop.soon.pop()()
    assert log == [f"s{i}" for i in range(24)]  # 0.2 ms, checked every 8 writes
    while loop.soon:
        loop.soon.pop()()
    assert log == [f"s{i}" for i in range(100)]


def test_a_connection_queued_again_after_its_write_goes_to_the_back() -> None:
    flush, loop, sessions, log = rounds(cost=0.00001, count=40)
    for s in sessions:
        flush.mark(cast(Session, s))
    loop.soon.pop()()  # s0..s23 written; a new event for s0 arrives between slices
    flush.mark(cast(Session, sessions[0]))
    assert not loop.soon[1:]  # still one pass
    while loop.soon:
        loop.soon.pop()()
    assert log[24:] == [f"s{i}" for i in range(24, 40)] + ["s0"]


def test_a_saturated_writer_waits_for_its_budget() -> None:
    flush, loop, sessions, log = rounds(cost=0.002, count=20)  # 2 ms per write
    for s in sessions:
        flush.mark(cast(Session, s))
    passes = 0
    while loop.soon:
        loop.soon.pop()()
        passes += 1
    # A slice stops at the first check past 0.2 ms: 8 writes, 16 ms, of which half is
    # earned back while writing. The 10 ms burst pays for one slice and part of another.
    assert passes == 2
    assert len(log) == 16
    ((delay, callback),) = loop.later
    assert delay == pytest.approx(0.012)  # 6 ms owed, earned back at half speed
    callback()
    assert log == [f"s{i}" for i in range(20)]


def test_a_failing_write_does_not_stop_the_others() -> None:
    flush, loop, sessions, log = rounds(cost=0.00001, count=3)
    sessions[1].fail = True
    for s in sessions:
        flush.mark(cast(Session, s))
    with pytest.raises(RuntimeError):
        loop.soon.pop()()
    assert len(loop.soon) == 1  # the rest is still on its way
    loop.soon.pop()()
    assert log == ["s0", "s2"]


def test_a_connection_queued_by_a_write_waits_for_the_budget_too() -> None:
    flush, loop, sessions, log = rounds(cost=0.004, count=9)  # one 36 ms slice
    # The first connection's write queues another (say, it failed and its leaving is told).
    sessions[0].then = lambda: flush.mark(cast(Session, sessions[8]))
    queue(flush, sessions[:8])
    loop.soon.pop()()
    assert log == [f"s{i}" for i in range(8)]
    assert not loop.soon
    ((delay, _),) = loop.later
    assert delay > 0


def test_frames_are_joined_once_for_connections_that_have_the_same() -> None:
    flush, _, _, _ = rounds(cost=0.0, count=0)
    room = [b'{"seq":1}', b'{"seq":2}']
    first = flush.joined(list(room))
    assert first == b'{"seq":1}{"seq":2}'
    assert flush.joined(list(room)) is first  # the next member's frames: the same objects
    # Equal bytes in other objects (as two fan-outs never make, but a test can): equal joins.
    assert flush.joined([bytes(bytearray(frame)) for frame in room]) is first


def test_frames_that_differ_are_joined_again() -> None:
    flush, _, _, _ = rounds(cost=0.0, count=0)
    frames = [b"a", b"b"]
    assert flush.joined(frames) == b"ab"
    frames.append(b"c")  # the caller's list changed after it was joined
    assert flush.joined(frames) == b"abc"
    assert flush.joined([b"a", b"b"]) == b"ab"
    assert flush.joined([b"b", b"a"]) == b"ba"
    assert flush.joined([b"b", b"a", b""]) == b"ba"


def test_a_join_is_kept_between_slices_of_a_pass_and_not_after_it() -> None:
    flush, loop, sessions, _ = rounds(cost=0.00001, count=30)
    room = [b'{"seq":1}', b'{"seq":2}']
    for s in sessions:
        flush.mark(cast(Session, s))
    first = flush.joined(list(room))  # as the first connection's write would
    loop.soon.pop()()  # the first slice: 24 written, 6 left
    assert flush.joined(list(room)) is first
    loop.soon.pop()()  # the pass ends
    assert not loop.soon
    again = flush.joined(list(room))
    assert again == first
    assert again is not first


def test_a_join_that_fails_leaves_the_last_one_as_it_was() -> None:
    flush, _, _, _ = rounds(cost=0.0, count=0)
    assert flush.joined([b"a", b"b"]) == b"ab"
    bad: list[Any] = [b"a", iter([b"b"])]  # not bytes: a bug elsewhere
    with pytest.raises(TypeError):
        flush.joined(bad)
    with pytest.raises(TypeError):
        flush.joined(bad)  # not b"ab", the join before it
    assert flush.joined([b"a", b"b"]) == b"ab"


def queue(flush: FlushRounds, sessions: list[Any]) -> None:
    for s in sessions:
        flush.mark(cast(Session, s))


def busy_rounds(
    count: int, cost: float = 0.001
) -> tuple[FlushRounds, FakeLoop, list[Any], list[float]]:
    """Rounds that are busy 5 ms behind and idle again under 2 ms; writes take ``cost``."""
    loop, clock, log = FakeLoop(), [0.0], list[str]()
    flush = FlushRounds(
        cast(Any, loop),
        WriteBudget(0.5, 1.0),
        clock=lambda: clock[0],
        busy_after=0.005,
        idle_under=0.002,
    )
    sessions = [FakeSession(f"s{i}", clock, log, cost) for i in range(count)]
    return flush, loop, sessions, clock


def test_behind_is_how_long_the_connection_written_next_has_waited() -> None:
    """Measured from when the run it was queued in began: a fan-out's members share it."""
    flush, loop, sessions, clock = busy_rounds(24)
    assert flush.behind(0.0) == 0.0  # nothing waits
    for s in sessions[:16]:
        flush.mark(cast(Session, s))  # at 0
    clock[0] = 0.003
    assert flush.behind(0.003) == pytest.approx(0.003)
    loop.soon.pop()()  # 8 written (1 ms each): s8 is next, queued at 0
    assert clock[0] == pytest.approx(0.011)
    assert flush.behind(0.011) == pytest.approx(0.011)
    for s in sessions[16:]:
        flush.mark(cast(Session, s))  # at 11 ms, behind the others
    loop.soon.pop()()  # s8..s15 written: the next was queued by 11 ms
    assert flush.behind(clock[0]) == pytest.approx(clock[0] - 0.011)
    loop.soon.pop()()  # the pass is over
    assert not loop.soon
    assert flush.behind(clock[0]) == 0.0


def test_writing_too_far_behind_is_busy_until_it_catches_up() -> None:
    """Busy once the connection written next has waited over 5 ms, idle under 2 ms."""
    flush, loop, sessions, clock = busy_rounds(32)
    queue(flush, sessions[:24])
    loop.soon.pop()()  # at 0: nothing waited yet; 8 written by 8 ms
    assert not flush.busy
    loop.soon.pop()()  # at 8 ms the next had waited 8 ms: busy
    assert flush.busy
    assert flush.spells == 1
    clock[0] += 0.003  # the loop did something else for 3 ms
    # The last of the first 24 has a fan-out queue the rest (at 27 ms).
    sessions[23].then = lambda: queue(flush, sessions[24:])
    loop.soon.pop()()  # at 19 ms s16 had waited 19 ms: still busy; s16..s23 written
    assert flush.busy
    clock[0] += 0.0015
    loop.soon.pop()()  # at 28.5 ms s24 has waited 1.5 ms: caught up, with s24.. to write
    assert not flush.busy
    assert flush.spells == 1


def test_a_busy_spell_ends_with_the_pass_and_stays_over_while_under_the_mark() -> None:
    """Nothing left to write ends a spell; a wait under 5 ms does not begin another."""
    flush, loop, sessions, clock = busy_rounds(24)
    queue(flush, sessions[:16])
    loop.soon.pop()()
    loop.soon.pop()()  # at 8 ms: busy, then s8..s15 written
    assert flush.spells == 1
    assert not loop.soon  # the pass is over, and the spell with it
    assert not flush.busy
    queue(flush, sessions[16:])
    clock[0] += 0.004  # waited 4 ms: between the two marks, not busy again
    loop.soon.pop()()
    assert not flush.busy
    assert flush.spells == 1


def test_a_busy_spell_goes_on_while_the_wait_is_between_the_marks() -> None:
    """Busy past 5 ms, idle again only under 2 ms: a wait of 3 ms changes neither."""
    flush, loop, sessions, clock = busy_rounds(32)
    queue(flush, sessions[:16])
    # The last of the first 16 has a fan-out queue 16 more (at 16 ms).
    sessions[15].then = lambda: queue(flush, sessions[16:])
    loop.soon.pop()()  # at 0; s0..s7 by 8 ms
    loop.soon.pop()()  # at 8 ms: busy; s8..s15 by 16 ms
    assert flush.busy
    clock[0] += 0.003
    loop.soon.pop()()  # at 19 ms s16 has waited 3 ms: still busy
    assert flush.busy
    assert flush.spells == 1


def test_a_connection_with_too_much_queued_makes_the_rest_of_the_pass_busy() -> None:
    """swamped() (a session found a quarter of the send limit queued for one connection)
    is busy at once, and stays so until everyone queued by then is written, however
    short the wait."""
    flush, loop, sessions, _ = busy_rounds(24, cost=0.0001)  # waits stay under 2 ms
    queue(flush, sessions[:16])
    sessions[0].then = lambda: flush.swamped("too much for one")
    sessions[7].then = lambda: queue(flush, sessions[16:])  # queued after it
    loop.soon.pop()()  # s0 swamped; s0..s7 written by 0.8 ms
    assert flush.busy
    loop.soon.pop()()  # s8 has waited 0.8 ms, but s8..s15 were queued by then
    assert flush.busy
    loop.soon.pop()()  # they are written: s16.. are not waited for
    assert not flush.busy
    assert flush.spells == 1


def test_busy_spells_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """A server that keeps falling behind says so once a minute, with how often."""
    flush, loop, sessions, clock = busy_rounds(16)

    def spell() -> None:
        for s in sessions:
            flush.mark(cast(Session, s))
        while loop.soon:
            loop.soon.pop()()

    with caplog.at_level(logging.WARNING, logger="achat.server"):
        spell()
        spell()
        clock[0] += 60.0
        spell()
    assert flush.spells == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "refusing says" in warnings[0]
    assert "(1 time(s) since the last report)" in warnings[0]
    assert "(2 time(s) since the last report)" in warnings[1]


def test_cut_offs_are_counted_and_a_warning_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection cut off for its send queue is counted and logged; a room of
    thousands cut off at once makes one warning a minute, with how many, not thousands."""
    flush, _, _, clock = busy_rounds(0)
    with caplog.at_level(logging.INFO, logger="achat.server"):
        flush.cut("sendq exceeded nick=a unsent=0 dropped=2000000")
        flush.cut("sendq exceeded nick=b unsent=0 dropped=2000000")
        clock[0] += 59.0
        flush.cut("sendq exceeded nick=c unsent=1500000 dropped=100")
        clock[0] += 1.0
        flush.cut("sendq exceeded nick=d unsent=1500000 dropped=100")
    assert flush.cut_off == 4
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert logged == [
        (
            logging.WARNING,
            "sendq exceeded nick=a unsent=0 dropped=2000000: cut off with sendq_exceeded "
            "(1 connection(s) since the last report)",
        ),
        (
            logging.INFO,
            "sendq exceeded nick=b unsent=0 dropped=2000000: cut off with sendq_exceeded",
        ),
        (
            logging.INFO,
            "sendq exceeded nick=c unsent=1500000 dropped=100: cut off with sendq_exceeded",
        ),
        (
            logging.WARNING,
            "sendq exceeded nick=d unsent=1500000 dropped=100: cut off with sendq_exceeded "
            "(3 connection(s) since the last report)",
        ),
    ]


def test_behind_counts_a_connection_whose_write_failed_as_written() -> None:
    """A bug in one write takes that connection off the queue like any write."""
    flush, loop, sessions, clock = busy_rounds(3)
    sessions[0].fail = True
    for s in sessions:
        flush.mark(cast(Session, s))
    clock[0] = 0.004
    with pytest.raises(RuntimeError):
        loop.soon.pop()()
    assert flush.behind(clock[0]) == pytest.approx(clock[0])  # s1, queued at 0, is next
    loop.soon.pop()()
    assert flush.behind(clock[0]) == 0.0
    assert not flush.busy


def test_the_busy_mark_must_be_above_the_idle_one() -> None:
    """An idle mark at or over the busy one would leave no room between them."""
    with pytest.raises(ValueError, match="idle_under"):
        FlushRounds(cast(Any, FakeLoop()), busy_after=0.1, idle_under=0.1)


class Transport:
    """What a session writes, as written; ``unsent`` is what its peer left unread."""

    def __init__(self, kernel: int | None = None) -> None:
        self.written: list[bytes] = []
        self.unsent = 0
        self.closed = False
        # What the kernel takes of a write into an empty buffer (None: all of it).
        self.kernel = kernel

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.kernel is not None:
            taken = min(len(data), self.kernel) if self.unsent == 0 else 0
            self.unsent += len(data) - taken

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Owner:
    def opened(self, session: Session) -> None:
        return None

    def closed(self, session: Session) -> None:
        pass


async def test_a_quarter_of_the_send_limit_queued_for_one_connection_is_written_and_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the server queued for a reader that takes everything it is sent is the server's
    backlog: written, not cut off, and a sign that the server is swamped."""
    loop = asyncio.get_running_loop()
    flush = FlushRounds(loop)
    alarms: Alarms[Session] = Alarms(loop)
    limits = SessionLimits(sendq_limit=200_000)
    session = Session(cast(Any, Owner()), cast(Any, None), limits, flush, alarms)
    transport = Transport()
    session.connection_made(cast(Any, transport))
    for _ in range(51):
        session.send(b"x" * 1000)  # 51,000 bytes: over a quarter of the limit
    with caplog.at_level(logging.WARNING, logger="achat.server"):
        await asyncio.sleep(0)  # the pass
    assert transport.written == [b"x" * 51_000]
    assert flush.spells == 1
    assert "51,000 bytes queued for one connection" in caplog.text
    alarms.cancel(session)


@pytest.mark.parametrize(
    ("unread", "queued", "cut"),
    [
        (0, 300, False),  # three times the limit, for a peer that has read everything
        (50_000, 300, False),  # a quarter of the limit unread: not over it
        (50_001, 149, False),  # over a quarter unread, but with this still under the limit
        (50_001, 150, True),  # over a quarter unread, and this would pass the limit
        (199_000, 2, True),
    ],
)
async def test_a_peer_is_cut_off_only_for_what_it_left_unread(
    unread: int, queued: int, cut: bool
) -> None:
    """The send limit (200,000 here) is for readers that leave their data unread: one
    that left no more than a quarter of it unread is written whatever the server has
    queued for it (its backlog: says are refused meanwhile); past that, what would take
    its unsent output over the limit cuts it off, and is not written."""
    loop = asyncio.get_running_loop()
    flush = FlushRounds(loop)
    alarms: Alarms[Session] = Alarms(loop)
    session = Session(
        cast(Any, Owner()), cast(Any, None), SessionLimits(sendq_limit=200_000), flush, alarms
    )
    transport = Transport()
    session.connection_made(cast(Any, transport))
    transport.unsent = unread
    for _ in range(queued):
        session.send(b"x" * 1000)
    await asyncio.sleep(0)  # the pass
    assert flush.cut_off == cut
    if cut:
        [error] = [
            decode_server(b) for w in transport.written for b in FrameDecoder().receive_data(w)
        ]
        assert isinstance(error, Error)
        assert (error.code, error.fatal) == ("sendq_exceeded", True)
        assert transport.closed
    else:
        assert transport.written == [b"x" * 1000 * queued]
        assert flush.spells == (queued * 1000 > 200_000 // 4)  # says refused meanwhile
        alarms.cancel(session)


def burst_session(
    loop: asyncio.AbstractEventLoop, kernel: int, clock: list[float] | None = None
) -> tuple[Session, Transport]:
    """A session with a send limit of 200,000 whose kernel takes ``kernel`` bytes of a
    write into an empty buffer; its rounds' clock reads ``clock[0]`` if given."""
    alarms: Alarms[Session] = Alarms(loop)
    rounds = FlushRounds(loop) if clock is None else FlushRounds(loop, clock=lambda: clock[0])
    session = Session(
        cast(Any, Owner()),
        cast(Any, None),
        SessionLimits(sendq_limit=200_000),
        rounds,
        alarms,
    )
    transport = Transport(kernel=kernel)
    session.connection_made(cast(Any, transport))
    alarms.cancel(session)
    return session, transport


async def feed(
    session: Session,
    transport: Transport,
    sizes: list[int],
    reads: int,
    clock: list[float] | None = None,
) -> None:
    """Queue writes of ``sizes``, one a pass, the peer reading ``reads`` bytes before
    each (and ``clock[0]`` a second later each time, if given), until the session is
    cut off."""
    for size in sizes:
        if clock is not None:
            clock[0] += 1.0
        transport.unsent = max(0, transport.unsent - reads)
        session.send(b"x" * size)
        await asyncio.sleep(0)
        if transport.closed:
            return


@pytest.mark.parametrize("reads", [0, 30_000])
async def test_what_is_left_of_a_burst_is_not_counted_against_its_reader(reads: int) -> None:
    """A burst the kernel could not take whole (150,000 bytes, the kernel taking 50,000)
    waits in the transport's buffer: the peer is given the time to read it. What it
    leaves unread of what came after counts, from the first byte: one that reads
    nothing more is cut off once that passes the limit (200,000 here); one that reads
    30,000 bytes between writes of 10,000 never is."""
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000)
    session.send(b"b" * 150_000)
    await asyncio.sleep(0)
    assert transport.unsent == 100_000
    await feed(session, transport, [10_000] * 40, reads)
    if reads:
        assert not transport.closed
        assert len(transport.written) == 41
    else:
        # Written while what it left unread of them, with the next, was within the limit.
        assert len(transport.written) == 1 + 20 + 1  # the burst, 20 writes, the error
        assert session._rounds.cut_off == 1


async def test_a_burst_that_comes_while_one_is_read_joins_it() -> None:
    """A peer that reads 30,000 bytes between writes is still reading a burst when a
    second comes, with a few writes of its own between them: it is never cut off."""
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000)
    await feed(session, transport, [300_000, *[10_000] * 5, 300_000, *[10_000] * 30], 30_000)
    assert not transport.closed
    assert len(transport.written) == 37


@pytest.mark.parametrize(
    ("reads", "seconds", "writes", "held"),
    [(0, 1.0, 8, 430_000), (0, 0.0, 15, 850_000), (1_000, 1.0, 15, 835_000)],
)
async def test_what_a_peer_may_hold_of_bursts(
    reads: int, seconds: float, writes: int, held: int
) -> None:
    """Bursts of 60,000 bytes, one after the other (``seconds`` apart), none of them the
    peer's to answer for: it holds 10,000 bytes after the first, 60,000 more after each
    (less what it reads). One that reads nothing for over five seconds (BURST_STALL)
    while it holds over twice the limit (400,000) is cut off; one that reads, however
    slowly (1,000 bytes between writes), or whose writes come sooner than that, once
    it holds over four times (800,000)."""
    clock = [0.0]
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000, clock=clock)
    await feed(session, transport, [60_000] * 30, reads, clock if seconds else None)
    assert len(transport.written) == writes + 1
    assert b"sendq_exceeded" in transport.written[-1]
    assert transport.unsent - len(transport.written[-1]) == held


PAGE = b"p" * 10_000


async def catch_up(
    session: Session,
    transport: Transport,
    behind: list[int],
    reads: int,
    *,
    busy: bool = False,
    clock: list[float] | None = None,
) -> list[int]:
    """The peer of a session catching up on pages reads ``reads`` bytes, then a frame of
    each size in ``behind`` is queued (with the server busy if ``busy``; ``clock[0]``
    two seconds later each time, if given), a round each; then the peer reads on
    until the pages are out, or it is cut off. Returns the sizes of the frames queued."""
    queued: list[int] = []
    for size in behind:
        if clock is not None:
            clock[0] += 2.0
        transport.unsent = max(0, transport.unsent - reads)
        session.resume_writing()
        session.send(b"f" * size)
        if busy:
            session._rounds.swamped("the test's")
        queued.append(size)
        await asyncio.sleep(0)
        if transport.closed:
            return queued
    for _ in range(1000):
        if not session._sources or transport.closed:
            break
        transport.unsent = max(0, transport.unsent - reads)
        session.resume_writing()
        await asyncio.sleep(0)
    return queued


async def pages_session(
    clock: list[float] | None = None, pages: int = 20
) -> tuple[Session, Transport]:
    """A session (send limit 200,000, high mark 50,000) catching up on ``pages`` pages
    of 10,000 bytes, whose peer holds 60,000 bytes of them: what was taken while under
    the high mark, twice."""
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000, clock=clock)
    session.send_pages(iter([PAGE] * pages))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.unsent == 60_000
    return session, transport


async def test_a_burst_behind_a_readers_pages_is_not_counted_against_it() -> None:
    """A peer catching up on 200,000 bytes of pages (join since), reading 30,000 bytes a
    round, while the server queues a burst of 300,000 behind them (more than its send
    limit, 200,000, at once), then frames of its own: it gets all of it, in order, and
    the server refuses says while the burst is queued."""
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000)
    session.send_pages(iter([PAGE] * 20))
    await asyncio.sleep(0)
    queued = await catch_up(session, transport, [300_000, *[1_000] * 30], reads=30_000)
    assert not transport.closed
    assert not session._sources
    assert b"".join(transport.written) == PAGE * 20 + b"".join(b"f" * n for n in queued)
    assert session._rounds.spells == 1


@pytest.mark.parametrize("burst", [0, 300_000])
async def test_what_a_reader_queues_behind_its_pages_counts_burst_aside(burst: int) -> None:
    """A peer catching up on pages that reads nothing holds 60,000 bytes of them: a
    burst queued behind them is not counted against it, what is queued after it is.
    The frame of 1,000 bytes that takes it past its limit (200,000) cuts it off, the
    141st with or without the burst, and nothing queued behind the pages is written."""
    session, transport = await pages_session()
    queued = await catch_up(session, transport, [burst, *[1_000] * 200], reads=0)
    assert transport.closed
    assert len(queued) == 1 + 141
    assert b"".join(transport.written[:-1]) == PAGE * 11
    assert b"sendq_exceeded" in transport.written[-1]


@pytest.mark.parametrize("busy", [True, False])
async def test_frames_behind_a_readers_pages_while_the_server_is_busy_are_a_burst(
    busy: bool,
) -> None:
    """Frames of 1,000 bytes, each too small to be a burst, queued behind the pages of
    a peer that reads nothing (it holds 60,000 bytes of them) while the server is
    busy: the server's backlog. It holds 300 of them and is not cut off; the same
    frames queued while the server is not busy cut it off at the 141st."""
    session, transport = await pages_session()
    queued = await catch_up(session, transport, [1_000] * 300, reads=0, busy=busy)
    assert transport.closed == (not busy)
    assert len(queued) == (300 if busy else 141)


@pytest.mark.parametrize(("reads", "bursts"), [(0, 3), (1_000, 4)])
async def test_what_a_reader_catching_up_may_hold_of_bursts(reads: int, bursts: int) -> None:
    """Bursts of 250,000 behind the pages of a peer, two seconds apart. One that reads
    nothing holds over twice the limit (400,000) after the second, and is cut off when
    the third comes, having read nothing for six seconds (over BURST_STALL). One that
    reads 1,000 bytes a round is cut off when the fourth comes, holding over four
    times the limit (BURST_HOLD: 800,000)."""
    clock = [0.0]
    session, transport = await pages_session(clock)
    queued = await catch_up(session, transport, [250_000] * 6, reads=reads, clock=clock)
    assert transport.closed
    assert len(queued) == bursts
    assert b"sendq_exceeded" in transport.written[-1]


async def test_a_burst_queued_just_before_a_readers_pages_is_a_burst() -> None:
    """A burst of 300,000 queued in the same tick as the pages a peer asked for, ahead
    of them (another room's fan-out): the server's backlog too. It is written first,
    is a burst in the transport, the server refuses says meanwhile, and a peer that
    reads 30,000 bytes a round gets all of it and its pages, not cut off."""
    session, transport = burst_session(asyncio.get_running_loop(), kernel=50_000)
    session.send(b"b" * 300_000)
    session.send_pages(iter([PAGE] * 20))
    await asyncio.sleep(0)
    assert session._last_burst is not None
    assert session._rounds.spells == 1
    await catch_up(session, transport, [], reads=30_000)
    assert not transport.closed
    assert b"".join(transport.written) == b"b" * 300_000 + PAGE * 20


async def test_frames_of_its_own_behind_a_second_rooms_pages_count_in_full() -> None:
    """A peer catching up on two rooms (their pages one after the other) holds 60,000
    bytes of the first's: a burst of 300,000 lands behind the first room's pages, then
    the second room's pages are queued, then 100 frames of 1,000 bytes of its own, one
    a round. It reads what it was sent, and the rest of the first room's pages and the
    burst go out; then it reads nothing, and leaves 40,000 bytes of those pages unread.
    Its own frames wait behind the second room's pages and count in full, the burst
    not at all: the 61st more takes them past the limit (200,000)."""
    session, transport = await pages_session()
    await catch_up(session, transport, [300_000], reads=0)
    session.send_pages(iter([PAGE] * 20))
    await catch_up(session, transport, [1_000] * 100, reads=0)
    assert not transport.closed
    while session._sources == 2:  # it reads all it was sent
        transport.unsent = 0
        session.resume_writing()
        await asyncio.sleep(0)
    assert b"".join(transport.written) == PAGE * 20 + b"f" * 300_000
    assert transport.unsent == 340_000
    assert session._unread(transport.unsent) == 40_000
    queued = await catch_up(session, transport, [1_000] * 300, reads=0)
    assert transport.closed
    assert len(queued) == 61
    assert b"sendq_exceeded" in transport.written[-1]


async def test_a_reader_catching_up_whose_kernel_takes_every_write_is_reading() -> None:
    """A peer catching up on pages whose kernel takes each write whole (its buffer is
    empty at every flush) reads as fast as it is sent: three bursts of 250,000 land
    behind its pages two seconds apart, and it holds over twice the limit for over
    five seconds. It is not cut off: what the kernel takes at once is read."""
    clock = [0.0]
    session, transport = burst_session(asyncio.get_running_loop(), kernel=10**9, clock=clock)
    session.send_pages(iter([PAGE] * 1_000))
    for i in range(40):  # a flush every quarter of a second, by hand
        clock[0] += 0.25
        if i in (0, 8, 16):
            session.send(b"f" * 250_000)
        session._flush()
        assert transport.unsent == 0
    assert not transport.closed
    assert b"".join(transport.written) == PAGE * 240  # six pages a flush: to the high mark


async def test_a_burst_written_with_pages_and_frames_of_the_readers_own_is_placed() -> None:
    """A write that carries the rest of a room's pages, a burst that waited behind them
    and frames of the peer's own after it: of the write, only the burst is the
    server's backlog. The peer reads it all but for that write (the kernel takes none
    of it): it left unread the 10,000 bytes it had been sent before, the 30,000 of
    pages and its own 10,000 after the burst."""
    session, transport = await pages_session()
    await catch_up(session, transport, [300_000, *[1_000] * 10], reads=0)
    while session._sources:
        transport.unsent = 0
        session.resume_writing()
        await asyncio.sleep(0)
    assert transport.written[-1] == PAGE * 3 + b"f" * 310_000
    assert transport.unsent == 350_000
    assert session._unread(transport.unsent) == 50_000


async def test_a_burst_after_pages_and_frames_of_the_readers_own_is_placed() -> None:
    """One write into an empty buffer: the last page of a room, a frame of the peer's
    own, a second room's one page, then a burst that waited behind it. Only the burst
    is the server's backlog, found across the second room's page: it lies after the
    21,000 bytes before it. The kernel takes 50,000 bytes of the write: all of those,
    and the first 29,000 of the burst, so the peer has left nothing of its own unread."""
    session, transport = await pages_session(pages=12)
    await catch_up(session, transport, [1_000], reads=0)
    session.send_pages(iter([PAGE]))
    await catch_up(session, transport, [300_000], reads=0)
    transport.unsent = 0
    session.resume_writing()
    await asyncio.sleep(0)
    assert not session._sources
    assert transport.written[-1] == PAGE + b"f" * 1_000 + PAGE + b"f" * 300_000
    assert transport.unsent == 271_000
    assert session._last_burst is not None
    assert session._last_burst[:3] == [21_000, 321_000, 0]
    assert session._unread(transport.unsent) == 0


def test_a_catch_up_keeps_its_bursts_as_ranges_of_the_frames_queued() -> None:
    """Bursts are ranges of the bytes of frames queued since the catch-up began; one
    right after another is one; where they are in a write of runs of frames (pages
    between them) is found from the runs."""
    catching = _CatchUp(queued=100, now=0.0)
    catching.came(False)  # the 100 queued ahead of the pages: not a burst
    catching.queued += 300
    catching.came(True)
    catching.queued += 50
    catching.came(True)  # right after the last: the same burst
    catching.queued += 20
    catching.came(False)
    assert catching.bursts == [[100, 450]]
    assert catching.burst(0, 470, [])[0] == 350
    assert catching.burst(0, 120, [])[0] == 20
    # Written: frames 0-200 in a run at 0, pages (1,000 bytes), frames 200-470 at 1,200.
    assert catching.burst(0, 470, [(0, 0), (1_200, 200)]) == (350, 100, 1_450)
    catching.taken = 300
    catching.written()
    assert catching.bursts == [[100, 450]]  # not all of it written yet
    catching.taken = 470
    catching.written()
    assert catching.bursts == []


async def test_sessions_queued_the_same_frames_are_written_one_join() -> None:
    loop = asyncio.get_running_loop()
    flush = FlushRounds(loop)
    alarms: Alarms[Session] = Alarms(loop)
    pairs = []
    for _ in range(3):
        session = Session(cast(Any, Owner()), cast(Any, None), SessionLimits(), flush, alarms)
        transport = Transport()
        session.connection_made(cast(Any, transport))
        pairs.append((session, transport))
    room, own = [b'{"seq":1}', b'{"seq":2}'], b'{"type":"ack"}'
    for session, _ in pairs:
        for frame in room:
            session.send(frame)
    pairs[2][0].send(own)
    await asyncio.sleep(0)  # the pass
    await asyncio.sleep(0)
    (first,), (second,), (third,) = (transport.written for _, transport in pairs)
    assert first == b'{"seq":1}{"seq":2}'
    assert second is first
    assert third == first + own
    for session, _ in pairs:
        alarms.cancel(session)
