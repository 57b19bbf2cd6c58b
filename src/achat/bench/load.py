"""The load side of ``achat-bench``: many raw protocol clients per process, on uvloop.

A worker process owns a slice of the clients. Each client is a bare asyncio
connection (no :class:`~achat.client.connection.Client` machinery, so the
generator stays cheaper than the server it measures): it says hello, joins
its room, then sends ``say`` frames at its rate with a random phase. Texts
carry their send time (``t=<ns since epoch>``), so a receiver can measure
latency from the bytes without decoding every frame.

Receiving is counted, not parsed: deliveries are the occurrences of
``"type":"message"`` in the byte stream (patterns split across reads are
counted once), and latency is sampled from the first and last timestamp in
each read — the oldest and newest message in it. A worker reports its
counters to the parent once a second over a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from ..protocol.frames import encode_frame

__all__ = ["ClientPlan", "WorkerPlan", "WorkerReport", "run_worker"]

MESSAGE = b'"type":"message"'
ACK = b'"type":"ack"'
STAMP = b'"text":"t='
TEXT_SIZE = 60


@dataclass(frozen=True, slots=True)
class ClientPlan:
    nick: str
    room: str
    rate: float  # messages per second; 0 = only listen


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    host: str
    port: int
    clients: list[ClientPlan]
    duration: float
    warmup: float
    seed: int
    cpu: int | None = None
    pipeline: int = 0  # ingest: keep this many says in flight instead of a rate
    connect_rate: float = 2000.0  # new connections a second per worker


@dataclass(slots=True)
class WorkerReport:
    connected: int = 0
    joined: int = 0
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: int = 0
    closed: int = 0
    latencies: list[float] = field(default_factory=list)
    samples_seen: int = 0
    connect_seconds: float = 0.0
    done: bool = False


def _stamp(text_size: int = TEXT_SIZE) -> bytes:
    head = b"t=%d " % time.time_ns()
    return head + b"x" * max(0, text_size - len(head))


def _say(room: bytes, ref: int) -> bytes:
    body = b'{"type":"say","room":"%s","text":"%s","ref":"%d"}' % (room, _stamp(), ref)
    return encode_frame(body)


class _Counter:
    """Counts a pattern across chunk boundaries."""

    __slots__ = ("pattern", "tail")

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self.tail = b""

    def count(self, chunk: bytes) -> int:
        joined = self.tail + chunk
        n = joined.count(self.pattern) - self.tail.count(self.pattern)
        self.tail = joined[-(len(self.pattern) - 1) :]
        return n


MAX_SAMPLES = 100_000


def _sample(report: WorkerReport, value: float, rng: random.Random) -> None:
    """Keep a uniform sample of at most MAX_SAMPLES latencies (reservoir sampling)."""
    report.samples_seen += 1
    if len(report.latencies) < MAX_SAMPLES:
        report.latencies.append(value)
    else:
        slot = rng.randrange(report.samples_seen)
        if slot < MAX_SAMPLES:
            report.latencies[slot] = value


class _Deadline:
    """When the run ends: unknown (far away) until the parent says go."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = float("inf")


async def _client(
    plan: WorkerPlan,
    c: ClientPlan,
    report: WorkerReport,
    measuring: asyncio.Event,
    rng: random.Random,
    deadline: _Deadline,
) -> None:
    reader, writer = await asyncio.open_connection(plan.host, plan.port)
    report.connected += 1
    hello = b'{"type":"hello","nick":"%s","version":1,"client":"achat-bench"}' % c.nick.encode()
    writer.write(encode_frame(hello))
    writer.write(encode_frame(b'{"type":"join","room":"%s"}' % c.room.encode()))
    room = c.room.encode()
    messages = _Counter(MESSAGE)
    acks = _Counter(ACK)
    joined = False
    window = {"sent": 0, "acked": 0}
    acked_more = asyncio.Event()

    async def send() -> None:
        ref = 0
        if plan.pipeline:
            while time.monotonic() < deadline.at:
                while window["sent"] - window["acked"] < plan.pipeline:
                    ref += 1
                    window["sent"] += 1
                    writer.write(_say(room, ref))
                    if measuring.is_set():
                        report.sent += 1
                acked_more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(acked_more.wait(), 1.0)
            return
        if c.rate <= 0:
            return
        period = 1.0 / c.rate
        await asyncio.sleep(rng.random() * period)
        next_at = time.monotonic()
        while next_at < deadline.at:
            ref += 1
            writer.write(_say(room, ref))
            if measuring.is_set():
                report.sent += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    sender: asyncio.Task[None] | None = None
    try:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                report.closed += 1
                return
            if not joined and b'"type":"names"' in data:
                joined = True
                report.joined += 1
                sender = asyncio.create_task(send())
            if b'"type":"ping"' in data:
                writer.write(encode_frame(b'{"type":"pong","ref":"keepalive"}'))
            if b'"type":"error"' in data:
                report.errors += data.count(b'"type":"error"')
            n = messages.count(data)
            got_acks = acks.count(data) if plan.pipeline else 0
            if got_acks:
                window["acked"] += got_acks
                acked_more.set()
            if measuring.is_set():
                report.delivered += n
                report.acked += got_acks
                if n:
                    now = time.time_ns()
                    for pos in (data.find(STAMP), data.rfind(STAMP)):
                        end = data.find(b" ", pos) if pos >= 0 else -1
                        # A stamp cut off at the end of the read is skipped, not misread.
                        if pos >= 0 and pos + len(STAMP) < end <= pos + len(STAMP) + 20:
                            with contextlib.suppress(ValueError):
                                sent_ns = int(data[pos + len(STAMP) : end])
                                _sample(report, (now - sent_ns) / 1e9, rng)
            if time.monotonic() > deadline.at + 2:
                return
    except (ConnectionError, OSError):
        report.closed += 1
    finally:
        if sender is not None:
            sender.cancel()
        writer.transport.abort()


async def _worker(plan: WorkerPlan, pipe: Connection) -> None:
    report = WorkerReport()
    measuring = asyncio.Event()
    rng = random.Random(plan.seed)
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    gap = 1.0 / plan.connect_rate
    deadline = _Deadline()
    for c in plan.clients:
        tasks.append(asyncio.create_task(_client(plan, c, report, measuring, rng, deadline)))
        await asyncio.sleep(gap)
    while report.joined + report.closed < len(plan.clients):
        await asyncio.sleep(0.01)
        if time.monotonic() - started > 60:
            break
    report.connect_seconds = time.monotonic() - started
    pipe.send(("joined", report.joined, report.connect_seconds))
    # The generator's own garbage collector would pause every client of the worker at
    # once and show up as server latency: what it allocates from here on is acyclic.
    gc.collect()
    gc.freeze()
    gc.disable()
    # Wait for the parent's go: all workers start measuring together.
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    deadline.at = time.monotonic() + plan.warmup + plan.duration
    await asyncio.sleep(plan.warmup)
    measuring.set()
    end = time.monotonic() + plan.duration
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        pipe.send(("tick", report.sent, report.delivered, report.acked, report.errors))
    measuring.clear()
    await asyncio.sleep(0.5)
    report.done = True
    pipe.send(("done", report))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(plan: WorkerPlan, pipe: Connection) -> None:
    """Entry point of a worker process."""
    if plan.cpu is not None:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, {plan.cpu})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The parent may have gone (interrupted run): then there is nobody to report to.
    with contextlib.suppress(BrokenPipeError, EOFError, ConnectionResetError, KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(_worker(plan, pipe))
        except ImportError:
            asyncio.run(_worker(plan, pipe))
