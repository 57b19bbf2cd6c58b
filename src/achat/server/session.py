"""One client connection on the server: bytes in, frames to the registry, queued bytes out.

Theory of operation: a :class:`Session` is the connection's
:class:`asyncio.Protocol`. Each chunk the transport delivers goes through
the frame decoder, and every complete frame is handed to the registry at
once, in the same callback: no task, no stream objects and no future per
connection, which is what keeps an idle client cheap (item 6 of
``docs/performance-history.md``). Output never goes straight to the socket:
:meth:`Session.send` appends to an outbox and queues the connection in
:class:`FlushRounds`, which writes queued connections in short slices at the
end of loop ticks (later when writing has used up its share of a saturated
loop), so a connection gets at most one ``write`` per pass whatever the
number of events. When what the peer left unread (the bytes the transport
could not send yet) is over a quarter of ``sendq_limit`` and would pass it
with the outbox, the outbox is dropped and the peer gets a fatal
``sendq_exceeded`` and nothing more, so that what it did get is a gapless
prefix that ``join ... since`` resumes from; nobody else ever waits for a
slow reader.

A server that is itself the slow one (more to write than its core can: a
room too big for it, or says taken all at once) does not let every
member's queue grow without end: while its writing is more than
``write_lag`` behind, or a quarter of the limit is queued for one
connection, it is *busy* and refuses ``say`` frames with a non-fatal
``rate_limited`` (:class:`FlushRounds`), which slows the talkers down
instead of cutting the listeners off. What it writes to a peer while busy
(or in a write over a quarter of the limit) is a *burst*: the server's
backlog, not the peer's slowness. What the kernel has not taken of it is
not counted as left unread until the peer has read it
(:meth:`Session._burst_left`), and a burst that comes while the peer
still reads one joins it. So a peer that reads, however slowly, is not
cut off for the server's backlog until it holds ``BURST_HOLD`` (4) times
the limit in all; one that holds over twice the limit and has read nothing
for ``BURST_STALL`` (5) seconds is cut off there (:meth:`Session._too_slow`).
A peer catching up on pages (below) is told the same way: a burst queued
with its pages, ahead of them or behind, is not counted, and what it holds,
its buffer and what waits behind its pages, is bounded by the same two
rules (:meth:`Session._flush_pages`).

The backlog a ``join ... since`` asks for can be any length: it is queued
as pages (:meth:`Session.send_pages`), read from the store only as the peer
reads what it was sent (the transport's ``resume_writing``), and what is
queued after them waits for them.

Timeouts are deadlines (:func:`deadline`, pure): ``hello`` within
``hello_timeout`` of connecting, a started frame completed within
``frame_timeout``, and some frame at least every ``idle_timeout`` (with a
``ping`` half-way). Each connection's alarm (one loop timer for all, see
:mod:`achat.server.alarms`) is set no later than its deadline; traffic only
updates timestamps, and when the alarm goes off the session either acts or
sets it to the deadline that now applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import typing
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import FrameError, ProtocolError
from ..protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder
from ..protocol.messages import (
    Bye,
    ClientFrame,
    Error,
    Hello,
    Ping,
    Say,
    decode_client,
    decode_client_many,
    encode,
)
from .alarms import Alarms
from .limits import FloodPolicy, TokenBucket
from .log import esc
from .registry import Member, Registry

__all__ = ["FlushRounds", "Session", "SessionLimits", "SessionOwner", "WriteBudget", "deadline"]

log = logging.getLogger("achat.server")

#: A connection's write buffer above which the transport calls pause_writing (and, once
#: under a quarter of it, resume_writing); also the most of a backlog's pages handed to
#: a connection before it has read them (Session.send_pages).
WRITE_HIGH = 64 * 1024
#: The least time between two warnings that writing is too far behind (FlushRounds).
BUSY_LOG_INTERVAL = 60.0
#: Says are refused while more than 1/SWAMPED_SHARE of the send limit is queued for one
#: connection (FlushRounds.swamped).
SWAMPED_SHARE = 4
#: The most a peer that reads, however slowly, may hold of what the server wrote to it
#: while busy, bursts and all, in send limits (Session._too_slow, _flush_pages).
BURST_HOLD = 4
#: Seconds a peer holding over twice the send limit, bursts and all, may read nothing
#: before it is cut off (Session._too_slow, _flush_pages): time for a reader across a slow network
#: to show that it reads, which the next write to it may come too soon for.
BURST_STALL = 5.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits (all sizes in bytes, times in seconds)."""

    max_frame: int = DEFAULT_MAX_FRAME
    sendq_limit: int = 1024 * 1024
    hello_timeout: float = 10.0
    frame_timeout: float = 10.0
    idle_timeout: float = 120.0
    close_timeout: float = 5.0
    flood: FloodPolicy = field(default_factory=FloodPolicy)
    #: How far behind the server's writing may fall (what has waited longest to be
    #: written, in seconds) before it refuses says until it catches up (FlushRounds).
    write_lag: float = 0.5


