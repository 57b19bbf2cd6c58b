"""The SQLite store: persistence, group commit, schema versioning, retention, refs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from achat.protocol.messages import DmEvent, Message
from achat.store import sqlite as sqlite_store
from achat.store.base import HistoryPage, RefRecord, Store, ack_of
from achat.store.memory import MemoryStore
from achat.store.sqlite import (
    _AFTER,
    _BEFORE,
    _DECODER,
    _LOAD_REFS,
    _MIGRATIONS,
    _OLD_CHUNKS,
    CHUNK_MAX,
    REF_HORIZON_MS,
    SCHEMA_VERSION,
    SQLiteStore,
    _enable_wal,
    _Write,
)
from tests.helpers.clocks import time_with


def msg(room: str, seq: int, ts: int = 1000, text: str = "hi") -> Message:
    return Message(room=room, seq=seq, ts=ts, sender="ana", text=text)


def stored_messages(db_path: Path) -> int:
    """How many room messages the database file holds, read by a connection of its own."""
    with contextlib.closing(sqlite3.connect(db_path)) as other:
        return sum(
            len(_DECODER.decode(body)) for (body,) in other.execute("SELECT body FROM chunks")
        )


def build_schema(db: sqlite3.Connection, version: int) -> None:
    """Give the raw connection ``db`` the schema of ``version``, as an older achat made it."""
    for migration in _MIGRATIONS[:version]:
        if isinstance(migration, str):
            db.executescript(migration)
        else:
            migration(db)
    db.execute(f"PRAGMA user_version={version}")


@pytest.fixture(autouse=True)
def no_slow_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No commit on the loop counts as slow (LOOP_COMMIT_SLOW) unless a test says so: on a
    busy machine one could take over its 5 ms, and which thread commits what would then
    depend on the machine, not on the store."""
    monkeypatch.setattr(sqlite_store, "LOOP_COMMIT_SLOW", 60.0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "achat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    yield s
    s.close()


@pytest.fixture
def still_store(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQLiteStore]:
    """A store whose checkpointer thread does nothing, so that which commits the loop
    makes itself does not depend on when a checkpoint ran (see _checkpoint)."""
    monkeypatch.setattr(SQLiteStore, "_checkpoint_loop", lambda self: None)
    s = SQLiteStore(db_path)
    yield s
    s.close()


def test_messages_survive_reopening(db_path: Path) -> None:
    """Appended messages, rooms and topics are there after the store is closed and reopened."""
    s = SQLiteStore(db_path)
    for seq in range(1, 6):
        s.append(msg("general", seq), lambda: None)
    s.set_topic("general", "hello world")
    s.set_topic("empty", "nobody here")
    s.close()
    again = SQLiteStore(db_path)
    try:
        rooms = {r.name: r for r in again.load_rooms()}
        assert rooms["general"].last_seq == 5
        assert rooms["general"].topic == "hello world"
        assert rooms["empty"].last_seq == 0
        page = again.history("general", before=None, after=None, limit=10)
        assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5]
    finally:
        again.close()


def test_on_stored_runs_after_commit(store: SQLiteStore, db_path: Path) -> None:
    """on_stored is called only once the row can be read by another connection."""
    seen: list[int] = []
    done = threading.Event()

    def stored() -> None:
        seen.append(stored_messages(db_path))
        done.set()

    store.append(msg("r", 1), stored)
    assert done.wait(5)
    assert seen == [1]


async def test_callbacks_come_back_on_the_loop(store: SQLiteStore) -> None:
    """With a running loop, on_stored runs on the loop's thread, not the writer's."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    done = asyncio.Event()

    def stored() -> None:
        threads.append(threading.get_ident())
        done.set()

    store.append(msg("r", 1), stored)
    async with asyncio.timeout(5):
        await done.wait()
    assert threads == [loop_thread]


async def test_an_append_from_another_thread_is_handed_over_at_once(store: SQLiteStore) -> None:
    """While the loop runs, an append made on another thread is not held for the loop's
    tick (nothing would wake the loop for it): it goes to the writer at once, and its
    callback still comes back on the loop."""
    loop_thread = threading.get_ident()
    first = asyncio.Event()
    store.append(msg("r", 1), first.set)  # the store takes this loop as its own
    async with asyncio.timeout(5):
        await first.wait()
    threads: list[int] = []
    done = asyncio.Event()

    def stored() -> None:
        threads.append(threading.get_ident())
        done.set()

    # Made while the loop sleeps, waiting for the callback.
    other = threading.Timer(0.05, store.append, args=(msg("r", 2), stored))
    other.start()
    async with asyncio.timeout(2):
        await done.wait()
    other.join()
    assert threads == [loop_thread]


async def test_append_many_commits_together_and_calls_back_once(
    store: SQLiteStore, db_path: Path
) -> None:
    """append_many stores every message with its ref, and calls back once, after the
    commit that holds all of them; an empty list still calls back."""
    messages = [msg("r", 1), msg("s", 1), msg("r", 2)]
    refs = [RefRecord("ana", "r1", 9000), None, RefRecord("ana", "r3", 9001)]
    counts: list[int] = []
    done = asyncio.Event()

    def stored() -> None:
        counts.append(stored_messages(db_path))
        done.set()

    store.append_many(messages, refs, stored)
    # Already part of history, before the writer has it...
    assert [m.seq for m in store.history("r", before=None, after=0, limit=10).messages] == [1, 2]
    messages.append(msg("r", 3))  # ...and what the caller does with its lists after is its own
    refs.append(None)
    async with asyncio.timeout(5):
        await done.wait()
    assert counts == [3]
    assert [m.seq for m in store.history("r", before=None, after=None, limit=10).messages] == [
        1,
        2,
    ]
    assert [(r.ref, r.ack) for r in store.load_refs(0)] == [
        ("r1", ack_of("r1", messages[0])),
        ("r3", ack_of("r3", messages[2])),
    ]
    empty = asyncio.Event()
    store.append_many([], [], empty.set)
    async with asyncio.timeout(5):
        await empty.wait()
    assert store._unstored == {}
    with pytest.raises(ValueError, match="a ref"):
        store.append_many([msg("r", 3)], [], lambda: None)


def test_a_commit_forgets_its_messages_whatever_order_they_were_handed_over_in(
    store: SQLiteStore,
) -> None:
    """Once committed, messages leave the unstored ones kept for history, also when two
    threads handed theirs over in another order than they were queued in."""
    first, second, third = msg("r", 1), msg("r", 2), msg("r", 3)
    db = store._connect()
    try:
        with store._lock:  # as two threads' hand-overs may leave it: 1 and 2, then 3
            store._unstored["r"] = [first, second, third]
        store._commit(db, [_Write(([third], [None]), None, None, None)])  # queued first
        assert store._unstored == {"r": [first, second]}
        store._commit(db, [_Write(([first, second], [None, None]), None, None, None)])
        assert store._unstored == {}
    finally:
        db.close()
    assert [m.seq for m in store.history("r", before=None, after=None, limit=5).messages] == [
        1,
        2,
        3,
    ]


async def test_group_commit_batches_a_tick(store: SQLiteStore) -> None:
    """Messages appended in one tick are committed in far fewer transactions than messages."""
    acked: list[int] = []
    done = asyncio.Event()
    count = 2000

    def stored(i: int) -> None:
        acked.append(i)
        if len(acked) == count:
            done.set()

    for i in range(1, count + 1):
        store.append(msg("r", i), functools.partial(stored, i))
    async with asyncio.timeout(10):
        await done.wait()
    assert acked == list(range(1, count + 1))
    assert store.batches < count // 10


async def _stored_on(store: SQLiteStore, messages: list[Message]) -> list[str]:
    """Append ``messages`` in one tick; the threads their callback ran on, by name."""
    seen: list[str] = []
    done = asyncio.Event()

    def stored() -> None:
        seen.append(threading.current_thread().name)
        done.set()

    store.append_many(messages, [None] * len(messages), stored)
    async with asyncio.timeout(5):
        await done.wait()
    return seen


async def test_a_small_tick_is_committed_on_the_loop_before_its_callback(
    still_store: SQLiteStore, db_path: Path
) -> None:
    """While the writer has nothing of its own, a tick of up to LOOP_COMMIT_MAX messages
    is committed by the loop itself (no thread hand-over), and called back once it can
    be read by another connection; a bigger tick is the writer thread's."""
    store = still_store
    counts: list[int] = []
    done = asyncio.Event()

    def stored() -> None:
        counts.append(stored_messages(db_path))
        done.set()

    store.append(msg("r", 1), stored)
    async with asyncio.timeout(5):
        await done.wait()
    assert counts == [1]
    assert (store.batches, store.loop_batches) == (0, 1)
    assert store._unstored == {}  # never handed over, so never kept as unstored
    small = [msg("r", seq) for seq in range(2, 2 + sqlite_store.LOOP_COMMIT_MAX)]
    assert await _stored_on(store, small) == ["MainThread"]
    assert (store.batches, store.loop_batches) == (0, 2)
    big = [msg("r", seq) for seq in range(100, 101 + sqlite_store.LOOP_COMMIT_MAX)]
    assert await _stored_on(store, big) == ["MainThread"]  # called back on the loop all the same
    assert (store.batches, store.loop_batches) == (1, 2)
    assert stored_messages(db_path) == 1 + len(small) + len(big)


