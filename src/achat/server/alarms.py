"""Every connection's next deadline on one loop timer.

A timer handle per connection costs about 600 bytes on uvloop (the handle,
its libuv timer and the callback's arguments); an idle server holds one for
each of its clients. :class:`Deadlines` keeps them all in one heap instead
(pure, clock-free: the caller says what time it is), and :class:`Alarms`
drives it with a single ``loop.call_at`` set to the earliest deadline.

Moving or cancelling a deadline leaves the old heap entry in place but
empties it (it lets go of its item at once, so a closed session is not kept
alive by it); empty entries are skipped when they come up, and the heap is
rebuilt once they outnumber the live ones, so a server with connection churn
does not pile them up.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import typing
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["Alarms", "Deadlines", "Wakeable"]

log = logging.getLogger("achat.server")

T = TypeVar("T", bound=Hashable)

#: Below this many stale entries the heap is never rebuilt (not worth the pass).
MIN_REBUILD = 64


class Deadlines(Generic[T]):
    """Items, each due at one time; the due ones come out in time order."""

    __slots__ = ("_entries", "_heap", "_order", "_stale")

    def __init__(self) -> None:
        # Entries are [at, order, item]; an emptied one has item None.
        self._heap: list[list[typing.Any]] = []
        self._entries: dict[T, list[typing.Any]] = {}
        self._order = itertools.count()
        self._stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    def when(self, item: T) -> float | None:
        """When ``item`` is due, or None if it has no deadline."""
        entry = self._entries.get(item)
        return None if entry is None else float(entry[0])

    def set(self, item: T, at: float) -> None:
        """Make ``item`` due at ``at`` (replacing any deadline it had)."""
        old = self._entries.get(item)
        if old is not None:
            old[2] = None
            self._stale += 1
        entry = self._entries[item] = [at, next(self._order), item]
        heapq.heappush(self._heap, entry)
        self._maybe_rebuild()

    def cancel(self, item: T) -> None:
        """Forget ``item``'s deadline, if it has one."""
        entry = self._entries.pop(item, None)
        if entry is not None:
            entry[2] = None
            self._stale += 1
            self._maybe_rebuild()

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item due at or before ``now``, earliest first."""
        heap, entries = self._heap, self._entries
        due: list[T] = []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if item is None:
                self._stale -= 1
            else:
                del entries[item]
                due.append(item)
        return due

    def next_at(self) -> float | None:
        """The earliest live deadline, or None."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        return float(heap[0][0]) if heap else None

    def _maybe_rebuild(self) -> None:
        if self._stale > MIN_REBUILD and self._stale > len(self._entries):
            self._heap = list(self._entries.values())
            heapq.heapify(self._heap)
            self._stale = 0


class Wakeable(Hashable, Protocol):
    def on_deadline(self) -> None:
        """Called once when the deadline set for this item is reached."""
        ...


W = TypeVar("W", bound=Wakeable)


class Alarms(Generic[W]):
    """:class:`Deadlines` on an event loop: each item's ``on_deadline`` runs when it is due."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deadlines: Deadlines[W] = Deadlines()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return len(self._deadlines)

    def when(self, item: W) -> float | None:
        return self._deadlines.when(item)

    def set(self, item: W, at: float) -> None:
        """Call ``item.on_deadline()`` at loop time ``at`` (replacing any earlier setting)."""
        self._deadlines.set(item, at)
        if at < self._timer_at:
            self._schedule(at)

    def cancel(self, item: W) -> None:
        self._deadlines.cancel(item)

    def _schedule(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        for item in self._deadlines.pop_due(self._loop.time()):
            try:
                item.on_deadline()
            except Exception:
                # One broken callback must not cost every other connection its deadline.
                log.exception("deadline callback failed: %r", item)
        at = self._deadlines.next_at()
        if at is not None and at < self._timer_at:
            self._schedule(at)
