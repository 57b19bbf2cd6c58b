"""The durable default store: SQLite in WAL mode, written by one thread with group commit.

Theory of operation: the event loop never waits for the disk. :meth:`append`
(or :meth:`append_many`, for a run of messages: the registry's way) collects
the records with the rest of the current loop tick's writes and returns at
once; at the end of the tick they are handed to the writer
thread in one piece (one wake-up, one GIL round trip). The single writer
thread takes *everything* handed over since its last commit, writes it in
one transaction, commits, and then hands the whole batch's ``on_stored``
callbacks back to the loop in one ``call_soon_threadsafe``. Messages that
arrive within one tick are therefore committed together, and an ``ack`` is
sent only after its message is on disk.

Records queued but not committed yet are kept in memory (``_unstored``) and
merged into history reads, so a reader never sees a gap between what was
delivered live and what the database already holds.

A small tick (up to ``LOOP_COMMIT_MAX`` messages) is committed by the loop
itself, on a connection of its own, when the writer thread has nothing of
its own (everything handed to it is committed and called back, so nothing is
overtaken) and ``durability="normal"``: that commit appends to the WAL
without an fsync, in about 0.1 ms, which is less than handing it over costs
the loop's core (the thread woken, the GIL passed back and forth, the loop
woken for the callbacks). That connection never waits for a lock: a locked
database, a failed commit, one slower than ``LOOP_COMMIT_SLOW`` (a stalling
disk) or a failed reopen of that connection after a failure sends the tick,
and for a while every tick (but a locked database's), to the writer.
Nor does the loop make the first write after a checkpoint that emptied the
WAL: that write starts the WAL over and syncs its header. ``close`` and
``flush`` hand the tick to the writer, so no callback runs from inside them.

``durability="normal"`` is ``synchronous=NORMAL``: in WAL mode a commit
survives a crash of the server process (``kill -9``); ``"full"`` is
``synchronous=FULL`` and also survives power loss, at the cost of an fsync
per batch.

Reads run on the caller's thread with their own connection (WAL readers
never block the writer); they are indexed and short.

Checkpoints (copying the WAL back into the database file, with the fsyncs
that takes) never run on the writer thread: SQLite's automatic checkpoint is
turned off there, and a third thread runs a ``PASSIVE`` checkpoint, which
never blocks the writer, at most every ``CHECKPOINT_INTERVAL`` seconds while
there are new commits. A disk stall during such a checkpoint therefore
delays no commit, so no ``ack`` and no delivery. Only once the WAL has grown
past ``WAL_RESTART_BYTES`` does a checkpoint hold the write lock, through its
syncs, so that the WAL starts over (under steady writing it never would):
the WAL file stays near that size, and SQLite cuts it back to twice that
when it starts over after a burst.

Room messages are a log of chunks: a commit stores each room's messages as
one row of the ``chunks`` table, its messages (and their refs) encoded
together in one msgpack ``body``, at most ``CHUNK_MAX`` to a row. A row
per message cost SQLite 6–8 µs per message, a row per commit 1.2–1.7 µs
(``benchmarks/row_layouts.py``). A room's chunks never overlap in ``seq``,
and a chunk's messages are in ``seq`` order; each row also carries the
least and greatest ``ts`` of its messages and the latest expiry of their
refs, so that retention and :meth:`load_refs` find the rows they need by
index and decode only those that may hold something for them. History
reads decode chunks from the one holding the request's starting point
until the page is full. Retention deletes whole chunks and rewrites the
one a cut-off falls into without its older messages, so it is exact. DMs
are rare and keep a row each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import queue
import sqlite3
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import cast

import msgspec

from ..protocol.messages import DmEvent, Message
from .base import REF_TTL_MS, HistoryPage, RefRecord, RoomRecord, Store, ack_of

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("achat.store")

SCHEMA_VERSION = 5

#: Seconds between checkpoints while commits keep coming.
CHECKPOINT_INTERVAL = 0.5

#: A WAL that has grown past this many bytes is started over by the next checkpoint that
#: copies it all (see ``SQLiteStore._checkpoint``); SQLite cuts its file back to twice
#: this when it starts over.
WAL_RESTART_BYTES = 32 * 1024 * 1024
#: About how long (ms) that checkpoint waits in all for the write lock and for the WAL's
#: readers, holding the write lock once it has it: only a reader outside the server
#: takes this long.
WAL_RESTART_WAIT_MS = 50

#: The most messages a loop tick may hold for the loop to commit it itself (see
#: ``SQLiteStore._submit``); a bigger tick goes to the writer thread, which commits what
#: several ticks handed over in one transaction.
LOOP_COMMIT_MAX = 16

#: A commit on the loop slower than this (seconds) hands every commit to the writer
#: thread for ``LOOP_COMMIT_PAUSE`` seconds: the loop must not wait for a slow disk.
LOOP_COMMIT_SLOW = 0.005
LOOP_COMMIT_PAUSE = 60.0

#: The most messages one chunk holds: a history page decodes whole chunks, and a
#: resume reads pages of 16, so a chunk stays small enough to decode for a few of them.
CHUNK_MAX = 256

#: Upgrades the schema from version i to i + 1: SQL statements, or a function that
#: runs them with the Python a migration needs (in the migration's transaction).
_Migration = str | Callable[[sqlite3.Connection], None]


def _messages_to_chunks(db: sqlite3.Connection) -> None:
    """Schema 5: the ``messages`` table's rows become chunks, their refs carried along."""
    for statement in _CHUNKS_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    rows = db.execute(
        f"SELECT room, seq, ts, sender, text, {_REF_COLUMNS} FROM messages ORDER BY room, seq"
    )
    chunks: list[_ChunkRow] = []
    room: str | None = None
    entries: list[_EntryTuple] = []
    for r, seq, ts, sender, text, key, ref, expires, ack in rows:
        if r != room or len(entries) == CHUNK_MAX:
            if entries:
                chunks.append(_chunk_row(cast(str, room), entries))
            room, entries = r, []
            if len(chunks) >= 1000:  # a bounded amount of the table in memory at a time
                db.executemany(_INSERT_CHUNK, chunks)
                chunks = []
        if ref is None:
            entries.append((seq, ts, sender, text))
        else:
            entries.append((seq, ts, sender, text, key, ref, expires, ack))
    if entries:
        chunks.append(_chunk_row(cast(str, room), entries))
    db.executemany(_INSERT_CHUNK, chunks)
    db.execute("DROP TABLE messages")  # and its index by time


