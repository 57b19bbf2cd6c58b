"""The durable default store: SQLite in WAL mode, written by one thread with group commit.

Theory of operation: the event loop never waits for the disk. :meth:`append`
collects the record with the rest of the current loop tick's writes and
returns at once; at the end of the tick they are handed to the writer
thread in one piece (one wake-up, one GIL round trip). The single writer
thread takes *everything* handed over since its last commit, writes it in
one transaction, commits, and then hands the whole batch's ``on_stored``
callbacks back to the loop in one ``call_soon_threadsafe``. Messages that
arrive within one tick are therefore committed together, and an ``ack`` is
sent only after its message is on disk.

Records queued but not committed yet are kept in memory (``_unstored``) and
merged into history reads, so a reader never sees a gap between what was
delivered live and what the database already holds.

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
there are new commits. A disk stall during a checkpoint therefore delays no
commit, so no ``ack`` and no delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec

from ..protocol.messages import DmEvent, Message
from .base import REF_TTL_MS, HistoryPage, RefRecord, RoomRecord, ack_of

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("achat.store")

SCHEMA_VERSION = 4

#: Seconds between checkpoints while commits keep coming (bounds the WAL's growth).
CHECKPOINT_INTERVAL = 0.5

# Each entry upgrades the schema from version i to i + 1.
_MIGRATIONS: tuple[str, ...] = (
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
)

#: How far back (ms) load_refs looks for messages whose ref may still be in force: the
#: refs' lifetime and a minute's margin, so a restart reads minutes of rows, not history.
REF_HORIZON_MS = REF_TTL_MS + 60_000

_REF_COLUMNS = "ref_key, ref, ref_expires, ack"


class _Write(msgspec.Struct):
    """One thing for the writer thread to store (a struct: one is made per message)."""

    message: Message | None
    dm: DmEvent | None
    ref: RefRecord | None
    on_stored: Callable[[], None] | None
    topic: tuple[str, str] | None = None
    # Called on the writer thread itself (flush() waits on it, possibly from the loop thread).
    in_thread: bool = False


class SQLiteStore:
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
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.rows = 0
        self._checkpoint_due = threading.Event()
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="achat-checkpoint", daemon=True
        )
        self._writer = threading.Thread(target=self._write_loop, name="achat-store", daemon=True)
        self._checkpointer.start()
        self._writer.start()

    # -- setup ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # First, so that the statements below wait for a lock instead of failing.
        db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
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
                for statement in _MIGRATIONS[target - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
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

    def _put_many(self, writes: list[_Write]) -> None:
        if not self._on_loop():
            self._hand_over(writes)
            return
        if not self._tick:
            cast(asyncio.AbstractEventLoop, self._loop).call_soon(self._submit)
        self._tick += writes

    def _submit(self) -> None:
        if self._tick:
            self._hand_over(self._tick)
            self._tick = []

    def _hand_over(self, writes: list[_Write]) -> None:
        # Messages on their way to the disk stay readable (history merges them in); one
        # lock per hand-over, not per message, since the writer takes it once per commit.
        with self._lock:
            for w in writes:
                if w.message is not None:
                    self._unstored.setdefault(w.message.room, []).append(w.message)
        self._queue.put(writes)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is committed (for tools and tests)."""
        if self._on_loop():
            self._submit()
        done = threading.Event()
        self._queue.put([_Write(None, None, None, done.set, in_thread=True)])
        if not done.wait(timeout):
            raise TimeoutError("the store did not commit in time")

    # -- the Store interface -------------------------------------------------

    def load_rooms(self) -> list[RoomRecord]:
        rows = self._reader.execute(
            "SELECT r.name, r.topic, max(r.last_seq, coalesce(m.seq, 0)) FROM rooms r "
            "LEFT JOIN (SELECT room, max(seq) AS seq FROM messages GROUP BY room) m "
            "ON m.room = r.name ORDER BY r.name"
        ).fetchall()
        return [RoomRecord(name, topic, int(seq)) for name, topic, seq in rows]

    def last_dm_id(self) -> int:
        row = self._reader.execute("SELECT coalesce(max(id), 0) FROM dms").fetchone()
        return int(row[0])

    def load_refs(self, now: int) -> list[RefRecord]:
        # One statement, so one snapshot: the writer may be pruning meanwhile, moving refs
        # from message rows to the refs table, and two reads could miss such a ref in both.
        rows = self._reader.execute(_LOAD_REFS, (now, now - REF_HORIZON_MS)).fetchall()
        return [_loaded_ref(row) for row in rows]

    def append(
        self, message: Message, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        self._put(_Write(message, None, ref, on_stored))

    def append_many(
        self,
        messages: Sequence[Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        writes = [_Write(m, None, r, None) for m, r in zip(messages, refs, strict=True)]
        if not writes:
            writes.append(_Write(None, None, None, None))
        writes[-1].on_stored = on_stored  # the last of them is committed with the rest
        self._put_many(writes)

    def append_dm(
        self, dm: DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        self._put(_Write(None, dm, ref, on_stored))

    def set_topic(self, room: str, topic: str) -> None:
        self._put(_Write(None, None, None, None, topic=(room, topic)))

    def history(
        self, room: str, *, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        with self._lock:
            unstored = list(self._unstored.get(room, ()))
        if self._tick and self._on_loop():
            # This tick's messages, not handed to the writer yet.
            unstored += [w.message for w in self._tick if w.message and w.message.room == room]
        db = self._reader
        if after is not None:
            rows = db.execute(
                "SELECT seq, ts, sender, text FROM messages WHERE room = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (room, after, limit + 1),
            ).fetchall()
            found = [Message(room=room, seq=s, ts=t, sender=f, text=x) for s, t, f, x in rows]
            merged = _merge(found, [m for m in unstored if m.seq > after])
            page = merged[:limit]
            more = len(merged) > limit
        else:
            bound = before if before is not None else 2**63 - 1
            rows = db.execute(
                "SELECT seq, ts, sender, text FROM messages WHERE room = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?",
                (room, bound, limit + 1),
            ).fetchall()
            found = [Message(room=room, seq=s, ts=t, sender=f, text=x) for s, t, f, x in rows]
            found.reverse()
            merged = _merge(found, [m for m in unstored if m.seq < bound])
            page = merged[-limit:]
            more = len(merged) > limit
        gap = self._gap(room, page, after=after, before=before, limit=limit)
        return HistoryPage(page, more=more, gap=gap)

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
            "SELECT min(seq) FROM messages WHERE room = ?", (room,)
        ).fetchone()
        oldest = row[0]
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
            self._submit()
        # A writer waiting to retry a failed commit tries it now (and last); the
        # checkpointer stops, since the writer truncates the WAL as it stops.
        self._stopping.set()
        self._queue.put(None)
        self._writer.join()
        self._checkpoint_due.set()
        self._checkpointer.join()
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
            attempts = 0
            while True:
                if failed:
                    # Nothing of it was stored or acked (the database locked elsewhere, the
                    # disk full): wait, then try it again, in order, with what came since.
                    # The wait doubles up to 8 retry_seconds while it keeps failing.
                    self._stopping.wait(self.retry_seconds * min(8, 2 ** (attempts - 1)))
                    more, stop = self._take(block=False)
                    batch = failed + more
                else:
                    batch, stop = self._take(block=True)
                if batch and self._commit(db, batch, quiet=attempts > 0):
                    if attempts:
                        log.warning("stored again after %d failed commits", attempts)
                    failed, attempts = [], 0
                    self._checkpoint_due.set()
                elif batch:
                    failed, attempts = batch, attempts + 1
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

    def _take(self, *, block: bool) -> tuple[list[_Write], bool]:
        """Everything queued (once something is, if ``block``), and whether to stop after it."""
        batch: list[_Write] = []
        try:
            item = self._queue.get(block)
        except queue.Empty:
            return batch, False
        while item is not None:
            batch.extend(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _checkpoint_loop(self) -> None:
        db = self._connect()
        try:
            while True:
                self._checkpoint_due.wait()
                if self._stopping.is_set():
                    return  # the writer truncates the WAL as it stops
                self._checkpoint_due.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    log.exception("checkpoint failed; the next one will retry")
                self._stopping.wait(CHECKPOINT_INTERVAL)
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, batch: list[_Write], *, quiet: bool = False) -> bool:
        """Store ``batch`` in one transaction and call back; False when nothing was stored.

        A failure is logged with its traceback, or in one line when ``quiet`` (a retry).
        """
        messages = [w.message for w in batch if w.message is not None]
        message_rows = [_row(w.message, w.ref) for w in batch if w.message is not None]
        dm_rows = [_dm_row(w.dm, w.ref) for w in batch if w.dm is not None]
        topics = [w.topic for w in batch if w.topic is not None]
        last: dict[str, int] = {}
        for m in messages:
            last[m.room] = max(last.get(m.room, 0), m.seq)
        # Every statement hands the GIL back and forth with the event loop: run only
        # the ones this batch needs.
        try:
            db.execute("BEGIN")
            if message_rows:
                db.executemany(
                    "INSERT OR IGNORE INTO messages "
                    f"(room, seq, ts, sender, text, {_REF_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                    message_rows,
                )
                db.executemany(
                    "INSERT INTO rooms (name, last_seq) VALUES (?, ?) ON CONFLICT(name) "
                    "DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                    list(last.items()),
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
        self.rows += len(batch)
        with self._lock:
            for m in messages:
                pending = self._unstored.get(m.room)
                if pending and pending[0] is m:
                    pending.pop(0)
                elif pending:
                    with contextlib.suppress(ValueError):
                        pending.remove(m)
                if not pending:
                    self._unstored.pop(m.room, None)
        callbacks = [w.on_stored for w in batch if w.on_stored is not None and not w.in_thread]
        for w in batch:
            if w.in_thread and w.on_stored is not None:
                w.on_stored()
        if callbacks:
            self._deliver(callbacks)
        return True

    def _deliver(self, callbacks: list[Callable[[], None]]) -> None:
        def run() -> None:
            for callback in callbacks:
                callback()

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
                self._delete(db, "messages", "ts < ?", (cutoff,), now)
                self._delete(db, "dms", "ts < ?", (cutoff,), now)
            if self.history_max:
                self._delete(
                    db,
                    "messages",
                    "(room, seq) IN (SELECT m.room, m.seq FROM messages m"
                    " JOIN rooms r ON r.name = m.room WHERE m.seq <= r.last_seq - ?)",
                    (self.history_max,),
                    now,
                )
            db.execute("DELETE FROM refs WHERE expires < ?", (now,))
            db.execute("COMMIT")
        except Exception:
            _rollback(db)
            log.exception("pruning old history failed")

    @staticmethod
    def _delete(
        db: sqlite3.Connection, table: str, where: str, args: tuple[int, ...], now: int
    ) -> None:
        # Refs outlive history: one still in force moves to the refs table first, so that
        # a resend after a restart is still recognised.
        rows = db.execute(
            f"SELECT {_REF_COLUMNS}, {_ACK_SOURCE[table]} FROM {table} "
            f"WHERE ({where}) AND ref IS NOT NULL AND ref_expires > ?",
            (*args, now),
        )
        db.executemany(
            "INSERT OR REPLACE INTO refs (nick_key, ref, expires, ack) VALUES (?, ?, ?, ?)",
            [msgspec.structs.astuple(_loaded_ref(row)) for row in rows.fetchall()],
        )
        db.execute(f"DELETE FROM {table} WHERE {where}", args)

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
        import time

        return time.time_ns() // 1_000_000


_RefColumns = tuple[str | None, str | None, int | None, bytes | None]


def _rollback(db: sqlite3.Connection) -> None:
    """Undo what is left of a failed transaction (SQLite may have undone it itself)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _ref_columns(ref: RefRecord | None) -> _RefColumns:
    if ref is None:
        return (None, None, None, None)
    return (ref.nick_key, ref.ref, ref.expires, ref.ack)


#: What ack_of needs, by table, as (room, seq, id, ts): a row whose ack is NULL has the one
#: ack_of derives from these.
_ACK_SOURCE = {"messages": "room, seq, NULL, ts", "dms": "NULL, NULL, id, ts"}

#: Refs still in force: those retention moved to the refs table, then those on the rows of
#: recent messages and DMs (?1 is now, ?2 how far back rows may hold one), oldest first.
_LOAD_REFS = (
    "SELECT nick_key, ref, expires, ack, NULL, NULL, NULL, NULL FROM refs WHERE expires > ?1 "
    f"UNION ALL SELECT {_REF_COLUMNS}, {_ACK_SOURCE['messages']} FROM messages "
    "WHERE ts > ?2 AND ref IS NOT NULL AND ref_expires > ?1 "
    f"UNION ALL SELECT {_REF_COLUMNS}, {_ACK_SOURCE['dms']} FROM dms "
    "WHERE ts > ?2 AND ref IS NOT NULL AND ref_expires > ?1 "
    "ORDER BY 3"
)


def _loaded_ref(row: tuple[Any, ...]) -> RefRecord:
    """A ref read back: ``_REF_COLUMNS``, then the ``_ACK_SOURCE`` columns of its row."""
    key, ref, expires, ack, room, seq, dm_id, ts = row
    if ack is not None:
        return RefRecord(key, ref, int(expires), bytes(ack))
    # ack_of reads only what identifies the record, so sender and text are left empty.
    record: Message | DmEvent
    if room is not None:
        record = Message(room=room, seq=seq, ts=ts, sender="", text="")
    else:
        record = DmEvent(sender="", to="", id=dm_id, ts=ts, text="")
    return RefRecord(key, ref, int(expires), ack_of(ref, record))


def _row(m: Message, ref: RefRecord | None) -> tuple[object, ...]:
    return (m.room, m.seq, m.ts, m.sender, m.text, *_ref_columns(ref))


def _dm_row(d: DmEvent, ref: RefRecord | None) -> tuple[object, ...]:
    return (d.id, d.ts, d.sender, d.to, d.text, *_ref_columns(ref))


def _merge(stored: list[Message], unstored: list[Message]) -> list[Message]:
    if not unstored:
        return stored
    seen = {m.seq for m in stored}
    merged = stored + [m for m in unstored if m.seq not in seen]
    merged.sort(key=lambda m: m.seq)
    return merged
