"""Deadlines (pure: times are plain numbers) and Alarms on a real event loop."""

from __future__ import annotations

import asyncio
import weakref

from achat.server.alarms import MIN_REBUILD, Alarms, Deadlines


def test_due_items_come_out_in_time_order_once() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("c", 3.0)
    d.set("a", 1.0)
    d.set("b", 2.0)
    assert d.next_at() == 1.0
    assert d.pop_due(0.5) == []
    assert d.pop_due(2.0) == ["a", "b"]
    assert d.pop_due(2.0) == []
    assert d.next_at() == 3.0
    assert len(d) == 1


def test_equal_times_keep_the_order_they_were_set_in() -> None:
    d: Deadlines[str] = Deadlines()
    for name in ("x", "y", "z"):
        d.set(name, 5.0)
    assert d.pop_due(5.0) == ["x", "y", "z"]


def test_setting_again_replaces_the_deadline_earlier_or_later() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("a", 1.0)
    d.set("a", 4.0)  # later: the old entry must not fire
    d.set("b", 3.0)
    d.set("b", 0.5)  # earlier
    assert d.when("a") == 4.0
    assert d.next_at() == 0.5
    assert d.pop_due(2.0) == ["b"]
    assert d.pop_due(10.0) == ["a"]
    assert d.next_at() is None


def test_cancelled_items_never_come_out() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("a", 1.0)
    d.set("b", 2.0)
    d.cancel("a")
    d.cancel("never-set")
    assert d.when("a") is None
    assert d.next_at() == 2.0
    assert d.pop_due(5.0) == ["b"]


def test_stale_entries_do_not_pile_up() -> None:
    """Churn (set, move, cancel) leaves the heap no bigger than about twice the live items."""
    d: Deadlines[int] = Deadlines()
    for i in range(10_000):
        d.set(i, 100.0 + i)
        d.set(i, 50.0 + i)
        if i % 2:
            d.cancel(i)
    assert len(d) == 5_000
    assert len(d._heap) <= 2 * len(d) + MIN_REBUILD + 1
    assert d.pop_due(50.0 + 9_999) == list(range(0, 10_000, 2))


class Sleeper:
    """Records its name when woken; ``then`` runs after that, ``broken`` raises instead."""

    def __init__(
        self, name: str, woken: list[str], then: asyncio.Future[None] | None = None
    ) -> None:
        self.name, self.woken, self.then = name, woken, then

    def on_deadline(self) -> None:
        if self.name == "broken":
            raise RuntimeError("broken callback")
        self.woken.append(self.name)
        if self.then is not None:
            self.then.set_result(None)


async def test_alarms_wake_items_in_order_on_one_timer() -> None:
    loop = asyncio.get_running_loop()
    woken: list[str] = []
    alarms: Alarms[Sleeper] = Alarms(loop)
    done: asyncio.Future[None] = loop.create_future()
    now = loop.time()
    last, late = Sleeper("last", woken, done), Sleeper("late", woken)
    early, cancelled = Sleeper("early", woken), Sleeper("cancelled", woken)
    alarms.set(last, now + 0.06)
    alarms.set(late, now + 0.04)
    alarms.set(cancelled, now + 0.01)
    alarms.set(early, now + 0.02)
    alarms.cancel(cancelled)
    async with asyncio.timeout(2):
        await done
    assert woken == ["early", "late", "last"]
    assert len(alarms) == 0


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    woken: list[str] = []
    alarms: Alarms[Sleeper] = Alarms(loop)
    done: asyncio.Future[None] = loop.create_future()
    at = loop.time() + 0.01
    alarms.set(Sleeper("broken", woken), at)
    alarms.set(Sleeper("fine", woken, done), at)
    async with asyncio.timeout(2):
        await done
    assert woken == ["fine"]


def test_a_cancelled_or_moved_item_is_not_kept_alive_by_its_old_entry() -> None:
    class Item:
        pass

    d: Deadlines[Item] = Deadlines()
    cancelled, moved = Item(), Item()
    d.set(cancelled, 10.0)
    d.set(moved, 10.0)
    d.set(moved, 20.0)
    d.cancel(cancelled)
    gone = weakref.ref(cancelled)
    del cancelled
    assert gone() is None
    assert d.pop_due(15.0) == []
    assert d.pop_due(20.0) == [moved]