_MIGRATIONS: tuple[_Migration, ...] = (
    """
    CREATE TABLE rooms (
        name      TEXT PRIMARY KEY,
        topic     TEXT NOT NULL DEFAULT '',
        last_seq  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        room    TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        ts      INTEGER NOT NULL,
        sender  TEXT NOT NULL,
        text    TEXT NOT NULL,
        PRIMARY KEY (room, seq)
    ) WITHOUT ROWID;
    CREATE INDEX messages_ts ON messages (ts);
    CREATE TABLE dms (
        id         INTEGER PRIMARY KEY,
        ts         INTEGER NOT NULL,
        sender     TEXT NOT NULL,
        recipient  TEXT NOT NULL,
        text       TEXT NOT NULL
    );
    CREATE TABLE refs (
        nick_key  TEXT NOT NULL,
        ref       TEXT NOT NULL,
        expires   INTEGER NOT NULL,
        ack       BLOB NOT NULL,
        PRIMARY KEY (nick_key, ref)
    ) WITHOUT ROWID;
    CREATE INDEX refs_expires ON refs (expires);
    """,
    # 2: a message's or DM's ref is kept in its own row (one insert per say instead of
    # two); the refs table keeps only those whose row retention deleted before they expired.
    """
    ALTER TABLE messages ADD COLUMN ref_key TEXT;
    ALTER TABLE messages ADD COLUMN ref TEXT;
    ALTER TABLE messages ADD COLUMN ref_expires INTEGER;
    ALTER TABLE messages ADD COLUMN ack BLOB;
    ALTER TABLE dms ADD COLUMN ref_key TEXT;
    ALTER TABLE dms ADD COLUMN ref TEXT;
    ALTER TABLE dms ADD COLUMN ref_expires INTEGER;
    ALTER TABLE dms ADD COLUMN ack BLOB;
    """,
    # 3: DMs by time, as messages already were: retention by days and load_refs looked
    # at every DM (131 ms and 66 ms per million, the first every minute on the writer).
    """
    CREATE INDEX dms_ts ON dms (ts);
    """,
    # 4: the id of this file's numbering of messages, for clients to tell a server that
    # lost its messages (and numbers its rooms from 1 again) from one that kept them.
    """
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('history_id', lower(hex(randomblob(8))));
    """,
    # 5: room messages as a log of chunks (see the module's docstring), a row per room per
    # commit instead of one per message.
    _messages_to_chunks,
)

_CHUNKS_SCHEMA = """
    CREATE TABLE chunks (
        id          INTEGER PRIMARY KEY,
        room        TEXT NOT NULL,
        first_seq   INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        min_ts      INTEGER NOT NULL,
        max_ts      INTEGER NOT NULL,
        refs_until  INTEGER,
        body        BLOB NOT NULL
    );
    CREATE UNIQUE INDEX chunks_room_seq ON chunks (room, last_seq);
    CREATE INDEX chunks_min_ts ON chunks (min_ts);
    CREATE INDEX chunks_max_ts ON chunks (max_ts);
"""

#: How far back (ms) load_refs looks for messages whose ref may still be in force: the
#: refs' lifetime and a minute's margin, so a restart reads minutes of rows, not history.
REF_HORIZON_MS = REF_TTL_MS + 60_000

_REF_COLUMNS = "ref_key, ref, ref_expires, ack"


class _Write(msgspec.Struct):
    """One thing for the writer thread to store: a run of messages, a DM or a topic."""

    #: Messages (an append_many's, or an append's one) and their refs: one write for all.
    run: tuple[Sequence[Message], Sequence[RefRecord | None]] | None
    dm: DmEvent | None
    ref: RefRecord | None  # the DM's
    on_stored: Callable[[], None] | None
    topic: tuple[str, str] | None = None
    # Called on the writer thread itself (flush() waits on it, possibly from the loop thread).
    in_thread: bool = False


def _messages_of(writes: Iterable[_Write]) -> Iterator[Message]:
    """The messages ``writes`` store, in order."""
    for w in writes:
        if w.run is not None:
            yield from w.run[0]


