"""An in-memory :class:`~achat.store.base.Store`: fast, and gone when the process ends."""

from __future__ import annotations

import bisect
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..protocol.messages import DmEvent, Message
from .base import HistoryPage, RefRecord, RoomRecord, Store, ack_of

__all__ = ["MAX_REFS", "MemoryStore"]

MAX_REFS = 100_000


class MemoryStore(Store):
    """Keeps every room's messages in a list ordered by ``seq``.

    ``max_per_room`` bounds memory: the oldest messages of a room are dropped
    beyond it, and a request reaching into them reports a gap.
    """

    def __init__(self, max_per_room: int | None = None) -> None:
        self._messages: dict[str, list[Message]] = {}
        self._topics: dict[str, str] = {}
        self._dms: list[DmEvent] = []
        self._last_dm = 0
        # Ordered so that dropping the oldest is O(1): deleting a plain dict's first key
        # over and over leaves a run of dead slots that every next(iter()) walks again,
        # which made each say past MAX_REFS cost more than the last.
        self._refs: OrderedDict[tuple[str, str], RefRecord] = OrderedDict()
        self._max = max_per_room
        #: Messages live as long as this object: each one numbers its rooms from 1.
        self.history_id = secrets.token_hex(8)

    def load_rooms(self) -> list[RoomRecord]:
        names = set(self._messages) | set(self._topics)
        return [
            RoomRecord(
                name,
                self._topics.get(name, ""),
                self._messages[name][-1].seq if self._messages.get(name) else 0,
            )
            for name in sorted(names)
        ]

    def last_dm_id(self) -> int:
        return self._last_dm

    def load_refs(self, now: int) -> list[RefRecord]:
        return sorted((r for r in self._refs.values() if r.expires > now), key=lambda r: r.expires)

    def append_many(
        self,
        messages: Sequence[Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        for message, ref in zip(messages, refs, strict=True):
            self._remember(ref, message)
            log = self._messages.setdefault(message.room, [])
            log.append(message)
            if self._max is not None and len(log) > self._max:
                del log[: len(log) - self._max]
        on_stored()

    def append_dm(
        self, dm: DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        self._remember(ref, dm)
        self._dms.append(dm)
        self._last_dm = max(self._last_dm, dm.id)
        on_stored()

    def _remember(self, ref: RefRecord | None, record: Message | DmEvent) -> None:
        if ref is None:
            return
        if ref.ack is None:
            ref = RefRecord(ref.nick_key, ref.ref, ref.expires, ack_of(ref.ref, record))
        key = (ref.nick_key, ref.ref)
        self._refs[key] = ref
        self._refs.move_to_end(key)  # a ref used again (after it expired) is the newest
        # Refs arrive in expiry order, so the oldest are first; bound the memory they take.
        while len(self._refs) > MAX_REFS:
            self._refs.popitem(last=False)

    def set_topic(self, room: str, topic: str) -> None:
        self._topics[room] = topic

    def history(
        self, room: str, *, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        log = self._messages.get(room, [])
        seqs = [m.seq for m in log]
        oldest = seqs[0] if seqs else None
        if after is not None:
            start = bisect.bisect_right(seqs, after)
            page = log[start : start + limit]
            gap = oldest is not None and oldest > after + 1
            return HistoryPage(page, more=start + limit < len(log), gap=gap)
        end = len(log) if before is None else bisect.bisect_left(seqs, before)
        start = max(0, end - limit)
        gap = oldest is not None and oldest > 1 and start == 0 and end - start < limit
        return HistoryPage(log[start:end], more=start > 0, gap=gap)

    def close(self) -> None:
        # Nothing to flush: every append is complete when it returns.
        return None
