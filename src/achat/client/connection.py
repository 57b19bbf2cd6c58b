"""The public async client API: connect, send frames, iterate over what the server says.

A :class:`Client` opens one TCP connection, says ``hello`` and waits for
``welcome``. A supervisor task then reads and decodes every frame (the server
is treated as untrusted: a bad frame is dropped and reported as a
:class:`LocalNotice`, never raised into the caller) and puts it on the queue
that :meth:`Client.events` iterates. Replies that echo a ``ref`` also resolve
the future of :meth:`Client.request`.

Theory of operation of reconnecting (``reconnect=True``): the client
remembers the rooms it is in with the last ``seq`` it saw in each, and, in
the order it sent them, every frame with a ``ref`` still waiting for its
answer (a ``join`` or ``part`` is given one if it has none): ``say`` and
``dm`` until acked, ``join``, ``part`` and the questions (``who``,
``rooms``, ``history``) until answered. When the connection drops it emits
:class:`ConnectionLost`, waits (exponential backoff with random jitter,
capped), connects again as the same nick, re-joins each room with
``since`` = last ``seq`` seen (or a pending join's lower ``since``), and
sends those frames again in their order, each with its original ``ref`` —
the server answers a repeated message with
the original ``ack`` instead of storing it twice. Messages whose ``seq`` the
client has already delivered are dropped, so each message reaches the caller
exactly once and in order. Frames sent while offline (before the first
connection too) wait and go out once connected. A server whose ``welcome``
gives another ``history_id`` than the last one numbers its rooms anew (it
lost its messages): each room with a known place is re-joined with ``since``
0 instead, and a ``history`` question by seq is answered with a non-fatal
``unavailable`` error whose message is ``HISTORY_LOST``.

Flood control: every frame goes out through the client's own token bucket
(:class:`SendBudget`), as IRC clients pace their lines: ``PACE_SHARE`` of
the flood limit the server announces in ``welcome``, on each connection
(:func:`pace_under`), or ``SEND_BURST`` at once, then ``SEND_RATE`` a
second (under the default limit) from a server that announces none, or
the pace the caller gave. While pacing, nothing more is written while a
kept frame waits for its answer (at most ``ANSWER_WAIT``). Frames beyond
the budget wait, in order; a resume is one such queue. Should a server
still refuse a kept frame with ``rate_limited``, the client halves its pace and sends that
frame again before anything else; since it was the only one in flight,
nothing overtook it, whatever the round trip. A busy server's refusal says
when to send again (``retry_after``): the client sends the frame then, at
the pace it had, for it was not sending too fast. The caller sees its eventual
answer, not the refusal. ``close()`` lets what waits go out, and the
messages be acked, for up to ``CLOSE_PACING_WAIT``; a request that times
out before it was ever written is not sent at all.

Example::

    async with Client("127.0.0.1", 7777, "bot") as client:
        await client.join("ops")
        await client.say("ops", "deploy finished")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TypeGuard

import msgspec

from ..errors import ConnectionClosed, FrameError, ProtocolError, ServerError
from ..protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder
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
    Joined,
    Message,
    Names,
    Nick,
    Part,
    Parted,
    Ping,
    Pong,
    PongReply,
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
from ..protocol.names import nick_key

__all__ = [
    "Backoff",
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "LocalNotice",
    "Reconnected",
    "SendBudget",
]

log = logging.getLogger("achat.client")

#: The largest frame the client accepts whatever the server announces.
CLIENT_FRAME_CAP = 16 * 1024 * 1024
#: Most bytes read and decoded at once: about 450 messages, 3 ms of decoding on a slow
#: host, so that a burst does not hold the loop (and the keyboard) for long.
READ_CHUNK = 64 * 1024
#: The share of the server's flood limit the client paces itself to, for the jitter of
#: the network: frames sent at even intervals may arrive closer together.
PACE_SHARE = 0.8
#: The client's own flood limit when the server does not announce one in ``welcome``:
#: this many frames at once, then SEND_RATE a second, PACE_SHARE of the server's
#: default (10 at once, 5 a second), which refuses the rest.
SEND_BURST = 8
SEND_RATE = 4.0
#: The message of the ``unavailable`` error the client answers a ``history`` question by seq
#: with, when the server turns out to have numbered its messages anew (see ``_renumber``).
HISTORY_LOST = "the server has lost its messages: the history asked for is gone"
#: Bounds on a pace taken from what a server announces (beyond them, no pacing is felt).
MAX_PACE_BURST = 10_000
MAX_PACE_RATE = 1e6
#: The slowest the client goes after a stricter server refused it again and again.
SLOWEST_RATE = 0.1
#: While pacing, a kept frame waits this long at most for the answer to the one before it.
ANSWER_WAIT = 5.0
#: The longest a busy server's ``retry_after`` holds the client back (a hostile or broken
#: server could ask for hours).
MAX_RETRY_AFTER = 10.0
#: Longest ``close()`` waits for queued frames to go out and messages to be acked.
CLOSE_PACING_WAIT = 5.0

_REPLY_TYPES = (Ack, Error, Names, History, Rooms, Pong)
# Kept until answered, and sent again after a reconnect or a flood refusal: messages
# until acked (the server knows a repeated ref), and joins, parts and questions, which
# a new connection needs as much as the lost one did.
_KEPT = (Say, Dm, Join, Part, Who, RoomsRequest, HistoryRequest)
# Refusals after which connecting again as the same user cannot help.
_HOPELESS = frozenset({"invalid_nick", "bad_password", "unsupported_version"})


class Disconnected(msgspec.Struct, frozen=True):
    """Event: the connection ended for good; ``reason`` says why in plain words. Always last."""

    reason: str


class ConnectionLost(msgspec.Struct, frozen=True):
    """Event: the connection dropped; the client is trying again (``reconnect=True``)."""

    reason: str
    retry_in: float


class Reconnected(msgspec.Struct, frozen=True):
    """Event: connected again; rooms are being re-joined and unacked messages resent."""

    welcome: Welcome
    resent: int


class LocalNotice(msgspec.Struct, frozen=True):
    """Event: something the client noticed itself (a frame from the server it refused)."""

    text: str


Event = ServerFrame | Disconnected | ConnectionLost | Reconnected | LocalNotice


class SendBudget:
    """A token bucket for what the client sends, which slows down when the server refuses.

    Pure: every method takes ``now`` (seconds, monotonic). ``take`` spends a
    token if there is one; ``wait`` says how long until there is. A ``rate``
    of 0 is no limit (for a server run with its flood limit off). After a
    ``rate_limited`` refusal, ``slow_down`` halves the rate (no limit becomes
    ``SEND_RATE``) and the burst and empties the bucket, at most once per new
    interval between frames: a refusal usually comes with those of the frames
    written right after it, and they are one episode, while the next frame
    goes out one interval after the slow-down. After a busy server's refusal,
    ``defer`` holds everything back until the time it gave, at the same pace.
    """

    __slots__ = ("_not_before", "_slowed", "_tokens", "_updated", "burst", "rate")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        if burst < 1 or not 0 <= rate < math.inf:
            raise ValueError("the send budget needs a burst of at least 1 and a rate of 0 or more")
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._updated = now
        self._slowed = -math.inf
        self._not_before = -math.inf

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._updated = max(self._updated, now)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)

    def take(self, now: float) -> bool:
        """Spend one token; False (and nothing spent) when there is none yet."""
        if now < self._not_before:
            return False
        if not self.rate:
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until ``take`` succeeds (0 when it would now)."""
        deferred = max(0.0, self._not_before - now)
        if not self.rate:
            return deferred
        self._refill(now)
        return max(deferred, (1.0 - self._tokens) / self.rate)

    def defer(self, until: float) -> None:
        """Send nothing before ``until`` (a busy server said when to send again), at the
        same pace after it."""
        self._not_before = max(self._not_before, until)

    def fill(self, now: float) -> None:
        """A whole burst again: a new connection starts with the server's bucket full."""
        self._tokens = float(self.burst)
        self._updated = now

    def restart(self, burst: int, rate: float, now: float) -> None:
        """A new pace, with a whole burst to spend: a new connection, the server's bucket full."""
        if burst < 1 or not 0 <= rate < math.inf:
            raise ValueError("the send budget needs a burst of at least 1 and a rate of 0 or more")
        self.burst = burst
        self.rate = rate
        self._slowed = -math.inf
        self._not_before = -math.inf
        self.fill(now)

    def spend(self, now: float) -> None:
        """Count a frame that goes whether or not there is a token (an answer the server
        waits for): into debt if need be, at most a burst's worth, so that what follows
        waits for the tokens the server's bucket will have, rather than be refused."""
        if self.rate:
            self._refill(now)
            self._tokens = max(-float(self.burst), self._tokens - 1.0)

    def slow_down(self, now: float) -> bool:
        """Halve the pace after a refusal; False if the refusal is of the same episode."""
        if self.rate and now - self._slowed < 1.0 / self.rate:
            return False
        self._slowed = now
        self.rate = min(self.rate, max(SLOWEST_RATE, self.rate / 2)) if self.rate else SEND_RATE
        self.burst = max(1, self.burst // 2)
        self._tokens = 0.0
        self._updated = now
        return True


def _retry_after(error: Error) -> float | None:
    """The wait a busy server's refusal asks for, within reason (None: it asks none, or
    one that makes no sense)."""
    wait = error.retry_after
    if wait is None or not 0 <= wait < math.inf:
        return None
    return min(wait, MAX_RETRY_AFTER)


def pace_under(welcome: Welcome) -> tuple[int, float] | None:
    """The burst and rate a client keeps to under the flood limit ``welcome`` announces.

    ``PACE_SHARE`` of the server's burst (at least one frame) and of its rate
    (0, no limit, stays 0). None when it announces none the client can use:
    both figures must be numbers, the rate 0 or more and the burst 1 or more.
    """
    rate, burst = welcome.send_rate, welcome.send_burst
    if not (_is_number(rate) and _is_number(burst) and rate >= 0 and burst >= 1):
        return None
    return (
        max(1, min(int(burst * PACE_SHARE), MAX_PACE_BURST)),
        min(rate * PACE_SHARE, MAX_PACE_RATE),
    )


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Backoff(msgspec.Struct):
    """Exponential backoff with full jitter: ``uniform(initial, min(cap, initial * 2**n))``."""

    initial: float = 0.25
    cap: float = 10.0
    rng: random.Random | None = None

    def delay(self, attempt: int) -> float:
        rng = self.rng or random
        ceiling = min(self.cap, self.initial * (2 ** min(attempt, 30)))
        return rng.uniform(self.initial, max(self.initial, ceiling))


class Client:
    """One user's connection to an achat server."""

    def __init__(
        self,
        host: str,
        port: int,
        nick: str,
        *,
        password: str | None = None,
        client_name: str = "achat",
        connect_timeout: float = 10.0,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        keepalive: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        send_burst: int | None = None,
        send_rate: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.nick = nick
        self.password = password
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.keepalive = keepalive
        self.clock = clock
        #: The client's own flood control (see the module's docstring): a pace given here
        #: is kept; without one, each connection paces under what its server announces.
        self.budget = SendBudget(
            SEND_BURST if send_burst is None else send_burst,
            SEND_RATE if send_rate is None else send_rate,
            clock(),
        )
        self._own_pace = send_burst is not None or send_rate is not None
        # The pace of a connection whose welcome announces no flood limit (or of every one,
        # when the caller gave one): slowed down by the refusals of such connections, as
        # the next is likely to the same server, with the same limit.
        self._quiet_pace = (self.budget.burst, self.budget.rate)
        # True while the connection's pace is the one its welcome announced.
        self._announced = False
        # The id of the server's numbering of messages, from the last welcome that gave
        # one; and whether this connection's differs (its rooms start again from 1).
        self._history_id: str | None = None
        self._renumbered = False
        self.welcome: Welcome | None = None
        #: Rooms joined, with the ``seq`` after which messages are delivered in each: the
        #: last one delivered, or where a join put the room (None until known).
        self.rooms: dict[str, int | None] = {}
        # Frames with a ref sent (or queued while offline) and not answered yet, in the
        # order they were sent: say and dm until acked, join, part and the questions
        # (who, rooms, history) until answered. A reconnect sends them again, in that
        # order, so a line typed before a /part still reaches its room.
        self._outbox: dict[str, ClientFrame] = {}
        # Frames waiting for their turn, in order: each frame's bytes, its ref (if any),
        # and whether it is kept in the outbox (if not, it is lost if the connection drops).
        self._paced: deque[tuple[bytes, str | None, bool]] = deque()
        # The refs of the frames in _paced, and of those that are not to go after all
        # (given up by their callers, or answered meanwhile): skipped when their turn comes.
        self._queued: set[str] = set()
        self._given_up: set[str] = set()
        # The kept frames written on this connection and not answered yet.
        self._written: set[str] = set()
        # Set (and replaced) whenever a kept frame is answered or the pacer stops.
        self._answered = asyncio.Event()
        # Refs written on any connection and not answered: a resume sends them again,
        # and a timeout does not unsend them (the server may have them).
        self._sent: set[str] = set()
        # Of those, the refs written on an earlier connection (the server may have them).
        self._carried: set[str] = set()
        # The refs of the re-joins the last resume sent (reused joins included): they go
        # whatever their callers do, until answered.
        self._rejoining: set[str] = set()
        # The room and since of each join with one whose names has not come yet (given up
        # by its caller or not: the server may have it): a room none of whose messages
        # the client has had is delivered from there (the backlog follows the names).
        self._join_since: dict[str, tuple[str, int]] = {}
        # The rooms whose seq in `rooms` is where a join's names put them (its seq, or the
        # join's since): no message of theirs delivered since, so a join since may start
        # them earlier.
        self._seq_from_names: set[str] = set()
        # Events that follow the frame being delivered (a re-join refused: the room left).
        self._follow: list[Event] = []
        self._close_requested = asyncio.Event()
        self._pacer: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._online = False
        self._closing = False
        self._ended = False  # Disconnected: nothing more is sent or kept
        self._supervisor: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[ServerFrame]] = {}
        self._refs = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._last_sent = 0.0
        self._last_heard = 0.0

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
        """True while a connection is up and registered."""
        return self._online

    async def connect(self) -> Welcome:
        """Connect, say ``hello`` and return the ``welcome``; then keep reading in the background.

        Raises :class:`ServerError` when the server refuses (``nick_taken``,
        ``invalid_nick`` …) and :class:`ConnectionClosed` when it cannot be
        reached; the first connection is never retried, so a typo fails fast.
        A client connects once (with ``reconnect`` it connects again by itself):
        after :class:`Disconnected`, make a new one.
        """
        if self._supervisor is not None or self._closing:
            raise RuntimeError("this client has connected or closed before: make a new Client")
        reader, writer, decoder, rest = await self._open()
        self._go_online(writer)
        if self._outbox:
            self._resume()  # what was asked before connecting (with reconnect) goes now
        for body in rest:
            self._deliver_body(body)
        self._supervisor = asyncio.create_task(self._supervise(reader, decoder))
        assert self.welcome is not None
        return self.welcome

    async def _open(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder, list[bytes]]:
        """Connect, say hello, wait for welcome; the caller puts the connection in use."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionClosed(f"cannot reach {self.host}:{self.port}: {exc}") from None
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
                first, rest = await self._read_first(reader, decoder)
        except (TimeoutError, ConnectionClosed, OSError) as exc:
            writer.transport.abort()
            raise ConnectionClosed(f"no welcome from the server: {exc}") from None
        except ProtocolError as exc:
            writer.transport.abort()
            raise ConnectionClosed(f"the server answered hello with a bad frame: {exc}") from None
        except asyncio.CancelledError:
            writer.transport.abort()  # close() while waiting for welcome
            raise
        if isinstance(first, Error):
            writer.transport.abort()
            raise ServerError(first.code, first.message, fatal=True)
        if not isinstance(first, Welcome):
            writer.transport.abort()
            raise ConnectionClosed(f"the server answered hello with {type(first).__name__}")
        self.welcome = first
        self.nick = first.nick
        decoder.max_frame = min(max(first.max_frame, DEFAULT_MAX_FRAME), CLIENT_FRAME_CAP)
        return reader, writer, decoder, rest

    def _go_online(self, writer: asyncio.StreamWriter) -> None:
        """Use the connection ``_open`` made."""
        self._writer = writer
        self._online = True
        self._last_heard = self._last_sent = self.clock()
        self._start_pace()
        history_id = self.welcome.history_id if self.welcome is not None else None
        if isinstance(history_id, str):
            self._renumbered = self._history_id not in (None, history_id)
            self._history_id = history_id

    def _start_pace(self) -> None:
        """A new connection, whose server has its bucket full: the pace its welcome
        announces, or the client's own (see ``_quiet_pace``), with a whole burst."""
        welcome = self.welcome
        pace = None if self._own_pace or welcome is None else pace_under(welcome)
        self._announced = pace is not None
        burst, rate = pace or self._quiet_pace
        self.budget.restart(burst, rate, self.clock())

    def _slow_down(self) -> bool:
        """Halve the pace after a refusal; False if the refusal is of the same episode."""
        slowed = self.budget.slow_down(self.clock())
        if slowed and not self._announced:
            self._quiet_pace = (self.budget.burst, self.budget.rate)
        return slowed

    @staticmethod
    async def _read_first(
        reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> tuple[ServerFrame, list[bytes]]:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                raise ConnectionClosed("the server closed the connection")
            try:
                bodies = decoder.receive_data(data)
            except FrameError as exc:
                raise ConnectionClosed(f"bad frame from the server: {exc}") from None
            if bodies:
                return decode_server(bodies[0]), bodies[1:]

    # -- sending --------------------------------------------------------------

    def new_ref(self) -> str:
        """A fresh ``ref``, unique for this client object."""
        return next(self._refs)

    def send(self, frame: ClientFrame) -> None:
        """Send ``frame`` as soon as the send budget allows, in order; offline, keep or refuse it.

        ``say``, ``dm``, ``join``, ``part`` and the questions with a ``ref``
        are kept until answered, and sent again after a reconnect or a flood
        refusal. Offline, with ``reconnect``, a kept frame waits for the
        connection. Raises :class:`ConnectionClosed` when the frame cannot
        be sent or kept, and ``ValueError`` when it cannot be encoded (a lone
        surrogate in a text): then nothing is kept or sent. A ``join`` or ``part``
        without a ``ref`` is given one: where the client is depends on their answers.
        """
        if isinstance(frame, Join | Part) and not frame.ref:
            frame = msgspec.structs.replace(frame, ref=self.new_ref())
        data = encode(frame)
        ref = (frame.ref if isinstance(frame, _KEPT) else None) or None
        online = self._online and self._writer is not None
        if not online and not (self.reconnect and not self._closing and not self._ended):
            raise ConnectionClosed("not connected")
        if isinstance(frame, Join) and frame.since is not None and ref is not None:
            self._join_since[ref] = (frame.room, frame.since)  # used by its names (_place)
        if ref is not None:
            self._outbox[ref] = frame  # offline, it goes with the resend after reconnecting
        if online:
            self._emit(data, getattr(frame, "ref", None) or None, kept=ref is not None)
        elif ref is None:
            raise ConnectionClosed("not connected")

    @property
    def queued(self) -> int:
        """How many frames wait for their turn (the client's own flood limit)."""
        return len(self._paced) - len(self._given_up)

    def _may_write(self) -> bool:
        """While pacing, a frame goes only once the kept frame before it is answered."""
        return not self.budget.rate or not self._written

    def _emit(self, data: bytes, ref: str | None, *, kept: bool) -> None:
        """Write ``data`` now if its turn has come; else queue it, in order.

        ``ref`` is the frame's ref if it has one; ``kept`` says whether it is in
        the outbox (answered or sent again after a reconnect).
        """
        if not self._paced and self._may_write() and self.budget.take(self.clock()):
            self._write_bytes(data)
            self._wrote(ref, kept=kept)
            return
        self._paced.append((data, ref, kept))
        if ref is not None:
            self._queued.add(ref)
        self._start_pacer()

    def _wrote(self, ref: str | None, *, kept: bool) -> None:
        """A frame went out: a kept one is now answered on this connection or resent."""
        if kept and ref is not None:
            self._written.add(ref)
            self._sent.add(ref)

    def _start_pacer(self) -> None:
        if self._pacer is None:
            self._pacer = asyncio.get_running_loop().create_task(self._pace())

    def _write_bytes(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        self._last_sent = self.clock()

    def _answer_ping(self, ref: str | None) -> None:
        """Answer the server's ``ping`` at once: it waits for the ``pong``.

        The server counts it like any frame, and so does the budget, into debt
        if there is no token: what waits for its turn waits that much longer,
        and is not refused for a token the pong took.
        """
        self.budget.spend(self.clock())
        self._write_bytes(encode(PongReply(ref=ref)))

    async def _pace(self) -> None:
        """Write the queued frames in order, each when its turn comes; stop when offline.

        A frame waits for the answer to the kept frame written before it (at
        most ``ANSWER_WAIT``: then it stops waiting for that one), then for a
        token. A refused frame goes again before anything else, and nothing
        overtakes it, whatever the round trip.
        """
        try:
            while self._paced:
                head = self._paced[0]
                if head[1] in self._given_up:
                    self._paced.popleft()  # its caller gave up, or it was answered, meanwhile
                    self._given_up.discard(head[1])
                    self._queued.discard(head[1])
                    continue
                if not self._may_write():
                    answered = self._answered
                    try:
                        async with asyncio.timeout(ANSWER_WAIT):
                            await answered.wait()
                    except TimeoutError:
                        self._written.clear()  # no answer: order no longer against them
                    if not self._online:
                        break
                    continue
                await asyncio.sleep(self.budget.wait(self.clock()))
                if not self._online or self._writer is None:
                    break
                if not self._paced or self._paced[0] is not head or head[1] in self._given_up:
                    continue  # the queue changed meanwhile (a refusal, a timeout)
                if not self._may_write():
                    continue
                if not self.budget.take(self.clock()):
                    continue
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    # uvloop: RuntimeError when a reset closed the transport just now
                    self._write_bytes(head[0])
                    self._paced.popleft()
                    if head[1] is not None:
                        self._queued.discard(head[1])
                    self._wrote(head[1], kept=head[2])
                    continue
                break
        finally:
            if self._pacer is asyncio.current_task():  # not stopped for a newer resume
                self._pacer = None
                self._drop_queue("the connection was lost")
            self._changed()

    def _changed(self) -> None:
        """Wake whoever waits for an answer or for the queue (the pacer, ``close``)."""
        self._answered.set()
        self._answered = asyncio.Event()

    def _settle(self, ref: str) -> None:
        """``ref`` is answered: it leaves the outbox, and the next kept frame may go."""
        self._written.discard(ref)
        self._sent.discard(ref)
        self._carried.discard(ref)
        self._rejoining.discard(ref)
        if ref in self._queued:
            self._given_up.add(ref)  # still in the queue: skipped there, not counted
        if self._outbox.pop(ref, None) is not None:
            self._changed()

    def _give_up(self, ref: str) -> bool:
        """The caller of ``ref`` stopped waiting: True if it was never written on any
        connection, and then it is not sent (skipped in the queue, or kept offline)."""
        if ref in self._sent or ref in self._given_up:
            return False
        if ref in self._queued:
            self._given_up.add(ref)
            return True
        return ref in self._outbox  # kept while offline

    def _drop_queue(self, why: str) -> None:
        """Forget what waits to be sent; what is in the outbox goes with the next resume."""
        lost = sum(
            not kept and not (ref is not None and ref in self._given_up)
            for _, ref, kept in self._paced
        )
        self._paced.clear()
        self._queued.clear()
        self._given_up.clear()
        if lost:
            self._events.put_nowait(LocalNotice(f"{lost} command(s) not sent: {why}"))

    def _send_again(self, ref: str, retry_after: float | None = None) -> None:
        """A stricter server refused the kept frame ``ref``: slow down and queue it again;
        or, after a busy server's refusal (``retry_after``), send it again that much
        later at the same pace.

        It goes ahead of the frames that were never written, among any other
        refused ones in the order they were first sent. (While pacing, it was the
        only kept frame in flight, so it simply goes first.)
        """
        self._written.discard(ref)
        if ref not in self._carried:
            self._sent.discard(ref)  # refused, and no earlier connection has a copy
        order = {kept: at for at, kept in enumerate(self._outbox)}
        mine = order[ref]
        if retry_after is not None:
            self.budget.defer(self.clock() + retry_after)
        elif self._slow_down():
            self._events.put_nowait(
                LocalNotice(
                    "the server refused a frame for sending too fast: sending it again, "
                    f"now at most {self.budget.rate:g} a second"
                )
            )
        paced = self._paced
        at = 0
        while at < len(paced) and paced[at][2] and order.get(paced[at][1] or "", mine) < mine:
            at += 1
        paced.insert(at, (encode(self._outbox[ref]), ref, True))
        self._queued.add(ref)
        self._start_pacer()
        self._changed()  # no longer in flight

    async def _wait_for_sending(self, timeout: float) -> None:
        """Until nothing waits to be sent and the messages sent are acked (at most ``timeout``)."""
        try:
            async with asyncio.timeout(timeout):
                while self._online and (self.queued or self._unacked_written()):
                    await self._answered.wait()
        except TimeoutError:
            pass

    def _unacked_written(self) -> bool:
        return any(isinstance(self._outbox.get(ref), Say | Dm) for ref in self._written)

    def _stop_pacing(self, why: str = "the connection was lost") -> None:
        pacer, self._pacer = self._pacer, None
        self._drop_queue(why)
        if pacer is not None:
            pacer.cancel()

    @property
    def unacked(self) -> dict[str, Say | Dm]:
        """``say``/``dm`` frames sent (or queued) and not acknowledged yet, in send order."""
        return {ref: f for ref, f in self._outbox.items() if isinstance(f, Say | Dm)}

    @property
    def pending(self) -> int:
        """How many sent messages wait for their ``ack``."""
        return sum(isinstance(f, Say | Dm) for f in self._outbox.values())

    async def request(self, frame: ClientFrame, timeout: float = 30.0) -> ServerFrame:
        """Send ``frame`` (which must carry a ``ref``) and return the server's direct reply.

        Raises :class:`ServerError` if the reply is an ``error`` (other than
        ``history_gap``), :class:`ConnectionClosed` if the connection ends
        first (without ``reconnect``), and :class:`TimeoutError`.
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
        except TimeoutError:
            if ref in self._rejoining:
                raise  # its room's re-join: it goes, and its names settles it
            if self._give_up(ref):  # never written: a timeout means not sent
                self._join_since.pop(ref, None)
                self._settle(ref)
            elif not isinstance(frame, Say | Dm):
                self._settle(ref)  # its caller gave up: not asked again
            raise
        finally:
            self._pending.pop(ref, None)
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message, fatal=reply.fatal, ref=reply.ref)
        return reply

    def _forget_room(self, room: str) -> None:
        """The client is not in ``room`` (any more)."""
        self.rooms.pop(room, None)
        self._seq_from_names.discard(room)

    def _refused(self, ref: str) -> None:
        """The server refused the frame ``ref`` for good (the error is not fatal, and the
        frame is not sent again). A refused re-join: the new connection is in no room, so
        the client has left that room, and says so after the error."""
        self._join_since.pop(ref, None)
        frame = self._outbox.get(ref)
        if isinstance(frame, Join) and ref in self._rejoining and frame.room in self.rooms:
            self._forget_room(frame.room)
            now = int(time.time() * 1000)
            self._follow.append(Parted(room=frame.room, nick=self.nick, ts=now))

    def say_frame(self, room: str, text: str) -> Say:
        return Say(room=room, text=text, ref=self.new_ref())

    async def join(self, room: str, since: int | None = None) -> Names:
        """Join ``room``; returns its ``names``.

        With ``since``, the messages stored after it follow as events, unless messages
        of a room the client is in already have reached the caller since it joined:
        then none is delivered twice or out of order.
        """
        reply = await self.request(Join(room=room, since=since, ref=self.new_ref()))
        assert isinstance(reply, Names)
        return reply

    async def part(self, room: str, reason: str | None = None) -> None:
        self.send(Part(room=room, reason=reason, ref=self.new_ref()))

    async def say(self, room: str, text: str, timeout: float = 30.0) -> Ack:
        """Send a message and wait until the server has stored it."""
        reply = await self.request(self.say_frame(room, text), timeout)
        assert isinstance(reply, Ack)
        return reply

    async def dm(self, to: str, text: str, timeout: float = 30.0) -> Ack:
        """Send a direct message and wait until the server has stored it."""
        reply = await self.request(Dm(to=to, text=text, ref=self.new_ref()), timeout)
        assert isinstance(reply, Ack)
        return reply

    async def who(self, room: str) -> Names:
        reply = await self.request(Who(room=room, ref=self.new_ref()))
        assert isinstance(reply, Names)
        return reply

    async def rooms_list(self) -> Rooms:
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
        """Say ``bye`` (if connected), let the server close, and stop reconnecting. Idempotent.

        On a client that never connected, what waits for the connection fails with
        :class:`ConnectionClosed`, and the events end with :class:`Disconnected`.
        """
        self._closing = True
        self._close_requested.set()
        await self._wait_for_sending(CLOSE_PACING_WAIT)
        self._stop_pacing("closing")
        writer = self._writer
        if writer is not None and self._online and not writer.is_closing():
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode(Bye(reason=reason)))
        self._online = False  # nothing goes out after bye, and a late refusal is not retried
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            try:
                async with asyncio.timeout(2):
                    await asyncio.shield(supervisor)
            except TimeoutError:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        if supervisor is None and not self._ended:
            # Never connected: what waits for a connection is over, and so are the events.
            self._ended = True
            self._fail_pending(ConnectionClosed("closed"))
            self._events.put_nowait(Disconnected("closed"))

    def _fail_pending(self, error: ConnectionClosed) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    # -- receiving ------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, ending with one :class:`Disconnected`."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Disconnected):
                return

    def received(self) -> list[Event]:
        """The events received and not taken yet, without waiting (what close() left)."""
        events: list[Event] = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event (for tests and simple bots)."""
        async with asyncio.timeout(timeout):
            return await self._events.get()

    async def _supervise(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> None:
        """Read until the connection ends; with ``reconnect``, connect again and resume."""
        reason = "the server closed the connection"
        try:
            while True:
                reason = await self._read_until_lost(reader, decoder)
                self._online = False
                self._changed()  # close() may be waiting for an ack that will not come
                if self._writer is not None:
                    self._writer.transport.abort()
                if self._closing or not self.reconnect:
                    break
                opened = await self._reconnect(reason)
                if opened is None:  # only when closing
                    reason = "closed"
                    break
                reader, decoder = opened
        except _Hopeless as exc:
            reason = str(exc)
        finally:
            self._online = False
            self._ended = True
            self._stop_pacing()  # its notice comes before Disconnected, which is last
            if self._closing and self.pending:
                self._events.put_nowait(
                    LocalNotice(
                        f"{self.pending} message(s) not acknowledged by the server before closing"
                    )
                )
            if self._writer is not None:
                self._writer.close()
            self._fail_pending(ConnectionClosed(reason))
            self._events.put_nowait(Disconnected(reason))

    async def _read_until_lost(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> str:
        keepalive = asyncio.create_task(self._keepalive())
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    return "the server closed the connection"
                self._last_heard = self.clock()
                try:
                    bodies = decoder.receive_data(data)
                except FrameError as exc:
                    for body in exc.frames:
                        self._deliver_body(body)
                    return f"the server sent a broken frame ({exc.message})"
                for body in bodies:
                    self._deliver_body(body)
        except (ConnectionError, OSError) as exc:
            return f"connection lost: {exc}"
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _keepalive(self) -> None:
        """Ping when we have been quiet; drop a connection that has gone silent.

        A ping takes a token, and without one skips its turn: a frame waiting
        for the token ends the silence when it comes (or the server, which
        pings a quiet client, keeps the connection up); a ping into debt would
        only put that frame off, and past the server's limit be refused. The server
        is given twice the longer of the keepalive interval and the pace's
        interval to say something, before the connection is taken for dead.
        """
        interval = self.keepalive
        while True:
            await asyncio.sleep(interval / 3)
            now = self.clock()
            rate = self.budget.rate
            patience = 2 * max(interval, 1 / rate if rate else 0.0)
            if now - self._last_heard > patience and self._writer is not None:
                log.info("no answer from the server for %.0f s; dropping", now - self._last_heard)
                self._writer.transport.abort()
                return
            if self._online and now - self._last_sent >= interval and self.budget.take(now):
                with contextlib.suppress(ConnectionError, OSError):
                    self._write_bytes(encode(Ping()))

    async def _reconnect(self, reason: str) -> tuple[asyncio.StreamReader, FrameDecoder] | None:
        attempt = 0
        while not self._closing:
            delay = self.backoff.delay(attempt)
            self._events.put_nowait(ConnectionLost(reason, delay))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._close_requested.wait()
            if self._closing:
                return None
            attempt += 1
            opening = asyncio.ensure_future(self._open())
            closing = asyncio.ensure_future(self._close_requested.wait())
            try:
                await asyncio.wait({opening, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
            if not opening.done():  # close() came first
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, ServerError):
                    await opening
                return None
            try:
                reader, writer, decoder, rest = opening.result()
            except ServerError as exc:
                if exc.code in _HOPELESS:
                    raise _Hopeless(f"the server refused to take us back: {exc.message}") from None
                reason = f"{exc.message} ({exc.code})"
                continue
            except ConnectionClosed as exc:
                reason = exc.reason
                continue
            if self._closing:  # close() came while this connection was opening
                writer.transport.abort()
                return None
            assert self.welcome is not None
            # Online and resumed in one step: nothing sent meanwhile can overtake the re-joins.
            self._go_online(writer)
            resent = self._resume()
            self._events.put_nowait(Reconnected(self.welcome, resent))
            for body in rest:
                self._deliver_body(body)
            return reader, decoder
        return None

    def _resume(self) -> int:
        """Re-join the rooms from their start (``_start_of``), then send the outbox again, in order.

        Each frame goes with its own ref (whoever waits for the answer knows it
        by its ref; the server answers a repeated say or dm with its first ack).
        A room's first pending join, part or say decides its re-join: a join is
        the re-join itself; a part means the room was left (its answer lost, or
        never sent), and since the new connection is in no room, not joining it
        again is that part, answered here. Returns how many messages go again.
        """
        heads: dict[str, ClientFrame] = {}
        parted: set[str] = set()
        after_part: set[str] = set()  # joins that come after a part of their room
        for kept, frame in self._outbox.items():
            if isinstance(frame, Join | Part | Say):
                heads.setdefault(frame.room, frame)
            if isinstance(frame, Part):
                parted.add(frame.room)
            elif isinstance(frame, Join) and frame.room in parted:
                after_part.add(kept)
        reused: set[int] = set()  # pending joins that the re-join of their room is
        rejoins: dict[str, Join] = {}
        for room in list(self.rooms):
            head = heads.get(room)
            if isinstance(head, Part):
                self._outbox.pop(head.ref or "", None)
                self._forget_room(room)
                now = int(time.time() * 1000)
                self._events.put_nowait(
                    Parted(room=room, nick=self.nick, ts=now, reason=head.reason)
                )
                continue
            ref = None
            if isinstance(head, Join):
                reused.add(id(head))
                ref = head.ref
            ref = ref or self.new_ref()
            rejoins[ref] = Join(room=room, since=self._start_of(room, after_part), ref=ref)
        # The re-joins are kept like any join (a refused one goes again; names answers it).
        rest = {ref: f for ref, f in self._outbox.items() if id(f) not in reused}
        if self._renumbered:
            rejoins, rest = self._renumber(rejoins, rest)
            self._renumbered = False
        self._outbox = rejoins | rest
        self._rejoining = set(rejoins)
        # A join's since is kept while it can still be answered: it goes again. A re-join
        # asks from its room's start, which its names then places.
        self._join_since = {r: s for r, s in self._join_since.items() if r in rest}
        for ref, rejoin in rejoins.items():
            if rejoin.since is not None:
                self._join_since[ref] = (rejoin.room, rejoin.since)
        self._written.clear()  # a new connection
        self._sent &= self._outbox.keys()  # a part answered here is settled
        self._carried = set(self._sent)
        self._stop_pacing()  # what it held that is kept is in the outbox
        self._paced.extend((encode(frame), ref, True) for ref, frame in self._outbox.items())
        self._queued.update(self._outbox)
        if self._paced:
            self._start_pacer()
        return self.pending

    def _renumber(
        self, rejoins: dict[str, Join], rest: dict[str, ClientFrame]
    ) -> tuple[dict[str, Join], dict[str, ClientFrame]]:
        """The server numbers its messages anew (its welcome's history id changed): the
        seqs known here and in the outbox are of the old numbering.

        Every room with a known place is joined again from the server's first
        message (one whose names never came, for what comes live, as it was), and
        every join with a ``since`` still waiting for its answer asks from 0. A
        ``history`` question by seq (``after`` 0, from the first, excepted) has no
        answer any more: it is answered here with an ``unavailable`` error.
        """
        # A room whose place is not known yet (its names did not come) was joined for what
        # comes live, and is joined so again.
        rejoins = {
            ref: j if j.since is None else msgspec.structs.replace(j, since=0)
            for ref, j in rejoins.items()
        }
        for join in rejoins.values():
            self.rooms[join.room] = None
            self._seq_from_names.discard(join.room)
        kept: dict[str, ClientFrame] = {}
        for ref, frame in rest.items():
            if isinstance(frame, Join) and frame.since is not None:
                frame = msgspec.structs.replace(frame, since=0)
                self._join_since[ref] = (frame.room, 0)
            elif isinstance(frame, HistoryRequest) and (frame.before is not None or frame.after):
                answer = Error(code="unavailable", message=HISTORY_LOST, fatal=False, ref=ref)
                future = self._pending.get(ref)
                if future is not None and not future.done():
                    future.set_result(answer)
                self._events.put_nowait(answer)
                continue
            kept[ref] = frame
        rooms = [j.room for j in (rejoins | kept).values() if isinstance(j, Join) and j.since == 0]
        shown = ", ".join(dict.fromkeys(f"#{room}" for room in rooms))
        self._events.put_nowait(
            LocalNotice(
                "the server has lost its messages and numbers them again from 1"
                + (f": what it has of {shown} is shown from its first message" if shown else "")
            )
        )
        return rejoins, kept

    def _deliver_body(self, body: bytes) -> None:
        try:
            frame = decode_server(body)
        except ProtocolError as exc:
            log.warning("dropped a bad frame from the server: %s", exc)
            self._events.put_nowait(
                LocalNotice(f"ignored a bad frame from the server ({exc.code})")
            )
            return
        if isinstance(frame, Ping):
            # The server checks we are alive; answering is all it takes.
            if self._online and self._writer is not None:
                self._answer_ping(frame.ref)
            return
        if not self._track(frame):
            return
        if isinstance(frame, _REPLY_TYPES):
            ref = frame.ref
            future = self._pending.get(ref) if ref else None
            if future is not None and not future.done():
                partial = isinstance(frame, Names | Rooms) and frame.more
                gap = isinstance(frame, Error) and frame.code == "history_gap"
                if not partial and not gap:
                    future.set_result(frame)
        self._events.put_nowait(frame)
        for event in self._follow:
            self._events.put_nowait(event)
        self._follow.clear()

    def _start_of(self, room: str, after_part: set[str]) -> int | None:
        """Where ``room``'s re-join asks from: the last seq delivered; or, while none of
        its messages has been delivered since its names (or its names never came), the
        lowest since an unanswered join of it in the outbox asked, if that is lower. Not
        a join ``after_part`` (it goes after the room is left, and asks for itself), nor
        one whose caller gave up (it is not asked again)."""
        last = self.rooms.get(room)
        asked = [
            since
            for ref, (joined, since) in self._join_since.items()
            if joined == room and ref in self._outbox and ref not in after_part
        ]
        if not asked or (last is not None and room not in self._seq_from_names):
            return last
        return min(asked) if last is None else min(*asked, last)

    def _place(self, names: Names) -> None:
        """Where the room of a join's ``names`` starts: the messages after it are delivered.

        By default the room's seq as the names gives it (what comes after is live). A
        join with since starts it there instead (never past the names' seq), the backlog
        following; in a room the client is in, only while none of its messages has been
        delivered since its names, so that none is delivered twice or out of order.
        """
        asked = self._join_since.pop(names.ref, None) if names.ref else None
        since = None if asked is None else min(asked[1], names.seq)
        room = names.room
        if room not in self.rooms:
            return
        last = self.rooms[room]
        if last is None:
            self.rooms[room] = names.seq if since is None else since
            self._seq_from_names.add(room)
        elif names.seq < last and isinstance(self._outbox.get(names.ref or ""), Join):
            # The server has fewer messages than were delivered here: it lost them (a
            # restart without its store) and numbers the room again. What it says from
            # now on is new, and so is this join's backlog; what it had stored before
            # this join and the join did not ask for is in its history.
            start = names.seq if since is None else since
            self.rooms[room] = start
            self._seq_from_names.add(room)
            missed = f"; its first {start} are in its history" if start else ""
            self._follow.append(
                LocalNotice(
                    f"the server now has {names.seq} message(s) of #{room}, where {last} "
                    f"were known here: it has lost its messages and numbers them again" + missed
                )
            )
        elif since is not None and since < last and room in self._seq_from_names:
            self.rooms[room] = since

    def _track(self, frame: ServerFrame) -> bool:
        """Update rooms, last ``seq`` and the outbox; False to drop a duplicate or echo."""
        me = nick_key(self.nick)
        if isinstance(frame, Message):
            last = self.rooms.get(frame.room)
            if last is not None and frame.seq <= last:
                return False  # already delivered (resume overlap)
            if frame.room in self.rooms:
                self.rooms[frame.room] = frame.seq
                self._seq_from_names.discard(frame.room)
        elif isinstance(frame, Ack):
            self._settle(frame.ref)
        elif isinstance(frame, Error):
            if frame.code == "rate_limited" and not frame.fatal:
                retry = _retry_after(frame)
                if frame.ref is not None and frame.ref in self._outbox and self._online:
                    self._send_again(frame.ref, retry)
                    return False  # answered later, when it goes through
                if retry is None:
                    self._slow_down()
            if frame.ref and frame.code != "history_gap":
                if not frame.fatal:
                    self._refused(frame.ref)
                self._settle(frame.ref)
        elif isinstance(frame, Joined):
            if nick_key(frame.nick) == me:
                self.rooms.setdefault(frame.room, None)
        elif isinstance(frame, Parted):
            if nick_key(frame.nick) == me:
                self._forget_room(frame.room)
                for ref, sent in self._outbox.items():
                    if isinstance(sent, Part) and sent.room == frame.room:
                        self._settle(ref)  # the oldest part of the room: answered
                        break
        elif isinstance(frame, Names):
            if not frame.more:
                self._place(frame)
                if frame.ref:
                    self._settle(frame.ref)
        elif isinstance(frame, Rooms | History):
            if frame.ref and not (isinstance(frame, Rooms) and frame.more):
                self._settle(frame.ref)
        elif isinstance(frame, Renamed) and nick_key(frame.old) == me:
            self.nick = frame.new
        return True


class _Hopeless(Exception):
    pass