class SQLiteStore(Store):
    """Rooms, messages, DMs and recent refs in one SQLite database file."""

    #: How long a statement waits for another connection's lock before it fails.
    busy_timeout_ms = 5000
    #: How long the writer waits before it tries a failed commit again.
    retry_seconds = 1.0

    def __init__(
        self,
        path: Path | str,
        *,
        durability: str = "normal",
        history_days: float | None = None,
        history_max: int | None = None,
        clock: Callable[[], int] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ValueError("durability is 'normal' or 'full'")
        self.path = Path(path)
        self.durability = durability
        self.history_days = history_days
        self.history_max = history_max
        self._clock = clock
        self._loop = loop
        self._loop_thread: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reader = self._connect()
        self._migrate(self._reader)
        #: The id of this file's numbering of messages (see ``Store``).
        self.history_id: str = self._reader.execute(
            "SELECT value FROM meta WHERE key = 'history_id'"
        ).fetchone()[0]
        # Lists of writes for the writer thread; None tells it to stop.
        self._queue: queue.SimpleQueue[list[_Write] | None] = queue.SimpleQueue()
        # Writes of the current loop tick, handed to the writer thread together.
        self._tick: list[_Write] = []
        self._unstored: dict[str, list[Message]] = {}
        # History reads' last decoded chunk: its id, its body, its entries (see _decoded).
        self._last_chunk: tuple[int, bytes, list[_Entry]] | None = None
        self._lock = threading.Lock()
        # Hand-overs to the writer thread not yet committed and called back (under _lock).
        self._outstanding = 0
        # The loop's own connection, for the ticks it commits itself (see
        # _commit_on_loop); None once a failure closed it (a new one is opened then).
        self._loop_db: sqlite3.Connection | None = None
        if durability == "normal":
            self._loop_db = self._connect_loop()
        # Until when (time.monotonic()) the loop leaves every commit to the writer.
        self._loop_commits_paused_until = 0.0
        # True from a checkpoint's start until the writer's next commit made while no
        # checkpoint ran, if that checkpoint emptied the WAL: the next write then starts
        # the WAL over, and syncs its header. Checkpoints begun and ended, to tell.
        self._wal_may_restart = False
        self._checkpoints_begun = self._checkpoints_ended = 0
        self._closed = False
        #: Transactions committed by the writer thread, and by the loop itself.
        self.batches = 0
        self.loop_batches = 0
        #: Checkpoints that had the WAL started over (see _checkpoint).
        self.wal_restarts = 0
        self._page_size = int(self._reader.execute("PRAGMA page_size").fetchone()[0])
        self._checkpoint_due = threading.Event()
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="achat-checkpoint", daemon=True
        )
        self._writer = threading.Thread(target=self._write_loop, name="achat-store", daemon=True)
        self._checkpointer.start()
        self._writer.start()

    # -- setup ------------------------------------------------------------------

    def _connect_loop(self) -> sqlite3.Connection:
        db = self._connect()
        db.execute("PRAGMA busy_timeout=0")  # a locked database is the writer's to wait for
        db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        return db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # First, so that the statements below wait for a lock instead of failing.
        db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        _enable_wal(db, self.busy_timeout_ms / 1000)
        db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        # Whichever connection starts the WAL over cuts its file back to this size: twice
        # the size that has it started over, so that it is not cut and grown every time.
        db.execute(f"PRAGMA journal_size_limit={2 * WAL_RESTART_BYTES}")
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {version}; this achat knows up to "
                f"{SCHEMA_VERSION}: upgrade achat"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            # Another process may have migrated while this one waited for the lock.
            if int(db.execute("PRAGMA user_version").fetchone()[0]) >= target:
                db.execute("COMMIT")
                continue
            try:
                migration = _MIGRATIONS[target - 1]
                if isinstance(migration, str):
                    for statement in migration.split(";"):
                        if statement.strip():
                            db.execute(statement)
                else:
                    migration(db)
                db.execute(f"PRAGMA user_version={target}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            log.info("database %s migrated to schema version %d", self.path, target)

    def _on_loop(self) -> bool:
        """True on the thread of the loop that appends (captured on first use).

        Callbacks go back to that loop; with no loop running (plain synchronous
        use) they run on the writer thread. The loop is expected to run on the
        thread it first appended from: one that stopped and ran again on
        another thread would still be taken for running on the first.
        """
        # The thread is compared first: asyncio.get_running_loop() makes a getpid()
        # system call on CPython 3.11 (to tell a forked child), and every say comes here.
        # On the loop's own thread, with the loop running, it is the running loop.
        loop = self._loop
        if loop is not None and self._loop_thread == threading.get_ident() and loop.is_running():
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if loop is None:
            self._loop = loop = running
        if running is not loop:
            return False
        self._loop_thread = threading.get_ident()
        return True

    def _put(self, write: _Write) -> None:
        # On the loop, one hand-over per tick: waking the writer thread costs a GIL
        # round trip, so a tick's writes travel together (and commit together).
        if not self._on_loop():
            self._hand_over([write])
            return
        if not self._tick:
            cast(asyncio.AbstractEventLoop, self._loop).call_soon(self._submit)
        self._tick.append(write)

    def _submit(self) -> None:
        tick, self._tick = self._tick, []
        if tick and not self._commit_on_loop(tick):
            self._hand_over(tick)

    def _commit_on_loop(self, tick: list[_Write]) -> bool:
        """Commit a small ``tick`` on the loop's thread and call back at once; False
        when it is the writer thread's to commit.

        Waking the writer thread, handing it the GIL for every SQLite step and being
        woken for its callbacks cost a delivery more than the commit itself does when
        the loop has the server's only core (busy-room 300: item 53 of
        docs/performance-history.md). So while the writer has nothing of its own
        (everything handed to it is committed and called back, so order is kept), a tick
        of a few writes is committed here, on a connection that never waits for a lock. Only
        with ``durability="normal"``: a commit then appends to the WAL without an
        fsync. Not the first commit after a checkpoint emptied the WAL either, which
        starts the WAL over and syncs its header. A commit that finds the database
        locked goes to the writer; one that fails or is slow, or whose connection (closed
        by a failure) cannot be opened again, with the commits of the next
        ``LOOP_COMMIT_PAUSE`` seconds.
        """
        if (
            self._outstanding
            or self._wal_may_restart
            or self._closed
            or sum(len(w.run[0]) if w.run is not None else 1 for w in tick) > LOOP_COMMIT_MAX
        ):
            return False
        if time.monotonic() < self._loop_commits_paused_until:
            return False
        db = self._loop_db
        if db is None:
            if self.durability != "normal":
                return False
            try:  # again, after a failed commit closed it
                db = self._loop_db = self._connect_loop()
            except Exception as exc:  # out of file descriptors, say: the writer has its own
                self._loop_commits_paused_until = time.monotonic() + LOOP_COMMIT_PAUSE
                log.warning(
                    "the loop could not open its connection (%s); the writer thread "
                    "commits for %.0f s",
                    exc,
                    LOOP_COMMIT_PAUSE,
                )
                return False
        started = time.monotonic()  # the commit's: reopening after a failure is not slowness
        try:
            _store(db, *_rows_of(tick), immediate=True)
        except BaseException as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _LOCKED:
                _rollback(db)
                return False
            # Whatever it was, the write lock must not stay with this connection, or the
            # writer would find the database locked for good: closing it rolls back.
            self._loop_db = None
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._loop_commits_paused_until = started + LOOP_COMMIT_PAUSE
            if not isinstance(exc, Exception):
                self._hand_over(tick)
                raise
            log.warning("a commit on the loop failed (%s); the writer thread will retry", exc)
            return False
        took = time.monotonic() - started
        if took > LOOP_COMMIT_SLOW:
            log.info(
                "a commit on the loop took %.1f ms; the writer thread commits for %.0f s",
                took * 1000,
                LOOP_COMMIT_PAUSE,
            )
            self._loop_commits_paused_until = started + LOOP_COMMIT_PAUSE
        self.loop_batches += 1
        self._checkpoint_due.set()
        _call_back([w.on_stored for w in tick if w.on_stored is not None])
        return True

    def _hand_over(self, writes: list[_Write]) -> None:
        # Messages on their way to the disk stay readable (history merges them in); one
        # lock per hand-over, not per message, since the writer takes it once per commit.
        with self._lock:
            for m in _messages_of(writes):
                self._unstored.setdefault(m.room, []).append(m)
            self._outstanding += 1
        self._queue.put(writes)

    def _hand_over_tick(self) -> None:
        """Hand this tick's writes to the writer thread, whatever their size: their
        callbacks come back through the loop, not from inside the caller."""
        tick, self._tick = self._tick, []
        if tick:
            self._hand_over(tick)

    def _settle(self, handovers: int) -> None:
        """``handovers`` hand-overs are committed and called back."""
        with self._lock:
            self._outstanding -= handovers

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is committed (for tools and tests)."""
        if self._on_loop():
            self._hand_over_tick()
        done = threading.Event()
        self._hand_over([_Write(None, None, None, done.set, in_thread=True)])
        if not done.wait(timeout):
            raise TimeoutError("the store did not commit in time")

    # -- the Store interface -------------------------------------------------

    def load_rooms(self) -> list[RoomRecord]:
        rows = self._reader.execute(
            "SELECT name, topic, max(last_seq, coalesce((SELECT max(c.last_seq) FROM chunks c "
            "WHERE c.room = rooms.name), 0)) FROM rooms ORDER BY name"
        ).fetchall()
        return [RoomRecord(name, topic, int(seq)) for name, topic, seq in rows]

    def last_dm_id(self) -> int:
        row = self._reader.execute("SELECT coalesce(max(id), 0) FROM dms").fetchone()
        return int(row[0])

    def load_refs(self, now: int) -> list[RefRecord]:
        # One statement, so one snapshot: the writer may be pruning meanwhile, moving refs
        # from chunks and DM rows to the refs table, and two reads could miss one in both.
        horizon = now - REF_HORIZON_MS
        refs: list[RefRecord] = []
        for key, ref, expires, ack, dm_id, ts, room, body in self._reader.execute(
            _LOAD_REFS, (now, horizon)
        ):
            if body is None:
                refs.append(_loaded_ref(key, ref, expires, ack, dm_id, ts))
                continue
            refs += [
                _ref_of(room, e)
                for e in _DECODER.decode(body)
                if e.ref is not None and e.ts > horizon and cast(int, e.expires) > now
            ]
        refs.sort(key=lambda r: r.expires)
        return refs

    def append_many(
        self,
        messages: Sequence[Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        if len(messages) != len(refs):
            raise ValueError("append_many takes a ref (or None) for each message")
        # Copied: the caller may reuse its lists once this returns.
        self._put(_Write((list(messages), list(refs)), None, None, on_stored))

    def append_dm(
        self, dm: DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        self._put(_Write(None, dm, ref, on_stored))

    def set_topic(self, room: str, topic: str) -> None:
        self._put(_Write(None, None, None, None, topic=(room, topic)))

    def history(
        self, room: str, *, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        # The unstored messages first: one leaves them only once committed, so each
        # message is in the copy or in what the database shows the read after it.
        with self._lock:
            unstored = list(self._unstored.get(room, ()))
        if self._tick and self._on_loop():
            # This tick's messages, not handed to the writer yet.
            unstored += [m for m in _messages_of(self._tick) if m.room == room]
        if after is not None:
            found = self._read_after(room, after, limit + 1)
            merged = _merge(found, [m for m in unstored if m.seq > after])
            page = merged[:limit]
        else:
            bound = before if before is not None else 2**63 - 1
            found = self._read_before(room, bound, limit + 1)
            merged = _merge(found, [m for m in unstored if m.seq < bound])
            page = merged[-limit:]
        gap = self._gap(room, page, after=after, before=before, limit=limit)
        return HistoryPage(page, more=len(merged) > limit, gap=gap)

    def _read_after(self, room: str, after: int, count: int) -> list[Message]:
        """The first ``count`` stored messages of ``room`` past ``after``, oldest first."""
        found: list[Message] = []
        # Closed as soon as the page is full: a statement left open holds its snapshot,
        # which keeps checkpoints from going past it.
        with contextlib.closing(self._reader.execute(_AFTER, (room, after))) as rows:
            for chunk_id, body in rows:
                entries = self._decoded(chunk_id, body)
                start = bisect_right(entries, after, key=_seq)
                found += _messages(room, entries[start : start + count - len(found)])
                if len(found) >= count:
                    break
        return found

    def _read_before(self, room: str, bound: int, count: int) -> list[Message]:
        """The last ``count`` stored messages of ``room`` before ``bound``, oldest first."""
        pieces: list[list[Message]] = []
        need = count
        with contextlib.closing(self._reader.execute(_BEFORE, (room, bound))) as rows:
            for chunk_id, body in rows:
                entries = self._decoded(chunk_id, body)
                end = bisect_left(entries, bound, key=_seq)
                pieces.append(_messages(room, entries[max(0, end - need) : end]))
                need -= len(pieces[-1])
                if need <= 0:
                    break
        return [m for piece in reversed(pieces) for m in piece]

    def _decoded(self, chunk_id: int, body: bytes) -> list[_Entry]:
        """The entries of a chunk, decoded once for the pages that read it one after
        another (a resume reads pages of 16 from chunks of up to 256).

        The last chunk decoded is kept with its body: one that retention has rewritten
        since (same row, other body) is decoded again.
        """
        last = self._last_chunk
        if last is not None and last[0] == chunk_id and last[1] == body:
            return last[2]
        entries = _DECODER.decode(body)
        self._last_chunk = (chunk_id, body, entries)
        return entries

    def _gap(
        self,
        room: str,
        page: list[Message],
        *,
        after: int | None,
        before: int | None,
        limit: int,
    ) -> bool:
        """True when messages the request reaches into have been deleted by retention."""
        row = self._reader.execute(
            "SELECT first_seq FROM chunks WHERE room = ? ORDER BY last_seq LIMIT 1", (room,)
        ).fetchone()
        oldest = row[0] if row else None
        if oldest is None:
            oldest = page[0].seq if page else None
        if oldest is None:
            last = self._reader.execute(
                "SELECT last_seq FROM rooms WHERE name = ?", (room,)
            ).fetchone()
            return bool(last and after is not None and last[0] > after)
        if after is not None:
            return int(oldest) > after + 1
        return int(oldest) > 1 and len(page) < limit and (not page or page[0].seq == oldest)

    def close(self) -> None:
        """Commit everything queued, stop the writer thread and close the database."""
        if self._closed:
            return
        self._closed = True
        if self._on_loop():
            self._hand_over_tick()
        # A writer waiting to retry a failed commit tries it now (and last); the
        # checkpointer stops, since the writer truncates the WAL as it stops.
        self._stopping.set()
        self._queue.put(None)
        self._writer.join()
        self._checkpoint_due.set()
        self._checkpointer.join()
        if self._loop_db is not None:
            self._loop_db.close()
        self._reader.close()

    # -- the writer thread -------------------------------------------------------

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
            last_prune = 0
            if self.history_days or self.history_max:
                last_prune = self._now()
                self._prune_on_writer(db, last_prune)
            failed: list[_Write] = []
            failed_handovers = attempts = 0
            while True:
                if failed:
                    # Nothing of it was stored or acked (the database locked elsewhere, the
                    # disk full): wait, then try it again, in order, with what came since.
                    # The wait doubles up to 8 retry_seconds while it keeps failing.
                    self._stopping.wait(self.retry_seconds * min(8, 2 ** (attempts - 1)))
                    more, handovers, stop = self._take(block=False)
                    batch, handovers = failed + more, failed_handovers + handovers
                else:
                    batch, handovers, stop = self._take(block=True)
                if batch and self._commit(db, batch, handovers, quiet=attempts > 0):
                    if attempts:
                        log.warning("stored again after %d failed commits", attempts)
                    failed, failed_handovers, attempts = [], 0, 0
                    self._checkpoint_due.set()
                elif batch:
                    failed, failed_handovers, attempts = batch, handovers, attempts + 1
                now = self._now()
                if now - last_prune > 60_000 and (self.history_days or self.history_max):
                    self._prune_on_writer(db, now)
                    last_prune = now
                if stop:
                    if failed:
                        log.error("closing with %d writes not stored (none was acked)", len(failed))
                    return
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()

    def _take(self, *, block: bool) -> tuple[list[_Write], int, bool]:
        """Everything queued (once something is, if ``block``), how many hand-overs that
        is, and whether to stop after it."""
        batch: list[_Write] = []
        handovers = 0
        try:
            item = self._queue.get(block)
        except queue.Empty:
            return batch, handovers, False
        while item is not None:
            batch.extend(item)
            handovers += 1
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, handovers, False
        return batch, handovers, True

    def _checkpoint_loop(self) -> None:
        db = self._connect()
        # Only a checkpoint that starts the WAL over waits for locks (see _checkpoint).
        db.execute(f"PRAGMA busy_timeout={WAL_RESTART_WAIT_MS}")
        try:
            while True:
                self._checkpoint_due.wait()
                if self._stopping.is_set():
                    return  # the writer truncates the WAL as it stops
                self._checkpoint_due.clear()
                self._checkpoint(db)
                self._stopping.wait(CHECKPOINT_INTERVAL)
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy what the WAL holds into the database file, as far as readers allow, and
        have the next write start the WAL over once it has grown past
        ``WAL_RESTART_BYTES``.

        A ``PASSIVE`` checkpoint never blocks a writer, but it does not start the WAL
        over either: the next write does, only if nothing was written since the
        checkpoint. Under steady writing something always was, and the WAL grew
        without end (531 MB in 22 s of ``achat-bench ingest``). So once it is that
        big, a ``RESTART`` checkpoint follows: it takes the write lock, copies what
        came since, syncs, and waits for the WAL's readers, about
        ``WAL_RESTART_WAIT_MS`` at most for the lock and the readers together (readers
        in the server are short); then the next write starts the WAL over. The
        writer's commits wait meanwhile: a few milliseconds on a healthy disk.
        """
        # Set first: a checkpoint that empties the WAL has the next write start it over
        # and sync its header, which is for the writer thread to do, not the loop. The
        # writer's commits clear it only if no checkpoint ran while they did (_commit).
        self._checkpoints_begun += 1
        self._wal_may_restart = True
        emptied = True  # unless it surely did not: then the next write cannot start over
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            emptied = frames == copied
            if emptied and frames * self._page_size > WAL_RESTART_BYTES:
                busy, frames, copied = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                # Busy: a reader outlasted the wait. All may be copied all the same, and
                # then the next write starts the WAL over once that reader is done.
                emptied = frames == copied
                if emptied and not busy:
                    self.wal_restarts += 1
        except sqlite3.Error:
            log.exception("checkpoint failed; the next one will retry")
        finally:
            if not emptied:
                self._wal_may_restart = False
            self._checkpoints_ended += 1

    def _commit(
        self,
        db: sqlite3.Connection,
        batch: list[_Write],
        handovers: int = 0,
        *,
        quiet: bool = False,
    ) -> bool:
        """Store ``batch`` (``handovers`` hand-overs) in one transaction and call back;
        False when nothing was stored.

        A failure is logged with its traceback, or in one line when ``quiet`` (a retry).
        """
        by_room, dm_rows, topics = _rows_of(batch)
        # Which checkpoints had begun and ended before this transaction did (_checkpoint).
        begun, ended = self._checkpoints_begun, self._checkpoints_ended
        try:
            _store(db, by_room, dm_rows, topics)
        except Exception as exc:
            _rollback(db)
            if quiet:
                log.warning("a commit of %d writes failed again: %s", len(batch), exc)
            else:
                log.exception(
                    "a commit of %d writes failed; none is acked until it is stored", len(batch)
                )
            return False
        self.batches += 1
        if begun == ended == self._checkpoints_begun:
            # No checkpoint ran while this transaction did: if the last one emptied the
            # WAL, this commit started it over, and the loop may commit again.
            self._wal_may_restart = False
        self._forget_unstored(batch, by_room)
        callbacks = [w.on_stored for w in batch if w.on_stored is not None and not w.in_thread]
        for w in batch:
            if w.in_thread and w.on_stored is not None:
                w.on_stored()
        if callbacks:
            self._deliver(callbacks, handovers)
        elif handovers:
            self._settle(handovers)
        return True

    def _forget_unstored(self, batch: list[_Write], by_room: dict[str, list[_EntryTuple]]) -> None:
        """Take the messages of a committed ``batch`` out of ``_unstored``."""
        with self._lock:
            for room, entries in by_room.items():
                pending = self._unstored.get(room)
                if pending is None:
                    continue
                # They were handed over in the order they are stored, so they are the
                # first of their room's: cut them off at once (removing them one by one
                # from the front of a long list took time quadratic in its length).
                head = pending[: len(entries)]
                if len(head) == len(entries) and all(
                    p.seq == e[0] for p, e in zip(head, entries, strict=True)
                ):
                    del pending[: len(entries)]
                else:
                    # Handed over by two threads at once: queued in another order.
                    for m in _messages_of(batch):
                        if m.room == room:
                            with contextlib.suppress(ValueError):
                                pending.remove(m)
                if not pending:
                    del self._unstored[room]

    def _deliver(self, callbacks: list[Callable[[], None]], handovers: int) -> None:
        def run() -> None:
            try:
                _call_back(callbacks)
            finally:
                self._settle(handovers)

        loop = self._loop
        if loop is None:
            run()
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(run)

    def _prune_on_writer(self, db: sqlite3.Connection, now: int) -> None:
        try:
            self._prune(db, now)
        except sqlite3.Error:
            # Locked for longer than busy_timeout (another process, a backup): the writer
            # goes on storing messages, and the next prune, a minute later, tries again.
            log.exception("pruning old history could not start; retrying in a minute")

    def _prune(self, db: sqlite3.Connection, now: int) -> None:
        """Apply retention; raises ``sqlite3.Error`` when the write lock cannot be had."""
        # IMMEDIATE: from prune_now's own connection, wait for the writer's lock rather
        # than fail when its snapshot cannot be upgraded.
        db.execute("BEGIN IMMEDIATE")
        try:
            if self.history_days:
                cutoff = now - int(self.history_days * 86_400_000)
                _expire_chunks(db, cutoff, now)
                _expire_dms(db, cutoff, now)
            if self.history_max:
                _trim_chunks(db, self.history_max, now)
            db.execute("DELETE FROM refs WHERE expires < ?", (now,))
            db.execute("COMMIT")
        except Exception:
            _rollback(db)
            log.exception("pruning old history failed")

    def prune_now(self) -> None:
        """Apply the retention settings at once (the writer also does so every minute).

        Raises ``sqlite3.Error`` when another connection keeps the database locked.
        """
        db = self._connect()
        try:
            self._prune(db, self._now())
        finally:
            db.close()

    def _now(self) -> int:
        if self._clock is not None:
            return self._clock()
        return time.time_ns() // 1_000_000


#: SQLite's primary result codes for a database another connection has locked.
_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _call_back(callbacks: Iterable[Callable[[], None]]) -> None:
    """Call each of ``callbacks``; one that raises (a bug) is logged, and the others
    still run: each acks and delivers messages that are stored."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("a callback of a commit failed")


def _rows_of(
    batch: Iterable[_Write],
) -> tuple[dict[str, list[_EntryTuple]], list[tuple[object, ...]], list[tuple[str, str]]]:
    """What ``batch`` stores: each room's messages as a chunk body's tuples (in seq
    order), the DMs' rows and the topics."""
    by_room: dict[str, list[_EntryTuple]] = {}
    dm_rows: list[tuple[object, ...]] = []
    topics: list[tuple[str, str]] = []
    for w in batch:
        if w.run is not None:
            for m, r in zip(*w.run, strict=True):
                entry: _EntryTuple = (
                    (m.seq, m.ts, m.sender, m.text)
                    if r is None
                    else (m.seq, m.ts, m.sender, m.text, r.nick_key, r.ref, r.expires, r.ack)
                )
                entries = by_room.get(m.room)
                if entries is None:
                    by_room[m.room] = [entry]
                else:
                    entries.append(entry)
        elif w.dm is not None:
            dm_rows.append(_dm_row(w.dm, w.ref))
        elif w.topic is not None:
            topics.append(w.topic)
    # A chunk's messages must be in seq order: they are, as the registry appends them
    # (one pass over them), unless two threads handed over at once.
    for entries in by_room.values():
        entries.sort(key=_entry_seq)
    return by_room, dm_rows, topics


def _store(
    db: sqlite3.Connection,
    by_room: dict[str, list[_EntryTuple]],
    dm_rows: list[tuple[object, ...]],
    topics: list[tuple[str, str]],
    *,
    immediate: bool = False,
) -> None:
    """Write and commit one transaction; raises (with the transaction open) on failure.

    ``immediate`` takes the write lock first, so that a connection that must not wait
    finds a locked database before it has done anything.
    """
    # Every statement hands the GIL back and forth with the event loop: run only
    # the ones this batch needs.
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    if by_room:
        db.executemany(
            _INSERT_CHUNK,
            [row for room, entries in by_room.items() for row in _chunk_rows(room, entries)],
        )
        db.executemany(
            "INSERT INTO rooms (name, last_seq) VALUES (?, ?) ON CONFLICT(name) "
            "DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
            [(room, entries[-1][0]) for room, entries in by_room.items()],
        )
    if dm_rows:
        db.executemany(
            "INSERT OR IGNORE INTO dms "
            f"(id, ts, sender, recipient, text, {_REF_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            dm_rows,
        )
    if topics:
        db.executemany(
            "INSERT INTO rooms (name, topic) VALUES (?, ?) ON CONFLICT(name) "
            "DO UPDATE SET topic = excluded.topic",
            topics,
        )
    db.execute("COMMIT")


_RefColumns = tuple[str | None, str | None, int | None, bytes | None]


class _Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A message in a chunk's body, as decoded (the ref fields are None without a ref)."""

    seq: int
    ts: int
    sender: str
    text: str
    nick_key: str | None = None
    ref: str | None = None
    expires: int | None = None
    #: None when it is the one ack_of derives (see RefRecord).
    ack: bytes | None = None


#: A message as the writer encodes it: a plain tuple (the cheapest thing to build), its
#: four ref fields left off when it has no ref (they decode as the defaults of _Entry).
_EntryTuple = tuple[int, int, str, str] | tuple[int, int, str, str, str, str, int, bytes | None]
#: A row of the chunks table, as inserted.
_ChunkRow = tuple[str, int, int, int, int, int | None, bytes]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[_Entry])

