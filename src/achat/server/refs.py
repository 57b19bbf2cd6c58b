"""The refs each nick used in the last ten minutes, and the ``ack`` each one got.

A ``say`` or ``dm`` that repeats a recent ``ref`` of the same nick is a
resend: it is answered with the original ``ack`` (or, if that is not known
yet, with the ack when it comes) and never stored twice.

Theory of operation: a busy server remembers millions of refs at once
(every message of the last ten minutes), so an entry is kept as plain
strings and bytes, which Python's cyclic garbage collector never has to
look at: the key is ``nick_key + "\\0" + ref`` (a nick can hold no control
character, so the first NUL splits it unambiguously), or that string's
digest when it is long or not ASCII (:func:`ref_key`), the value is the
``ack`` as its owner keeps it. The server keeps a *receipt*
(:func:`receipt_of`): the ack's time and number packed in 17 bytes, and its
room, from which :func:`ack_from` makes the ack again for a resend; the
encoded ack would take 55 bytes more.

A ref is remembered with its receipt as soon as its record has a number,
before it is stored: one lookup of the table (:meth:`RecentRefs.claim`)
both finds a resend and remembers a new ref, and the ack changes nothing
in it. Whether a remembered ref's record is stored yet is for its owner to
tell from the number (the registry knows the last ``seq`` of each room it
fanned out, and the last DM it acked); a resend of one that is not waits,
by the receipt, for its ack.

The table is split by the keys' hashes into :data:`SHARDS` (64) dicts. A
dict that has filled up copies everything it holds into a new table at once,
with the loop stopped: when it doubles, and again each time the entries that
expiry deleted have used up its room. As one dict of three million refs,
that stopped the loop for 0.13–0.14 s as it grew and 0.3–0.65 s once it was
full (item 59 of docs/performance-history.md). The shards fill evenly, so
they copy themselves within a short stretch of says of one another: a read
of thousands of says (a client pipelining them) may carry several copies; a
read of a few, rarely more than one.

Entries expire in the order they were made, so a deque of keys and one of
marks (where the keys of each deadline begin) are all the bookkeeping
expiry needs. Deadlines are rounded up to a ``granularity`` (the server's
is a second), so that the refs of one second share a mark instead of
having a deadline each (40 bytes a ref); a ref is then kept up to that
much longer.
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from hashlib import blake2b
from typing import Generic, TypeAlias, TypeVar

import msgspec

from ..protocol.frames import HEADER_SIZE
from ..protocol.messages import Ack, DmEvent, Message, encode

__all__ = [
    "DEADLINE_STEP_MS",
    "PLAIN_KEY_MAX",
    "REF_BYTES",
    "SHARDS",
    "RecentRefs",
    "ack_from",
    "receipt_number",
    "receipt_of",
    "receipt_of_ack",
    "ref_key",
]

#: A receipt's head: its kind (``m`` or ``d``), the time and the seq or DM id.
_RECEIPT = struct.Struct("<cqq")

W = TypeVar("W")

#: A ref's key in the table (see ref_key).
Key: TypeAlias = str | bytes

#: What a released ref has until it expires: nothing (a use of it is new again).
_RELEASED = b""

#: The server's granularity: the refs said in one second share a deadline (and are kept
#: up to a second more than their ten minutes).
DEADLINE_STEP_MS = 1000
#: Resident memory a remembered ref takes, typically, on a server that has run for ten
#: minutes: ``benchmarks/pauses.py`` measured 194 B a ref as the table grew to three
#: million refs and 237 B once it had turned over twice (the dicts' deleted slots, and
#: freed memory taken again in pieces); a 22-character key, a receipt for a room of five
#: letters. Longer names take more, a quarter more at most (see PLAIN_KEY_MAX).
REF_BYTES = 237

#: The longest key kept as it is. A longer one, or one not ASCII (which CPython keeps
#: at one, two or four bytes a character), is kept as its digest, a bytes of 49, so
#: that no client can make its refs take much more than REF_BYTES each. As a table of
#: a million refs grew (by hand, ``/proc/self/statm``): 180 B a ref with a client's
#: usual key (``ana\0a1b2c3d4-17``), 228 B with the longest key kept plain and a
#: 32-character room; with the longest names the protocol allows, a 24-character nick
#: and a 64-character ref beyond the BMP, 575 B kept plain and 208 B as a digest. The
#: digest costs about 0.5 µs a ``say`` where it is taken, the check 28 ns.
PLAIN_KEY_MAX = 40

#: How many dicts the table is split into (a power of two). With 64, the longest read
#: of 100 says took 3.5–26 ms as the table grew to three million refs or stayed full,
#: against 0.13–0.65 s as one dict (``benchmarks/pauses.py``). More would stop the loop
#: for less at a time, but with 1,024 ingest was 7 % slower (item 59).
SHARDS = 64
#: A key's shard is picked by the upper half of its hash: a dict places a key by the
#: hash's low bits, and keys that shared those would crowd into a sliver of its slots.
_SHIFT = sys.hash_info.width // 2


def ref_key(nick_key: str, ref: str) -> Key:
    """The one key that names ``ref`` as used by the nick whose key is ``nick_key``:
    ``nick_key + "\\0" + ref``, or, if that is over :data:`PLAIN_KEY_MAX` characters
    or not ASCII, its 16-byte BLAKE2b digest (a str is never equal to a bytes)."""
    key = f"{nick_key}\0{ref}"
    if len(key) <= PLAIN_KEY_MAX and key.isascii():
        return key
    return blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def receipt_of(record: Message | DmEvent) -> bytes:
    """What the ack of a ``say`` stored as ``record`` (or a ``dm``) needs, besides its ref.

    ``m``, then the time and ``seq``, then the room; or ``d``, then the time
    and the DM's id.
    """
    if isinstance(record, Message):
        return _RECEIPT.pack(b"m", record.ts, record.seq) + record.room.encode()
    return _RECEIPT.pack(b"d", record.ts, record.id)


class _AckNumbers(msgspec.Struct):
    """What a receipt keeps of an encoded ``ack`` (its ref is skipped, not kept)."""

    type: str
    ts: int
    room: str | None = None
    seq: int | None = None
    id: int | None = None


#: 0.17 µs an ack, against 2.9 for the protocol's decoder of every server frame: a
#: server restarted under load loads millions.
_ACK_NUMBERS = msgspec.json.Decoder(_AckNumbers)


def receipt_of_ack(ack: bytes) -> bytes:
    """The receipt of an encoded ``ack`` (as a store hands back the refs it kept): a
    fifth of its size, and without the ref it echoes, which may be 64 characters of
    anything (its key names it already). Raises ValueError if ``ack`` is no ack of a
    stored record."""
    try:
        a = _ACK_NUMBERS.decode(ack[HEADER_SIZE:])
    except msgspec.DecodeError as exc:
        raise ValueError(f"not an ack: {ack[:200]!r}") from exc
    if a.type == "ack":
        if a.room is not None and a.seq is not None:
            return _RECEIPT.pack(b"m", a.ts, a.seq) + a.room.encode()
        if a.id is not None:
            return _RECEIPT.pack(b"d", a.ts, a.id)
    raise ValueError(f"not the ack of a stored record: {ack[:200]!r}")


def receipt_number(receipt: bytes) -> tuple[str | None, int]:
    """The record a receipt names: its room and ``seq``, or None and the DM's id."""
    _, _, number = _RECEIPT.unpack_from(receipt)
    return (receipt[_RECEIPT.size :].decode() if receipt[:1] == b"m" else None), number


