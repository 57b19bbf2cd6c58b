"""The refs each nick used in the last ten minutes, and the ``ack`` each one got.

A ``say`` or ``dm`` that repeats a recent ``ref`` of the same nick is a
resend: it is answered with the original ``ack`` (or, if that is not known
yet, with the ack when it comes) and never stored twice.

Theory of operation: a busy server remembers millions of refs at once
(every message of the last ten minutes), so an acked entry is kept as plain
strings and bytes, which Python's cyclic garbage collector never has to
look at: the key is ``nick_key + "\\0" + ref`` (a nick can hold no control
character, so the first NUL splits it unambiguously), the value is the
``ack`` as its owner keeps it. The server keeps a *receipt*
(:func:`receipt_of`): the ack's time and number packed in 16 bytes, and its
room, from which :func:`ack_from` makes the ack again for a resend; the
encoded ack would take 55 bytes more. Until its ack, a ref's value is the
:class:`Pending` batch it was added with: one object for a run of ``say``
frames, which also holds the resends waiting, so adding a ref allocates
nothing. Entries expire in the order they were made, so a deque of keys and
one of marks (where the keys of each deadline begin) are all the
bookkeeping expiry needs. Deadlines are rounded up to a ``granularity``
(the server's is a second), so that the refs of one second share a mark
instead of having a deadline each (40 bytes a ref); a ref is then kept up
to that much longer.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from ..protocol.messages import Ack, DmEvent, Message, encode

__all__ = ["Pending", "RecentRefs", "ack_from", "receipt_of", "ref_key"]

#: A receipt's head: its kind (``m`` or ``d``), the time and the seq or DM id.
_RECEIPT = struct.Struct("<cqq")

W = TypeVar("W")


def ref_key(nick_key: str, ref: str) -> str:
    """The one string that names ``ref`` as used by the nick whose key is ``nick_key``."""
    return f"{nick_key}\0{ref}"


def receipt_of(record: Message | DmEvent) -> bytes:
    """What the ack of a ``say`` stored as ``record`` (or a ``dm``) needs, besides its ref.

    ``m``, then the time and ``seq``, then the room; or ``d``, then the time
    and the DM's id. Never starts with a NUL, as an encoded frame does.
    """
    if isinstance(record, Message):
        return _RECEIPT.pack(b"m", record.ts, record.seq) + record.room.encode()
    return _RECEIPT.pack(b"d", record.ts, record.id)


def ack_from(ref: str, kept: bytes) -> bytes:
    """The encoded ``ack`` of ``ref`` from its receipt, or ``kept`` if that is the ack itself."""
    kind = kept[:1]
    if kind not in (b"m", b"d"):
        return kept  # a whole frame (as a store hands back the refs it kept)
    _, ts, number = _RECEIPT.unpack_from(kept)
    if kind == b"m":
        return encode(Ack(ref=ref, ts=ts, room=kept[_RECEIPT.size :].decode(), seq=number))
    return encode(Ack(ref=ref, ts=ts, id=number))


class Pending(Generic[W]):
    """Refs added together and acked together (a run of ``say`` frames, a ``dm``) while
    what they name is being stored, and the resends waiting for their acks.

    A pending ref's entry is its batch: one object for the whole run, not one each.
    """

    __slots__ = ("start", "waiting")

    def __init__(self, start: int) -> None:
        #: Where its keys begin among all those ever added (see RecentRefs._first).
        self.start = start
        #: The resenders waiting for each key's ack, by key (None while nobody waits).
        self.waiting: dict[str, list[W]] | None = None


class RecentRefs(Generic[W]):
    """Recent refs: acked ones with their receipt, pending ones with their batch."""

    def __init__(self, granularity: int = 1) -> None:
        if granularity < 1:
            raise ValueError("granularity must be at least 1")
        self._granularity = granularity
        # One dict for both states, so that a new ref costs one lookup and one insert,
        # and its ack one lookup and one store: the receipt (bytes) once acked, until
        # then the batch it was added with (which use of the key this is).
        self._refs: dict[str, bytes | Pending[W]] = {}
        # Every key in the order added, the first of them the _first'th ever added.
        self._keys: deque[str] = deque()
        self._first = 0
        # Where each run of keys sharing a (rounded) deadline starts, oldest first: the
        # deadline and the index (counted as _first is) of the run's first key.
        self._marks: deque[tuple[int, int]] = deque()

    def __len__(self) -> int:
        return len(self._keys)

    def expire(self, now: int) -> None:
        """Forget every ref whose (rounded) deadline is not after ``now``."""
        marks, keys, refs = self._marks, self._keys, self._refs
        while marks and marks[0][0] <= now:
            marks.popleft()
            end = marks[0][1] if marks else self._first + len(keys)
            for _ in range(end - self._first):
                refs.pop(keys.popleft(), None)
            self._first = end

    def ack(self, key: str) -> bytes | None:
        """The receipt (or ack) of ``key``, if it was acked and has not expired."""
        entry = self._refs.get(key)
        return entry if isinstance(entry, bytes) else None

    def resent(self, key: str, waiter: W) -> bytes | bool:
        """What a resend of ``key`` gets: its receipt if ``key`` was acked; True if it is
        not yet (``waiter`` is queued for the ack); False if ``key`` is unknown: no resend."""
        entry = self._refs.get(key)
        if entry is None:
            return False
        if isinstance(entry, bytes):
            return entry
        waiting = entry.waiting
        if waiting is None:
            entry.waiting = {key: [waiter]}
        elif key in waiting:
            waiting[key].append(waiter)
        else:
            waiting[key] = [waiter]
        return True

    def pending(self, deadline: int) -> Pending[W]:
        """A new batch for refs to :meth:`add`, each kept until ``deadline`` (rounded up
        to the granularity), pending until :meth:`acked`."""
        self._mark(deadline)
        return Pending(self._first + len(self._keys))

    def add(self, key: str, batch: Pending[W]) -> None:
        """Remember ``key`` as pending in ``batch`` (the newest one made)."""
        self._refs[key] = batch
        self._keys.append(key)

    def keep(self, key: str, deadline: int, ack: bytes) -> None:
        """Remember ``key`` as acked with ``ack`` (a receipt or a whole ack frame) until
        ``deadline`` (rounded up to the granularity)."""
        self._mark(deadline)
        self._refs[key] = ack
        self._keys.append(key)

    def acked(self, batch: Pending[W], acked: Iterable[tuple[str, bytes]]) -> dict[str, list[W]]:
        """Record the receipts of ``batch``'s keys, as (key, receipt) pairs; returns the
        resenders that were waiting for them, by key.

        A key no longer pending in ``batch`` keeps what it has: one that expired while it
        was being stored is not remembered again, and the entry of a later use of it (it
        expired, then came again) is not taken for this one's.
        """
        refs = self._refs
        if batch.start >= self._first:
            # None of its keys has expired, so each is still pending in it: a key is
            # added again only once it has expired.
            refs.update(acked)
        else:
            for key, receipt in acked:
                if refs.get(key) is batch:
                    refs[key] = receipt
        return batch.waiting or {}

    def _mark(self, deadline: int) -> None:
        """Start a run of keys at ``deadline`` rounded up, unless the newest run has it."""
        step = self._granularity
        deadline = -(-deadline // step) * step
        marks = self._marks
        if not marks or marks[-1][0] != deadline:
            marks.append((deadline, self._first + len(self._keys)))
