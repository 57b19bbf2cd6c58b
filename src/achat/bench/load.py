"""The load side of ``achat-bench``: many raw protocol clients per process, on uvloop.

A worker process owns a slice of the clients. Each client is a bare asyncio
connection (no :class:`~achat.client.connection.Client` machinery, so the
generator stays cheaper than the server it measures): it says hello, joins
its room and, once every client of the run has joined, sends ``say`` frames
at its rate with a random phase. Texts
carry their send time (``t=<ns since epoch>``), so a receiver can measure
latency from the bytes without decoding every frame.

Receiving is counted, not parsed, and a read costs the same however many
messages it holds. A message belongs to the read its stamp completes in, and
what a read delivered is the seq of its newest such message less the one
before. The contract numbers a room's messages 1, 2, 3... and every member
gets all of them, in that order; achat servers encode a message's type, room
and seq first, compact (``{"type":"message","room":"r","seq":41,``), so a
``bytes.rfind`` for the last stamp from the end of a read, and one for the
seq before it, find the newest, and the ``names`` that answers the join
gives the seq to start from. Counting by seq trusts the contract's "no gap,
no repeat", so every ``CHECK_EVERY``-th client of a worker also counts the
message frames it reads (``{"type":"message","room":"`` in the byte stream,
patterns split across reads counted once, as every client once did) and
compares the two at each read's newest stamp; the run reports any
difference: a server that skips or repeats a message is caught there (unless
a skip and a repeat fall in the same read, or in clients that do not check),
and the run's figures are not to be trusted. That pass over every byte was
most of what the generator did: 43 % of its busy time at 4 M deliveries/s
on the reference machine, where ``bytes.count`` ran at 3.2-3.6 GB/s.

What counts is when a message was said. The stamps of a read are in the
order the server took the says in, which is not quite the order they were
said in, but out of order by less than ``NEAR_NS``; nothing is said at or
after the window's end. So a read whose first and last stamps, whichever is
older, were both said well before the window's start is left out whole, and
one said well after its start is counted whole, by seq. A read across the
start is split by binary searches over its stamps: after a stamp said well
after the start everything counts, by seq; before one said well before it
nothing does; and what lies between is kept and counted stamp by stamp once
the window is over (``findall``, sorted), when the worker has nothing else to
do. Nobody says anything after the window, and the workers read on until
every message said is read (:func:`_drain`), ten seconds at most, so the
delivered ratio misses exactly the messages said inside the window and never
read.
Latency is counted per message, in a histogram of every message
(:mod:`achat.bench.histogram`), at up to ``SPREAD`` points a read: spread
evenly between the stamps a read counted by seq starts and ends with, and,
where its stamps are read, the middle stamp of each equal share of them in
order. The spreading itself waits for the
window's end (item 39): a read in it keeps three numbers. It used to be a
sample of up to 100,000 reads, two stamps each, which gave a read of 400
messages the weight of a read of one. Reads near either edge of the window
were once read stamp by stamp as they came, a step of Python per stamp for
half a second of all the traffic at once: at busy-room 2,500 that stalled
the worker for a second or more at the window's start and at its end, which
the latencies measured, and often set off a collapse (item 32 of
docs/performance-history.md).

That is all a read costs while the client waits for nothing.
Besides messages, what a client needs from the server are the answers to
what it sent: ``names`` to its join, an ``ack`` or an ``error`` to each
``say`` (every say carries a ``ref``, which its answer echoes) and a ``pong``
to its keep-alive ``ping``. Only while answers are due is a read searched
for them, for their ``"ref":"`` and the ``REF_MARK`` every ref of the
generator's starts with (no message has either), and the search stops
at the last answer due: a busy room's client waits for one answer a second,
found where it arrived (a client that falls behind by more than the time
between its says has more than one due, and then reads to their end are
searched until it catches up). Searching every read for every frame that is
not a message, as this generator once did, cost a second pass over every
byte (``achat-bench self-check``: 7.2 M deliveries/s with it, the figures in
docs/performance.md without it). Other frames (joins and parts of others,
topics, the server's own pings) are never looked at. The client pings after
``KEEPALIVE_SECONDS`` of saying nothing (``--keepalive``; the worker looks
every ``KEEPALIVE_POLL`` or a quarter of that, if sooner), as the contract
asks of an idle client, which keeps it connected to any server whose
``idle_timeout`` is over 30 s (over the keep-alive and its poll, if lower)
whether or not it answers the server's pings. The errors without a ``ref`` that a client
can meet are its join's refusal, seen in the greeting, and fatal ones, the
last frame before the server closes: the client looks at the end of its
stream when the connection is lost. Both are counted with their codes, as
are those that answer its says. A worker reports its counters to the parent
once a second over a pipe.

Clients are :class:`asyncio.Protocol` objects driven by callbacks and
timers: no stream objects, no task and no future per read, so one worker
process can take millions of deliveries a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import random
import re
import resource
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

from ..protocol.frames import encode_frame
from .histogram import Histogram

__all__ = [
    "ClientPlan",
    "WorkerPlan",
    "WorkerReport",
    "answered",
    "run_worker",
    "settled",
    "stamped_text",
    "wall_offset",
]

#: The start of every message frame (see above): what checking clients count.
MESSAGE = b'{"type":"message","room":"'
NAMES = b'{"type":"names"'
#: The room's seq in ``names``: its last field, or the one before ``more``. Names and
#: topics cannot hold ``"seq":`` (their quotes are escaped), so the first after NAMES is it.
NAMES_SEQ = re.compile(rb'"seq":(\d{1,20})[,}]')
#: One client in this many also counts every message frame, to check the seqs (see above).
CHECK_EVERY = 10
#: A seq's digits and the comma after them.
_SEQ_SIZE = 21
ERROR = b'{"type":"error"'
#: What every ref of the generator's starts with: the contract allows refs of up to 64
#: characters, and a long search pattern that ends in a letter no frame of a busy room
#: has is found 3.4 times as fast as ``"ref":"`` alone (6.2 against 1.8 GB/s).
REF_MARK = "Z" * 16
#: An answer's ref field, as the generator's refs make it. No message has one (a text's
#: quotes are escaped).
REF = b'"ref":"' + REF_MARK.encode()
#: What the server writes just before an answer's ref: it is the first field of an ack
#: and of a pong, and the last of an error (after ``fatal``).
ACK_HEAD = b'{"type":"ack",'
PONG_HEAD = b'{"type":"pong",'
ERROR_HEADS = (b'"fatal":false,', b'"fatal":true,')
_HEAD_SIZE = max(len(ACK_HEAD), len(PONG_HEAD), *map(len, ERROR_HEADS))
CODE = re.compile(rb'"code":"([a-z_]{1,32})"')
#: A client that has said nothing for this long pings (the contract: every 30 s).
KEEPALIVE_SECONDS = 25.0
KEEPALIVE_REF = REF_MARK + "keepalive"
KEEPALIVE_FRAME = encode_frame(b'{"type":"ping","ref":"%s"}' % KEEPALIVE_REF.encode())
#: How a fatal error that answers nothing (it has no ref) ends, as the last frame.
FATAL_END = b'"fatal":true}'
#: Bytes of the stream kept from before a read: enough for any pattern split across two
#: reads, for what precedes a ref split from it, for the server's errors whole (their
#: codes, of an error begun in an earlier read than its ref or ending the stream) and for
#: a message from its seq to its stamp, which comes after the sender's nick: 24
#: characters after NFKC, but sent as typed, which can be over 200 bytes of UTF-8.
KEEP = 1024
STAMP = b'"text":"t='
STAMPS = re.compile(rb'"text":"t=(\d{1,20}) ')
#: The most bytes a stamp takes, up to the space after its digits.
_STAMP_SIZE = len(STAMP) + 21
#: How far (ns) the stamps of a read may be out of order: they are in seq order, the order
#: the server took the says in, not quite the order they were said in (by up to 28 ms at
#: busy-room 2,000 on the reference machine). What was said this close to the window's
#: start is counted stamp by stamp; the rest of a read, by seq (_BenchClient._deliveries).
NEAR_NS = 100_000_000
#: Latency points a read's messages are spread over (see _BenchClient._deliveries).
SPREAD = 8
#: Reads whose latencies wait to be counted, at most (24 bytes each): past it, the
#: newest FOLD_CHUNK are counted at once, in the window (see _Window.spread).
SPREADS_MAX = 1_000_000
FOLD_CHUNK = 1_000
#: The most of a greeting kept while waiting for the room's seq in names.
GREETING_LIMIT = 4 << 20
TEXT_SIZE = 60
#: Longest wait after the window for messages said inside it (see _drain), looking
#: every DRAIN_STEP whether they are in.
DRAIN_SECONDS = 10.0
DRAIN_STEP = 0.02
#: The ping every client sends once every say of every worker is answered (_drain).
DRAIN_REF = REF_MARK + "drain"
DRAIN_FRAME = encode_frame(b'{"type":"ping","ref":"%s"}' % DRAIN_REF.encode())


@dataclass(frozen=True, slots=True)
class ClientPlan:
    nick: str
    room: str
    rate: float  # messages per second; 0 = only listen


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    host: str
    port: int
    clients: list[ClientPlan]
    duration: float
    warmup: float
    seed: int
    cpu: int | None = None
    pipeline: int = 0  # ingest: keep this many says in flight instead of a rate
    connect_rate: float = 2000.0  # new connections a second, this worker's share
    # Read on after the window until what was said in it is read (see _drain); off where
    # nobody says anything (idle, and self-check, whose sink never stops).
    drain: bool = True
    keepalive: float = KEEPALIVE_SECONDS  # ping after this long without sending


@dataclass(slots=True)
class WorkerReport:
    connected: int = 0
    joined: int = 0
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: int = 0
    closed: int = 0
    #: The latency of every message counted, in ns: read from its stamp, or from the
    #: two ends of its read (see _BenchClient._deliveries).
    latency: Histogram = field(default_factory=Histogram)
    message_reads: int = 0  # reads that held a message
    codes: dict[str, int] = field(default_factory=dict)  # the errors' codes, counted
    connect_seconds: float = 0.0
    #: The worker's CPU time over the measured window, and the window's length as it saw
    #: it: a worker near a whole CPU is what limits the run, not the server.
    cpu_seconds: float = 0.0
    window_seconds: float = 0.0
    #: Clients that counted every message frame too, and the messages on which the
    #: two counts differed (see the module's docstring): 0 unless the seqs lie.
    checked: int = 0
    unaccounted: int = 0
    #: The most a read's stamps were seen out of order (ns): the window's count is exact
    #: while it is under NEAR_NS (see _BenchClient._deliveries).
    disorder_ns: int = 0
    cpu: int | None = None  # the CPU the worker was pinned to, if any
    #: False if the drain gave up (DRAIN_SECONDS) with messages maybe still on the way.
    drained: bool = True
    done: bool = False


def stamped_text(text_size: int = TEXT_SIZE, now_ns: int | None = None) -> bytes:
    """A say's text: its send time (ns since the epoch), padded to ``text_size`` bytes."""
    head = b"t=%d " % (time.time_ns() if now_ns is None else now_ns)
    return head + b"x" * max(0, text_size - len(head))