def ack_from(ref: str, receipt: bytes) -> bytes:
    """The encoded ``ack`` of ``ref`` from its receipt."""
    _, ts, number = _RECEIPT.unpack_from(receipt)
    if receipt[:1] == b"m":
        return encode(Ack(ref=ref, ts=ts, room=receipt[_RECEIPT.size :].decode(), seq=number))
    return encode(Ack(ref=ref, ts=ts, id=number))


class RecentRefs(Generic[W]):
    """Recent refs, each with its receipt, and the resends waiting
    for the acks of records not stored yet."""

    def __init__(self, granularity: int = 1, shards: int = SHARDS) -> None:
        if granularity < 1:
            raise ValueError("granularity must be at least 1")
        if shards < 1 or shards & (shards - 1):
            raise ValueError("shards must be a power of two")
        self._granularity = granularity
        # A ref's receipt from the moment it is claimed, before its record is stored:
        # whether it is stored yet is its owner's to tell (from the record's number). In
        # the shard its key's hash picks (a str keeps its hash once computed, so the
        # dict does not compute it again).
        self._shards: list[dict[Key, bytes]] = [{} for _ in range(shards)]
        self._mask = shards - 1
        # Every key in the order claimed, the first of them the _first'th ever claimed.
        self._keys: deque[Key] = deque()
        self._first = 0
        # Where each run of keys sharing a (rounded) deadline starts, oldest first: the
        # deadline and the index (counted as _first is) of the run's first key.
        self._marks: deque[tuple[int, int]] = deque()
        #: The resenders waiting for the ack of a record not stored yet, by its receipt
        #: (which names one record: a room's seq, a DM's id).
        self.waiting: dict[bytes, list[W]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _shard(self, key: Key) -> dict[Key, bytes]:
        return self._shards[(hash(key) >> _SHIFT) & self._mask]

    def expire(self, now: int) -> None:
        """Forget every ref whose (rounded) deadline is not after ``now``."""
        marks, keys, shards, mask = self._marks, self._keys, self._shards, self._mask
        while marks and marks[0][0] <= now:
            marks.popleft()
            end = marks[0][1] if marks else self._first + len(keys)
            for _ in range(end - self._first):
                key = keys.popleft()
                shards[(hash(key) >> _SHIFT) & mask].pop(key, None)  # as _shard does
            self._first = end

    def next_expiry(self) -> int | None:
        """The deadline at which the oldest refs are forgotten (None: none is kept)."""
        return self._marks[0][0] if self._marks else None

    def get(self, key: Key) -> bytes | None:
        """What ``key`` was remembered with (a receipt or an ack), if it has not expired."""
        return self._shard(key).get(key) or None

    def deadline(self, deadline: int) -> None:
        """Have the keys claimed from now on kept until ``deadline``, rounded up to the
        granularity (a run's keys share one)."""
        step = self._granularity
        deadline = -(-deadline // step) * step
        marks = self._marks
        if not marks or marks[-1][0] != deadline:
            marks.append((deadline, self._first + len(self._keys)))

    def claim(self, key: Key, receipt: bytes) -> bytes | None:
        """Remember ``key`` with ``receipt`` (a new object) unless ``key`` is known: None
        if it was new, else what it has (``key`` is then a resend's)."""
        refs = self._shards[(hash(key) >> _SHIFT) & self._mask]  # _shard inline: per say
        kept = refs.setdefault(key, receipt)  # one lookup, new or not
        if kept is receipt:
            self._keys.append(key)
            return None
        if not kept:  # released: new again, in its place (so at its first deadline)
            refs[key] = receipt
            return None
        return kept

    def release(self, key: Key, receipt: bytes) -> None:
        """Undo the claim of ``key`` with ``receipt``, whose record never reached the
        store: a use of ``key`` is new again. It keeps its place in the expiry order
        (every key is once in it), so it is forgotten at its first deadline."""
        refs = self._shard(key)
        if refs.get(key) is receipt:
            refs[key] = _RELEASED

    def keep(self, key: Key, deadline: int, receipt: bytes) -> None:
        """Remember ``key`` with ``receipt`` until ``deadline`` (rounded up to the
        granularity)."""
        self.deadline(deadline)
        if self.claim(key, receipt) is not None:
            # Two uses of one key in force: only a clock stepped back around a restart
            # does that. The later (load_refs gives it last) at the earlier's deadline.
            self._shard(key)[key] = receipt

    def wait(self, receipt: bytes, waiter: W) -> None:
        """Have ``waiter`` wait for the ack of the record ``receipt`` names."""
        self.waiting.setdefault(receipt, []).append(waiter)
