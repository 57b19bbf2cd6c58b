"""The refs each nick used in the last ten minutes, and the ``ack`` each one got.

A ``say`` or ``dm`` that repeats a recent ``ref`` of the same nick is a
resend: it is answered with the original ``ack`` (or, if that is not known
yet, with the ack when it comes) and never stored twice.

Theory of operation: a busy server remembers millions of refs at once
(every message of the last ten minutes), so an entry is kept as plain
strings and bytes, which Python's cyclic garbage collector never has to
look at: the key is ``nick_key + "\\0" + ref`` (a nick can hold no control
character, so the first NUL splits it unambiguously), the value is the
``ack`` as its owner keeps it. The server keeps a *receipt*
(:func:`receipt_of`): the ack's time and number packed in 16 bytes, and its
room, from which :func:`ack_from` makes the ack again for a resend; the
encoded ack would take 55 bytes more. Entries expire in the order they were
made, so a deque of keys and one of deadlines are all the bookkeeping expiry
needs. Deadlines are rounded up to a ``granularity`` (the server's is a
second), so that the refs of one second share a deadline and a count
instead of having one each (40 bytes a ref); a ref is then kept up to that
much longer.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Generic, TypeVar

from ..protocol.messages import Ack, DmEvent, Message, encode

__all__ = ["RecentRefs", "ack_from", "receipt_of", "ref_key"]

_NUMBERS = struct.Struct("<qq")

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
        return b"m" + _NUMBERS.pack(record.ts, record.seq) + record.room.encode()
    return b"d" + _NUMBERS.pack(record.ts, record.id)


def ack_from(ref: str, kept: bytes) -> bytes:
    """The encoded ``ack`` of ``ref`` from its receipt, or ``kept`` if that is the ack itself."""
    kind = kept[:1]
    if kind not in (b"m", b"d"):
        return kept  # a whole frame (as a store hands back the refs it kept)
    ts, number = _NUMBERS.unpack_from(kept, 1)
    if kind == b"m":
        return encode(Ack(ref=ref, ts=ts, room=kept[1 + _NUMBERS.size :].decode(), seq=number))
    return encode(Ack(ref=ref, ts=ts, id=number))


class RecentRefs(Generic[W]):
    """Recent refs: acked ones with their ack, unacked ones with whoever waits for it."""

    def __init__(self, granularity: int = 1) -> None:
        if granularity < 1:
            raise ValueError("granularity must be at least 1")
        self._granularity = granularity
        # One dict for both states, so that a new ref costs one lookup and one insert,
        # and its ack one lookup and one store: the ack (bytes) once acked; until then
        # its deadline as given (which use of the key this is) and the resenders waiting
        # for its ack, if any.
        self._refs: dict[str, bytes | tuple[int, list[W] | None]] = {}
        self._keys: deque[str] = deque()
        # Runs of keys (oldest first) that share a deadline: the deadline, how many keys.
        self._deadlines: deque[int] = deque()
        self._counts: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._keys)

    def expire(self, now: int) -> None:
        """Forget every ref whose (rounded) deadline is not after ``now``."""
        keys, deadlines, counts = self._keys, self._deadlines, self._counts
        while deadlines and deadlines[0] <= now:
            deadlines.popleft()
            for _ in range(counts.popleft()):
                self._refs.pop(keys.popleft(), None)

    def ack(self, key: str) -> bytes | None:
        """The ack of ``key``, if it was acked and has not expired."""
        entry = self._refs.get(key)
        return entry if isinstance(entry, bytes) else None

    def resent(self, key: str, waiter: W) -> bytes | bool:
        """What a resend of ``key`` gets: the ack if ``key`` was acked; True if it is not
        yet (``waiter`` is queued for the ack); False if ``key`` is unknown: no resend."""
        entry = self._refs.get(key)
        if entry is None:
            return False
        if isinstance(entry, bytes):
            return entry
        deadline, waiting = entry
        if waiting is None:
            self._refs[key] = (deadline, [waiter])
        else:
            waiting.append(waiter)
        return True

    def add(self, key: str, deadline: int, ack: bytes | None = None) -> None:
        """Remember ``key`` until ``deadline`` (rounded up to the granularity): acked if
        ``ack`` is given, else pending."""
        self._refs[key] = (deadline, None) if ack is None else ack
        self._keys.append(key)
        step = self._granularity
        deadline = -(-deadline // step) * step
        deadlines = self._deadlines
        if deadlines and deadlines[-1] == deadline:
            self._counts[-1] += 1
        else:
            deadlines.append(deadline)
            self._counts.append(1)

    def acked(self, key: str, ack: bytes, deadline: int | None = None) -> list[W]:
        """Record the ``ack`` of ``key``; returns the resenders that were waiting for it.

        With ``deadline`` (the one ``key`` was added with), an ack for an earlier use
        of the key, which expired while it was being stored, is not taken for the ack
        of a later one.
        """
        entry = self._refs.get(key)
        if entry is None or isinstance(entry, bytes):
            return []  # expired while it was being stored: nothing to remember it for
        given, waiting = entry
        if deadline is not None and given != deadline:
            return []  # a later use of the key, the earlier one expired meanwhile
        self._refs[key] = ack
        return waiting or []