_MARK = REF_MARK.encode()


def _say(room: bytes, ref: int, now_ns: int) -> bytes:
    text = stamped_text(now_ns=now_ns)
    body = b'{"type":"say","room":"%s","text":"%s","ref":"%s%d"}' % (room, text, _MARK, ref)
    return encode_frame(body)


#: The bytes a read can start with if it ends a MESSAGE begun in the read before (a read
#: that starts a frame starts with its length, a zero byte here, and skips the joined edges).
_MESSAGE_TAIL = frozenset(MESSAGE[i : i + 1] for i in range(1, len(MESSAGE)))


def _straddling(pattern: bytes, before: bytes, chunk: bytes) -> int:
    """Occurrences of ``pattern`` begun in the stream ``before`` ``chunk`` and ended in it.

    Only such an occurrence fits in the joined edges (neither side alone is long
    enough), so nothing is counted twice, and the chunk is not copied.
    """
    keep = len(pattern) - 1
    return (before[-keep:] + chunk[:keep]).count(pattern)


def _count(pattern: bytes, before: bytes, chunk: bytes) -> int:
    """Occurrences of ``pattern`` completed in ``chunk``, given the stream ``before`` it."""
    return chunk.count(pattern) + _straddling(pattern, before, chunk)


def _code_at(kept: bytes, data: bytes, pos: int) -> str:
    """The code of the error whose ref (or end) is at ``pos`` of ``data`` (negative: of
    ``kept``, the stream before it); "unknown" if it began further back than that."""
    start = data.rfind(ERROR, 0, pos) if pos > 0 else -1
    if start >= 0:
        found = CODE.search(data, start, pos)
    else:
        stream = kept + data[: max(0, pos)]
        end = len(kept) + pos
        start = stream.rfind(ERROR, 0, end)
        found = CODE.search(stream, start, end) if start >= 0 else None
    return found[1].decode() if found is not None else "unknown"