_INSERT_CHUNK = (
    "INSERT OR IGNORE INTO chunks (room, first_seq, last_seq, min_ts, max_ts, refs_until, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)

#: The chunks of ?1 that hold messages after ?2, oldest first.
_AFTER = "SELECT id, body FROM chunks WHERE room = ?1 AND last_seq > ?2 ORDER BY last_seq"

#: The chunks of ?1 that hold messages before ?2, newest first: those that end before
#: it and the one it falls into (the first to end at or after it), by the index.
_BEFORE = (
    "SELECT id, body FROM chunks WHERE room = ?1 AND first_seq < ?2 AND last_seq <= "
    "coalesce((SELECT min(last_seq) FROM chunks WHERE room = ?1 AND last_seq >= ?2), ?2) "
    "ORDER BY last_seq DESC"
)

#: Refs still in force (?1 is now, ?2 how far back a message or DM may hold one): those
#: retention moved to the refs table, the chunks of recent messages that hold one (their
#: refs are picked out of the body), and those on recent DM rows; in that order, which
#: sorting by expiry keeps among refs that expire together.
_LOAD_REFS = (
    "SELECT nick_key, ref, expires, ack, NULL, NULL, NULL, NULL FROM refs WHERE expires > ?1 "
    "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, room, body FROM chunks "
    "WHERE max_ts > ?2 AND refs_until > ?1 "
    f"UNION ALL SELECT {_REF_COLUMNS}, id, ts, NULL, NULL FROM dms "
    "WHERE ts > ?2 AND ref IS NOT NULL AND ref_expires > ?1"
)

#: Retention by age, ?1 the cut-off and ?2 now: every chunk holding a message older than
#: the cut-off (by the index), whether all of its messages are, and its body when it is
#: needed: to rewrite the chunk with its newer messages, or for refs still in force.
_OLD_CHUNKS = (
    "SELECT id, room, max_ts < ?1, CASE WHEN max_ts >= ?1 OR refs_until > ?2 THEN body END "
    "FROM chunks WHERE min_ts < ?1"
)

#: Retention by count, ?1 the messages a room keeps: the rooms whose oldest chunk starts
#: at or below their last seq - ?1, with that bound.
_ROOMS_OVER = (
    "SELECT r.name, r.last_seq - ?1 FROM rooms r WHERE (SELECT c.first_seq FROM chunks c "
    "WHERE c.room = r.name ORDER BY c.last_seq LIMIT 1) <= r.last_seq - ?1"
)

#: The chunks of room ?1 holding a message at or below ?2 (now is ?3), as _OLD_CHUNKS.
_LOW_CHUNKS = (
    "SELECT id, room, last_seq <= ?2, CASE WHEN last_seq > ?2 OR refs_until > ?3 THEN body END "
    "FROM chunks WHERE room = ?1 AND first_seq <= ?2 AND last_seq <= "
    "coalesce((SELECT min(last_seq) FROM chunks WHERE room = ?1 AND last_seq > ?2), ?2)"
)


def _chunk_row(room: str, entries: Sequence[_EntryTuple]) -> _ChunkRow:
    """The row of a chunk holding ``entries`` (at most CHUNK_MAX, in seq order)."""
    ts = [e[1] for e in entries]
    expiries = [e[6] for e in entries if len(e) > 4]
    return (
        room,
        entries[0][0],
        entries[-1][0],
        min(ts),
        max(ts),
        max(expiries) if expiries else None,
        _ENCODER.encode(entries),
    )


def _chunk_rows(room: str, entries: list[_EntryTuple]) -> Iterator[_ChunkRow]:
    """The rows of the chunks that hold ``entries``, CHUNK_MAX messages at most to one."""
    if len(entries) <= CHUNK_MAX:
        yield _chunk_row(room, entries)
        return
    for i in range(0, len(entries), CHUNK_MAX):
        yield _chunk_row(room, entries[i : i + CHUNK_MAX])


def _entry_tuple(e: _Entry) -> _EntryTuple:
    """``e`` as the writer would have encoded it."""
    if e.ref is None:
        return (e.seq, e.ts, e.sender, e.text)
    return msgspec.structs.astuple(e)


_entry_seq = operator.itemgetter(0)


def _seq(e: _Entry) -> int:
    return e.seq


def _messages(room: str, entries: Iterable[_Entry]) -> list[Message]:
    return [Message(room=room, seq=e.seq, ts=e.ts, sender=e.sender, text=e.text) for e in entries]


def _ref_of(room: str, e: _Entry) -> RefRecord:
    """The ref of message ``e`` (which has one), its ack filled in."""
    key, ref, expires = cast(str, e.nick_key), cast(str, e.ref), cast(int, e.expires)
    if e.ack is not None:
        return RefRecord(key, ref, expires, e.ack)
    # ack_of reads only what identifies the message, so sender and text are left empty.
    return RefRecord(
        key, ref, expires, ack_of(ref, Message(room=room, seq=e.seq, ts=e.ts, sender="", text=""))
    )


_MOVE_REFS = "INSERT OR REPLACE INTO refs (nick_key, ref, expires, ack) VALUES (?, ?, ?, ?)"


def _cut(
    db: sqlite3.Connection,
    rows: list[tuple[int, str, int, bytes | None]],
    old: Callable[[str, _Entry], bool],
    now: int,
) -> None:
    """Delete the messages for which ``old(room, entry)`` holds from the chunks ``rows``.

    ``rows`` as ``_OLD_CHUNKS`` gives them: id, room, whether every message goes, and
    the body when the chunk is to be rewritten or may hold refs in force. Refs outlive
    history: one still in force moves to the refs table first, so that a resend after a
    restart is still recognised.
    """
    moved: list[tuple[str, str, int, bytes | None]] = []
    doomed: list[tuple[int]] = []
    for chunk, room, whole, body in rows:
        if body is None:
            doomed.append((chunk,))
            continue
        entries = _DECODER.decode(body)
        gone = entries if whole else [e for e in entries if old(room, e)]
        moved += [
            msgspec.structs.astuple(_ref_of(room, e))
            for e in gone
            if e.ref is not None and cast(int, e.expires) > now
        ]
        kept = [] if whole else [_entry_tuple(e) for e in entries if not old(room, e)]
        if not kept:
            doomed.append((chunk,))
        elif len(kept) < len(entries):
            db.execute(
                "UPDATE chunks SET first_seq = ?, last_seq = ?, min_ts = ?, max_ts = ?, "
                "refs_until = ?, body = ? WHERE id = ?",
                (*_chunk_row(room, kept)[1:], chunk),
            )
    db.executemany(_MOVE_REFS, moved)
    db.executemany("DELETE FROM chunks WHERE id = ?", doomed)


def _expire_chunks(db: sqlite3.Connection, cutoff: int, now: int) -> None:
    """Retention by age: delete the messages older than ``cutoff``, whatever their chunk."""
    rows = db.execute(_OLD_CHUNKS, (cutoff, now)).fetchall()
    _cut(db, rows, lambda room, e: e.ts < cutoff, now)


def _trim_chunks(db: sqlite3.Connection, keep: int, now: int) -> None:
    """Retention by count: delete each room's messages at or below its last seq - ``keep``."""
    bounds: dict[str, int] = dict(db.execute(_ROOMS_OVER, (keep,)).fetchall())
    rows = [
        row
        for room, bound in bounds.items()
        for row in db.execute(_LOW_CHUNKS, (room, bound, now)).fetchall()
    ]
    _cut(db, rows, lambda room, e: e.seq <= bounds[room], now)


def _expire_dms(db: sqlite3.Connection, cutoff: int, now: int) -> None:
    """Retention by age for DMs, their refs in force moved to the refs table first."""
    rows = db.execute(
        f"SELECT {_REF_COLUMNS}, id, ts FROM dms WHERE ts < ? AND ref IS NOT NULL "
        "AND ref_expires > ?",
        (cutoff, now),
    ).fetchall()
    db.executemany(_MOVE_REFS, [msgspec.structs.astuple(_loaded_ref(*row)) for row in rows])
    db.execute("DELETE FROM dms WHERE ts < ?", (cutoff,))


def _enable_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Put ``db`` in WAL mode, trying again for up to ``timeout`` seconds while busy.

    SQLite can refuse the switch at once (SQLITE_BUSY, without waiting for its busy
    handler) while another process opens the same new file: 1 open in 240 failed with
    eight processes opening one new database at once.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


def _rollback(db: sqlite3.Connection) -> None:
    """Undo what is left of a failed transaction (SQLite may have undone it itself)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _ref_columns(ref: RefRecord | None) -> _RefColumns:
    if ref is None:
        return (None, None, None, None)
    return (ref.nick_key, ref.ref, ref.expires, ref.ack)


def _loaded_ref(
    key: str, ref: str, expires: int, ack: bytes | None, dm_id: int | None, ts: int | None
) -> RefRecord:
    """A ref read back from the refs table (with its ack) or from a DM's row (``dm_id``)."""
    if ack is not None:
        return RefRecord(key, ref, int(expires), bytes(ack))
    # ack_of reads only what identifies the DM, so the rest is left empty.
    dm = DmEvent(sender="", to="", id=cast(int, dm_id), ts=cast(int, ts), text="")
    return RefRecord(key, ref, int(expires), ack_of(ref, dm))


def _dm_row(d: DmEvent, ref: RefRecord | None) -> tuple[object, ...]:
    return (d.id, d.ts, d.sender, d.to, d.text, *_ref_columns(ref))


def _merge(stored: list[Message], unstored: list[Message]) -> list[Message]:
    if not unstored:
        return stored
    seen = {m.seq for m in stored}
    merged = stored + [m for m in unstored if m.seq not in seen]
    merged.sort(key=lambda m: m.seq)
    return merged
