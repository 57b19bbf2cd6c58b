"""The server's single owner of state: nicks, rooms, members, and the fan-out of events.

Theory of operation: the registry is synchronous and never awaits. Sessions
call :meth:`Registry.register` with a ``hello``, then :meth:`Registry.handle`
with each later frame (or :meth:`Registry.say_many` with a run of ``say``
frames from one read, which answers as ``handle`` would one at a time, with
one store append and one ack write for all of them), then
:meth:`Registry.unregister` when the connection ends. Every event is
encoded into a frame *once* and handed to the :class:`Peer` of each
recipient with :meth:`Peer.send`, which only queues bytes; the session
writes everything queued for it in one write per loop tick. A refusal is
raised as :class:`~achat.errors.ProtocolError` and the session turns it
into an ``error`` frame.

Messages get their room ``seq`` here, at the moment they are accepted, so the
order every member sees is the order of ``seq``. The store is told to keep
each message and calls back when it has; only then does the sender get its
``ack``. A ``say`` or ``dm`` repeating a ``ref`` its nick used in the last
ten minutes is answered with the original ``ack`` and not stored again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import NoReturn, Protocol, TypeVar

from msgspec import Struct

from ..errors import ProtocolError
from ..protocol.frames import DEFAULT_MAX_FRAME, HEADER_SIZE
from ..protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ClientFrame,
    Dm,
    DmEvent,
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
    RoomInfo,
    Rooms,
    RoomsRequest,
    Say,
    Topic,
    TopicEvent,
    Welcome,
    Who,
    encode,
    encode_many,
)
from ..protocol.names import (
    nick_key,
    nick_skeleton,
    validate_nick,
    validate_reason,
    validate_room,
    validate_text,
    validate_topic,
)
from ..store.base import REF_TTL_MS, RefRecord, Store, ack_frame
from .limits import FloodPolicy
from .log import esc
from .refs import (
    DEADLINE_STEP_MS,
    RecentRefs,
    ack_from,
    receipt_number,
    receipt_of,
    receipt_of_ack,
    ref_key,
)

__all__ = ["DEFAULT_MAX_TEXT", "REF_TTL_MS", "Member", "Peer", "Registry", "Room"]

log = logging.getLogger("achat.server")

DEFAULT_MAX_TEXT = 4_000
#: Messages read from the store at a time for a backlog (join since): a backlog waiting
#: for its reader holds one such page (up to 16 x 16 KB), not 500 of them.
BACKLOG_PAGE = 16
#: The most bytes of a backlog handed to a connection in one piece.
BACKLOG_PIECE = 32 * 1024
#: The most of the loop's time fan-outs a commit triggers may take: after one that took t,
#: the next waits 9t (see Registry.fan_out).
FAN_OUT_SHARE = 0.1
#: The least time between two log lines about refusals for the refs' limit, ms.
REFS_LOG_INTERVAL_MS = 60_000
#: A wait for a fan-out shorter than this is no wait (the loop's timers are whole ms).
FAN_OUT_MIN_WAIT = 0.001
#: The longest wait: a fan-out held up by something else (a collection, the loop thread
#: losing its CPU) does not hold the next one back nine times as long.
FAN_OUT_MAX_WAIT = 0.010

T = TypeVar("T")


#: Frames whose handling shows nothing of a room's state: they do not wait for a fan-out.
_UNSEEN = (Say, Ping, PongReply)


class Peer(Protocol):
    """The registry's view of a connection: somewhere to queue frames."""

    def send(self, frame: bytes) -> None:
        """Queue one encoded frame; must not block or raise."""
        ...

    def send_pages(self, pages: Iterator[bytes]) -> None:
        """Queue ``pages`` (encoded frames, a piece at a time): each is taken only as the
        peer reads what it was sent, and whatever is queued after them waits for them
        all. A backlog of any length goes out this way without being held in memory."""
        ...

    def close(self, frame: bytes | None = None) -> None:
        """Send ``frame`` (if any) after what is queued, then close the connection."""
        ...