#: What the refs of the generator's pings have after REF_MARK, where a say's has digits.
_PING_REF_HEADS = {KEEPALIVE_REF[len(REF_MARK)], DRAIN_REF[len(REF_MARK)]}


def _answers_a_ping(data: bytes, pos: int) -> bool:
    """Whether the answer whose REF is at ``pos`` of ``data`` (negative: begun in the
    read before) answers a ping, not a say: by the ref's character after REF, which an
    answer is only taken once it has come (see _BenchClient._answers)."""
    return chr(data[pos + len(REF)]) in _PING_REF_HEADS


def _stamp_at(data: bytes, pos: int) -> int | None:
    """The send time stamped at ``pos`` (a STAMP's start), or None if cut off or not ours.

    What STAMPS matches, read without the regex engine: this runs on every read.
    """
    if pos < 0:
        return None
    start = pos + len(STAMP)
    return _number(data, start, start + 21, b" ")


def _number(buf: bytes, start: int, stop: int, end: bytes) -> int | None:
    """The integer written in ``buf`` from ``start`` to the first ``end`` before ``stop``;
    None if there is no ``end`` there, or no integer before it."""
    close = buf.find(end, start, stop)
    if close <= start:
        return None
    try:
        return int(buf[start:close])
    except ValueError:
        return None


#: The bytes a read can start with if it ends a stamp begun in the read before.
_STAMP_TAIL = frozenset(bytes([b]) for b in STAMP[1:] + b"0123456789 ")


def _first_stamp(kept: bytes, data: bytes) -> int | None:
    """The oldest stamp completed in ``data``: one begun in ``kept``, the stream before
    it, or else the first in ``data``; None if none is whole."""
    if data[:1] in _STAMP_TAIL:
        tail = kept[-_STAMP_SIZE:]
        for m in STAMPS.finditer(tail + data[:_STAMP_SIZE]):
            if m.end() > len(tail):
                return int(m[1])
    return _stamp_at(data, data.find(STAMP))


def _stamp_from(data: bytes, pos: int) -> tuple[int, int] | None:
    """Where the first whole stamp at or after ``pos`` starts, and its value."""
    at = data.find(STAMP, pos)
    while at >= 0:
        stamp = _stamp_at(data, at)
        if stamp is not None:
            return at, stamp
        at = data.find(STAMP, at + 1)
    return None


def _stamp_after(data: bytes, bound: int) -> tuple[int, int] | None:
    """A stamp of at least ``bound`` in ``data``, as early as a binary search over the
    read's stamps (in order but for a little) finds one: (where, value)."""
    low, high = 0, len(data)
    while low < high:
        mid = (low + high) // 2
        found = _stamp_from(data, mid)
        if found is None or found[0] >= high or found[1] >= bound:
            high = mid
        else:
            low = found[0] + 1
    found = _stamp_from(data, low)
    return found if found is not None and found[1] >= bound else None


