"""What SQLite takes to store one message, by table layout, with nothing else running.

The ingest target leaves 6.7 µs of one core per ``say`` for everything. This
times only SQLite and the building of its rows: messages of ~60 characters,
inserted with ``executemany`` and committed ``--tick`` at a time (as the
store's writer thread does) into a WAL database with ``synchronous=NORMAL``
(the server's default durability), SQLite's own checkpoints included (the
server runs them on another thread, on the same core), for each of these
layouts:

- schema 4's: one row per message, keyed by (room, seq), its ref on it,
  and an index by time for retention;
- the same without the index by time;
- the barest row: room, seq, ts, sender, text, keyed by (room, seq), no index;
- one row per commit: the tick's messages as one encoded blob, keyed by
  (room, first seq) (what a log-structured store would do);
- the store's own (schema 5): that, as the store builds it: a chunk per room
  per commit, its messages and their refs in one msgpack body, with the
  store's three indexes (by room and seq, by least and by greatest time).

    python benchmarks/row_layouts.py [--messages 60000] [--tick 200]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from achat.protocol.messages import Message
from achat.store.base import RefRecord
from achat.store.sqlite import _CHUNKS_SCHEMA, _INSERT_CHUNK, _chunk_rows, _EntryTuple

ROOM = "bench"
NOW = 1_764_090_000_000
TEXT = "t=1764090000000000000 " + "x" * 38

STORE = """
CREATE TABLE m (room TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
  sender TEXT NOT NULL, text TEXT NOT NULL, ref_key TEXT, ref TEXT, ref_expires INTEGER,
  ack BLOB, PRIMARY KEY (room, seq)) WITHOUT ROWID;
"""
BY_TIME = "CREATE INDEX m_ts ON m (ts);"
BARE = """
CREATE TABLE m (room TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
  sender TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
"""
BLOBS = """
CREATE TABLE m (room TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
  ts INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (room, first)) WITHOUT ROWID;
"""

Rows = Callable[[range], list[tuple[object, ...]]]


def store_rows(seqs: range) -> list[tuple[object, ...]]:
    return [(ROOM, s, NOW + s, "bob", TEXT, f"bob\0{s}", str(s), NOW + 600_000, None) for s in seqs]


def bare_rows(seqs: range) -> list[tuple[object, ...]]:
    return [(ROOM, s, NOW + s, "bob", TEXT) for s in seqs]


def blob_rows(seqs: range) -> list[tuple[object, ...]]:
    body = [{"seq": s, "ts": NOW + s, "from": "bob", "text": TEXT} for s in seqs]
    return [(ROOM, seqs[0], seqs[-1], NOW + seqs[-1], msgspec.json.encode(body))]


def chunk_layout(messages: int) -> Rows:
    """The store's chunks, built as the writer thread builds them from what it is handed
    (the messages and refs themselves are made beforehand: the loop makes them)."""
    writes = [
        (
            Message(room=ROOM, seq=s, ts=NOW + s, sender="bob", text=TEXT),
            RefRecord(f"bob\0{s}", str(s), NOW + 600_000),
        )
        for s in range(1, messages + 1)
    ]

    def rows(seqs: range) -> list[tuple[object, ...]]:
        entries: list[_EntryTuple] = [
            (m.seq, m.ts, m.sender, m.text, r.nick_key, r.ref, r.expires, r.ack)
            for m, r in writes[seqs[0] - 1 : seqs[-1]]
        ]
        return list(_chunk_rows(ROOM, entries))

    return rows


def per_message_us(
    schema: str, rows: Rows, columns: int, messages: int, tick: int, insert: str | None = None
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "layout.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
        insert = insert or f"INSERT OR IGNORE INTO m VALUES ({','.join('?' * columns)})"
        start = time.perf_counter()
        for first in range(1, messages + 1, tick):
            batch = rows(range(first, min(first + tick, messages + 1)))
            db.execute("BEGIN")
            db.executemany(insert, batch)
            db.execute("COMMIT")
        elapsed = time.perf_counter() - start
        db.close()
    return elapsed / messages * 1e6


def table(messages: int, tick: int) -> str:
    layouts: list[tuple[str, str, Rows, int, str | None]] = [
        (
            "schema 4's: a row per message, its ref on it, an index by time",
            STORE + BY_TIME,
            store_rows,
            9,
            None,
        ),
        ("the same without the index by time", STORE, store_rows, 9, None),
        ("the barest row per message, no index", BARE, bare_rows, 5, None),
        (f"one row per commit: {tick} messages in one blob", BLOBS, blob_rows, 5, None),
        (
            "the store's (schema 5): a chunk per room per commit, refs in it, three indexes",
            _CHUNKS_SCHEMA,
            chunk_layout(messages),
            7,
            _INSERT_CHUNK,
        ),
    ]
    lines = [
        f"{messages:,} messages, {tick} per commit, WAL with synchronous=NORMAL and its "
        "checkpoints, one thread:",
        "",
        "| layout | per message |",
        "|---|---:|",
    ]
    for name, schema, rows, columns, insert in layouts:
        cost = per_message_us(schema, rows, columns, messages, tick, insert)
        lines.append(f"| {name} | {cost:.2f} µs |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--tick", type=int, default=200)
    args = parser.parse_args()
    print(table(args.messages, args.tick))


if __name__ == "__main__":
    main()