@dataclass(eq=False, slots=True)
class Member:
    """A registered connection: one nick, the rooms it is in, and its peer."""

    nick: str
    key: str
    skeleton: str
    peer: Peer
    #: The rooms joined, in joining order (a list: most members are in one or two rooms,
    #: and an idle server holds one per client).
    rooms: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Run:
    """The messages of a run of ``say`` frames from one member, their acks (and those
    encoded one after another) and the receipts their refs are remembered with (None
    without a ref), on their way to the store and then the fan-out."""

    member: Member
    messages: list[Message]
    acks: list[Ack]
    encoded: bytes
    receipts: list[bytes | None]


@dataclass(eq=False)
class Room:
    """A room: its members by nick key, its topic and the latest ``seq`` given out."""

    name: str
    topic: str = ""
    #: The latest ``seq`` handed out (its message may still be on its way to the store).
    last_seq: int = 0
    #: The latest ``seq`` stored and delivered: what members and newcomers have seen.
    stored_seq: int = 0
    members: dict[str, Member] = field(default_factory=dict)


class Registry:
    """Rooms, nicks and members of one server, and every rule about them."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], int],
        name: str = "achat",
        motd: str | None = None,
        max_text: int = DEFAULT_MAX_TEXT,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_clients: int = 10_000,
        password: str | None = None,
        flood: FloodPolicy | None = None,
        defer: Callable[[Callable[[], None], float], object] | None = None,
        timer: Callable[[], float] = time.perf_counter,
        max_refs: int = 0,
    ) -> None:
        self.store = store
        #: The most refs remembered at once (0: no limit): past it a ``say`` or ``dm``
        #: with a new ref is refused with ``rate_limited`` until old ones expire.
        self.max_refs = max_refs
        #: How many were refused so far, and when (ms) and at what count it was logged.
        self.refs_refused = 0
        self._refs_logged: tuple[int, int] | None = None
        # Runs a callback after a delay in seconds (0: once this tick's events are done);
        # None: fan out as each commit lands.
        self._defer = defer
        self._timer = timer
        self._fan_out_ready = float("-inf")
        self.clock = clock
        self.name = name
        self.motd = motd
        self.max_text = max_text
        self.max_frame = max_frame
        self.max_clients = max_clients
        self.password = password
        #: The flood limit the sessions enforce, announced in ``welcome`` (None: not said).
        self.flood = flood
        self._by_key: dict[str, Member] = {}
        self._by_skeleton: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {
            r.name: Room(r.name, r.topic, r.last_seq, r.last_seq) for r in store.load_rooms()
        }
        self._last_dm = store.last_dm_id()
        self._acked_dm = self._last_dm  # the last DM acked: every stored one, so far
        # Refs said in one second expire together (kept up to a second more than 10 min).
        self._refs: RecentRefs[Member] = RecentRefs(granularity=DEADLINE_STEP_MS)
        for r in store.load_refs(clock()):
            if r.ack is None:
                raise ValueError("the store returned a ref without its ack")
            # Kept as a receipt, as a ref said since start is: the whole ack holds the
            # ref again, up to 64 characters of anything, escaped (item 62).
            self._refs.keep(ref_key(r.nick_key, r.ref), r.expires, receipt_of_ack(r.ack))
        # Stored messages not fanned out yet: per room, their frames (encoded, in seq
        # order) and the last seq among them; and their runs, for the acks.
        self._stored: dict[Room, list[bytes]] = {}
        self._stored_seqs: dict[Room, int] = {}
        self._stored_acks: list[_Run] = []
        self._handlers: dict[type, Callable[[Member, ClientFrame], None]] = {
            Join: self._join,  # type: ignore[dict-item]
            Part: self._part,  # type: ignore[dict-item]
            Say: self._say,  # type: ignore[dict-item]
            Dm: self._dm,  # type: ignore[dict-item]
            Nick: self._nick,  # type: ignore[dict-item]
            Who: self._who,  # type: ignore[dict-item]
            RoomsRequest: self._rooms,  # type: ignore[dict-item]
            HistoryRequest: self._history,  # type: ignore[dict-item]
            Topic: self._topic,  # type: ignore[dict-item]
            Ping: self._ping,  # type: ignore[dict-item]
            PongReply: self._pong,  # type: ignore[dict-item]
        }

    # -- lifecycle of a member ---------------------------------------------

    @property
    def members(self) -> list[Member]:
        """Every registered member."""
        return list(self._by_key.values())

    def member(self, nick: str) -> Member | None:
        """The member using ``nick`` (compared case-insensitively), if any."""
        return self._by_key.get(nick_key(nick))

    def register(self, peer: Peer, hello: Hello, addr: str = "?") -> Member:
        """Admit a connection that said ``hello`` and send it ``welcome``.

        Raises a fatal :class:`ProtocolError` (``unsupported_version``,
        ``bad_password``, ``invalid_nick``, ``nick_taken``, ``server_full``).
        """
        self.fan_out()
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_version",
                f"this server speaks protocol version {PROTOCOL_VERSION}",
                fatal=True,
            )
        if self.password is not None and hello.password != self.password:
            raise ProtocolError("bad_password", "wrong or missing password", fatal=True)
        try:
            nick = validate_nick(hello.nick)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, fatal=True) from None
        key, skeleton = nick_key(nick), nick_skeleton(nick)
        self._check_free(key, skeleton, fatal=True)
        if len(self._by_key) >= self.max_clients:
            raise ProtocolError("server_full", "the server is full; try again later", fatal=True)
        member = Member(nick, key, skeleton, peer)
        self._by_key[key] = member
        self._by_skeleton[skeleton] = member
        peer.send(
            encode(
                Welcome(
                    nick=nick,
                    server=self.name,
                    version=PROTOCOL_VERSION,
                    max_frame=self.max_frame,
                    max_text=self.max_text,
                    motd=self.motd,
                    send_rate=None if self.flood is None else self.flood.rate,
                    send_burst=None if self.flood is None else self.flood.burst,
                    history_id=self.store.history_id,
                )
            )
        )
        log.info("register nick=%s addr=%s client=%s", esc(nick), addr, esc(hello.client or ""))
        return member

    def unregister(self, member: Member, reason: str = "quit") -> None:
        """Forget ``member``: every room it was in is told it left with ``reason``."""
        if self._by_key.get(member.key) is not member:
            return
        self.fan_out()
        del self._by_key[member.key]
        if self._by_skeleton.get(member.skeleton) is member:
            del self._by_skeleton[member.skeleton]
        ts = self.clock()
        for name in sorted(member.rooms):
            room = self.rooms[name]
            room.members.pop(member.key, None)
            self._broadcast(room, encode(Parted(room=name, nick=member.nick, ts=ts, reason=reason)))
        member.rooms.clear()
        log.info("unregister nick=%s reason=%s", esc(member.nick), esc(reason))

    def handle(self, member: Member, frame: ClientFrame) -> None:
        """Carry out one frame from a registered member.

        Raises :class:`ProtocolError` for a refusal; the caller answers with
        ``error`` (echoing the frame's ``ref``) and the connection goes on.
        """
        if not isinstance(frame, _UNSEEN):
            self.fan_out()
        if isinstance(frame, Hello):
            raise ProtocolError("already_registered", "you are already registered")
        if isinstance(frame, Bye):
            # The session closes the connection; nothing else to do here.
            return
        self._handlers[type(frame)](member, frame)

    # -- frame handlers -----------------------------------------------------

    def _join(self, member: Member, frame: Join) -> None:
        name = validate_room(frame.room)
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            log.info("room created room=%s by=%s", name, esc(member.nick))
        if member.key not in room.members:
            room.members[member.key] = member
            member.rooms.append(name)
            self._broadcast(room, encode(Joined(room=name, nick=member.nick, ts=self.clock())))
            log.info("join room=%s nick=%s", name, esc(member.nick))
        self._send_names(member, room, frame.ref)
        if frame.since is not None:
            self._send_backlog(member, room, frame.since, frame.ref)

    def _send_backlog(self, member: Member, room: Room, since: int, ref: str | None) -> None:
        """Queue what ``room`` stored after ``since``, up to what its members have been
        sent: read from the store a page at a time as the member reads it. What is
        stored later reaches the member live, after it."""
        if since < room.stored_seq:
            member.peer.send_pages(self._backlog(room.name, since, room.stored_seq, ref))

    def _backlog(self, name: str, since: int, upto: int, ref: str | None) -> Iterator[bytes]:
        after = since
        while after < upto:
            page = self.store.history(name, before=None, after=after, limit=BACKLOG_PAGE)
            if page.gap:
                # Expired since the join, too (pages are read as the member reads them).
                oldest = min(page.messages[0].seq if page.messages else upto + 1, upto + 1)
                text = f"messages {after + 1} to {oldest - 1} of #{name} have expired"
                yield encode(Error(code="history_gap", message=text, fatal=False, ref=ref))
            messages = [message for message in page.messages if message.seq <= upto]
            piece: list[bytes] = []
            size = 0
            for message in messages:
                frame = encode(message)
                piece.append(frame)
                size += len(frame)
                if size >= BACKLOG_PIECE:
                    yield b"".join(piece)
                    piece, size = [], 0
            if piece:
                yield b"".join(piece)
            if not messages or len(messages) < len(page.messages) or not page.more:
                return
            after = messages[-1].seq

    def _part(self, member: Member, frame: Part) -> None:
        room = self._joined_room(member, frame.room)
        reason = validate_reason(frame.reason)
        self._broadcast(
            room,
            encode(Parted(room=room.name, nick=member.nick, ts=self.clock(), reason=reason)),
        )
        del room.members[member.key]
        member.rooms.remove(room.name)
        log.info("part room=%s nick=%s", room.name, esc(member.nick))

    def _say(self, member: Member, frame: Say) -> None:
        self.say_many(member, (frame,), _raise)

    def say_many(
        self, member: Member, frames: Sequence[Say], refuse: Callable[[ProtocolError], None]
    ) -> None:
        """Carry out a run of ``say`` frames from ``member``, as :meth:`handle` would
        one at a time, with one append to the store and one callback for all of them.

        A frame refused (not in the room, a bad text) is handed to ``refuse``, its
        ``ref`` set, when it is met; the frames after it go on. A session hands over
        the ``say`` frames of one read this way (the tokens of its flood limit taken).
        The messages of a run share one ``ts``: the clock is read once for the read
        that brought them.
        """
        now = self.clock()
        nick = member.nick
        messages: list[Message] = []
        records: list[RefRecord | None] = []
        acks: list[Ack] = []
        receipts: list[bytes | None] = []
        deadline = now + REF_TTL_MS
        self._refs.expire(now)
        self._refs.deadline(deadline)
        # Whether the run could fill the table of refs: only then is each say looked at.
        crowded = 0 < self.max_refs < len(self._refs) + len(frames)
        try:
            for frame in frames:
                ref = frame.ref
                try:
                    room = self._joined_room(member, frame.room)
                    text = validate_text(frame.text, self.max_text)
                    if crowded and ref and len(self._refs) >= self.max_refs:
                        self._refs_full(now)
                except ProtocolError as exc:
                    # A resend is answered all the same: its room may have been left since.
                    if ref and self._answered_again(member, ref):
                        continue
                    exc.ref = ref
                    refuse(exc)
                    continue
                message = Message(
                    room=room.name, seq=room.last_seq + 1, ts=now, sender=nick, text=text
                )
                receipt = None
                if ref:
                    receipt = self._claimed(member, ref, message)
                    if receipt is None:
                        continue  # a resend, answered
                room.last_seq += 1
                messages.append(message)
                receipts.append(receipt)
                acks.append(ack_frame(ref or "", message))
                records.append(RefRecord(member.key, ref, deadline) if ref else None)
            if messages:
                # Encoded now, not in the fan-out, which is paced by the time it takes.
                run = _Run(member, messages, acks, encode_many(acks), receipts)
                self.store.append_many(messages, records, lambda: self._messages_stored(run))
        except BaseException:
            # Whatever was numbered or claimed never reaches the store: a ref claimed for
            # it would be taken for acked once its room's stored_seq passed its seq.
            self._undo(member, frames, messages, receipts)
            raise

    def _undo(
        self,
        member: Member,
        frames: Sequence[Say | Dm],
        records: Sequence[Message | DmEvent],
        receipts: Sequence[bytes | None],
    ) -> None:
        """Take back the numbers and the refs given to ``records`` (from ``frames``),
        which will not be stored."""
        for record in reversed(records):
            if isinstance(record, Message):
                self.rooms[record.room].last_seq = record.seq - 1
            else:
                self._last_dm = record.id - 1
        ours = {id(receipt) for receipt in receipts if receipt is not None}
        for frame in frames:
            if frame.ref:
                key = ref_key(member.key, frame.ref)
                kept = self._refs.get(key)
                if kept is not None and id(kept) in ours:
                    self._refs.release(key, kept)

    def _messages_stored(self, run: _Run) -> None:
        # Delivered only once stored: a crash can never show members a seq that the
        # store then hands out again. The store calls back in seq order, a whole commit
        # at a time; the batch is fanned out once it is complete (see fan_out). Encoded
        # here, once each, so that the paced fan-out only appends (see fan_out).
        first = not self._stored_acks
        stored, seqs, rooms = self._stored, self._stored_seqs, self.rooms
        for name, group in groupby(run.messages, key=_room_of):  # nearly always one room
            messages = list(group)
            room = rooms[name]
            blobs = stored.get(room)
            if blobs is None:
                stored[room] = [encode_many(messages)]
            else:
                blobs.append(encode_many(messages))
            seqs[room] = messages[-1].seq
        self._stored_acks.append(run)
        if self._defer is None:
            self.fan_out()
        elif first:
            wait = min(self._fan_out_ready - self._timer(), FAN_OUT_MAX_WAIT)
            self._defer(self.fan_out, wait if wait >= FAN_OUT_MIN_WAIT else 0.0)

    def fan_out(self) -> None:
        """Deliver every stored message not delivered yet, then their acks.

        A room's messages (encoded as they were stored) are joined into one
        blob that each member gets with one append, so a busy room costs one
        step per member per fan-out instead of one per member per message.
        Everything that could show a room's state (a frame other than ``say``
        or ``ping``, a member leaving) calls this first, so nobody ever sees
        events out of their order; a ``say`` does not, for its message comes
        in seq order anyway.

        What a commit sets off waits, after a fan-out that took t, until 9t
        later (:data:`FAN_OUT_SHARE`), and the commits that land meanwhile go
        out together. In a room of 2,500 saying 2,500 messages a second a
        fan-out took about half a millisecond and came after nearly every
        commit, about 380 times a second: a quarter of the loop's busy time
        (py-spy), spent queueing small blobs. In small rooms the wait is
        under a millisecond, which is none; it is never over 10 ms. The
        fan-out is left only what batching saves on (a step per member) and
        the acks: what costs the same however the messages are batched, their
        encoding, is done as they are stored. A fan-out to one member (a client
        pipelining ``say`` frames in a room of its own) is then too short to
        make anything wait.
        """
        stored, seqs, acks = self._stored, self._stored_seqs, self._stored_acks
        if not acks:
            return
        started = self._timer()
        self._stored, self._stored_seqs, self._stored_acks = {}, {}, []
        for room, blobs in stored.items():
            room.stored_seq = seqs[room]
            self._broadcast(room, blobs[0] if len(blobs) == 1 else b"".join(blobs))
        for run in acks:
            self._acknowledge(run.member, run.acks, run.encoded, run.receipts)
        ended = self._timer()
        self._fan_out_ready = ended + (ended - started) * (1 / FAN_OUT_SHARE - 1)

    def _dm(self, member: Member, frame: Dm) -> None:
        now = self.clock()
        ref = frame.ref
        if ref:
            self._refs.expire(now)
        target = self._by_key.get(nick_key(frame.to))
        try:
            if target is None:
                raise ProtocolError("no_such_nick", f"nobody called {frame.to!r} is online")
            text = validate_text(frame.text, self.max_text)
            if ref and 0 < self.max_refs <= len(self._refs):
                self._refs_full(now)
        except ProtocolError:
            # A resend is answered all the same: its recipient may have gone since.
            if ref and self._answered_again(member, ref):
                return
            raise
        dm = DmEvent(sender=member.nick, to=target.nick, id=self._last_dm + 1, ts=now, text=text)
        receipt, record = None, None
        if ref:
            deadline = now + REF_TTL_MS
            self._refs.deadline(deadline)
            receipt = self._claimed(member, ref, dm)
            if receipt is None:
                return  # a resend, answered
            record = RefRecord(member.key, ref, deadline)
        self._last_dm = dm.id
        ack = ack_frame(ref or "", dm)
        encoded = encode(ack)

        def stored() -> None:
            self.fan_out()  # room messages stored before this DM go first
            target.peer.send(encode(dm))
            self._acked_dm = dm.id
            self._acknowledge(member, [ack], encoded, [receipt])

        try:
            self.store.append_dm(dm, stored, record)
        except BaseException:
            self._undo(member, [frame], [dm], [receipt])
            raise

    def _nick(self, member: Member, frame: Nick) -> None:
        new = validate_nick(frame.nick)
        if new == member.nick:
            return
        key, skeleton = nick_key(new), nick_skeleton(new)
        if key != member.key:
            self._check_free(key, skeleton, fatal=False, me=member)
        old = member.nick
        del self._by_key[member.key]
        if self._by_skeleton.get(member.skeleton) is member:
            del self._by_skeleton[member.skeleton]
        member.nick, member.key, member.skeleton = new, key, skeleton
        self._by_key[key] = member
        self._by_skeleton[skeleton] = member
        data = encode(Renamed(old=old, new=new, ts=self.clock()))
        told = {member.key: member}
        for name in member.rooms:
            room = self.rooms[name]
            room.members = {(key if m is member else k): m for k, m in room.members.items()}
            told.update((m.key, m) for m in room.members.values())
        for m in told.values():
            m.peer.send(data)
        log.info("rename old=%s new=%s", esc(old), esc(new))

    def _who(self, member: Member, frame: Who) -> None:
        name = validate_room(frame.room)
        self._send_names(member, self.rooms.get(name) or Room(name), frame.ref)

    def _rooms(self, member: Member, frame: RoomsRequest) -> None:
        infos = [
            RoomInfo(room=r.name, members=len(r.members), topic=r.topic)
            for r in sorted(self.rooms.values(), key=lambda r: (-len(r.members), r.name))
        ]
        for data in self._split(
            infos, lambda part, more: Rooms(rooms=part, ref=frame.ref, more=more)
        ):
            member.peer.send(data)

    def _history(self, member: Member, frame: HistoryRequest) -> None:
        name = validate_room(frame.room)
        if frame.before is not None and frame.after is not None:
            raise ProtocolError("missing_field", "give either before or after, not both")
        # Only what members have been shown: a message still on its way to the store
        # reaches everyone live, so listing it here too would show it twice.
        room = self.rooms.get(name)
        shown = room.stored_seq if room is not None else 0
        before = frame.before
        if frame.after is None:
            before = shown + 1 if before is None else min(before, shown + 1)
        page = self.store.history(name, before=before, after=frame.after, limit=frame.limit)
        messages, more = page.messages, page.more
        if frame.after is not None and messages and messages[-1].seq > shown:
            messages = [m for m in messages if m.seq <= shown]
            more = False
        if page.gap and frame.after is not None:
            member.peer.send(
                encode(
                    Error(
                        code="history_gap",
                        message=f"some messages of #{name} after {frame.after} have expired",
                        fatal=False,
                        ref=frame.ref,
                    )
                )
            )
        data = encode(History(room=name, messages=messages, more=more, ref=frame.ref))
        while len(data) > self.max_frame + HEADER_SIZE and len(messages) > 1:
            # Keep the messages nearest the reference point; the client pages for the rest.
            half = len(messages) // 2
            messages = messages[:half] if frame.after is not None else messages[half:]
            more = True
            data = encode(History(room=name, messages=messages, more=more, ref=frame.ref))
        member.peer.send(data)

    def _topic(self, member: Member, frame: Topic) -> None:
        room = self._joined_room(member, frame.room)
        topic = validate_topic(frame.topic)
        room.topic = topic
        self.store.set_topic(room.name, topic)
        self._broadcast(
            room, encode(TopicEvent(room=room.name, topic=topic, by=member.nick, ts=self.clock()))
        )
        log.info("topic room=%s by=%s", room.name, esc(member.nick))

    def _ping(self, member: Member, frame: Ping) -> None:
        member.peer.send(encode(Pong(ref=frame.ref)))

    def _pong(self, member: Member, frame: PongReply) -> None:
        # The answer to our keepalive ping: arriving at all is what counts.
        return None

    # -- helpers ------------------------------------------------------------

    def _check_free(
        self, key: str, skeleton: str, *, fatal: bool, me: Member | None = None
    ) -> None:
        if key in self._by_key:
            raise ProtocolError("nick_taken", "that nick is in use", fatal=fatal)
        holder = self._by_skeleton.get(skeleton)
        # Looking like one's own current nick (lol -> l0l) takes nothing from anyone.
        if holder is not None and holder is not me:
            raise ProtocolError(
                "nick_taken",
                f"that nick looks too much like {holder.nick!r}, who is online",
                fatal=fatal,
            )

    def _joined_room(self, member: Member, raw: str) -> Room:
        # Only valid names are ever joined, so a member's own room needs no other check.
        if raw not in member.rooms:
            name = validate_room(raw)
            raise ProtocolError("not_in_room", f"you are not in #{name}")
        return self.rooms[raw]

    def _send_names(self, member: Member, room: Room, ref: str | None) -> None:
        for data in self._split(
            self._nicks(room),
            lambda part, more: Names(
                room=room.name,
                nicks=part,
                topic=room.topic,
                seq=room.stored_seq,
                ref=ref,
                more=more,
            ),
        ):
            member.peer.send(data)

    def _split(self, items: list[T], build: Callable[[list[T], bool], Struct]) -> list[bytes]:
        """Encode ``items`` in as few frames as fit ``max_frame``; all but the last say more."""
        whole = encode(build(items, False))
        if len(whole) <= self.max_frame + HEADER_SIZE:
            return [whole]
        size = max(1, len(items) * self.max_frame // (2 * len(whole)))
        frames: list[bytes] = []
        start = 0
        while start < len(items):
            part = items[start : start + size]
            last = start + size >= len(items)
            data = encode(build(part, not last))
            if len(data) > self.max_frame + HEADER_SIZE and size > 1:
                size //= 2
                continue
            frames.append(data)
            start += len(part)
        return frames

    @staticmethod
    def _nicks(room: Room) -> list[str]:
        return sorted((m.nick for m in room.members.values()), key=str.casefold)

    @staticmethod
    def _broadcast(room: Room, data: bytes) -> None:
        for m in room.members.values():
            m.peer.send(data)

    @property
    def refs_in_force(self) -> int:
        """How many refs are remembered now (those loaded at start among them)."""
        return len(self._refs)

    def _refs_full(self, now: int) -> NoReturn:
        """Refuse a ``say`` or ``dm`` with a new ref: the table of refs holds
        ``max_refs``. Its sender may send it again once the oldest refs have expired."""
        expiry = self._refs.next_expiry()
        wait = max(1.0, (expiry - now) / 1000) if expiry is not None else 1.0
        self.refs_refused += 1
        logged = self._refs_logged
        if logged is None or now - logged[0] >= REFS_LOG_INTERVAL_MS:
            log.warning(
                "the server remembers %d refs, its --max-refs: refusing messages with new "
                "refs for %.0f s, until the oldest expire (%d time(s) since the last report)",
                len(self._refs),
                wait,
                self.refs_refused - (logged[1] if logged else 0),
            )
            self._refs_logged = (now, self.refs_refused)
        raise ProtocolError(
            "rate_limited",
            "the server remembers as many recent messages as it may; this message was "
            "dropped: send it again later",
            fatal=False,
            peer_fault=False,
            retry_after=wait,
        )

    def _answered_again(self, member: Member, ref: str) -> bool:
        """True when ``ref`` is one of the nick's recent refs: a resend, answered."""
        kept = self._refs.get(ref_key(member.key, ref))
        if kept is None:
            return False
        self._answer_resend(member, ref, kept)
        return True

    def _claimed(self, member: Member, ref: str, record: Message | DmEvent) -> bytes | None:
        """Remember ``ref`` as the nick's for ``record`` (numbered, not stored yet), which
        the run's deadline is set for: its receipt; None if ``ref`` is a resend's
        (answered: ``record`` is not to be stored)."""
        receipt = receipt_of(record)
        kept = self._refs.claim(ref_key(member.key, ref), receipt)
        if kept is None:
            return receipt
        self._answer_resend(member, ref, kept)
        return None

    def _answer_resend(self, member: Member, ref: str, kept: bytes) -> None:
        """Answer a resend of ``ref``, remembered with ``kept``: with the original ack, at
        once if its record was acked, else when it is."""
        if self._acked(kept):
            member.peer.send(ack_from(ref, kept))
        else:
            self._refs.wait(kept, member)

    def _acked(self, kept: bytes) -> bool:
        """Whether the record a ref was remembered with (``kept``) was acked: every room
        message up to a room's ``stored_seq`` was, and every DM up to the last one acked
        (the store calls back in order)."""
        room_name, number = receipt_number(kept)
        if room_name is None:
            return number <= self._acked_dm
        room = self.rooms.get(room_name)
        # Rooms are never dropped: a room not known was not loaded at start, so its
        # messages (a ref loaded with its receipt names one) were all stored before.
        return room is None or number <= room.stored_seq

    def _acknowledge(
        self,
        member: Member,
        acks: Sequence[Ack],
        encoded: bytes,
        receipts: Sequence[bytes | None],
    ) -> None:
        """Send ``member`` the acks of its stored records (``encoded``: those one after
        another) in one piece, each followed by its copies for the resends waiting for it
        (by the receipt its ref is remembered with, None without one): on this
        connection, in the same piece; on another, sent there."""
        waiting = self._refs.waiting
        if not waiting or all(receipt not in waiting for receipt in receipts):
            member.peer.send(encoded)
            return
        out: list[bytes] = []
        for ack, receipt in zip(acks, receipts, strict=True):
            data = encode(ack)
            out.append(data)
            for waiter in waiting.pop(receipt, ()) if receipt is not None else ():
                if waiter is member:
                    out.append(data)
                else:
                    waiter.peer.send(data)
        member.peer.send(b"".join(out))


_room_of = attrgetter("room")


def _raise(exc: ProtocolError) -> None:
    raise exc