def _end_before(data: bytes, high: int, bound: int) -> int:
    """Where a stamp of less than ``bound`` before ``high`` ends, as late as a binary
    search finds one; 0 if none is found."""
    low, end = 0, 0
    while low < high:
        mid = (low + high) // 2
        found = _stamp_from(data, mid)
        if found is not None and found[0] < high and found[1] < bound:
            end = data.index(b" ", found[0] + len(STAMP)) + 1
            low = found[0] + 1
        else:
            high = mid
    return end


def _seq_before(buf: bytes, stamp_at: int, mark: bytes) -> int | None:
    """The seq of the message whose stamp starts at ``stamp_at`` of ``buf``, or None if
    its ``mark`` is not in ``buf`` or no seq an achat server writes follows it."""
    begun = buf.rfind(mark, max(0, stamp_at - KEEP), stamp_at)
    if begun < 0:
        return None
    start = begun + len(mark)
    return _number(buf, start, min(stamp_at, start + _SEQ_SIZE), b",")


def _spread_sorted(latency: Histogram, now_ns: int, said: list[int]) -> None:
    """Count the latencies of messages said at ``said`` (in order) and read at
    ``now_ns``, at up to SPREAD points: each the middle one of an equal share."""
    points = min(len(said), SPREAD)
    each, more = divmod(len(said), points)
    at = 0
    for i in range(points):
        size = each + (i < more)
        latency.add(now_ns - said[at + size // 2], size)
        at += size


def wall_offset() -> int:
    """The wall clock less the monotonic one, in ns: the largest of three measures (the
    monotonic clock is read second, so a measure interrupted between the two is short)."""
    return max(time.time_ns() - time.monotonic_ns() for _ in range(3))


class _Window:
    """The measured window; unknown until go.

    On the monotonic clock all processes share (when to send, when acks count), and
    the same on the wall clock of the messages' stamps (which says and deliveries count).
    """

    __slots__ = ("end", "end_ns", "near", "spreads", "start", "start_ns")

    def __init__(self) -> None:
        self.start = self.end = float("inf")
        self.start_ns = self.end_ns = 2**63
        #: Reads, or the parts of reads, said near the window's start, kept to be counted
        #: stamp by stamp after it: when each was read (ns), the end of the stream
        #: before it (or nothing, for a part that starts after a stamp), and the bytes.
        self.near: list[tuple[int, bytes, bytes]] = []
        #: The latencies of reads counted inside the window, to be spread over the
        #: histogram after it (fold): for each, the lowest, the highest and how many.
        self.spreads = array("q")

    def open(self, start: float, duration: float, wall: int | None = None) -> None:
        """Open at ``start`` (monotonic s) for ``duration``; ``wall`` is the wall clock
        less the monotonic one (ns), measured once by the parent for every worker, so
        that all agree to the ns on which stamps are inside."""
        self.start, self.end = start, start + duration
        if wall is None:
            wall = wall_offset()
        self.start_ns = round(self.start * 1e9) + wall
        self.end_ns = round(self.end * 1e9) + wall

    def spread(self, report: WorkerReport, low: int, high: int, count: int) -> None:
        """Count ``count`` latencies from ``low`` to ``high`` (ns) into ``report``, spread
        evenly over them at up to SPREAD points, once the window is over.

        Spreading takes ~4 µs of Python a read, 15 % of a worker's time at busy-room
        2,500 (py-spy): while the window is open that time delays the reads that
        measure the latencies, so it waits for :meth:`settle`. Past SPREADS_MAX reads
        waiting (a long run), FOLD_CHUNK of them are spread at a time: a few ms,
        not seconds.
        """
        spreads = self.spreads
        try:
            spreads.fromlist([low, high, count])  # all three or none
        except OverflowError:  # from stamps achat-bench did not write: counted at once
            report.latency.add_between(low, high, count, SPREAD)
            return
        if len(spreads) >= 3 * SPREADS_MAX:
            self.fold(report, FOLD_CHUNK)

    def fold(self, report: WorkerReport, reads: int | None = None) -> None:
        """Count the latencies :meth:`spread` kept into ``report``: all of them, or the
        newest ``reads`` reads' (taken from the end: no copy of the rest)."""
        spreads, add = self.spreads, report.latency.add_between
        begin = 0 if reads is None else max(0, len(spreads) - 3 * reads)
        for i in range(begin, len(spreads), 3):
            add(spreads[i], spreads[i + 1], spreads[i + 2], SPREAD)
        del spreads[begin:]

    def settle(self, report: WorkerReport) -> None:
        """After the window and the drain: count into ``report`` all that waited."""
        self.fold(report)
        self.count_near(report)

    def count_near(self, report: WorkerReport) -> None:
        """Count what the reads kept near the start delivered inside the window.

        Every stamp completed in a read (one begun in the tail before it too) is read
        at once (``findall``), the stamps are sorted, and those inside the window are
        counted, their latencies spread over them in order (:func:`_spread_sorted`).
        """
        start, end = self.start_ns, self.end_ns
        for read_at, tail, data in self.near:
            found = STAMPS.findall(tail + data)
            if tail:
                del found[: len(STAMPS.findall(tail))]
            stamps = list(map(int, found))
            said = sorted(stamps)
            if said != stamps:  # out of order: by how much, at most
                newest = 0
                for stamp in stamps:
                    newest = max(newest, stamp)
                    report.disorder_ns = max(report.disorder_ns, newest - stamp)
            inside = said[bisect_left(said, start) : bisect_left(said, end)]
            if inside:
                report.delivered += len(inside)
                _spread_sorted(report.latency, read_at, inside)
        self.near.clear()


class _BenchClient(asyncio.Protocol):
    """One raw protocol client, driven by callbacks (no stream objects, no task per read)."""

    def __init__(
        self,
        plan: WorkerPlan,
        c: ClientPlan,
        report: WorkerReport,
        window: _Window,
        rng: random.Random,
        checks: bool = False,
    ) -> None:
        self.plan, self.c, self.report, self.window, self.rng = plan, c, report, window, rng
        self.room = c.room.encode()
        # What precedes the seq of a message to the room, and the newest seq read (None
        # until the join's names gives the room's).
        self.seq_mark = MESSAGE + self.room + b'","seq":'
        self.seq: int | None = None
        # A checking client's count of message frames read after the newest stamp, and of
        # the messages on which frames and seqs disagreed (see above).
        self.checks = checks
        self.after = self.off = 0
        self.names_at = -1
        self.kept = b""
        self.joined = False
        self.greeting = b""
        self.refused = False  # its join or hello; the error is counted
        # Answers due: to the join until joined, to each say, to each keep-alive ping. The
        # sum of what follows, kept as one number so that a read tests one attribute.
        self.due = 1
        self.unanswered = 0  # says
        self.pongs_due = 0
        self.ref = 0
        self.last_sent = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.report.connected += 1
        nick = self.c.nick.encode()
        self.transport.write(
            encode_frame(b'{"type":"hello","nick":"%s","version":1,"client":"achat-bench"}' % nick)
            + encode_frame(b'{"type":"join","room":"%s"}' % self.room)
        )
        self.last_sent = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.kept.endswith(FATAL_END) and not self.refused:
            # The server's last word was a fatal error that answered nothing (no ref):
            # sendq_exceeded, a flood cut-off, idle_timeout, server_shutdown...
            self.report.errors += 1
            self._note_code(_code_at(b"", self.kept, len(self.kept)))
        if self.timer is not None:
            self.timer.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
        self.report.closed += 1

    def _write_say(self, now_ns: int | None = None) -> None:
        assert self.transport is not None
        self.transport.write(self._next_say(now_ns))

    def _next_say(self, now_ns: int | None = None) -> bytes:
        """The next ``say`` frame, counted as sent."""
        self.ref += 1
        if now_ns is None:
            now_ns = time.time_ns()
        frame = _say(self.room, self.ref, now_ns)
        self.unanswered += 1
        self.due += 1
        self.last_sent = time.monotonic()
        if self.window.start_ns <= now_ns < self.window.end_ns:
            self.report.sent += 1
        return frame

    def _ping(self, frame: bytes, now: float) -> None:
        """Send the ping ``frame`` and wait for its answer, if still connected."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(frame)
        self.pongs_due += 1
        self.due += 1
        self.last_sent = now

    def drain_ping(self) -> None:
        """Ping, after every say is answered (see _drain)."""
        self._ping(DRAIN_FRAME, time.monotonic())

    def keep_alive(self, now: float) -> None:
        """Ping if nothing was sent for the plan's keep-alive (``now``: the monotonic clock)."""
        if now - self.last_sent >= self.plan.keepalive:
            self._ping(KEEPALIVE_FRAME, now)

    def _tick(self, at: float) -> None:
        # Sends on a fixed schedule (no drift), whatever the loop's lateness. Nothing is
        # said at or after the window's end, on the stamps' clock too: a read counted
        # whole needs no look at its stamps for that edge (see _deliveries).
        if at >= self.window.end or self.transport is None or self.transport.is_closing():
            return
        now_ns = time.time_ns()
        if now_ns >= self.window.end_ns:
            return
        self._write_say(now_ns)
        at += 1.0 / self.c.rate
        self.timer = self.loop.call_at(at, self._tick, at)

    def _fill(self) -> None:
        # One write for all the says the pipeline has room for, as a client that pipelines
        # sends them: one system call here, and reads of many frames at the server.
        window = self.window
        frames: list[bytes] = []
        while self.unanswered < self.plan.pipeline and time.monotonic() < window.end:
            now_ns = time.time_ns()
            if now_ns >= window.end_ns:  # as in _tick
                break
            frames.append(self._next_say(now_ns))
        if frames:
            assert self.transport is not None
            self.transport.write(b"".join(frames))

    def _start_sending(self) -> None:
        if self.plan.pipeline:
            self._fill()
        elif self.c.rate > 0:
            first = self.loop.time() + self.rng.random() / self.c.rate
            self.timer = self.loop.call_at(first, self._tick, first)

    def data_received(self, data: bytes) -> None:
        # The hot path of the generator (once per read, millions of messages a second):
        # a few searches from the two ends of the read, however long it is.
        kept = self.kept
        if self.due:
            self._answers(kept, data)
        last_seq = self.seq
        newest = self._newest(kept, data) if last_seq is not None else None
        if self.checks:
            self._check(kept, data, newest)
        self.kept = data[-KEEP:] if len(data) >= KEEP else (kept + data)[-KEEP:]
        # Nothing newer (a repeat is not: the checking clients see it), or nothing at all.
        if newest is None or last_seq is None or newest[0] <= last_seq:
            return
        self.seq = newest[0]
        self.report.message_reads += 1
        self._deliveries(kept, data, newest[0] - last_seq, newest[1])

    def _newest(self, kept: bytes, data: bytes) -> tuple[int, int, int] | None:
        """The seq and stamp of the newest message whose stamp completed in ``data``
        (``kept`` before it), and where its stamp starts in ``data`` (negative: in
        ``kept``); None if no stamp did whose message's seq can be read."""
        mark = self.seq_mark
        at = data.rfind(STAMP)
        if at >= 0:
            # The common case, with _stamp_at and _seq_before inlined (this runs for every
            # read): the read's last stamp is whole, and its message's seq in the read.
            digits = at + len(STAMP)
            space = data.find(b" ", digits, digits + 21)
            begun = data.rfind(mark, max(0, at - KEEP), at) if space > digits else -1
            if begun >= 0:
                begin = begun + len(mark)
                comma = data.find(b",", begin, min(at, begin + _SEQ_SIZE))
                if comma > begin:
                    try:
                        return int(data[begin:comma]), int(data[digits:space]), at
                    except ValueError:  # not what an achat server writes: the slow way
                        pass
        while at >= 0:
            # A stamp cut off by the read's end, or a message whose seq cannot be read,
            # leaves it to the one before.
            stamp = _stamp_at(data, at)
            if stamp is not None:
                seq = self._seq_at(kept, data, at)
                if seq is not None:
                    return seq, stamp, at
            at = data.rfind(STAMP, 0, at)
        # None completed wholly in data; one begun in the read before may have ended in it.
        stream = kept + data[:_STAMP_SIZE]
        found = None
        for m in STAMPS.finditer(stream, max(0, len(kept) - _STAMP_SIZE)):
            if m.end() > len(kept):
                found = m
        if found is None:
            return None
        seq = _seq_before(stream, found.start(), mark)
        return None if seq is None else (seq, int(found[1]), found.start() - len(kept))

    def _check(self, kept: bytes, data: bytes, newest: tuple[int, int, int] | None) -> None:
        """A checking client's other count: the message frames begun before the newest
        stamp, against what the seqs say were read up to it (0 if it is no newer)."""
        frames = data.count(MESSAGE)
        if data[:1] in _MESSAGE_TAIL:
            # Begun in the read before, so before any stamp completed in this one.
            frames += _straddling(MESSAGE, kept, data)
        if newest is None or self.seq is None:
            self.after += frames
            return
        seq, _, at = newest
        # A frame begun after the stamp's start is after the stamp: no frame overlaps one.
        after = data.count(MESSAGE, at) if at >= 0 else frames
        before = self.after + frames - after
        self.after = after
        self.off += abs(before - max(0, seq - self.seq))

    def unaccounted(self) -> int:
        """For a checking client: messages read that the seqs did not account for, or
        the reverse, compared at each read's newest stamp; and frames read after the
        last stamp compared but one (the stream may end inside a message), as when no
        seq could be read at all."""
        return self.off + max(0, self.after - 1)

    def _deliveries(self, kept: bytes, data: bytes, n: int, last: int) -> None:
        """Count the ``n`` messages whose stamps completed in ``data`` (``kept`` before it)
        that were said in the window; ``last`` is the newest one's stamp.

        The stamps of a read are in the order the server took the says in, which is
        not quite the order they were said in, but out of order by less than NEAR_NS;
        and nothing is said at or after the window's end (:meth:`_tick`). So a read
        whose first and last stamps, whichever is older, are both more than that
        before the window's start was all said before it, and one whose older stamp is
        more than that after the start was all said inside it: either is counted
        whole, by seq, with its messages' latencies spread evenly between the two.

        A read across the start is split by binary searches over its stamps. After a
        stamp said well after the start, everything is inside the window: counted by
        seq. Before one said well before it, nothing is. What lies between, said
        within NEAR_NS of the start, is kept and counted stamp by stamp after the
        window (:meth:`_Window.count_near`), when the worker has nothing else to do:
        read at once, that was a step of Python per stamp for a fifth of a second of
        all the traffic, and the reads it held up were what the latencies measured.
        """
        window = self.window
        start, end = window.start_ns, window.end_ns
        first = last if n == 1 else _first_stamp(kept, data)
        report = self.report
        now_ns = time.time_ns()
        if first is None or max(first, last) >= end:
            # No stamp to go by (not what achat-bench sends), or said after the window
            # (not what it sends either): every stamp is read.
            window.near.append((now_ns, kept[-_STAMP_SIZE:], data))
            return
        if first <= last:
            oldest, newest = first, last
        else:
            oldest, newest = last, first
            report.disorder_ns = max(report.disorder_ns, first - last)
        if newest < start - NEAR_NS:  # said well before the window
            return
        if start + NEAR_NS <= oldest:  # inside it
            report.delivered += n
            window.spread(report, now_ns - newest, now_ns - oldest, n)
            return
        cut, inside = len(data), 0
        if newest >= start + NEAR_NS:
            found = _stamp_after(data, start + NEAR_NS)
            seq = None if found is None else self._seq_at(kept, data, found[0])
            if found is not None and seq is not None and self.seq is not None:
                cut, inside = found[0], self.seq - seq + 1
                report.delivered += inside
                low = now_ns - (last if inside > 1 else found[1])
                window.spread(report, low, now_ns - found[1], inside)
        begin = _end_before(data, cut, start - NEAR_NS) if oldest < start - NEAR_NS else 0
        window.near.append((now_ns, kept[-_STAMP_SIZE:] if begin == 0 else b"", data[begin:cut]))

    def _seq_at(self, kept: bytes, data: bytes, at: int) -> int | None:
        """The seq of the message whose stamp starts at ``at`` of ``data``."""
        seq = _seq_before(data, at, self.seq_mark)
        if seq is None and at < KEEP:  # its message began in the read before
            seq = _seq_before(kept + data[:at], len(kept) + at, self.seq_mark)
        return seq

    def _answers(self, kept: bytes, data: bytes) -> None:
        """Take the answers due that completed in ``data`` (``kept`` before it)."""
        report = self.report
        if not self.joined:
            # The greeting (welcome, joined, names) is kept whole until the room's seq.
            before = len(self.greeting)
            self.greeting += data
            if self.names_at < 0:
                self.names_at = self.greeting.find(NAMES, max(0, before - len(NAMES) + 1))
            names_seq = None
            if self.names_at >= 0:
                # Where the room's seq can be, without searching again what was searched.
                names_seq = NAMES_SEQ.search(self.greeting, max(self.names_at, before - 28))
            if names_seq is not None:
                self.seq = int(names_seq[1])
                self.joined = True
                self.due -= 1
                report.joined += 1
                self.greeting = b""
            elif (
                (at := self.greeting.find(ERROR, max(0, before - KEEP))) >= 0
                and CODE.search(self.greeting, at)
            ) or len(self.greeting) > GREETING_LIMIT:
                # The hello or the join was refused (a fatal hello error: the server
                # closes too, and connection_lost must not count it again), or what
                # came is no greeting this generator can read.
                report.errors += 1
                if at >= 0:
                    self._note_code(_code_at(b"", self.greeting, len(self.greeting)))
                else:
                    self._note_code("no_names_seq")
                self.due = 0  # nothing more to wait for: the client leaves
                self.refused = True
                self.greeting = b""
                assert self.transport is not None
                self.transport.close()
                return
        want = self.unanswered + self.pongs_due
        if not want:
            return
        acks = errors = pongs = refused_pings = 0
        # An answer is taken in the read that brings the character after its REF, which
        # tells a ping's ref from a say's: a REF that ends a read waits for the next one.
        # One begun in the stream before this read: only one ended in it or at its end
        # fits in these edges.
        edge = kept + data[: len(REF) - 1]
        at = edge.find(REF, max(0, len(kept) - len(REF)))
        if at + len(REF) >= len(kept) + len(data):
            at = -1  # this read ends at its end: the next one takes it
        # Where the answer's ref starts in data (negative: in kept); -1 before the first.
        pos = at - len(kept) if at >= 0 else -1
        head = edge[max(0, at - _HEAD_SIZE) : at] if at >= 0 else b""
        while True:
            if head:
                if head.endswith(ACK_HEAD):
                    acks += 1
                elif head.endswith(PONG_HEAD):
                    pongs += 1
                elif head.endswith(ERROR_HEADS):
                    if _answers_a_ping(data, pos):
                        refused_pings += 1
                    else:
                        errors += 1
                    self._note_code(_code_at(kept, data, pos))
            if acks + errors + pongs + refused_pings >= want:
                break
            pos = data.find(REF, max(pos, -1) + 1)
            if pos < 0 or pos + len(REF) >= len(data):
                break
            head = data[pos - _HEAD_SIZE : pos] if pos >= _HEAD_SIZE else kept + data[:pos]
        # An error answers the say it refused, an ack the one it stored; which say is
        # which does not matter here, only how many are still out.
        self.unanswered -= acks + errors
        self.pongs_due -= pongs + refused_pings
        self.due -= acks + errors + pongs + refused_pings
        report.errors += errors + refused_pings
        if acks:
            window = self.window
            if window.start <= time.monotonic() < window.end:
                report.acked += acks
        if self.plan.pipeline and acks + errors:
            self._fill()

    def _note_code(self, code: str) -> None:
        self.report.codes[code] = self.report.codes.get(code, 0) + 1


async def _client(
    plan: WorkerPlan,
    c: ClientPlan,
    report: WorkerReport,
    window: _Window,
    rng: random.Random,
    everyone: list[_BenchClient],
    checks: bool = False,
) -> None:
    loop = asyncio.get_running_loop()
    try:
        transport, client = await loop.create_connection(
            lambda: _BenchClient(plan, c, report, window, rng, checks), plan.host, plan.port
        )
    except OSError:
        report.closed += 1
        return
    everyone.append(client)
    try:
        await client.closed
    finally:
        transport.abort()


#: How often the worker looks for clients quiet for KEEPALIVE_SECONDS.
KEEPALIVE_POLL = 1.0


def connect_pause(begun: float, started: int, rate: float, now: float) -> float:
    """How long to wait before the next connection, ``started`` of them begun at ``begun``.

    On a schedule of ``rate`` a second rather than a gap after each: the loop's timers
    (uvloop's) are whole milliseconds, so a gap under one is no wait at all. Less than
    a millisecond ahead is no wait either (the loop still runs the connections begun).
    """
    ahead = begun + started / rate - now
    return ahead if ahead >= 0.001 else 0.0


def _live(clients: Sequence[_BenchClient]) -> list[_BenchClient]:
    """The clients that joined and are still connected: the ones the drain waits for."""
    return [c for c in clients if c.joined and not c.closed.done()]


def answered(clients: Sequence[_BenchClient]) -> bool:
    """Whether every say of a worker's clients still connected has had its answer. The
    server acks a say once its message is queued for every member of the room, and
    refuses one with an error that delivers nothing."""
    return not any(c.unanswered for c in _live(clients))


def settled(clients: Sequence[_BenchClient]) -> bool:
    """Whether every client still connected has had an answer to everything it sent,
    the drain's ping included (see _drain)."""
    return not any(c.due for c in _live(clients))


async def _drain(clients: Sequence[_BenchClient], pipe: Connection, deadline: float) -> bool:
    """Wait until every message said by any worker's clients has been read by this
    worker's clients still connected (False if ``deadline``, monotonic, came first).
    A say whose client was cut off before its answer came is not waited for: its
    message may come after the drain (the run then notes the connections lost).

    A server writes a connection's frames in the order it queued them. Once every say
    of every worker is answered, each message is queued for every member it goes to
    (:func:`answered`; the parent tells the workers, being the only one that knows
    them all), so the answer to a ping sent after that comes after every message:
    once each client has it (:func:`settled`), nothing is on the way. A quiet spell
    would not do: a server stalled for longer than the spell would have messages on
    the way still.
    """

    async def until(condition: Callable[[], bool]) -> bool:
        """Look every DRAIN_STEP until ``condition()``; False if the deadline comes first."""
        while not condition():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_STEP)
        return True

    if not await until(lambda: answered(clients)):
        return False
    pipe.send(("answered",))
    # The parent's word that every worker's says are answered.
    if not await until(pipe.poll):
        return False
    pipe.recv()
    for client in _live(clients):
        client.drain_ping()
    return await until(lambda: settled(clients))


async def _keep_alive(everyone: list[_BenchClient], every: float = KEEPALIVE_POLL) -> None:
    """Every ``every`` seconds, have each client that said nothing for a while ping."""
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for client in everyone:
            client.keep_alive(now)


async def _worker(plan: WorkerPlan, pipe: Connection) -> None:
    report = WorkerReport(cpu=plan.cpu)
    window = _Window()
    rng = random.Random(plan.seed)
    started = time.monotonic()
    everyone: list[_BenchClient] = []
    every = min(KEEPALIVE_POLL, plan.keepalive / 4)
    tasks = [asyncio.create_task(_keep_alive(everyone, every))]
    loop = asyncio.get_running_loop()
    begun = loop.time()
    for i, c in enumerate(plan.clients):
        checks = i % CHECK_EVERY == 0
        tasks.append(asyncio.create_task(_client(plan, c, report, window, rng, everyone, checks)))
        await asyncio.sleep(connect_pause(begun, i + 1, plan.connect_rate, loop.time()))
    while report.joined + report.closed < len(plan.clients):
        await asyncio.sleep(0.01)
        if time.monotonic() - started > 60:
            break
    report.connect_seconds = time.monotonic() - started
    pipe.send(("joined", report.joined, report.connect_seconds))
    # The generator's own garbage collector would pause every client of the worker at
    # once and show up as server latency: what it allocates from here on is acyclic.
    gc.collect()
    gc.freeze()
    gc.disable()
    # Wait for the parent's go: one start time for every worker, so that a message sent
    # inside the window by one worker is counted inside it by the others.
    _, go_at, wall = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    window.open(go_at + plan.warmup, plan.duration, wall)
    # Everyone starts saying things once the whole room is there (a join storm under a
    # room's full traffic is not what the scenarios measure); the warm-up settles it.
    for client in everyone:
        if client.joined:
            client._start_sending()
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    cpu_start, wall_start = time.process_time(), time.monotonic()
    while time.monotonic() < window.end:
        await asyncio.sleep(min(1.0, max(0.0, window.end - time.monotonic())))
        elapsed = min(time.monotonic(), window.end) - window.start
        pipe.send(("tick", report.sent, report.delivered, report.acked, report.errors, elapsed))
    report.cpu_seconds = time.process_time() - cpu_start
    report.window_seconds = time.monotonic() - wall_start
    # Nothing is said after the window: wait until what was said inside it has been read
    # (a message read later, or never, is missing from the delivered ratio).
    if plan.drain:
        report.drained = await _drain(everyone, pipe, time.monotonic() + DRAIN_SECONDS)
    window.settle(report)
    checking = [client for client in everyone if client.checks]
    report.checked = len(checking)
    report.unaccounted = sum(client.unaccounted() for client in checking)
    report.done = True
    pipe.send(("done", report))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(plan: WorkerPlan, pipe: Connection) -> None:
    """Entry point of a worker process."""
    if plan.cpu is not None:
        try:
            os.sched_setaffinity(0, {plan.cpu})
        except (OSError, AttributeError):
            plan = dataclasses.replace(plan, cpu=None)  # not pinned: its CPU is its own
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The parent may have gone (interrupted run): then there is nobody to report to.
    with contextlib.suppress(BrokenPipeError, EOFError, ConnectionResetError, KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(_worker(plan, pipe))
        except ImportError:
            asyncio.run(_worker(plan, pipe))
