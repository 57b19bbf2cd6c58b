"""What one ``say`` costs the server, step by step, without sockets.

The ingest target (150,000 ``say``/s stored and acked on one core) leaves
6.7 µs per ``say`` for everything. This measures where a ``say`` stands
against it, in one process on one core (pin it: ``taskset -c 0``):

- the strict decode of a ``say`` frame (``decode_client``);
- the registry and the SQLite store together, fed ``say`` frames in ticks
  of ``--tick`` (as a connection's reads bring them, decoded together and
  handed over as one run, as the session does) on uvloop, until every one
  is stored and acked: the loop thread's CPU and the writer thread's;
- the least Python a ``say`` needs in this design, run in one loop with
  nothing around it: decode (a tick's frames together), check the text,
  build the message and its ack, remember the ref with its receipt, build
  the message's entry in its chunk, encode the tick's messages and acks
  (SQLite not included);
- the store's commit alone, on one thread with nothing else running: a
  tick's messages stored as the writer thread does (a chunk per room, the
  messages and their refs in one body), without the hand-over, callbacks or
  checkpoints (the server's checkpoint thread does those, on the same core);
- the memory a remembered ref takes for its ten minutes.

    python benchmarks/say_cost.py [--says 200000] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from achat.bench.cli import replace_section
from achat.errors import ProtocolError
from achat.protocol.messages import (
    Ack,
    Hello,
    Join,
    Message,
    Say,
    decode_client,
    decode_client_many,
    encode_many,
)
from achat.protocol.names import validate_text
from achat.server.app import defer_on_loop
from achat.server.refs import RecentRefs, receipt_of, ref_key
from achat.server.registry import Registry
from achat.store.base import REF_TTL_MS, RefRecord
from achat.store.sqlite import _DECODER, SQLiteStore, _Write

ROOM = "bench"
NOW = 1_764_090_000_000
TICK = 200  # says per read, as --tick's default
TEXT = b"t=1764090000000000000 " + b"x" * 38  # like achat-bench's stamped texts


def bodies(count: int) -> list[bytes]:
    return [
        b'{"type":"say","room":"%s","text":"%s","ref":"%d"}' % (ROOM.encode(), TEXT, i)
        for i in range(count)
    ]


class Peer:
    """A connection that only counts what it is sent."""

    def __init__(self) -> None:
        self.frames = 0

    def send(self, frame: bytes) -> None:
        self.frames += 1

    def send_pages(self, pages: Iterator[bytes]) -> None:
        self.frames += sum(1 for _ in pages)

    def close(self, frame: bytes | None = None) -> None:
        return None


def decode_us() -> float:
    body = bodies(1)[0]
    runs = timeit.repeat(lambda: decode_client(body), number=100_000, repeat=5)
    return min(runs) / 100_000 * 1e6


def decode_many_us(tick: int) -> float:
    run = bodies(tick)
    runs = timeit.repeat(lambda: decode_client_many(run), number=1000, repeat=5)
    return min(runs) / 1000 / tick * 1e6


async def registry_and_store(says: int, tick: int) -> tuple[float, float]:
    """CPU µs per ``say`` of the loop thread and of the rest of the process (the store)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "achat.db")
        registry = Registry(store, clock=lambda: time.time_ns() // 1_000_000, defer=defer_on_loop)
        member = registry.register(Peer(), Hello(nick="bob", version=1))
        registry.handle(member, Join(room=ROOM))
        frames = bodies(says)
        # Both clocks in ns: os.times() counts in ticks of 10 ms, coarser than a short run.
        loop_start, process_start = time.thread_time(), time.process_time()
        for i in range(0, says, tick):
            run = decode_client_many(frames[i : i + tick])
            assert run is not None
            registry.say_many(member, run, refused)  # type: ignore[arg-type]
            await asyncio.sleep(0)  # the tick ends: the store takes the batch
        # Polled: the registry tells nobody when a commit's callbacks have run.
        while registry.rooms[ROOM].stored_seq < says:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        registry.fan_out()  # the last commit's messages and acks
        loop_cpu = time.thread_time() - loop_start
        process_cpu = time.process_time() - process_start
        store.close()
    return loop_cpu / says * 1e6, (process_cpu - loop_cpu) / says * 1e6


def refused(exc: ProtocolError) -> None:
    raise exc


def least_python_us(says: int) -> float:
    refs: RecentRefs[object] = RecentRefs(granularity=1000)  # as the server keeps them
    frames = bodies(says)
    rows: list[tuple[object, ...]] = []
    out: list[bytes] = []
    start = time.perf_counter()
    decoded = [
        frame
        for i in range(0, says, TICK)
        for frame in decode_client_many(frames[i : i + TICK]) or ()
    ]
    for first in range(0, says, TICK):
        refs.deadline(NOW + 600_000)  # a tick's refs share one
        messages: list[Message] = []
        acks: list[Ack] = []
        for seq, say in enumerate(decoded[first : first + TICK], first + 1):
            assert isinstance(say, Say)
            assert say.ref is not None
            text = validate_text(say.text, 2000)
            message = Message(room=ROOM, seq=seq, ts=NOW, sender="bob", text=text)
            if refs.claim(ref_key("bob", say.ref), receipt_of(message)) is not None:
                raise RuntimeError("a ref used twice")
            messages.append(message)
            acks.append(Ack(ref=say.ref, ts=NOW, room=ROOM, seq=seq))
            rows.append((seq, NOW, "bob", text, "bob", say.ref, NOW + 600_000, None))
        out.append(encode_many(messages))  # a tick's messages and acks encoded together
        out.append(encode_many(acks))
    return (time.perf_counter() - start) / says * 1e6


def store_commit_us(says: int, tick: int) -> float:
    """Wall µs per ``say`` of the SQLite store's own commit, ``tick`` messages at a time."""
    text = TEXT.decode()
    batches = [
        [  # a tick's run, as the registry appends it
            _Write(
                (
                    [
                        Message(room=ROOM, seq=seq, ts=NOW, sender="bob", text=text)
                        for seq in range(first, min(first + tick, says + 1))
                    ],
                    [
                        RefRecord("bob", str(seq), NOW + REF_TTL_MS)
                        for seq in range(first, min(first + tick, says + 1))
                    ],
                ),
                None,
                None,
                None,
            )
        ]
        for first in range(1, says + 1, tick)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "achat.db")
        db = store._connect()  # the writer thread's own connection, as it opens it
        db.execute("PRAGMA wal_autocheckpoint=0")  # as the writer thread does
        start = time.perf_counter()
        for batch in batches:
            if not store._commit(db, batch):
                raise RuntimeError("a commit failed")
        elapsed = time.perf_counter() - start
        stored = sum(
            len(_DECODER.decode(body)) for (body,) in db.execute("SELECT body FROM chunks")
        )
        if stored != says:
            raise RuntimeError("not every message was stored")
        db.close()
        store.close()
    return elapsed / says * 1e6


def ref_bytes(count: int = 100_000, per_second: int = 2_500) -> float:
    """Bytes per ref remembered as the server does, at ``per_second`` new refs a second."""
    refs: RecentRefs[object] = RecentRefs(granularity=1000)
    message = Message(room=ROOM, seq=1, ts=NOW, sender="bob", text="x")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        ref = str(1_000_000 + i)
        key = ref_key("b0u123", ref)
        refs.keep(key, NOW + 600_000 + i * 1000 // per_second, receipt_of(message))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / count


def table(says: int, tick: int) -> str:
    import uvloop

    decode, decode_many = decode_us(), decode_many_us(tick)
    loop_us, writer_us = uvloop.run(registry_and_store(says, tick))
    floor = least_python_us(says)
    commit = store_commit_us(says, tick)
    per_ref = ref_bytes()
    total = loop_us + writer_us
    return "\n".join(
        [
            f"{says:,} `say` frames with refs, in ticks of {tick}, one process on one core:",
            "",
            "| step | per `say` |",
            "|---|---:|",
            f"| strict decode, one frame (`decode_client`) | {decode:.2f} µs |",
            f"| strict decode, a tick's frames together (`decode_client_many`) "
            f"| {decode_many:.2f} µs |",
            f"| registry and SQLite store, loop thread (decode included) | {loop_us:.2f} µs |",
            f"| SQLite store, its writer and checkpoint threads | {writer_us:.2f} µs |",
            f"| **in all, before sockets** | **{total:.2f} µs ({1e6 / total:,.0f}/s)** |",
            f"| the least Python a `say` needs here (no store, no calls) | {floor:.2f} µs |",
            f"| the store's commit alone, a chunk per commit, no checkpoints | {commit:.2f} µs |",
            f"| **the two together: the least a `say` costs in this design** "
            f"| **{floor + commit:.2f} µs ({1e6 / (floor + commit):,.0f}/s)** |",
            "| what 150,000 `say`/s on one core allows | 6.67 µs |",
            f"| memory per remembered ref (ten minutes; 2,500 new a second) | {per_ref:.0f} B |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--says", type=int, default=200_000)
    parser.add_argument("--tick", type=int, default=200, help="says handled per loop tick")
    parser.add_argument("--update", type=Path, help="replace the say-cost section of this file")
    args = parser.parse_args()
    text = table(args.says, args.tick)
    print(text)
    if args.update is not None:
        replace_section(args.update, "say-cost", text)


if __name__ == "__main__":
    main()