class WriteBudget:
    """How much of the loop's time writing may take: ``share`` on average, in bursts.

    Pure (times are passed in). Each slice of writing spends what it took;
    credit comes back at ``share`` seconds per second of wall time, up to
    ``burst``. While there is credit the next slice may run at once; once it
    is spent, the next slice waits until it is paid back. A server writing
    less than ``share`` of the time, in stretches shorter than
    ``burst / (1 - share)`` (33 ms by default), therefore never waits: a busy
    room's message goes out in the tick it was stored. A saturated one settles
    at writing ``share`` of the time, each connection's write taking
    everything queued for it meanwhile, and leaves the rest to reading and
    handling frames.

    What is owed never passes ``max_debt``: a slice stretched by a stall
    that was not writing's doing (the process descheduled, a pause) would
    otherwise hold every later write back for as long again, so no wait is
    longer than ``max_debt / share`` (14 ms by default). The cap cannot tell
    a stall from a slice that really was that long, so a saturated writer
    keeps to its share only while its slices are shorter than
    ``max_debt / (1 - share)`` (33 ms): slices are 0.2 ms
    (:class:`FlushRounds`), and one runs longer only when its writes do (the
    clock is read every 8), as when writes fail and their connections are
    closed.

    The default share, 0.7, was measured: at 0.5 a 2,500-member
    room at 6.25 M deliveries/s (``achat-bench busy-room -n 2500``) had its
    p99 over 250 ms in more runs, and 2,500 clients joining one room were no
    faster.
    """

    __slots__ = ("_burst", "_credit", "_last", "_max_debt", "_share")

    def __init__(self, share: float = 0.7, burst: float = 0.010, max_debt: float = 0.010) -> None:
        if not 0 < share < 1:
            raise ValueError("share must be between 0 and 1")
        if not burst >= 0:
            raise ValueError("burst must not be negative")
        if not max_debt > 0:
            raise ValueError("max_debt must be positive")
        self._share = share
        self._burst = burst
        self._max_debt = max_debt
        self._credit = burst
        self._last: float | None = None

    def spent(self, started: float, ended: float) -> None:
        """A slice of writing ran from ``started`` to ``ended``."""
        if self._last is not None:
            self._credit = min(self._burst, self._credit + (started - self._last) * self._share)
        # Earned while writing, too.
        self._credit = max(-self._max_debt, self._credit - (ended - started) * (1 - self._share))
        self._last = ended

    def ready_at(self) -> float:
        """The earliest time the next slice may start (in the past: at once)."""
        if self._last is None or self._credit >= 0:
            return float("-inf")
        return self._last - self._credit / self._share