async def test_the_loop_does_not_commit_while_the_writer_has_something(
    still_store: SQLiteStore,
) -> None:
    """A small tick goes to the writer while something handed to it earlier is not yet
    committed and called back: committed by the loop, it could overtake it."""
    store = still_store
    gate = threading.Event()
    order: list[int] = []
    second = asyncio.Event()

    def stuck() -> None:
        gate.wait()

    def stored_second() -> None:
        order.append(2)
        second.set()

    # The writer, stuck in a callback of its own, has hand-overs outstanding.
    store._hand_over([_Write(None, None, None, stuck, in_thread=True)])
    store._hand_over(
        [_Write(([msg("r", 1)], [None]), None, None, functools.partial(order.append, 1))]
    )
    try:
        store.append(msg("r", 2), stored_second)
        await asyncio.sleep(0)  # the loop's tick is submitted
        assert not store._tick
        assert order == []
    finally:
        gate.set()  # or the store could not close
    async with asyncio.timeout(5):
        await second.wait()
    assert order == [1, 2]
    assert store.loop_batches == 0
    assert store._outstanding == 0
    assert await _stored_on(store, [msg("r", 3)]) == ["MainThread"]
    assert store.loop_batches == 1  # the writer has nothing again


async def test_a_locked_database_leaves_the_commit_to_the_writer(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop never waits for a lock: another connection's write lock sends the tick to
    the writer thread, which stores it once the lock is gone; the loop commits the next."""
    monkeypatch.setattr(SQLiteStore, "_checkpoint_loop", lambda self: None)
    monkeypatch.setattr(SQLiteStore, "busy_timeout_ms", 500)  # what the loop must not wait
    monkeypatch.setattr(SQLiteStore, "retry_seconds", 0.01)
    s = SQLiteStore(db_path)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    watch = _LogWatch("failed")
    logging.getLogger("achat").addHandler(watch)
    stored = asyncio.Event()
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, a backup...
        loop = asyncio.get_running_loop()
        started = loop.time()
        s.append(msg("r", 1), stored.set)
        await asyncio.sleep(0)  # the loop's tick is submitted
        assert loop.time() - started < 0.4  # the loop did not wait for busy_timeout
        assert await asyncio.to_thread(watch.seen.wait, 10)  # the writer's commit failed
        assert not stored.is_set()
        assert s.loop_batches == 0
        blocker.execute("COMMIT")
        async with asyncio.timeout(5):
            await stored.wait()
        assert await _stored_on(s, [msg("r", 2)]) == ["MainThread"]
        assert s.loop_batches == 1
    finally:
        logging.getLogger("achat").removeHandler(watch)
        blocker.close()
        s.close()


def _lose_loop_connection(store: SQLiteStore) -> None:
    """Close the loop's own connection, as a failed commit on the loop does."""
    assert store._loop_db is not None
    store._loop_db.close()
    store._loop_db = None


async def test_opening_the_loops_connection_is_no_part_of_a_commits_time(
    still_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit on the loop that failed closed the loop's connection; the next one opens
    another. A slow open (a cold disk) is not a slow commit: the loop keeps its commits."""
    store = still_store
    _lose_loop_connection(store)
    ahead = [0.0]  # how far the store's monotonic clock is ahead of the real one
    monkeypatch.setattr(
        sqlite_store, "time", time_with(monotonic=lambda: time.monotonic() + ahead[0])
    )
    monkeypatch.setattr(sqlite_store, "LOOP_COMMIT_SLOW", 0.5)
    open_for_the_loop = store._connect_loop

    def slow_open() -> sqlite3.Connection:
        ahead[0] += 1.0
        return open_for_the_loop()

    monkeypatch.setattr(store, "_connect_loop", slow_open)
    caplog.set_level(logging.INFO, "achat.store")
    assert await _stored_on(store, [msg("r", 1)]) == ["MainThread"]
    assert await _stored_on(store, [msg("r", 2)]) == ["MainThread"]
    assert (store.batches, store.loop_batches) == (0, 2)
    assert "a commit on the loop took" not in caplog.text


async def test_a_loop_that_cannot_open_its_connection_leaves_commits_to_the_writer(
    still_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reopening the loop's connection can fail (out of file descriptors): the tick goes to
    the writer thread, which has its own, and so do those of the next LOOP_COMMIT_PAUSE."""
    store = still_store
    _lose_loop_connection(store)

    def no_open() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store, "_connect_loop", no_open)
    caplog.set_level(logging.INFO, "achat.store")
    await _stored_on(store, [msg("r", 1)])
    assert "the loop could not open its connection" in caplog.text
    await _stored_on(store, [msg("r", 2)])
    assert (store.batches, store.loop_batches) == (2, 0)
    assert stored_messages(store.path) == 2


async def test_a_slow_or_failed_loop_commit_hands_commits_to_the_writer(
    still_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit on the loop that takes longer than LOOP_COMMIT_SLOW (a stalling disk)
    leaves the commits of the next LOOP_COMMIT_PAUSE seconds to the writer, as does one
    that fails, which the writer then tries again."""
    store = still_store
    monkeypatch.setattr(sqlite_store, "LOOP_COMMIT_SLOW", 0.0)  # every commit is slow
    caplog.set_level(logging.INFO, "achat.store")
    await _stored_on(store, [msg("r", 1)])
    assert store.loop_batches == 1
    assert "a commit on the loop took" in caplog.text
    await _stored_on(store, [msg("r", 2)])
    assert (store.batches, store.loop_batches) == (1, 1)

    monkeypatch.setattr(sqlite_store, "LOOP_COMMIT_SLOW", 60.0)
    store._loop_commits_paused_until = 0.0
    store_batch = sqlite_store._store
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing(db: sqlite3.Connection, *args: Any, **kwargs: Any) -> None:
        if failures and threading.current_thread() is threading.main_thread():
            db.execute("BEGIN IMMEDIATE")  # and fail inside the transaction
            raise failures.pop()
        store_batch(db, *args, **kwargs)

    monkeypatch.setattr(sqlite_store, "_store", failing)
    await _stored_on(store, [msg("r", 3)])
    assert "a commit on the loop failed" in caplog.text
    await _stored_on(store, [msg("r", 4)])
    assert (store.batches, store.loop_batches) == (3, 1)
    assert [m.seq for m in store.history("r", before=None, after=None, limit=9).messages] == [
        1,
        2,
        3,
        4,
    ]


async def test_the_loop_does_not_commit_while_the_writers_callbacks_wait(
    still_store: SQLiteStore,
) -> None:
    """Committed by the writer is not enough: until its callbacks have run on the loop,
    a tick the loop committed itself would be called back first."""
    store = still_store
    order: list[str] = []
    done = asyncio.Event()
    big = [msg("r", seq) for seq in range(1, 2 + sqlite_store.LOOP_COMMIT_MAX)]
    store.append_many(big, [None] * len(big), functools.partial(order.append, "big"))
    store.flush()  # on the loop: the writer has committed it, its callback waits for the loop
    assert store.batches == 1
    assert order == []

    def small() -> None:
        order.append("small")
        done.set()

    store.append(msg("r", len(big) + 1), small)
    store._submit()  # the tick's end, before the loop has run the writer's callback
    async with asyncio.timeout(5):
        await done.wait()
    assert order == ["big", "small"]
    assert store.loop_batches == 0


def _wal_bytes(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _store_big(store: SQLiteStore, seqs: range) -> None:
    """Messages of 4,000 bytes in room r, stored: a page of the WAL or so each."""
    for seq in seqs:
        store.append(msg("r", seq, text="y" * 4000), lambda: None)
    store.flush()


@contextlib.contextmanager
def _snapshot(db_path: Path) -> Iterator[None]:
    """Another connection reading the database, holding its snapshot of now until the
    block ends: a reader of the WAL that no checkpoint may copy past."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM chunks").fetchone()
        yield


async def test_a_commit_that_empties_the_wal_leaves_the_next_write_to_the_writer(
    still_store: SQLiteStore, db_path: Path
) -> None:
    """The first write after a checkpoint that copied the whole WAL starts the WAL over
    and syncs its header: the writer thread makes it, and the loop the ones after."""
    store = still_store
    await _stored_on(store, [msg("r", 1)])
    assert (store.batches, store.loop_batches) == (0, 1)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        store._checkpoint(db)
        assert store._wal_may_restart
        await _stored_on(store, [msg("r", 2)])
        assert (store.batches, store.loop_batches) == (1, 1)
        assert not store._wal_may_restart
        await _stored_on(store, [msg("r", 3)])
        assert (store.batches, store.loop_batches) == (1, 2)
        with _snapshot(db_path):  # from before 4
            await _stored_on(store, [msg("r", 4)])
            store._checkpoint(db)  # cannot copy 4: the reader's snapshot is older
        assert not store._wal_may_restart
        await _stored_on(store, [msg("r", 5)])
        assert (store.batches, store.loop_batches) == (1, 4)


@pytest.fixture
def small_wal_store(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQLiteStore]:
    """A still store whose WAL is started over past 64 KiB and cut back to 128 KiB:
    patched before it opens, since its connections read the limit as they open."""
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_BYTES", 64 * 1024)
    monkeypatch.setattr(SQLiteStore, "_checkpoint_loop", lambda self: None)
    s = SQLiteStore(db_path)
    yield s
    s.close()


class _CommitDuringCheckpoint:
    """The checkpointer's connection as under steady writing: right after the PASSIVE
    checkpoint's copy, the writer thread commits (a tick handed over from another
    thread), so the WAL holds a commit that the checkpoint did not copy."""

    def __init__(self, db: sqlite3.Connection, store: SQLiteStore, message: Message) -> None:
        self.db, self.store, self.message = db, store, message

    def execute(self, sql: str) -> sqlite3.Cursor:
        cursor = self.db.execute(sql)
        if "PASSIVE" in sql:
            answer = cursor.fetchone()

            def commit() -> None:
                self.store.append(self.message, lambda: None)
                self.store.flush()

            writer = threading.Thread(target=commit)
            writer.start()
            writer.join()
            cursor = self.db.execute("SELECT ?, ?, ?", answer)  # what PASSIVE answered
        return cursor


async def test_a_big_wal_starts_over_though_commits_land_during_checkpoints(
    small_wal_store: SQLiteStore, db_path: Path
) -> None:
    """A PASSIVE checkpoint leaves starting the WAL over to the next write, which cannot
    when a commit landed after the checkpoint's copy: under steady writing one always
    does, and the WAL grew without end (531 MB in 22 s of ingest). Past
    WAL_RESTART_BYTES a RESTART checkpoint follows, which copies that commit too, so
    that the next write starts the WAL over (and cuts its file back). That write syncs
    the WAL's header: the writer's, though the writer committed during the checkpoint."""
    store = small_wal_store
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute(f"PRAGMA busy_timeout={sqlite_store.WAL_RESTART_WAIT_MS}")
        _store_big(store, range(1, 80))
        assert _wal_bytes(db_path) > 2 * 128 * 1024
        steady = _CommitDuringCheckpoint(db, store, msg("r", 80))
        store._checkpoint(cast(sqlite3.Connection, steady))
        assert store.wal_restarts == 1
        assert store._wal_may_restart
        batches, loop_batches = store.batches, store.loop_batches
        await _stored_on(store, [msg("r", 81)])
        assert (store.batches, store.loop_batches) == (batches + 1, loop_batches)
        assert _wal_bytes(db_path) <= 128 * 1024
        assert not store._wal_may_restart
        await _stored_on(store, [msg("r", 82)])
        assert (store.batches, store.loop_batches) == (batches + 1, loop_batches + 1)
    assert stored_messages(db_path) == 82


def test_a_checkpoint_restarts_the_wal_only_past_its_limit(
    small_wal_store: SQLiteStore, db_path: Path
) -> None:
    store = small_wal_store
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        store._checkpoint(db)  # the schema's pages, written as the store opened
        store.append(msg("r", 1), lambda: None)  # the WAL starts over
        store.flush()
        store.wal_restarts = 0
        store._checkpoint(db)
        assert store.wal_restarts == 0  # a few pages: PASSIVE alone
        _store_big(store, range(2, 40))
        store._checkpoint(db)
        assert store.wal_restarts == 1
        assert store._wal_may_restart
        _store_big(store, range(40, 80))
        with _snapshot(db_path):
            store.append(msg("r", 80), lambda: None)
            store.flush()
            store._checkpoint(db)  # cannot copy 80, so does not try to start over
        assert store.wal_restarts == 1
        assert not store._wal_may_restart


def test_a_reader_that_outlasts_the_restart_leaves_it_to_the_next_write(
    small_wal_store: SQLiteStore, db_path: Path
) -> None:
    """RESTART copies everything, then gives up waiting for a reader of the WAL: the
    next write still starts the WAL over once that reader is done, so it stays the
    writer's to make."""
    store = small_wal_store
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute(f"PRAGMA busy_timeout={sqlite_store.WAL_RESTART_WAIT_MS}")
        _store_big(store, range(1, 40))
        with _snapshot(db_path):  # the latest
            store._checkpoint(db)
        assert store.wal_restarts == 0  # not started over: the reader outlasted the wait
        assert store._wal_may_restart


async def test_a_callback_that_raises_leaves_the_others_to_run(
    still_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one callback of a commit is logged; the commit's other callbacks (acks and
    deliveries of stored messages) still run, on either thread's commits."""
    store = still_store

    def broken() -> None:
        raise RuntimeError("a bug")

    for size in (1, sqlite_store.LOOP_COMMIT_MAX + 1):  # on the loop, then the writer
        done = asyncio.Event()
        base = 1000 * size
        store.append_many([msg("r", base)], [None], broken)
        more = [msg("r", base + i) for i in range(1, size + 1)]
        store.append_many(more, [None] * size, done.set)
        async with asyncio.timeout(5):
            await done.wait()
    assert caplog.text.count("a callback of a commit failed") == 2
    assert (store.batches, store.loop_batches) == (1, 1)


async def test_any_error_in_a_loop_commit_lets_go_of_the_write_lock(
    still_store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only SQLite's errors: whatever stops a commit on the loop mid-transaction, the
    loop's connection lets go of the lock, and the writer stores the tick."""
    store = still_store
    store_batch = sqlite_store._store
    failures = [OverflowError("a bug")]

    def failing(db: sqlite3.Connection, *args: Any, **kwargs: Any) -> None:
        if failures and threading.current_thread() is threading.main_thread():
            db.execute("BEGIN IMMEDIATE")
            raise failures.pop()
        store_batch(db, *args, **kwargs)

    monkeypatch.setattr(sqlite_store, "_store", failing)
    assert await _stored_on(store, [msg("r", 1)]) == ["MainThread"]
    assert (store.batches, store.loop_batches) == (1, 0)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # nobody holds the lock
        other.execute("ROLLBACK")
    store._loop_commits_paused_until = 0.0
    await _stored_on(store, [msg("r", 2)])
    assert store.loop_batches == 1  # on a new connection of the loop's


async def test_closing_on_the_loop_hands_the_tick_to_the_writer(db_path: Path) -> None:
    """close() and flush() commit what the tick holds through the writer thread: no
    callback runs from inside them."""
    s = SQLiteStore(db_path)
    called: list[int] = []
    s.append(msg("r", 1), functools.partial(called.append, 1))
    s.flush()
    assert called == []
    assert (s.batches, s.loop_batches) == (1, 0)
    s.append(msg("r", 2), functools.partial(called.append, 2))
    s.close()
    assert called == []
    assert s.batches == 2
    await asyncio.sleep(0)  # the callbacks, queued on the loop
    assert called == [1, 2]
    again = SQLiteStore(db_path)
    try:
        assert [m.seq for m in again.history("r", before=None, after=None, limit=5).messages] == [
            1,
            2,
        ]
    finally:
        again.close()


async def test_full_durability_never_commits_on_the_loop(db_path: Path) -> None:
    """With durability='full' a commit waits for an fsync: never on the loop."""
    s = SQLiteStore(db_path, durability="full")
    try:
        assert await _stored_on(s, [msg("r", 1)]) == ["MainThread"]
        assert (s.batches, s.loop_batches) == (1, 0)
    finally:
        s.close()


def test_history_sees_unstored_messages(db_path: Path) -> None:
    """A message queued but not committed yet is already part of history (no gap)."""
    s = SQLiteStore(db_path)
    try:
        gate = threading.Event()

        # Block the writer thread inside a callback so later appends stay queued.
        def block() -> None:
            gate.wait()

        s.append(msg("r", 1), block)
        s.append(msg("r", 2), lambda: None)
        page = s.history("r", before=None, after=0, limit=10)
        assert [m.seq for m in page.messages] == [1, 2]
        gate.set()
    finally:
        s.close()


async def test_history_sees_messages_appended_this_tick(store: SQLiteStore) -> None:
    """On the loop, a message appended a moment ago (not handed to the writer yet) is there."""
    store.append(msg("r", 1), lambda: None)
    store.append(msg("other", 1), lambda: None)
    store.append(msg("r", 2), lambda: None)
    assert store._tick  # still this tick
    assert [m.seq for m in store.history("r", before=None, after=None, limit=10).messages] == [1, 2]
    assert [m.seq for m in store.history("r", before=None, after=1, limit=10).messages] == [2]


def test_history_paging(store: SQLiteStore) -> None:
    """before/after/limit select the right window, oldest first, with `more` set correctly."""
    for seq in range(1, 21):
        store.append(msg("r", seq), lambda: None)
    store.flush()
    latest = store.history("r", before=None, after=None, limit=5)
    assert [m.seq for m in latest.messages] == [16, 17, 18, 19, 20]
    assert latest.more
    before = store.history("r", before=4, after=None, limit=5)
    assert [m.seq for m in before.messages] == [1, 2, 3]
    assert not before.more
    after = store.history("r", before=None, after=17, limit=5)
    assert [m.seq for m in after.messages] == [18, 19, 20]
    assert not after.more
    middle = store.history("r", before=None, after=5, limit=3)
    assert [m.seq for m in middle.messages] == [6, 7, 8]
    assert middle.more
    assert store.history("nowhere", before=None, after=None, limit=5).messages == []


def test_refs_persist_until_they_expire(db_path: Path) -> None:
    """Refs stored with a message are loaded again after a restart, unless expired."""
    s = SQLiteStore(db_path)
    s.append(msg("r", 1), lambda: None, RefRecord("ana", "ref-1", 5_000, b"ack-1"))
    s.append_dm(
        DmEvent(sender="ana", to="bob", id=1, ts=10, text="psst"),
        lambda: None,
        RefRecord("ana", "ref-2", 9_000, b"ack-2"),
    )
    s.close()
    again = SQLiteStore(db_path)
    try:
        assert [(r.ref, r.ack) for r in again.load_refs(now=1_000)] == [
            ("ref-1", b"ack-1"),
            ("ref-2", b"ack-2"),
        ]
        assert [r.ref for r in again.load_refs(now=6_000)] == ["ref-2"]
        assert again.last_dm_id() == 1
    finally:
        again.close()


def test_schema_version_is_recorded(store: SQLiteStore, db_path: Path) -> None:
    """A new database carries the current schema version in user_version, in WAL mode."""
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_the_history_id_stays_with_the_file(db_path: Path, tmp_path: Path) -> None:
    """The id of the numbering of messages is made with the file and read back with it;
    another file numbers its own messages, with another id."""
    first = SQLiteStore(db_path)
    made = first.history_id
    first.close()
    again = SQLiteStore(db_path)
    other = SQLiteStore(tmp_path / "other.db")
    try:
        assert again.history_id == made
        assert other.history_id != made
        assert len(made) == 16
    finally:
        again.close()
        other.close()


def test_newer_schema_is_refused(db_path: Path) -> None:
    """A database written by a newer achat is refused instead of being misread."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="schema version"):
        SQLiteStore(db_path)


def test_retention_by_count_reports_a_gap(db_path: Path) -> None:
    """history_max deletes the oldest messages of a room and history reports the gap."""
    s = SQLiteStore(db_path, history_max=5)
    try:
        for seq in range(1, 13):
            s.append(msg("r", seq), lambda: None)
        s.flush()
        s.prune_now()
        page = s.history("r", before=None, after=0, limit=100)
        assert [m.seq for m in page.messages] == [8, 9, 10, 11, 12]
        assert page.gap
        assert not s.history("r", before=None, after=9, limit=100).gap
    finally:
        s.close()


def test_retention_by_age(db_path: Path) -> None:
    """history_days deletes messages older than the cut-off, judged by the injected clock."""
    day = 86_400_000
    now = 100 * day
    s = SQLiteStore(db_path, history_days=2, clock=lambda: now)
    try:
        s.append(msg("r", 1, ts=now - 3 * day), lambda: None)
        s.append(msg("r", 2, ts=now - 1 * day), lambda: None)
        s.flush()
        s.prune_now()
        page = s.history("r", before=None, after=None, limit=10)
        assert [m.seq for m in page.messages] == [2]
        assert s.load_rooms()[0].last_seq == 2
    finally:
        s.close()


@pytest.mark.parametrize(
    ("query", "args", "table", "index"),
    [
        (_OLD_CHUNKS, (1, 2), "chunks", "chunks_min_ts"),
        (_LOAD_REFS, (1, 2), "chunks", "chunks_max_ts"),
        ("DELETE FROM dms WHERE ts < 5", (), "dms", "dms_ts"),
        (_LOAD_REFS, (1, 2), "dms", "dms_ts"),
    ],
)
def test_what_runs_on_a_timer_or_at_startup_finds_rows_by_time(
    store: SQLiteStore, query: str, args: tuple[int, ...], table: str, index: str
) -> None:
    """Retention by age and load_refs search by time through an index, not the whole table."""
    plan = store._reader.execute(f"EXPLAIN QUERY PLAN {query}", args).fetchall()
    steps = [str(row[3]) for row in plan if f" {table} " in f" {row[3]} "]
    assert steps, plan
    assert all(f"INDEX {index} " in step for step in steps), plan


@pytest.mark.parametrize("query", [_AFTER, _BEFORE])
def test_history_finds_a_rooms_chunks_through_its_index(store: SQLiteStore, query: str) -> None:
    """A history page reads the chunks of its room near its starting point, by index."""
    plan = store._reader.execute(f"EXPLAIN QUERY PLAN {query}", ("r", 5)).fetchall()
    steps = [str(row[3]) for row in plan if " chunks " in f" {row[3]} "]
    assert steps, plan
    assert all("INDEX chunks_room_seq (room=? AND last_seq" in step for step in steps), plan


class _LogWatch(logging.Handler):
    """Sets an event when the store logs a line containing ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_a_prune_that_cannot_start_leaves_the_writer_storing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holding the write lock too long costs a prune, not the writer."""
    monkeypatch.setattr(SQLiteStore, "busy_timeout_ms", 20)
    SQLiteStore(db_path).close()  # the database, at the current schema
    watch = _LogWatch("could not start")
    logging.getLogger("achat").addHandler(watch)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, a backup...
        s = SQLiteStore(db_path, history_days=1)  # its writer prunes as it starts
        assert watch.seen.wait(10)
        blocker.execute("COMMIT")
        stored: list[int] = []
        s.append(msg("r", 1), lambda: stored.append(1))
        s.flush()
        assert stored == [1]
        s.close()
    finally:
        logging.getLogger("achat").removeHandler(watch)
        blocker.close()


def test_a_commit_that_fails_is_tried_again_until_it_is_stored(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit another connection's lock keeps out is retried in order, not dropped."""
    monkeypatch.setattr(SQLiteStore, "busy_timeout_ms", 20)
    monkeypatch.setattr(SQLiteStore, "retry_seconds", 0.01)
    s = SQLiteStore(db_path)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    watch = _LogWatch("failed")
    logging.getLogger("achat").addHandler(watch)
    stored: list[int] = []
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, a backup...
        s.append(msg("r", 1), lambda: stored.append(1))
        s.append(msg("r", 2), lambda: stored.append(2))
        assert watch.seen.wait(10)  # the commit failed: nothing is acked meanwhile
        assert stored == []
        blocker.execute("COMMIT")
        s.append(msg("r", 3), lambda: stored.append(3))
        s.flush()
        assert stored == [1, 2, 3]
        assert [m.seq for m in s.history("r", before=None, after=None, limit=10).messages] == [
            1,
            2,
            3,
        ]
    finally:
        logging.getLogger("achat").removeHandler(watch)
        blocker.close()
        s.close()


def test_the_writer_outlives_a_transaction_that_sqlite_ended_itself(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after which SQLite has rolled back (a full disk, an interrupt) is retried."""
    monkeypatch.setattr(SQLiteStore, "retry_seconds", 0.01)
    interrupt = threading.Event()
    connect = SQLiteStore._connect

    def interruptible(self: SQLiteStore) -> sqlite3.Connection:
        db = connect(self)
        if threading.current_thread().name == "achat-store":
            inserting = [False]

            def trace(sql: str) -> None:
                inserting[0] = sql.lstrip().upper().startswith("INSERT")

            def progress() -> int:
                if inserting[0] and interrupt.is_set():
                    interrupt.clear()
                    return 1  # SQLITE_INTERRUPT: SQLite rolls the transaction back itself
                return 0

            db.set_trace_callback(trace)
            db.set_progress_handler(progress, 1)
        return db

    monkeypatch.setattr(SQLiteStore, "_connect", interruptible)
    s = SQLiteStore(db_path)
    watch = _LogWatch("failed")
    logging.getLogger("achat").addHandler(watch)
    stored: list[int] = []
    try:
        interrupt.set()
        s.append(msg("r", 1), lambda: stored.append(1))
        s.flush()  # stored on the second try
        assert watch.seen.is_set()
        assert stored == [1]
        assert s._writer.is_alive()
    finally:
        logging.getLogger("achat").removeHandler(watch)
        s.close()


def test_refs_load_oldest_first_whatever_they_come_from(db_path: Path) -> None:
    """load_refs orders by expiry across the refs table, messages and DMs."""
    day = 86_400_000
    s = SQLiteStore(db_path, history_days=1, clock=lambda: 10 * day)
    try:
        s.append(msg("r", 1, ts=8 * day), lambda: None, RefRecord("ana", "moved", 10 * day + 900))
        s.append(msg("r", 2, ts=10 * day), lambda: None, RefRecord("ana", "msg", 10 * day + 500))
        dm = DmEvent(sender="ana", to="bob", id=1, ts=10 * day, text="x")
        s.append_dm(dm, lambda: None, RefRecord("ana", "dm", 10 * day + 100))
        s.flush()
        s.prune_now()  # "moved" now lives in the refs table, expiring last
        loaded = s.load_refs(now=10 * day)
        assert [r.ref for r in loaded] == ["dm", "msg", "moved"]
        assert loaded[2].ack == ack_of("moved", msg("r", 1, ts=8 * day))
    finally:
        s.close()


def test_a_pruned_dm_keeps_its_derived_ack(db_path: Path) -> None:
    """Retention by age moves a DM's ref, whose ack it derives, to the refs table."""
    day = 86_400_000
    s = SQLiteStore(db_path, history_days=1, clock=lambda: 10 * day)
    dm = DmEvent(sender="ana", to="bob", id=4, ts=8 * day, text="old")
    try:
        s.append_dm(dm, lambda: None, RefRecord("ana", "old-dm", 10 * day + 100))
        s.flush()
        s.prune_now()
        assert s._reader.execute("SELECT count(*) FROM dms").fetchone()[0] == 0
        assert [(r.ref, r.ack) for r in s.load_refs(now=10 * day)] == [
            ("old-dm", ack_of("old-dm", dm))
        ]
    finally:
        s.close()


def test_a_version_2_database_keeps_the_acks_it_stored(db_path: Path) -> None:
    """Rows written by schema 2 carry their ack: it is what loads, also once pruned."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    build_schema(raw, 2)
    raw.execute("INSERT INTO messages VALUES ('r', 1, 1000, 'ana', 'a', 'ana', 'm1', 9000, x'01')")
    raw.execute("INSERT INTO messages VALUES ('r', 2, 1001, 'ana', 'b', 'ana', 'm2', 9000, x'02')")
    raw.execute("INSERT INTO dms VALUES (5, 1002, 'ana', 'bob', 'c', 'ana', 'd1', 9000, x'03')")
    raw.execute("INSERT INTO rooms VALUES ('r', '', 2)")
    raw.close()
    s = SQLiteStore(db_path, history_max=1, clock=lambda: 3_000)
    try:
        expected = [("m1", b"\x01"), ("m2", b"\x02"), ("d1", b"\x03")]
        assert [(r.ref, r.ack) for r in s.load_refs(now=3_000)] == expected
        s.prune_now()  # moves m1 to the refs table with its ack
        assert [(r.ref, r.ack) for r in s.load_refs(now=3_000)] == expected
        indexes = s._reader.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        assert "dms_ts" in {name for (name,) in indexes}
        assert len(s.history_id) == 16  # given one by the upgrade
    finally:
        s.close()


def _signal_write_lock_requests(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when a connection opened from now on asks for the write lock."""
    waiting = threading.Event()
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(*args, **kwargs)
        db.set_trace_callback(lambda sql: waiting.set() if "IMMEDIATE" in sql else None)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    return waiting


def test_prune_now_waits_for_the_writer(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune_now from its own connection waits for a write in progress instead of failing."""
    day = 86_400_000
    s = SQLiteStore(db_path, history_days=1, clock=lambda: 10 * day)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        s.append(msg("r", 1, ts=day), lambda: None)
        s.flush()
        blocker.execute("BEGIN IMMEDIATE")  # a write in progress elsewhere
        waiting = _signal_write_lock_requests(monkeypatch)
        pruning = threading.Thread(target=s.prune_now)
        pruning.start()
        assert waiting.wait(10)  # prune_now asked for the write lock up front...
        blocker.execute("COMMIT")
        pruning.join(10)
        # ...and got it once the other write was done.
        assert s.history("r", before=None, after=None, limit=10).messages == []
    finally:
        blocker.close()
        s.close()


def test_full_durability_is_accepted(db_path: Path) -> None:
    """durability='full' opens the database with synchronous=FULL; anything else is refused."""
    s = SQLiteStore(db_path, durability="full")
    try:
        assert s._reader.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        s.close()
    with pytest.raises(ValueError, match="durability"):
        SQLiteStore(db_path, durability="sometimes")


def test_a_version_1_database_is_migrated_and_keeps_its_refs(db_path: Path) -> None:
    """Schema 1 kept refs in their own table only; after migrating, both kinds load."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path, isolation_level=None)
    build_schema(raw, 1)
    raw.execute("INSERT INTO messages VALUES ('r', 1, 1000, 'ana', 'old')")
    raw.execute("INSERT INTO refs VALUES ('ana', 'old-ref', 5000, x'01')")
    raw.close()
    s = SQLiteStore(db_path)
    try:
        s.append(msg("r", 2), lambda: None, RefRecord("ana", "new-ref", 6_000, b"\x02"))
        s.flush()
        assert [(r.ref, r.ack) for r in s.load_refs(now=2_000)] == [
            ("old-ref", b"\x01"),
            ("new-ref", b"\x02"),
        ]
        page = s.history("r", before=None, after=None, limit=10)
        assert [m.text for m in page.messages] == ["old", "hi"]
        assert s._reader.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def test_retention_keeps_refs_that_are_still_in_force(db_path: Path) -> None:
    """Deleting old messages must not forget their refs before they expire (resend safety)."""
    s = SQLiteStore(db_path, history_max=1, clock=lambda: 3_000)
    try:
        s.append(msg("r", 1), lambda: None, RefRecord("ana", "expired", 2_000, b"a"))
        s.append(msg("r", 2), lambda: None, RefRecord("ana", "in-force", 9_000, b"b"))
        s.append(msg("r", 3), lambda: None, RefRecord("ana", "kept-row", 9_500, b"c"))
        s.flush()
        s.prune_now()
        assert [m.seq for m in s.history("r", before=None, after=None, limit=10).messages] == [3]
        assert [r.ref for r in s.load_refs(now=3_000)] == ["in-force", "kept-row"]
    finally:
        s.close()
    again = SQLiteStore(db_path)
    try:
        assert [r.ref for r in again.load_refs(now=3_000)] == ["in-force", "kept-row"]
    finally:
        again.close()


def test_an_ack_left_out_is_derived_from_its_row(db_path: Path) -> None:
    """A ref stored without its ack gets back the ack of its message or DM, also once pruned."""
    s = SQLiteStore(db_path, history_max=1, clock=lambda: 3_000)
    dm = DmEvent(sender="ana", to="bob", id=7, ts=40, text="psst")
    try:
        s.append(msg("r", 1), lambda: None, RefRecord("ana", "pruned", 9_000))
        s.append(msg("r", 2), lambda: None, RefRecord("ana", "kept", 9_100))
        s.append_dm(dm, lambda: None, RefRecord("ana", "dm", 9_200))
        s.flush()
        (body,) = s._reader.execute("SELECT body FROM chunks").fetchone()
        assert [(e.ref, e.ack) for e in _DECODER.decode(body)] == [("pruned", None), ("kept", None)]
        s.prune_now()
    finally:
        s.close()
    again = SQLiteStore(db_path)
    try:
        assert [(r.ref, r.ack) for r in again.load_refs(now=3_000)] == [
            ("pruned", ack_of("pruned", msg("r", 1))),
            ("kept", ack_of("kept", msg("r", 2))),
            ("dm", ack_of("dm", dm)),
        ]
    finally:
        again.close()


def test_a_migration_done_meanwhile_by_another_process_is_not_repeated(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers opening an old database at once: the second finds it migrated, no error."""
    db_path.parent.mkdir(parents=True)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")  # as every achat database is
    build_schema(other, 1)
    other.execute("BEGIN IMMEDIATE")  # the other process is migrating right now
    opened: list[SQLiteStore | BaseException] = []

    def open_store() -> None:
        try:
            opened.append(SQLiteStore(db_path))
        except BaseException as exc:  # reported below
            opened.append(exc)

    thread = threading.Thread(target=open_store)
    waiting = _signal_write_lock_requests(monkeypatch)
    thread.start()
    # The store has read version 1 and now waits for the lock the other process holds.
    assert waiting.wait(10)
    second = _MIGRATIONS[1]
    assert isinstance(second, str)
    for statement in second.split(";"):
        if statement.strip():
            other.execute(statement)
    other.execute("PRAGMA user_version=2")
    other.execute("COMMIT")
    other.close()
    thread.join(10)
    assert len(opened) == 1
    store = opened[0]
    assert isinstance(store, SQLiteStore), store
    try:
        assert store._reader.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        store.close()


# -- the log of chunks ---------------------------------------------------------------


def chunk_bounds(store: SQLiteStore, room: str) -> list[tuple[int, int]]:
    """The seq range of each of ``room``'s chunks, in seq order."""
    rows = store._reader.execute(
        "SELECT first_seq, last_seq FROM chunks WHERE room = ? ORDER BY last_seq", (room,)
    )
    return [(first, last) for first, last in rows]


def pages(store: Store, room: str, top: int) -> list[tuple[str, int | None, int, HistoryPage]]:
    """Every page a client could ask for around seqs 1..``top``, with how it asked."""
    out: list[tuple[str, int | None, int, HistoryPage]] = []
    for limit in (1, 2, 3, 5, 7, 12, 40):
        out.append(
            ("latest", None, limit, store.history(room, before=None, after=None, limit=limit))
        )
        for point in range(0, top + 2):
            out.append(
                ("after", point, limit, store.history(room, before=None, after=point, limit=limit))
            )
            out.append(
                ("before", point, limit, store.history(room, before=point, after=None, limit=limit))
            )
    return out


def test_history_pages_across_chunk_boundaries_are_those_of_the_memory_store(
    store: SQLiteStore,
) -> None:
    """Pages that start, end or lie inside chunks, in both directions, have the messages,
    `more` and `gap` of the memory store given the same messages."""
    memory = MemoryStore()
    for first, last in ((1, 5), (6, 6), (7, 13), (14, 15)):  # a commit each: a chunk each
        for seq in range(first, last + 1):
            message = msg("r", seq, ts=1000 + seq, text=f"m{seq}")
            store.append(message, lambda: None)
            memory.append(message, lambda: None)
        store.flush()
    assert chunk_bounds(store, "r") == [(1, 5), (6, 6), (7, 13), (14, 15)]
    assert pages(store, "r", 15) == pages(memory, "r", 15)
    # A few by hand, so that the memory store is not the only judge.
    page = store.history("r", before=None, after=3, limit=5)
    assert ([m.seq for m in page.messages], page.more) == ([4, 5, 6, 7, 8], True)
    page = store.history("r", before=12, after=None, limit=8)
    assert ([m.seq for m in page.messages], page.more) == ([4, 5, 6, 7, 8, 9, 10, 11], True)
    page = store.history("r", before=9, after=None, limit=10)
    assert ([m.seq for m in page.messages], page.more) == ([1, 2, 3, 4, 5, 6, 7, 8], False)
    assert [m.text for m in store.history("r", before=None, after=12, limit=9).messages] == [
        "m13",
        "m14",
        "m15",
    ]


def test_a_big_commit_is_split_into_capped_chunks(store: SQLiteStore) -> None:
    """A commit holding more than CHUNK_MAX messages of a room stores several chunks,
    none bigger than CHUNK_MAX, and history reads across them."""
    total = 2 * CHUNK_MAX + 88
    messages = [msg("r", seq, ts=seq) for seq in range(1, total + 1)]
    messages.insert(100, msg("s", 1))  # another room's in the same commit
    store.append_many(messages, [None] * len(messages), lambda: None)
    store.flush()  # one hand-over, so one commit
    assert chunk_bounds(store, "r") == [
        (1, CHUNK_MAX),
        (CHUNK_MAX + 1, 2 * CHUNK_MAX),
        (2 * CHUNK_MAX + 1, total),
    ]
    assert chunk_bounds(store, "s") == [(1, 1)]
    middle = store.history("r", before=None, after=CHUNK_MAX - 2, limit=5)
    assert [m.seq for m in middle.messages] == list(range(CHUNK_MAX - 1, CHUNK_MAX + 4))
    back = store.history("r", before=2 * CHUNK_MAX + 3, after=None, limit=CHUNK_MAX + 10)
    assert [m.seq for m in back.messages] == list(range(CHUNK_MAX - 7, 2 * CHUNK_MAX + 3))
    assert back.more
    assert {r.name: r.last_seq for r in store.load_rooms()} == {"r": total, "s": 1}


def test_retention_by_age_cuts_through_a_chunk_exactly(db_path: Path) -> None:
    """history_days deletes exactly the messages older than the cut-off, also from inside
    a chunk whose times are out of order, and their refs in force load after reopening."""
    day = 86_400_000
    now = 100 * day
    old, new = now - 3 * day, now - 1_000
    s = SQLiteStore(db_path, history_days=2, clock=lambda: now)
    times = {1: old, 2: old, 3: old, 4: new, 5: old, 6: new, 7: new, 8: old, 9: new}
    refs = {
        2: RefRecord("ana", "gone-expired", now - 1),
        3: RefRecord("ana", "gone-in-force", now + 500),
        5: RefRecord("ana", "gone-own-ack", now + 600, b"own"),
        6: RefRecord("ana", "kept", now + 700),
    }
    try:
        for seq in (1, 2, 3):  # a chunk wholly older than the cut-off
            s.append(msg("r", seq, ts=times[seq]), lambda: None, refs.get(seq))
        s.flush()
        for seq in range(4, 10):  # one it falls into, out of time order
            s.append(msg("r", seq, ts=times[seq]), lambda: None, refs.get(seq))
        s.flush()
        s.append(msg("s", 1, ts=old), lambda: None)  # a room left with nothing
        s.flush()
        s.prune_now()
        page = s.history("r", before=None, after=0, limit=10)
        assert [m.seq for m in page.messages] == [4, 6, 7, 9]
        assert page.gap
        assert chunk_bounds(s, "r") == [(4, 9)]
        assert chunk_bounds(s, "s") == []
        assert {r.name: r.last_seq for r in s.load_rooms()} == {"r": 9, "s": 1}
    finally:
        s.close()
    again = SQLiteStore(db_path)
    try:
        assert [(r.ref, r.ack) for r in again.load_refs(now)] == [
            ("gone-in-force", ack_of("gone-in-force", msg("r", 3, ts=old))),
            ("gone-own-ack", b"own"),
            ("kept", ack_of("kept", msg("r", 6, ts=new))),
        ]
        assert [m.seq for m in again.history("r", before=None, after=None, limit=2).messages] == [
            7,
            9,
        ]
    finally:
        again.close()


def test_retention_by_count_cuts_through_a_chunk_exactly(db_path: Path) -> None:
    """history_max keeps exactly the last messages of each room, cutting the chunk the
    limit falls into, and the refs in force of those deleted load after reopening."""
    s = SQLiteStore(db_path, history_max=7, clock=lambda: 3_000)
    refs = {
        3: RefRecord("ana", "whole-chunk", 9_000),
        7: RefRecord("ana", "cut-chunk", 9_100),
        8: RefRecord("ana", "expired", 2_000),
        12: RefRecord("ana", "kept", 9_200),
    }
    try:
        for first, last in ((1, 5), (6, 10), (11, 15)):
            for seq in range(first, last + 1):
                s.append(msg("r", seq), lambda: None, refs.get(seq))
            s.flush()
        s.append(msg("small", 1), lambda: None)  # under the limit: untouched
        s.flush()
        s.prune_now()
        page = s.history("r", before=None, after=None, limit=20)
        assert [m.seq for m in page.messages] == list(range(9, 16))
        assert page.gap
        assert not s.history("r", before=None, after=8, limit=20).gap
        assert chunk_bounds(s, "r") == [(9, 10), (11, 15)]
        assert chunk_bounds(s, "small") == [(1, 1)]
        s.prune_now()  # nothing more to do
        assert chunk_bounds(s, "r") == [(9, 10), (11, 15)]
    finally:
        s.close()
    again = SQLiteStore(db_path)
    try:
        assert [(r.ref, r.ack) for r in again.load_refs(3_000)] == [
            ("whole-chunk", ack_of("whole-chunk", msg("r", 3))),
            ("cut-chunk", ack_of("cut-chunk", msg("r", 7))),
            ("kept", ack_of("kept", msg("r", 12))),
        ]
    finally:
        again.close()


def test_load_refs_picks_refs_out_of_chunks(db_path: Path) -> None:
    """load_refs gives the refs of recent chunks still in force, acks filled in, oldest
    first across chunks; those of messages older than the horizon are not read."""
    now = 10 * REF_HORIZON_MS
    s = SQLiteStore(db_path)
    try:
        s.append(
            msg("r", 1, ts=now - REF_HORIZON_MS), lambda: None, RefRecord("a", "too-old", now + 9)
        )
        s.append(msg("r", 2, ts=now - 5), lambda: None, RefRecord("a", "late", now + 800))
        s.append(msg("r", 3, ts=now - 5), lambda: None)
        s.append(msg("r", 4, ts=now - 5), lambda: None, RefRecord("a", "expired", now))
        s.flush()
        s.append(msg("r", 5, ts=now - 1), lambda: None, RefRecord("a", "early", now + 100, b"x"))
        s.append(msg("s", 1, ts=now - 1), lambda: None, RefRecord("b", "other", now + 300))
        s.flush()
        assert len(chunk_bounds(s, "r")) == 2
        assert [(r.nick_key, r.ref, r.expires, r.ack) for r in s.load_refs(now)] == [
            ("a", "early", now + 100, b"x"),
            ("b", "other", now + 300, ack_of("other", msg("s", 1, ts=now - 1))),
            ("a", "late", now + 800, ack_of("late", msg("r", 2, ts=now - 5))),
        ]
    finally:
        s.close()


def version_4_database(db_path: Path) -> tuple[list[Message], list[RefRecord]]:
    """A database as schema 4 left it, and the messages and refs it holds."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    build_schema(raw, 4)
    messages = [msg("big", seq, ts=1000 + seq, text=f"b{seq}") for seq in range(1, CHUNK_MAX + 40)]
    messages += [msg("r", seq, ts=5000 + seq, text=f"r{seq}") for seq in (3, 4, 7)]
    refs: list[RefRecord] = []
    for m in messages:
        ref: RefRecord | None = None
        if m.seq % 5 == 0:
            ref = RefRecord("ana", f"{m.room}-{m.seq}", 90_000 + m.seq)  # ack left out
        elif m.room == "r":
            ref = RefRecord("bob", f"{m.room}-{m.seq}", 80_000 + m.seq, b"kept %d" % m.seq)
        if m.seq == 11:
            ref = RefRecord("ana", "expired", 1_500)
        raw.execute(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.room,
                m.seq,
                m.ts,
                m.sender,
                m.text,
                *(msgspec.structs.astuple(ref) if ref else [None] * 4),
            ),
        )
        if ref is not None and ref.expires > 2_000:
            refs.append(
                RefRecord(ref.nick_key, ref.ref, ref.expires, ref.ack or ack_of(ref.ref, m))
            )
    raw.execute("INSERT INTO refs VALUES ('ana', 'moved', 85000, x'01')")
    refs.append(RefRecord("ana", "moved", 85_000, b"\x01"))
    raw.execute("INSERT INTO dms VALUES (3, 6000, 'ana', 'bob', 'hi', 'ana', 'dm', 95000, NULL)")
    dm = DmEvent(sender="ana", to="bob", id=3, ts=6000, text="hi")
    refs.append(RefRecord("ana", "dm", 95_000, ack_of("dm", dm)))
    raw.execute(f"INSERT INTO rooms VALUES ('big', 'the topic', {CHUNK_MAX + 39})")
    raw.execute("INSERT INTO rooms VALUES ('r', '', 9)")  # its last two messages were lost
    raw.close()
    refs.sort(key=lambda r: r.expires)
    return messages, refs


def test_a_version_4_database_is_migrated_to_chunks_and_reads_the_same(db_path: Path) -> None:
    """Schema 4's message rows become capped chunks with their refs: history, rooms and
    refs read as they were written, and the messages table is gone."""
    messages, refs = version_4_database(db_path)
    memory = MemoryStore()
    for m in messages:
        memory.append(m, lambda: None)
    s = SQLiteStore(db_path, clock=lambda: 2_000)
    try:
        assert s._reader.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        tables = {n for (n,) in s._reader.execute("SELECT name FROM sqlite_master")}
        assert "messages" not in tables
        assert "messages_ts" not in tables
        assert chunk_bounds(s, "big") == [(1, CHUNK_MAX), (CHUNK_MAX + 1, CHUNK_MAX + 39)]
        assert chunk_bounds(s, "r") == [(3, 7)]
        assert [(r.name, r.topic, r.last_seq) for r in s.load_rooms()] == [
            ("big", "the topic", CHUNK_MAX + 39),
            ("r", "", 9),
        ]
        assert s.load_refs(2_000) == refs
        assert pages(s, "r", 9) == pages(memory, "r", 9)
        assert (
            s.history("big", before=None, after=0, limit=500).messages == messages[: CHUNK_MAX + 39]
        )
        assert s.last_dm_id() == 3
    finally:
        s.close()


def test_a_migration_to_chunks_that_fails_leaves_version_4_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python step of a migration runs in its transaction: when it fails, the
    database is still at schema 4 with its messages, and the next start migrates it."""
    messages, _ = version_4_database(db_path)
    calls = [0]
    chunk_row = sqlite_store._chunk_row

    def failing(room: str, entries: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("disk on fire")
        return chunk_row(room, entries)

    monkeypatch.setattr(sqlite_store, "_chunk_row", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        SQLiteStore(db_path)
    monkeypatch.undo()
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 4
        assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == len(messages)
        assert (
            raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chunks'").fetchone()[0]
            == 0
        )
    s = SQLiteStore(db_path)
    try:
        assert (
            s.history("big", before=None, after=0, limit=500).messages == messages[: CHUNK_MAX + 39]
        )
    finally:
        s.close()


def test_a_batch_handed_over_out_of_seq_order_is_stored_in_seq_order(tmp_path: Path) -> None:
    """Two threads' hand-overs that reach the writer in one batch, the later seq first
    (as _forget_unstored allows for), still make a chunk in seq order: every page reads
    as the memory store's, and nothing is left unstored."""
    store = SQLiteStore(tmp_path / "a.db")
    first, second, third = msg("r", 1), msg("r", 2), msg("r", 3)
    db = store._connect()
    try:
        with store._lock:
            store._unstored["r"] = [third, first, second]
        run = _Write(([first, second], [None, None]), None, None, None)
        assert store._commit(db, [_Write(([third], [None]), None, None, None), run])
    finally:
        db.close()
    memory = MemoryStore()
    for message in (first, second, third):
        memory.append(message, lambda: None)
    try:
        assert store._unstored == {}
        for before, after in ((None, 0), (None, 1), (None, None), (3, None), (2, None)):
            got = store.history("r", before=before, after=after, limit=10)
            want = memory.history("r", before=before, after=after, limit=10)
            assert [m.seq for m in got.messages] == [m.seq for m in want.messages]
    finally:
        store.close()


class _SwitchRefused:
    """A connection whose switch to WAL mode fails ``times`` times with ``code``."""

    def __init__(self, times: int, code: int = sqlite3.SQLITE_BUSY) -> None:
        self.times, self.code, self.tries = times, code, 0

    def execute(self, sql: str) -> None:
        assert sql == "PRAGMA journal_mode=WAL"
        self.tries += 1
        if self.tries <= self.times:
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorcode = self.code
            raise exc


def test_the_switch_to_wal_is_tried_again_while_busy() -> None:
    """SQLite may refuse the switch to WAL at once while another process opens the same
    new file (busy, without waiting): it is tried again until the busy timeout, and any
    other error, or busy past the timeout, is raised."""
    again = _SwitchRefused(times=3)
    _enable_wal(again, timeout=5.0)  # type: ignore[arg-type]
    assert again.tries == 4
    recovery = _SwitchRefused(times=1, code=261)  # SQLITE_BUSY_RECOVERY
    _enable_wal(recovery, timeout=5.0)  # type: ignore[arg-type]
    assert recovery.tries == 2
    with pytest.raises(sqlite3.OperationalError):
        _enable_wal(_SwitchRefused(times=1, code=sqlite3.SQLITE_IOERR), timeout=5.0)  # type: ignore[arg-type]
    stuck = _SwitchRefused(times=10**9)
    with pytest.raises(sqlite3.OperationalError):
        _enable_wal(stuck, timeout=0.05)  # type: ignore[arg-type]
    assert stuck.tries > 1


def test_a_chunk_rewritten_by_retention_is_not_read_from_the_last_page(tmp_path: Path) -> None:
    """History keeps the last chunk it decoded for the next page; a chunk that retention
    has rewritten meanwhile (the same row, fewer messages) is read again, not remembered."""
    store = SQLiteStore(tmp_path / "a.db")
    try:
        store.append_many([msg("r", seq) for seq in range(1, 101)], [None] * 100, lambda: None)
        store.flush()
        first = store.history("r", before=None, after=0, limit=10)
        assert [m.seq for m in first.messages] == list(range(1, 11))
        store.history_max = 50
        store.prune_now()
        again = store.history("r", before=None, after=0, limit=10)
        assert [m.seq for m in again.messages] == list(range(51, 61))
        assert again.gap
        older = store.history("r", before=60, after=None, limit=20)
        assert [m.seq for m in older.messages] == list(range(51, 60))
    finally:
        store.close()
