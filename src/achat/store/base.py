"""The storage interface the server's registry writes to and reads history from.

A store keeps rooms (name, topic, latest ``seq``), room messages and direct
messages. The registry assigns ``seq`` and DM ids itself, so appends never
need to wait for the store to answer; the store calls ``on_stored`` once the
record is durable as far as that backend goes, and only then does the sender
get its ``ack``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ..protocol.messages import Ack, DmEvent, Message, encode

__all__ = [
    "REF_TTL_MS",
    "HistoryPage",
    "RefRecord",
    "RoomRecord",
    "Store",
    "ack_frame",
    "ack_of",
]

#: How long a ``ref`` is remembered after its message (ms): a resend within this time
#: gets the first ``ack`` again. A store may forget refs of messages older than this.
REF_TTL_MS = 10 * 60 * 1000


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """What a store remembers of a room between runs."""

    name: str
    topic: str
    last_seq: int


class RefRecord(msgspec.Struct, frozen=True, gc=False):
    """A ``ref`` a nick used for a ``say`` or ``dm``, and the ``ack`` it got (encoded frame).

    Kept until ``expires`` (ms since the epoch) so that a resend after a
    reconnect or a server restart is answered with the same ``ack``. One is
    made per ``say`` with a ref, so it is a struct: a frozen dataclass took
    ten times as long to build (0.46 µs against 0.04).

    ``ack`` is None when it is the one :func:`ack_of` derives from the
    message or DM the ref is stored with, which is what the server always
    sends: a store then keeps nothing it can derive (as bytes on every row
    it cost SQLite a quarter of its time per message) and fills it in when
    it hands refs back. :meth:`Store.load_refs` never returns None.
    """

    nick_key: str
    ref: str
    expires: int
    ack: bytes | None = None


def ack_frame(ref: str, record: Message | DmEvent) -> Ack:
    """The ``ack`` of a ``say`` or ``dm`` with ``ref``, stored as ``record``."""
    if isinstance(record, Message):
        return Ack(ref=ref, ts=record.ts, room=record.room, seq=record.seq)
    return Ack(ref=ref, ts=record.ts, id=record.id)


def ack_of(ref: str, record: Message | DmEvent) -> bytes:
    """The ``ack`` of a ``say`` or ``dm`` with ``ref``, stored as ``record``, encoded."""
    return encode(ack_frame(ref, record))


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a room's history, oldest first.

    ``more`` is true when older (for ``before``/latest) or newer (for
    ``after``) messages exist beyond this page. ``gap`` is true when messages
    the request asked for have expired from the store.
    """

    messages: list[Message]
    more: bool
    gap: bool = False


class Store(Protocol):
    """What the registry needs from a message store. No method may block for long.

    Writes are kept, and their ``on_stored`` called, in the order they were given:
    a write that cannot be kept yet holds back every later one until it is (the
    SQLite store retries it with them), never skipped. The registry relies on it:
    a ref's record counts as acked once a later one of its room (or a later DM)
    was, and an append that raises is taken as not given at all.
    """

    #: Names this store's numbering of messages: the same for as long as its rooms' seqs
    #: go on from where they were, a new one when they start again from 1 (a memory
    #: store each time it is made, a database file when it is created; a file put back
    #: from an older copy keeps its id, though its seqs go back).
    history_id: str

    def load_rooms(self) -> list[RoomRecord]:
        """Every room the store knows, with its topic and latest ``seq``."""
        ...

    def last_dm_id(self) -> int:
        """The highest DM id ever stored (0 if none)."""
        ...

    def load_refs(self, now: int) -> list[RefRecord]:
        """The remembered refs that have not expired at ``now``, oldest first."""
        ...

    def append(
        self, message: Message, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        """Store a message (its ``seq`` set by the registry) and its ``ref``, atomically.

        ``on_stored`` is called on the event loop once both are kept. A store that
        subclasses this protocol has it as an :meth:`append_many` of one.
        """
        self.append_many((message,), (ref,), on_stored)

    def append_many(
        self,
        messages: Sequence[Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        """Store several messages (each room's in ``seq`` order), ``refs[i]`` with
        ``messages[i]``, as :meth:`append` would one by one, in the order given.

        A room's messages come to the store in ``seq`` order, from one thread (the
        registry numbers them on the loop as it appends them): a store may rely on
        it, as the SQLite store does for the order of its chunks.

        ``on_stored`` is called once, on the event loop, when all of them are kept:
        one call for a read's worth of ``say`` frames instead of one per message.
        """
        ...

    def append_dm(
        self, dm: DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        """Store a direct message and its ``ref``; call ``on_stored`` when kept."""
        ...

    def set_topic(self, room: str, topic: str) -> None:
        """Remember a room's topic (creates the room record if needed)."""
        ...

    def history(
        self, room: str, *, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        """Up to ``limit`` messages of ``room``: after ``after``, before ``before``, or latest."""
        ...

    def close(self) -> None:
        """Flush and release resources; idempotent."""
        ...
