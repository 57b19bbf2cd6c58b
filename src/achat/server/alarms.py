"""Every connection's next deadline on one loop timer.

A timer handle per connection costs about 600 bytes on uvloop (the handle,
its libuv timer and the callback's arguments); an idle server holds one for
each of its clients. :class:`Deadlines` keeps them all in one heap instead
(pure, clock-free: the caller says what time it is), and :class:`Alarms`
drives it with a single ``loop.call_at`` set to the earliest deadline.

Moving or cancelling a deadline leaves the old heap entry in place and only
marks it stale; stale entries are skipped when they come up, and the heap is
rebuilt once they outnumber the live ones, so a server with connection churn
neither leaks entries nor keeps closed sessions alive.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["Alarms", "Deadlines", "Wakeable"]

log = logging.getLogger("achat.server")

T = TypeVar("T", bound=Hashable)

#: Below this many stale entries the heap is never rebuilt (not worth the pass).
MIN_REBUILD = 64


class Deadlines(Generic[T]):
    """Items, each due at one time; the due ones come out in time order."""

    __slots__ = ("_at", "_heap", "_order", "_stale")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._at: dict[T, float] = {}
        self._order = itertools.count()
        self._stale = 0

    def __len__(self) -> int:
        return len(self._at)

    def when(self, item: T) -> float | None:
        """When ``item`` is due, or None if it has no deadline."""
        return self._at.get(item)

    def set(self, item: T, at: float) -> None:
        """Make ``item`` due at ``at`` (replacing any deadline it had)."""
        if item in self._at:
            self._stale += 1
        self._at[item] = at
        heapq.heappush(self._heap, (at, next(self._order), item))
        self._maybe_rebuild()

    def cancel(self, item: T) -> None:
        """Forget ``item``'s deadline, if it has one."""
        if self._at.pop(item, None) is not None:
            self._stale += 1
            self._maybe_rebuild()

    def pop_due(self, now: float) -> list[T]:
        """Remove and return every item due at or before ``now``, earliest first."""
        heap, current = self._heap, self._at
        due: list[T] = []
        while heap and heap[0][0] <= now:
            at, _, item = heapq.heappop(heap)
            if current.get(item) == at:
                del current[item]
                due.append(item)
            else:
                self._stale -= 1
        return due

    def next_at(self) -> float | None:
        """The earliest live deadline, or None."""
        heap, current = self._heap, self._at
        while heap and current.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0][0] if heap else None

    def _maybe_rebuild(self) -> None:
        if self._stale > MIN_REBUILD and self._stale > len(self._at):
            self._heap = [(at, next(self._order), item) for item, at in self._at.items()]
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