class FlushRounds:
    """Writes every connection that has queued output, in the order they were queued.

    Writing happens in slices of about ``slice_seconds`` (the clock is read
    every 8 writes) at the end of a loop tick, with the loop free to read
    sockets and take store commits between slices: a message that arrives
    while hundreds of members are being written does not wait for all of
    them. It is queued behind what members not yet written have, and they get
    both in one write; those already written are queued again at the end. A
    connection is in the queue at most once, so it gets at most one ``write``
    per pass whatever the number of events.

    When writing has used up its share of the loop's time
    (:class:`WriteBudget`) the next slice waits, and everything queued
    meanwhile joins the connections' next writes. A server that is not
    saturated writes at once; a saturated one writes each connection less
    often and in bigger pieces, which is what keeps a 2,500-member room from
    spending all its time in ``write``.

    The members of a room are queued the same frames (a fan-out appends one
    blob to each), so the connections written one after another in a pass
    mostly have the same frames to write: :meth:`joined` joins them once for
    all of them. In a saturated 2,500-member room (``achat-bench busy-room
    -n 2500``) five writes in six reuse the join before them, 27 KiB on
    average, and a join of that size takes 4.5–5 µs of the loop's core.

    Writing that cannot keep up (a room whose deliveries a second are more
    than one core can write) falls further behind with every pass, and each
    member's queue would grow until it passed the send limit: every member
    would be cut off with ``sendq_exceeded`` for the server's own slowness.
    So the rounds watch how long the connection written next has waited
    (:meth:`behind`). Past ``busy_after`` (or when a session finds a quarter
    of the send limit queued for one connection: :meth:`swamped`) they are
    :attr:`busy` until the connection written next has waited less than
    ``idle_under``, or nothing waits, and meanwhile sessions refuse ``say``
    frames with a non-fatal ``rate_limited`` that carries ``retry_after``:
    refusing is cheap, and only the sender is told. achat's client sends the
    message again that much later (its ``ref`` makes that safe), so the room
    slows to what the server can carry, its members get every message that
    was taken, late by about ``busy_after`` and a pass at most, and nobody is
    cut off. A queue cannot grow much past that either: what the talkers
    have not said yet waits in their clients, not in the server. (Not reading the
    talkers instead, which TCP would push back to them, was tried: once read
    again they brought everything they had said meanwhile at once, and the
    queues grew past the limit all the same.)
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        budget: WriteBudget | None = None,
        clock: typing.Callable[[], float] = time.monotonic,
        slice_seconds: float = 0.0002,
        busy_after: float = 0.5,
        idle_under: float | None = None,
    ) -> None:
        idle_under = busy_after / 5 if idle_under is None else idle_under
        if not 0 <= idle_under < busy_after:
            raise ValueError("idle_under must be under busy_after")
        self._loop = loop
        self._budget = budget or WriteBudget()
        self._clock = clock
        self._slice = slice_seconds
        self._dirty: deque[Session] = deque()
        self._scheduled = False
        # How far behind writing is: connections queued so far, and when runs of them
        # began to be queued (the time, the count before), oldest first (see behind).
        self._queued = 0
        self._stamps: deque[tuple[float, int]] = deque()
        self._stamp_due = True
        #: How far behind writing may fall before a busy spell (``--write-lag``).
        self.busy_after = busy_after
        self._idle_under = idle_under
        #: True while writing is too far behind: ``say`` frames are refused meanwhile.
        self.busy = False
        # A spell lasts at least until the connections queued before this count are
        # written (see swamped).
        self._busy_until = 0
        # Times writing fell too far behind (spells); the says refused meanwhile (Session).
        self._spells = _Paced()
        self.refused = 0
        # Connections cut off with sendq_exceeded (Session._overflow: see cut).
        self._cuts = _Paced()
        # The frames joined last and their join (see joined).
        self._joined_from: list[bytes] = []
        self._joined = b""

    def now(self) -> float:
        """The rounds' clock (monotonic seconds)."""
        return self._clock()

    def joined(self, frames: list[bytes]) -> bytes:
        """``b"".join(frames)``, the join before if the frames are the same again."""
        if frames == self._joined_from:  # nearly always the same objects, told by identity
            return self._joined
        data = b"".join(frames)  # first: a join that raises leaves the last one as it was
        self._joined_from, self._joined = frames.copy(), data
        return data

    def mark(self, session: Session) -> None:
        """Have ``session`` written after those already queued."""
        if self._stamp_due:
            # The first connection queued since a slice: a fan-out queues the members of
            # a room in a row, and the time is read once for all of them.
            self._stamp_due = False
            self._stamps.append((self._clock(), self._queued))
        self._dirty.append(session)
        self._queued += 1
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        wait = self._budget.ready_at() - self._clock()
        if wait > 0:
            self._loop.call_later(wait, self._write_slice)
        else:
            self._loop.call_soon(self._write_slice)

    @property
    def _written(self) -> int:
        """Connections queued so far that have been written (or dropped by a failed write)."""
        return self._queued - len(self._dirty)

    def behind(self, now: float) -> float:
        """How long the connection to be written next has waited (seconds; 0 when none
        waits). It was queued in the run its stamp began, a little later at most."""
        written = self._written
        if written == self._queued:
            return 0.0
        stamps = self._stamps
        while len(stamps) > 1 and stamps[1][1] <= written:
            stamps.popleft()  # the next connection is in a later run
        return now - stamps[0][0]

    def _write_slice(self) -> None:
        # Still "scheduled" while running: a connection queued by a write (a peer that
        # failed and closed, telling the others) waits for this slice to be charged.
        clock, dirty = self._clock, self._dirty
        started = clock()
        stop = started + self._slice
        written = 0
        try:
            self._watch(started)
            while dirty:
                dirty.popleft()._flush()
                written += 1
                if written % 8 == 0 and clock() >= stop:
                    break
        finally:
            # Even after a bug in one connection's write, the others are still written.
            self._budget.spent(started, clock())
            self._scheduled = False
            self._stamp_due = True
            if dirty:
                self._schedule()
            else:  # the pass is over: no join is kept until the next one
                self._joined_from, self._joined = [], b""
                self._stamps.clear()
                self.busy = False

    def _watch(self, now: float) -> None:
        """Begin or end a busy spell by how far behind writing is."""
        behind = self.behind(now)
        if self.busy:
            self.busy = behind >= self._idle_under or self._written < self._busy_until
        elif behind > self.busy_after:
            self._begin(f"writing {behind:.2f} s behind")

    def swamped(self, why: str) -> None:
        """Be busy until every connection queued so far has been written (a session found
        too much queued for one: the server's backlog, whatever the wait says); ``why``
        is for the log."""
        self._busy_until = self._queued
        self._begin(why)

    @property
    def spells(self) -> int:
        """Times writing fell too far behind, so far."""
        return self._spells.count

    @property
    def cut_off(self) -> int:
        """Connections cut off with sendq_exceeded, so far."""
        return self._cuts.count

    def cut(self, what: str) -> None:
        """Count a connection cut off for its send queue, and log ``what`` (which one,
        and what was queued): as a warning once every BUSY_LOG_INTERVAL, with how many
        since the last, else at info. Whether the peer left its data unread or the
        server queued it faster than it wrote is in ``what``, and a room of thousands
        cut off at once must not write thousands of warnings."""
        said = f"{what}: cut off with sendq_exceeded"
        if not self._cuts.warn(self._clock(), said, "connection(s)"):
            log.info("%s", said)

    def _begin(self, why: str) -> None:
        if self.busy:
            return
        self.busy = True
        self._spells.warn(self._clock(), f"{why}: refusing says until it catches up", "time(s)")


class _Paced:
    """A count of something that can come thousands of times at once, and when to warn
    of it: at most once every BUSY_LOG_INTERVAL, with how many since the last warning."""

    __slots__ = ("_at", "_warned", "count")

    def __init__(self) -> None:
        self.count = 0
        self._warned = 0  # the count at the last warning
        self._at: float | None = None

    def warn(self, now: float, what: str, unit: str) -> bool:
        """Count one (``now``: the clock's time), and warn of ``what`` with how many
        ``unit`` since the last warning if one is due now; whether it warned."""
        self.count += 1
        if self._at is not None and now - self._at < BUSY_LOG_INTERVAL:
            return False
        since, self._warned, self._at = self.count - self._warned, self.count, now
        log.warning("%s (%d %s since the last report)", what, since, unit)
        return True


def deadline(
    limits: SessionLimits,
    *,
    connected: float,
    registered: bool,
    last_frame: float,
    pinged: bool,
    frame_started: float | None,
) -> tuple[float, str]:
    """The next deadline of a connection and what happens at it.

    ``"no hello"``, ``"frame"`` and ``"idle"`` end the connection; ``"ping"``
    asks a quiet client whether it is still there (half-way to idle).
    """
    if not registered:
        at, why = connected + limits.hello_timeout, "no hello"
    elif not pinged:
        at, why = last_frame + limits.idle_timeout / 2, "ping"
    else:
        at, why = last_frame + limits.idle_timeout, "idle"
    if frame_started is not None and frame_started + limits.frame_timeout < at:
        at, why = frame_started + limits.frame_timeout, "frame"
    return at, why


def holds_too_much(held: int, limit: int, quiet: float) -> bool:
    """Whether a peer that holds ``held`` bytes, bursts and all, and has read nothing for
    ``quiet`` seconds is cut off: over twice the send limit only while it reads (for
    BURST_STALL seconds), and never over BURST_HOLD times the limit. Pure."""
    return held > 2 * limit and (quiet > BURST_STALL or held > BURST_HOLD * limit)


class _CatchUp:
    """What a session catching up on pages (``join ... since``: Session.send_pages)
    knows of the frames queued with them, which wait behind them. Pure.

    Frames are counted in the order they were queued, from the first already
    queued when the catch-up began: ``queued`` bytes in all, of which the first
    ``taken`` are written (frames are written in the order they were queued,
    pages or not between them). What came between two flushes is a *burst* if
    the server queued it as one (over a quarter of the send limit, or while it
    was busy: Session._flush_pages), kept as a range of that count until
    written: the server's backlog, not the peer's to answer for.
    """

    __slots__ = ("bursts", "queued", "read_at", "seen", "taken", "unsent")

    def __init__(self, queued: int, now: float) -> None:
        self.queued = queued
        self.taken = 0
        self.seen = 0  # queued at the last flush
        self.bursts: list[list[int]] = []  # [start, end) of each burst not all written
        # The transport's buffer after the last flush, as if the kernel had taken none of
        # its write: what it took at once was read, as _too_slow counts it.
        self.unsent = 0
        self.read_at = now  # when the peer was last seen reading (its buffer shrank)

    def came(self, burst: bool) -> None:
        """A flush: what came since the last is a burst if ``burst``."""
        if burst and self.queued > self.seen:
            bursts = self.bursts
            if bursts and bursts[-1][1] == self.seen:
                bursts[-1][1] = self.queued
            else:
                bursts.append([self.seen, self.queued])
        self.seen = self.queued

    def burst(self, lo: int, hi: int, runs: list[tuple[int, int]]) -> tuple[int, int, int]:
        """Bytes of bursts among frames ``lo`` to ``hi`` of the count; and, for frames
        written in runs (each a run's offset in the write and its place in the count,
        in order), where in the write the first burst byte is and the last ends."""
        total, first, last = 0, -1, 0
        for start, end in self.bursts:
            start, end = max(start, lo), min(end, hi)
            if start >= end:
                continue
            total += end - start
            for i, (offset, at) in enumerate(runs):
                stop = runs[i + 1][1] if i + 1 < len(runs) else hi  # where the run ends
                a, b = max(start, at), min(end, stop)
                if a < b:
                    if first < 0:
                        first = offset + a - at
                    last = offset + b - at
        return total, max(first, 0), last

    def written(self) -> None:
        """Forget the bursts written in all."""
        while self.bursts and self.bursts[0][1] <= self.taken:
            del self.bursts[0]


class SessionOwner(typing.Protocol):
    """What a session reports to the server that accepted it."""

    def opened(self, session: Session) -> ProtocolError | None:
        """Admit a new connection, or say why it is refused."""
        ...

    def closed(self, session: Session) -> None:
        """The connection is gone (called once, also for a refused one)."""
        ...


class Session(asyncio.Protocol):
    """Drives one connection; implements the registry's :class:`~achat.server.registry.Peer`."""

    __slots__ = (
        "_alarms",
        "_bucket",
        "_burst_read_at",
        "_catching",
        "_closing",
        "_connected",
        "_decoder",
        "_ending",
        "_frame_started",
        "_last_burst",
        "_last_frame",
        "_limits",
        "_loop",
        "_member",
        "_out",
        "_owner",
        "_pinged",
        "_port",
        "_quit_reason",
        "_registry",
        "_rounds",
        "_scheduled",
        "_sources",
        "_transport",
        "host",
    )

    def __init__(
        self,
        owner: SessionOwner,
        registry: Registry,
        limits: SessionLimits,
        rounds: FlushRounds,
        alarms: Alarms[Session],
    ) -> None:
        self._owner = owner
        self._alarms = alarms
        self._registry = registry
        self._limits = limits
        self._rounds = rounds
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(limits.max_frame)
        now = self._loop.time()
        self._bucket = TokenBucket(limits.flood, now)
        # Made on the first send: an idle connection needs no outbox. Its entries are
        # frames, or pages taken only as the peer reads (send_pages): _sources of them.
        self._out: list[bytes | Iterator[bytes]] | None = None
        # The last burst written while the peer reads it: [start, end, since, read]
        # (_burst_left, _too_slow), and when the peer was last seen reading it.
        self._last_burst: list[int] | None = None
        self._burst_read_at = 0.0
        self._sources = 0
        self._catching: _CatchUp | None = None  # while there are pages (_flush_pages)
        self._ending = False  # closing once the pages queued are out (close)
        self._scheduled = False
        self._closing = False
        self._member: Member | None = None
        self._quit_reason = "quit"
        self._connected = self._last_frame = now
        self._frame_started: float | None = None
        self._pinged = False
        self.host = "?"
        self._port: int | None = None

    # -- Peer ---------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; it is written, with everything queued before the write, soon."""
        if self._closing:
            return
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        catching = self._catching
        if catching is not None:
            catching.queued += len(frame)
        if not self._scheduled:
            self._scheduled = True
            self._rounds.mark(self)

    def send_pages(self, pages: Iterator[bytes]) -> None:
        """Queue ``pages``: each is taken when the peer has read what it was sent before,
        and whatever is queued after them is written once they are all out."""
        if self._closing:
            return
        if self._out is None:
            self._out = []
        if self._catching is None:  # counted from the frames already queued
            ahead = sum(len(entry) for entry in self._out if isinstance(entry, bytes))
            self._catching = _CatchUp(ahead, self._rounds.now())
        self._out.append(pages)
        self._sources += 1
        if not self._scheduled:
            self._scheduled = True
            self._rounds.mark(self)

    def close(self, frame: bytes | None = None, *, flush: bool = True) -> None:
        """Flush what is queued (unless ``flush`` is false), then ``frame``, then close.
        Idempotent.

        A peer that ends its session (``bye``, or its end of the stream) while pages it
        asked for are still to go gets them all first: it stops being read and leaves
        at once, and the connection closes when they are out (or after close_timeout).
        """
        if self._closing and not self._ending:
            return
        self._ending = False
        try:
            if flush:
                # Messages already stored reach this peer too before it goes.
                self._registry.fan_out()
                self._flush()
        finally:
            transport = self._transport
            if flush and frame is None and self._sources and transport is not None:
                self._end_after_pages(transport)
            else:
                # Whatever went wrong above, the connection still closes, the member leaves.
                self._close_now(frame)

    def _close_now(self, frame: bytes | None) -> None:
        self._stop()
        transport = self._transport
        if transport is not None:
            if frame is not None and not transport.is_closing():
                transport.write(frame)
            transport.close()
            # The member leaves at once (the registry may be mid-iteration: right after
            # it), not when a peer that does not read finally lets the transport go...
            self._loop.call_soon(self._leave)
            # ...which it is made to do after close_timeout.
            self._loop.call_later(self._limits.close_timeout, transport.abort)

    def _end_after_pages(self, transport: asyncio.Transport) -> None:
        self._closing = self._ending = True  # nothing more is read or queued
        self._alarms.cancel(self)
        with contextlib.suppress(RuntimeError):  # already not reading (its end came)
            transport.pause_reading()
        self._loop.call_soon(self._leave)
        self._loop.call_later(self._limits.close_timeout, transport.abort)

    def fail(self, exc: ProtocolError, *, flush: bool = True) -> None:
        """Answer with a fatal ``error`` built from ``exc`` and close (see :meth:`close`)."""
        frame = encode(Error(code=exc.code, message=exc.message, fatal=True, ref=exc.ref))
        self.close(frame, flush=flush)

    @property
    def unsent(self) -> int:
        """Bytes queued for this connection that the kernel has not taken yet (pages not
        taken yet are not counted: they are read only as they are needed)."""
        transport = self._transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        return queued + sum(len(e) for e in self._out or () if isinstance(e, bytes))

    @property
    def addr(self) -> str:
        """``host:port`` of the peer (for logs)."""
        return self.host if self._port is None else f"{self.host}:{self._port}"

    @property
    def nick(self) -> str | None:
        return self._member.nick if self._member is not None else None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = typing.cast(asyncio.Transport, transport)
        # Known, so that pages (send_pages) know when resume_writing will come.
        self._transport.set_write_buffer_limits(high=self._high())
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            # Interned: every client behind one address shares the string.
            self.host, self._port = sys.intern(str(peer[0])), int(peer[1])
        else:
            self.host = str(peer)
        refused = self._owner.opened(self)
        if refused is not None:
            self.fail(refused)
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._receive(data)
        except Exception:
            # A bug, not the peer's fault: log it, and close after what is already queued.
            log.exception("error serving addr=%s", self.addr)
            self.close()

    def _receive(self, data: bytes) -> None:
        try:
            bodies = self._decoder.receive_data(data)
        except FrameError as exc:
            # Frames completed before the bad header are served, so that what happens
            # does not depend on how TCP happened to split the stream; one of them may
            # end the connection first, and then the header is not what ended it.
            for body in exc.frames:
                if not self._dispatch(body) or self._closing:
                    return
            log.info("bad frame addr=%s code=%s", self.addr, exc.code)
            self.fail(exc)
            return
        now = self._loop.time()
        if bodies:
            self._last_frame = now
            self._pinged = False
        if not self._decoder.in_frame:
            self._frame_started = None
        elif self._frame_started is None or bodies:
            self._frame_started = now
            # A frame in progress may bring the deadline forward.
            self._arm_if_sooner()
        if len(bodies) > 1 and self._member is not None and not self._rounds.busy:
            frames = decode_client_many(bodies)
            if frames is not None:
                self._handle_many(frames)
                return
        for body in bodies:
            if not self._dispatch(body) or self._closing:
                return

    def resume_writing(self) -> None:
        # The peer has read most of what it was sent: the next pages, if any are due.
        if self._sources and not self._scheduled:
            self._scheduled = True
            self._rounds.mark(self)

    def eof_received(self) -> bool:
        # The peer is done sending: close our side too (the member leaves now).
        self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("connection error addr=%s: %s", self.addr, exc)
        self._stop()
        try:
            self._leave()
        finally:
            self._owner.closed(self)

    # -- inside -------------------------------------------------------------

    def _stop(self) -> None:
        """Nothing more is read, queued or timed for this connection."""
        self._closing = True
        self._ending = False
        self._out = None
        self._sources = 0
        self._catching = None
        self._alarms.cancel(self)

    def _leave(self) -> None:
        member, self._member = self._member, None
        if member is not None:
            self._registry.unregister(member, self._quit_reason)

    def _deadline(self) -> tuple[float, str]:
        return deadline(
            self._limits,
            connected=self._connected,
            registered=self._member is not None,
            last_frame=self._last_frame,
            pinged=self._pinged,
            frame_started=self._frame_started,
        )

    def _arm(self) -> None:
        """Set the alarm to the connection's current deadline."""
        self._alarms.set(self, self._deadline()[0])

    def _arm_if_sooner(self) -> None:
        """Move the alarm up if the deadline now comes before it.

        A later deadline needs nothing: the alarm goes off early and moves itself on.
        """
        at, set_for = self._deadline()[0], self._alarms.when(self)
        if set_for is not None and at < set_for:
            self._alarms.set(self, at)

    def on_deadline(self) -> None:
        """The alarm went off: act on the deadline, unless traffic has moved it on since."""
        if self._closing:
            return
        at, why = self._deadline()
        if at > self._loop.time():
            self._arm()
        elif why == "ping":
            self._pinged = True
            self.send(encode(Ping(ref="keepalive")))
            self._arm()
        else:
            self._timed_out(why)

    def _dispatch(self, body: bytes) -> bool:
        """Handle one frame body; False when the connection must end."""
        try:
            frame: ClientFrame = decode_client(body)
        except ProtocolError as exc:
            if self._member is None:
                log.info("bad frame addr=%s code=%s", self.addr, exc.code)
                self.fail(exc)
                return False
            # Garbage costs a token like any frame, so it cannot flood for free.
            if not self._bucket.take(self._loop.time()):
                return self._flooded(exc.ref)
            self._refuse(exc)
            return True
        if self._member is None:
            return self._hello(frame)
        return self._handle(frame)

    def _handle_many(self, frames: list[ClientFrame]) -> None:
        """Handle the frames of one read, decoded together: the ``say`` frames among them
        go to the registry a run at a time (one store append, one ack write for each run),
        in order with the rest."""
        member = self._member
        assert member is not None  # frames are decoded together only once registered
        bucket, registry = self._bucket, self._registry
        now = self._loop.time()
        says: list[Say] = []
        for frame in frames:
            if frame.__class__ is Say and bucket.take(now):
                says.append(frame)
                continue
            if says:
                registry.say_many(member, says, self._refuse)
                says = []
                if self._closing:
                    return
            # A say here is one the flood limit refused.
            going_on = self._flooded(frame.ref) if frame.__class__ is Say else self._handle(frame)
            if not going_on or self._closing:
                return
        if says:
            registry.say_many(member, says, self._refuse)

    def _handle(self, frame: ClientFrame) -> bool:
        """Handle one decoded frame of a registered member; False when the connection must
        end."""
        member = self._member
        assert member is not None
        if not isinstance(frame, Bye) and not self._bucket.take(self._loop.time()):
            return self._flooded(getattr(frame, "ref", None))
        if frame.__class__ is Say and self._rounds.busy:
            self._busy(frame.ref)
            return True
        try:
            self._registry.handle(member, frame)
        except ProtocolError as exc:
            if exc.ref is None:
                exc.ref = getattr(frame, "ref", None)
            self._refuse(exc)
            return not exc.fatal
        if isinstance(frame, Bye):
            if frame.reason:
                self._quit_reason = frame.reason
            log.info("bye nick=%s", esc(member.nick))
            self.close()
            return False
        return True

    def _flooded(self, ref: str | None) -> bool:
        """Refuse a frame over the rate limit; drop a connection that keeps flooding."""
        if self._bucket.flooding():
            log.info("flooding addr=%s nick=%s", self.addr, esc(self.nick or ""))
            self.fail(ProtocolError("rate_limited", "disconnected for flooding", fatal=True))
            return False
        policy = self._limits.flood
        self.send(
            encode(
                Error(
                    code="rate_limited",
                    message=f"slow down: at most {policy.rate:g} frames a second "
                    f"(bursts of {policy.burst:g}); this frame was dropped",
                    fatal=False,
                    ref=ref,
                )
            )
        )
        return True

    def _busy(self, ref: str | None) -> None:
        """Refuse a ``say`` while the server's writing is too far behind (FlushRounds). It
        costs the sender its token, as any frame does, but counts as no strike: it is no
        sign of flooding. ``retry_after`` says so, and when to send it again."""
        self._rounds.refused += 1
        self.send(
            encode(
                Error(
                    code="rate_limited",
                    message="the server is busy delivering what was said before; "
                    "this message was dropped: send it again in a moment",
                    fatal=False,
                    ref=ref,
                    retry_after=self._rounds.busy_after,
                )
            )
        )

    def _hello(self, frame: ClientFrame) -> bool:
        if not isinstance(frame, Hello):
            self.fail(ProtocolError("not_registered", "say hello first", fatal=True))
            return False
        try:
            self._member = self._registry.register(self, frame, self.addr)
        except ProtocolError as exc:
            log.info("refused addr=%s code=%s nick=%s", self.addr, exc.code, esc(frame.nick))
            self.fail(exc)
            return False
        # From the hello deadline to the idle one, which may come sooner.
        self._arm_if_sooner()
        return True

    def _refuse(self, exc: ProtocolError) -> None:
        if exc.fatal:
            self.fail(exc)
        else:
            self.send(
                encode(
                    Error(
                        code=exc.code,
                        message=exc.message,
                        fatal=False,
                        ref=exc.ref,
                        retry_after=exc.retry_after,
                    )
                )
            )

    def _timed_out(self, why: str) -> None:
        log.info("timeout addr=%s why=%s", self.addr, why)
        if why == "no hello":
            self.fail(ProtocolError("not_registered", "no hello in time", fatal=True))
        elif why == "frame":
            self.fail(ProtocolError("idle_timeout", "a frame took too long to arrive", fatal=True))
        else:
            self.fail(ProtocolError("idle_timeout", "nothing received for too long", fatal=True))

    def _flush(self) -> None:
        self._scheduled = False
        out = self._out
        if not out:
            return
        if self._sources:  # while ending, too (close)
            self._flush_pages(out)
            return
        if self._closing:
            return
        frames = typing.cast(list[bytes], out)
        data = frames[0] if len(frames) == 1 else self._rounds.joined(frames)
        out.clear()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        burst = self._queued_at_once(len(data))
        unsent = transport.get_write_buffer_size()
        if unsent > self._limits.sendq_limit // SWAMPED_SHARE and self._too_slow(unsent, len(data)):
            return
        # A peer that has left no more than a quarter of the limit unread is not the slow
        # one, however much is queued: that is the server's backlog (says taken all at
        # once, pipelined or sent while the server was stopped), written to it all the
        # same while says are refused (swamped, above): a burst.
        transport.write(data)
        if burst or self._rounds.busy:
            self._burst_grows(unsent, len(data))
        elif self._last_burst is not None:
            self._last_burst[2] += len(data)  # the peer's own to read, behind the burst

    def _queued_at_once(self, size: int) -> bool:
        """Whether ``size`` bytes queued for this connection since it was last written
        are a burst: over a quarter of the limit. That is what the server queued, not
        what the peer left unread: the server is the slow one (big messages fill a
        member's queue before the write lag shows it), and says so (swamped) before
        any queue gets to the limit."""
        if size <= self._limits.sendq_limit // SWAMPED_SHARE:
            return False
        self._rounds.swamped(f"{size:,} bytes queued for one connection")
        return True

    def _too_slow(self, unsent: int, size: int) -> bool:
        """Whether the peer, which left ``unsent`` bytes unread, is cut off rather than
        sent ``size`` more: if it left more than a quarter of the limit unread, a burst's
        rest not counted, and ``size`` would take that past the limit. And the bound on
        what it holds, bursts and all: over twice the limit, only while it reads (it
        has read some in the last BURST_STALL seconds), and never over BURST_HOLD times
        the limit."""
        limit = self._limits.sendq_limit
        unread = self._unread(unsent)
        if unread > limit // SWAMPED_SHARE and unread + size > limit:
            self._overflow(unread, unsent, size)
            return True
        last = self._last_burst
        if unsent > 2 * limit and last is not None:  # (no burst: unread is over it)
            read = last[1] + last[2] - unsent  # since the burst began (see _burst_left)
            now = self._rounds.now()
            if read > last[3]:
                last[3], self._burst_read_at = read, now
            if holds_too_much(unsent, limit, now - self._burst_read_at):
                self._overflow(unread, unsent, size)
                return True
        return False

    def _unread(self, unsent: int) -> int:
        """What the peer left unread of the ``unsent`` bytes in the transport's buffer,
        the rest of the last burst not counted (_burst_left)."""
        return unsent if self._last_burst is None else unsent - self._burst_left(unsent)

    def _burst_grows(self, unsent: int, written: int, pre: int = 0, post: int = 0) -> None:
        """The server wrote ``written`` bytes into a buffer of ``unsent``, a burst but for
        the first ``pre`` and the last ``post`` of them (the peer's own: pages and
        frames written with a burst that waited behind them, _flush_pages): what the
        kernel did not take of the burst is a burst, or joins the one the peer is still
        reading, with what the peer had left unread of its own since (and the ``pre``
        of this write). It is the server's backlog, not the peer's to answer for until
        it has read it (the bound is in _too_slow). What the kernel took of the write
        at once counts as read."""
        assert self._transport is not None
        after = self._transport.get_write_buffer_size()
        end = unsent + written - post
        last = self._last_burst
        left = self._burst_left(unsent) if last is not None else 0
        if last is not None and left > 0:
            # From the buffer's front: what the peer left unread before the burst, the
            # burst's rest, what it left unread since, what was just written. From the
            # burst's rest on, it is all one burst now, counted from the front as it is.
            # What it had read is counted anew from here; when it last read is kept.
            last[:] = [unsent - left - last[2], end, post, unsent + written - after]
        elif after > unsent + post:  # the kernel did not take all of the burst
            self._last_burst = [unsent + pre, end, post, unsent + written - after]
            self._burst_read_at = self._rounds.now()

    def _burst_left(self, unsent: int) -> int:
        """What is left in the transport's buffer (``unsent`` bytes now) of the last
        burst written to it. The buffer is read from its front: the burst went in
        behind ``start`` bytes, up to ``end``, and ``since`` more have gone in behind
        it; so the peer has read ``end + since - unsent`` of it all since."""
        assert self._last_burst is not None
        start, end, since, _ = self._last_burst
        left = end - max(start, end + since - unsent)
        if left <= 0:
            self._last_burst = None  # read: what the peer leaves unread now is its own
            return 0
        return left

    def _flush_pages(self, out: list[bytes | Iterator[bytes]]) -> None:
        """Write what is queued up to the first pages the peer has not read enough for
        yet, taking pages while what it has not read is under the high mark.

        What waits behind the pages counts against the send limit with what the peer
        left unread, but for what the server queued as a burst (_CatchUp): as in
        :meth:`_flush`, that is the server's backlog, and a burst once written
        (_burst_grows). What the peer holds in all, its transport's buffer and what
        waits, is bounded as :meth:`_too_slow` bounds the buffer: over twice the limit
        only while it reads, and never over BURST_HOLD times the limit."""
        transport = self._transport
        catching = self._catching
        if transport is None or transport.is_closing() or catching is None:
            out.clear()
            self._sources = 0
            self._catching = None
            return
        limit = self._limits.sendq_limit
        unsent = transport.get_write_buffer_size()
        now = self._rounds.now()
        if unsent < catching.unsent:
            catching.read_at = now
        held = unsent + catching.seen - catching.taken  # what came since is not held yet
        came = self._queued_at_once(catching.queued - catching.seen)
        catching.came(came or self._rounds.busy)
        high = self._high()
        pieces: list[bytes] = []
        # Where each run of frames begins in the write, and where in the count of frames.
        runs: list[tuple[int, int]] = []
        size = taken = 0
        frames_from = catching.taken
        try:
            while taken < len(out):
                entry = out[taken]
                if isinstance(entry, bytes):
                    if not runs or runs[-1][1] + size - runs[-1][0] != catching.taken:
                        runs.append((size, catching.taken))
                    pieces.append(entry)
                    size += len(entry)
                    catching.taken += len(entry)
                    taken += 1
                    continue
                while unsent + size <= high:
                    page = next(entry, None)
                    if page is None:
                        break
                    pieces.append(page)
                    size += len(page)
                else:
                    break  # enough for now: the rest once the peer has read it
                self._sources -= 1
                taken += 1
        except Exception:
            # The pages could not be read (the store failed). What was taken is a gapless
            # prefix; nothing queued after the pages may follow it, or the peer's stream
            # would have a gap. It gets an error and is closed; it resumes with since.
            log.exception("backlog failed addr=%s", self.addr)
            if pieces:
                transport.write(b"".join(pieces))
            self.fail(
                ProtocolError(
                    "unavailable", "the history could not be read; join again with since"
                ),
                flush=False,
            )
            return
        del out[:taken]
        waiting = catching.queued - catching.taken
        in_write = catching.burst(frames_from, catching.taken, runs)
        bursts = in_write[0] + catching.burst(catching.taken, catching.queued, [])[0]
        unread = self._unread(unsent)
        if unread + size + waiting - bursts > limit or holds_too_much(
            held, limit, now - catching.read_at
        ):
            self._overflow(unread, unsent, size + waiting)
            return
        if pieces:
            transport.write(b"".join(pieces))
            if in_write[0]:  # (some of) a burst is out from behind the pages
                self._burst_grows(unsent, size, in_write[1], size - in_write[2])
            elif self._last_burst is not None:
                self._last_burst[2] += size
        catching.written()
        catching.unsent = unsent + size
        if not self._sources:
            self._catching = None
        if self._ending and not out:
            self._stop()  # the pages are out: the session ends as it was asked to
            transport.close()
            return
        if self._sources and transport.get_write_buffer_size() <= high:
            # No resume_writing will come (the buffer is not over the high mark): go on at
            # the next round, which takes a page at least. Over it, resume_writing will.
            self._scheduled = True
            self._rounds.mark(self)

    def _high(self) -> int:
        """The write buffer's high mark: pages are taken up to it (see WRITE_HIGH)."""
        return min(WRITE_HIGH, self._limits.sendq_limit // 4)

    def _overflow(self, unread: int, unsent: int, dropped: int) -> None:
        # unread: what the peer left unread, a burst's rest not counted; unsent: with it;
        # dropped: what the server had queued for it and not written yet.
        self._rounds.cut(
            f"sendq exceeded addr={self.addr} nick={esc(self.nick or '')} "
            f"unread={unread} unsent={unsent} dropped={dropped}"
        )
        # What was queued is dropped, so nothing queued after it may be written either (a
        # commit fanned out by the close would be): the peer's stream stops at what it
        # was already sent, a gapless prefix, and `join since` resumes from there.
        self.fail(
            ProtocolError(
                "sendq_exceeded",
                "you are reading too slowly; rejoin with since to catch up",
                fatal=True,
            ),
            flush=False,
        )
