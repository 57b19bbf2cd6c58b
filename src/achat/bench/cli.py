"""``achat-bench``: run a named load scenario against an achat server and report the figures.

Scenarios::

    busy-room   N clients in one room, each saying R messages/s (random phase)
    many-rooms  N clients in rooms of K, each saying R messages/s
    idle        N clients connect, join rooms of K and sit idle: server RSS per client,
                connect+join time
    ingest      one client keeping W say frames in flight: frames/s stored and acked
                (its server runs with the flood limit off, and the report says so)
    self-check  the generator against a trivial sink that floods it: its own ceiling

By default ``achat-bench`` starts ``achat-server`` itself on a free loopback
port, pinned to CPU 0 with ``taskset`` when there is more than one CPU, and
pins its worker processes to the other CPUs; ``--port`` targets a running
server instead (server CPU and RSS are then not reported).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

from ..portfile import wait_port_file
from ..protocol.frames import encode_frame
from ..protocol.messages import Message, encode
from ..server.session import SWAMPED_SHARE
from .histogram import Histogram
from .load import (
    DRAIN_SECONDS,
    KEEPALIVE_REF,
    KEEPALIVE_SECONDS,
    NEAR_NS,
    ClientPlan,
    WorkerPlan,
    WorkerReport,
    _count,
    run_worker,
    stamped_text,
    wall_offset,
)

__all__ = ["Result", "main", "replace_section", "run"]


@dataclass
class Result:
    scenario: str
    params: dict[str, Any]
    seconds: float
    offered_per_s: float = 0.0
    delivered_per_s: float = 0.0
    delivered_ratio: float = 0.0
    sent: int = 0
    acked_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    connect_join_s: float = 0.0
    joined: int = 0
    errors: int = 0
    closed: int = 0
    server_cpu_pct: float | None = None
    #: The busiest worker process's CPU over the measured window (of one CPU).
    load_cpu_pct: float | None = None
    server_rss_mib: float | None = None
    rss_per_client_kib: float | None = None
    notes: list[str] = field(default_factory=list)


#: New connections a second, all workers together: a join storm, paced so that the
#: server's listen queue (4,096 on achat-server) never overflows.
CONNECT_RATE = 10_000.0
#: Bytes a server sends back per ``say`` of ingest (its ack and its message, ~210), with
#: room to spare.
INGEST_REPLY_BYTES = 512
#: Says in flight for ingest against a server started here, deep enough that the server,
#: not the round trip, is what limits.
INGEST_PIPELINE = 8192
#: achat-server's --sendq-limit by default.
DEFAULT_SENDQ = 1 << 20


def ingest_sendq(pipeline: int) -> int:
    """The --sendq-limit under which ``pipeline`` says in flight are never refused: the
    server refuses says while over 1/SWAMPED_SHARE of it is queued for one connection."""
    return pipeline * INGEST_REPLY_BYTES * SWAMPED_SHARE


def ingest_pipeline(sendq: int) -> int:
    """The most says in flight a server with ``sendq`` as its --sendq-limit never refuses."""
    return sendq // (INGEST_REPLY_BYTES * SWAMPED_SHARE)


# -- the server under test ------------------------------------------------------------


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


class _Server:
    def __init__(self, extra: list[str], pin: int | None, clients: int = 0) -> None:
        """``achat-server`` on a loopback port the kernel picks, pinned to CPU ``pin`` if
        given, with room for ``clients`` connections and 1,000 more, and 10,000 at least."""
        self.tmp = tempfile.TemporaryDirectory()
        port_file = Path(self.tmp.name) / "port"
        self._start(
            [
                str(Path(sys.executable).parent / "achat-server"),
                *("--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)),
                *("--data-dir", self.tmp.name, "--log-level", "warning"),
                *("--max-clients", str(max(10_000, clients + 1_000))),
                *extra,
            ],
            port_file,
            pin,
        )

    def _start(self, cmd: list[str], port_file: Path, pin: int | None) -> None:
        """Run ``cmd``, pinned to CPU ``pin`` if given, and return once it listens: once
        it has written its port to ``port_file`` (15 s at most)."""
        if pin is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(pin), *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        try:
            self.port = wait_port_file(port_file, self.proc, 15)
        except (ChildProcessError, TimeoutError) as exc:
            self.stop()
            raise SystemExit(f"achat-bench: {exc}") from None

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.tmp.cleanup()


# -- running a scenario -----------------------------------------------------------------


def _plans(args: argparse.Namespace) -> tuple[list[ClientPlan], int]:
    """The clients of the scenario and the size of each room."""
    tag = f"{os.getpid() % 10000}"
    if args.scenario == "busy-room":
        return [
            ClientPlan(f"b{tag}u{i}", "busy", args.rate) for i in range(args.clients)
        ], args.clients
    if args.scenario == "many-rooms":
        k = args.room_size
        return [ClientPlan(f"m{tag}u{i}", f"r{i // k}", args.rate) for i in range(args.clients)], k
    if args.scenario == "idle":
        # Rooms of K: one room of N would cost N^2/2 join notices before anyone is idle.
        k = args.room_size
        return [ClientPlan(f"i{tag}u{i}", f"lobby{i // k}", 0.0) for i in range(args.clients)], k
    if args.scenario == "ingest":
        return [ClientPlan(f"g{tag}u0", "ingest", 0.0)], 1
    raise ValueError(args.scenario)


def run(args: argparse.Namespace) -> Result:
    """Run one scenario as described by parsed command-line ``args``."""
    cpus = _cpus()
    server: _Server | None = None
    if args.scenario == "ingest" and args.pipeline is None:
        # A server started here gets a send queue with room for the replies; one already
        # running has its own, by default room for those of 512 says (ingest_pipeline).
        running = ingest_pipeline(DEFAULT_SENDQ)
        args.pipeline = INGEST_PIPELINE if args.port is None else running
    result = Result(args.scenario, _params(args), args.duration)
    if args.scenario == "ingest" and args.port is not None:
        result.notes.append(
            f"ingest against a running server: its --sendq-limit must be at least "
            f"{ingest_sendq(args.pipeline)} for {args.pipeline:,} says in flight, "
            "and its flood limit off (--rate 0)"
        )
    if args.port is None:
        extra = []
        if args.scenario == "ingest":
            # A pipeline's acks and messages can come back together: room for all of
            # them under the quarter of the send queue past which says are refused.
            sendq = max(DEFAULT_SENDQ, ingest_sendq(args.pipeline))
            extra = ["--rate", "0", "--sendq-limit", str(sendq)]
            result.notes.append(
                f"server started with --rate 0 (flood limit off) and --sendq-limit {sendq} "
                f"(room for the replies to {args.pipeline:,} says in flight) for ingest"
            )
        server = _Server(extra, cpus[0] if len(cpus) > 1 else None, args.clients)
        host, port = "127.0.0.1", server.port
    else:
        host, port = args.host, args.port
    load_cpus = cpus[1:] if server is not None and len(cpus) > 1 else cpus
    try:
        clients, room_size = _plans(args)
        procs = max(1, min(args.procs, len(clients)))
        rss_before = server.rss_kib() if server else 0
        reports = _drive(args, host, port, clients, procs, load_cpus, result, server)
        if server is not None and args.scenario == "idle":
            result.server_rss_mib = server.rss_kib() / 1024
            result.rss_per_client_kib = (server.rss_kib() - rss_before) / max(1, result.joined)
        _summarise(args, result, reports, room_size)
    finally:
        if server is not None:
            server.stop()
    return result


def _by_cpu(reports: list[WorkerReport]) -> list[tuple[float, int]]:
    """For each CPU the workers ran on, the share of it they used over the measured
    window and the deliveries they counted (a worker not pinned has its own)."""
    cpus: dict[object, tuple[float, int]] = {}
    for i, r in enumerate(reports):
        if r.window_seconds > 0:
            key = r.cpu if r.cpu is not None else ("worker", i)
            busy, delivered = cpus.get(key, (0.0, 0))
            cpus[key] = (busy + r.cpu_seconds / r.window_seconds, delivered + r.delivered)
    return list(cpus.values())


def _load_cpu(reports: list[WorkerReport]) -> float | None:
    """The busiest load CPU over the window, in per cent (its workers' CPU added up)."""
    busy = [b for b, _ in _by_cpu(reports)]
    return round(100 * max(busy), 1) if busy else None


def _note_trouble(result: Result, reports: list[WorkerReport]) -> None:
    """Say what went wrong in the run, if anything: errors by code, connections lost."""
    codes: Counter[str] = Counter()
    for r in reports:
        codes.update(r.codes)
    if codes:
        counted = ", ".join(f"{code} ×{n:,}" for code, n in sorted(codes.items()))
        result.notes.append(f"errors from the server: {counted}")
    unaccounted = sum(r.unaccounted for r in reports)
    if unaccounted:
        checked = sum(r.checked for r in reports)
        result.notes.append(
            f"frames and seqs disagree: {checked:,} client(s) that counted every message "
            f"frame as well found {unaccounted:,} that the seqs do not account for, or the "
            "reverse (the server skipped or repeated messages, or sent some this generator "
            "cannot read); deliveries are counted by seq, so this run's figures are not to "
            "be trusted"
        )
    disorder = max((r.disorder_ns for r in reports), default=0)
    if disorder >= NEAR_NS:
        result.notes.append(
            f"stamps out of order by up to {disorder / 1e6:,.0f} ms within a read, more "
            f"than the {NEAR_NS // 10**6} ms the count at the window's start allows: "
            "the delivered count may be off by a few messages there"
        )
    stuck = sum(not r.drained for r in reports)
    if stuck:
        result.notes.append(
            f"{stuck} worker(s) gave up after {DRAIN_SECONDS:g} s waiting for what was "
            "said in the window: messages still on the way then count as not delivered"
        )
    closed = sum(r.closed for r in reports)
    if closed:
        result.notes.append(
            f"{closed:,} connection(s) ended before the run did (refused, or closed by "
            "the server: a fatal error, such as sendq_exceeded for a reader too slow)"
        )


#: A worker this busy (of its CPU) may be what limits a run.
LOAD_CPU_LIMIT = 90.0


def _note_short_load(result: Result, planned: float) -> None:
    """Say so when the generator, not the server, may be what limited the run.

    Messages are counted as offered by their send stamps, so offering less than
    planned means the clients' timers ran late: their worker could not keep up.
    """
    short = planned > 0 and result.offered_per_s < 0.99 * planned
    busy = result.load_cpu_pct is not None and result.load_cpu_pct >= LOAD_CPU_LIMIT
    if not (short or busy):
        return
    cpu = f"{result.load_cpu_pct:g}%" if result.load_cpu_pct is not None else "?"
    result.notes.append(
        f"the generator may be the limit here: it offered {result.offered_per_s / planned:.1%} "
        f"of the {planned:,.0f} deliveries/s planned, and its busiest CPU was {cpu} busy "
        "(self-check shows its ceiling): give the load more CPUs (--procs) or fewer "
        "clients"
    )


def _params(args: argparse.Namespace) -> dict[str, Any]:
    keys = {
        "busy-room": ("clients", "rate"),
        "many-rooms": ("clients", "room_size", "rate"),
        "idle": ("clients", "room_size"),
        "ingest": ("pipeline",),
        "self-check": ("clients",),
    }[args.scenario]
    return {k: getattr(args, k) for k in keys} | {"duration": args.duration}


def _drive(
    args: argparse.Namespace,
    host: str,
    port: int,
    clients: list[ClientPlan],
    procs: int,
    cpus: list[int],
    result: Result,
    server: _Server | None,
) -> list[WorkerReport]:
    ctx = mp.get_context("spawn")
    pipes = []
    workers = []
    for w in range(procs):
        plan = WorkerPlan(
            host=host,
            port=port,
            clients=clients[w::procs],
            duration=args.duration,
            warmup=args.warmup,
            seed=w,
            cpu=cpus[w % len(cpus)] if cpus else None,
            pipeline=args.pipeline if args.scenario == "ingest" else 0,
            connect_rate=CONNECT_RATE / procs,
            keepalive=args.keepalive,
            drain=args.scenario not in ("idle", "self-check"),
        )
        parent, child = ctx.Pipe()
        p = ctx.Process(target=run_worker, args=(plan, child), daemon=True)
        p.start()
        # The worker has its own copy now: with this one closed, the parent's end reads
        # EOF when the worker dies, and a worker that died is not waited for forever.
        child.close()
        pipes.append(parent)
        workers.append(p)
    started = time.monotonic()
    joined = 0
    slowest = 0.0
    for pipe in pipes:
        try:
            _, n, seconds = pipe.recv()
        except EOFError:
            continue
        joined += n
        slowest = max(slowest, seconds)
    result.joined = joined
    result.connect_join_s = round(time.monotonic() - started, 3)
    _progress(f"{joined}/{len(clients)} clients joined in {result.connect_join_s:.2f} s")
    go_at = time.monotonic() + 0.2
    wall_ns = wall_offset()  # one for every worker: they agree on which stamps are inside
    for pipe in pipes:
        pipe.send(("go", go_at, wall_ns))
    # Server CPU over the measured window only (not the warm-up or the wind-down).
    window_start, window_end = go_at + args.warmup, go_at + args.warmup + args.duration
    cpu_start: tuple[float, float] | None = None
    cpu_end: tuple[float, float] | None = None
    reports: list[WorkerReport] = []
    ticks: dict[int, tuple[int, int, int, int, float]] = {}
    rss_max = 0
    alive = set(range(procs))
    # The workers whose says are all answered after the window, and whether they were
    # told that every worker's are (see load._drain).
    answered: set[int] = set()
    settled = False
    shown = ""  # the progress line last shown
    while alive:
        for i, pipe in enumerate(pipes):
            while i in alive and pipe.poll():
                try:
                    kind, *rest = pipe.recv()
                except EOFError:
                    alive.discard(i)
                    result.notes.append(
                        f"worker {i} died before reporting; its clients are missing"
                    )
                    break
                if kind == "tick":
                    ticks[i] = tuple(rest)
                elif kind == "answered":
                    answered.add(i)
                elif kind == "done":
                    reports.append(rest[0])
                    alive.discard(i)
        if not settled and alive and alive <= answered:
            settled = True
            for i in alive:
                # A worker gone meanwhile is found by its pipe's end, above.
                with contextlib.suppress(OSError):
                    pipes[i].send(("settle",))
        if server is not None:
            rss_max = max(rss_max, server.rss_kib())
            now = time.monotonic()
            if cpu_start is None and now >= window_start:
                cpu_start = (now, server.cpu_seconds())
            elif cpu_end is None and now >= window_end:
                cpu_end = (now, server.cpu_seconds())
        elapsed = min(t[4] for t in ticks.values()) if ticks else 0.0
        if elapsed > 0:
            sent = sum(t[0] for t in ticks.values())
            delivered = sum(t[1] for t in ticks.values())
            line = (
                f"{elapsed:5.1f}/{args.duration:g} s  sent {sent / elapsed:10,.0f}/s  "
                f"delivered {delivered / elapsed:12,.0f}/s"
            )
            if line != shown:
                _progress(line)
                shown = line
        mp_connection.wait([pipes[i] for i in alive], timeout=0.2)
    if server is not None:
        if cpu_start is not None and cpu_end is not None:
            busy, wall = cpu_end[1] - cpu_start[1], cpu_end[0] - cpu_start[0]
            result.server_cpu_pct = round(100 * busy / max(wall, 1e-9), 1)
        if result.server_rss_mib is None:
            result.server_rss_mib = round(rss_max / 1024, 1)
    for p in workers:
        p.join(10)
    print(file=sys.stderr)
    return reports


def _summarise(
    args: argparse.Namespace,
    result: Result,
    reports: list[WorkerReport],
    room_size: int,
) -> None:
    d = args.duration
    sent = sum(r.sent for r in reports)
    delivered = sum(r.delivered for r in reports)
    result.sent = sent
    result.errors = sum(r.errors for r in reports)
    result.closed = sum(r.closed for r in reports)
    result.delivered_per_s = round(delivered / d)
    # What was actually said (by send stamp) times the room: a generator falling behind
    # offers less than its rate, and one catching up after a late start a little more.
    result.offered_per_s = round(sent * room_size / d)
    if args.scenario == "ingest":
        result.acked_per_s = round(sum(r.acked for r in reports) / d)
    result.load_cpu_pct = _load_cpu(reports)
    _note_trouble(result, reports)
    if args.scenario in ("busy-room", "many-rooms"):
        _note_short_load(result, planned=args.clients * args.rate * room_size)
    expected = sent * room_size
    result.delivered_ratio = round(delivered / expected, 5) if expected else 0.0
    latency = Histogram()
    for r in reports:
        latency.merge(r.latency)
    if latency.total:
        result.latency_ms = {
            name: round(latency.quantile(q) / 1e6, 2)
            for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
        }


def _progress(text: str) -> None:
    print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)


# -- self-check: the generator's own ceiling ------------------------------------------------


async def _answer_pings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The sink's answer to a generator client's keep-alive pings (it searches until then)."""
    ping = b'{"type":"ping"'
    pong = encode_frame(b'{"type":"pong","ref":"%s"}' % KEEPALIVE_REF.encode())
    kept = b""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(pong * _count(ping, kept, data))
            kept = (kept + data)[-len(ping) :]


#: The sink's first seq: ten digits, as every seq it sends has (9 billion of them).
_FIRST_SEQ = 10**9


def _sink_main(port_pipe: Any, frames_per_write: int, clients: int, cpu: int | None) -> None:
    """A trivial 'server' that welcomes every client, then floods them all with messages.

    The flood starts once all ``clients`` have joined: a sink already flooding
    some makes the others' connect and join crawl (tens of seconds). It runs
    on ``cpu``, the server's, off the generator's: sharing one with a worker,
    it measured half the ceiling.
    """
    if cpu is not None:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, {cpu})

    def burst(first: int) -> bytes:
        # A busy room's messages as the server encodes them (the generator's cost depends
        # on the bytes), stamped now: the generator counts what was said in its window.
        # Their seqs follow on from ``first``, all of as many digits as _FIRST_SEQ.
        now_ns = time.time_ns()
        text = stamped_text(now_ns=now_ns).decode()
        message = Message(
            room="busy", seq=_FIRST_SEQ, ts=now_ns // 1_000_000, sender="b1234u1234", text=text
        )
        # Every other % byte (the length prefix may hold one) is escaped for the formatting.
        frame = encode(message).replace(b"%", b"%%")
        numbered = frame.replace(b'"seq":%d,' % _FIRST_SEQ, b'"seq":%d,')
        return (numbered * frames_per_write) % tuple(range(first, first + frames_per_write))

    welcome = encode_frame(
        b'{"type":"welcome","nick":"x","server":"sink","version":1,"max_frame":65536,'
        b'"max_text":4000}'
    )
    names = encode_frame(
        b'{"type":"names","room":"busy","nicks":[],"topic":"","seq":%d}' % (_FIRST_SEQ - 1)
    )

    everyone = asyncio.Event()
    joined = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal joined
        await reader.read(65536)
        writer.write(welcome + names)
        joined += 1
        if joined >= clients:
            everyone.set()
        # A client that never comes (refused, or its worker died) must not hold up the rest.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everyone.wait(), 30)
        answering = asyncio.create_task(_answer_pings(reader, writer))
        seq = _FIRST_SEQ
        try:
            while True:
                writer.write(burst(seq))
                seq += frames_per_write
                await writer.drain()
        except (ConnectionError, OSError):
            writer.transport.abort()
        finally:
            answering.cancel()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def self_check(args: argparse.Namespace) -> Result:
    """Measure how many deliveries per second the generator itself can count."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    cpus = _cpus()
    pin = cpus[0] if len(cpus) > 1 else None
    sink = ctx.Process(target=_sink_main, args=(child, 256, args.clients, pin), daemon=True)
    sink.start()
    port = parent.recv()
    result = Result("self-check", _params(args), args.duration)
    clients = [ClientPlan(f"s{i}", "busy", 0.0) for i in range(args.clients)]
    try:
        reports = _drive(
            args, "127.0.0.1", port, clients, args.procs, cpus[1:] or cpus, result, None
        )
    finally:
        sink.terminate()
        sink.join(5)
    result.delivered_per_s = round(sum(r.delivered for r in reports) / args.duration)
    result.load_cpu_pct = _load_cpu(reports)
    _note_trouble(result, reports)
    _note_ceiling(result, reports, args.duration)
    return result


#: Under this much of its CPU, a worker of self-check was held back by the sink.
SINK_LIMIT_CPU = 90.0


def _note_ceiling(result: Result, reports: list[WorkerReport], duration: float) -> None:
    """Say what self-check's figure is: the generator's ceiling, or, when the sink
    could not keep its workers busy, the sink's, with what the workers' rate per CPU
    second comes to with their CPUs full."""
    cpus = [(busy, delivered) for busy, delivered in _by_cpu(reports) if busy > 0]
    if not cpus or max(busy for busy, _ in cpus) * 100 >= SINK_LIMIT_CPU:
        result.notes.append("a sink floods the generator; this is the most it can count")
        return
    full = sum(delivered / duration / busy for busy, delivered in cpus)
    result.notes.append(
        f"a sink floods the generator, and was the limit: the generator's busiest CPU "
        f"was {result.load_cpu_pct}% busy; at the rate it counted per CPU second it "
        f"would count about {full / 1e6:.1f} M deliveries/s with its CPUs full"
    )


# -- output -------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    lines = [
        "| scenario | parameters | offered/s | delivered/s | delivered | p50 | p99 | p99.9 "
        "| acked/s | connect+join | server CPU | load CPU | server RSS | RSS/client |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        lat = r.latency_ms
        lines.append(
            f"| {r.scenario} | {params} | {r.offered_per_s:,.0f} | {r.delivered_per_s:,.0f} | "
            f"{r.delivered_ratio:.2%} | {lat.get('p50', '-')} ms | {lat.get('p99', '-')} ms | "
            f"{lat.get('p99.9', '-')} ms | {r.acked_per_s:,.0f} | {r.connect_join_s} s | "
            f"{_opt(r.server_cpu_pct, '%')} | {_opt(r.load_cpu_pct, '%')} | "
            f"{_opt(r.server_rss_mib, ' MiB')} | "
            f"{_opt(r.rss_per_client_kib, ' KiB', 2)} |"
        )
    for r in results:
        for note in r.notes:
            lines.append(f"\n{r.scenario}: {note}")
    return "\n".join(lines)


def _opt(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="achat-bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "scenario",
        choices=["busy-room", "many-rooms", "idle", "ingest", "self-check"],
        help="or 'standard' (first argument) for the whole set; --update FILE writes it",
    )
    p.add_argument("--clients", "-n", type=int, default=300)
    p.add_argument("--rate", "-r", type=float, default=1.0, help="messages/s per client")
    p.add_argument("--room-size", "-k", type=int, default=10)
    p.add_argument(
        "--pipeline",
        type=int,
        default=None,
        help=f"ingest: says in flight (default {INGEST_PIPELINE:,} with a server started "
        "here, deep enough that the server, not the round trip, limits; against --port, "
        f"what the default send queue has room for, {ingest_pipeline(DEFAULT_SENDQ):,})",
    )
    p.add_argument("--duration", "-d", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0)
    # One worker per CPU the load may use (the server has the first): two on one CPU take
    # turns by the scheduler's slices, and no run measured them better than one.
    p.add_argument("--procs", type=int, default=max(1, min(4, len(_cpus()) - 1)))
    p.add_argument(
        "--keepalive",
        type=_seconds,
        default=KEEPALIVE_SECONDS,
        help="a client pings after this many seconds of saying nothing (default %(default)g, "
        "for servers whose --idle-timeout is over 30 s; lower it for a shorter one)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="target a running server")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    return p


#: Seconds between the scenarios of ``standard``, for the machine to settle.
SETTLE_SECONDS = 5.0

#: The set ``make bench`` runs: the issue's targets, in the order of its table.
STANDARD: list[list[str]] = [
    ["self-check", "-n", "100"],
    ["busy-room", "-n", "300", "-r", "1"],
    ["busy-room", "-n", "2500", "-r", "1"],
    ["many-rooms", "-n", "2000", "-k", "10", "-r", "1"],
    ["idle", "-n", "10000"],
    ["ingest"],
]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["standard"]:
        rest = argv[1:]
        update = None
        if "--update" in rest:
            i = rest.index("--update")
            update = Path(rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
        results = []
        for i, scenario in enumerate(STANDARD):
            if i:
                # What the last scenario leaves to the kernel (thousands of sockets to tear
                # down) takes seconds of CPU: busy-room 300 right after self-check measured
                # a p99 of 6.1 ms, and 4.8 ms five seconds later.
                time.sleep(SETTLE_SECONDS)
            results.append(_one(parser().parse_args(scenario + rest)))
        text = table(results)
        print(text)
        if update is not None:
            replace_section(update, "bench", text)
        return 0
    result = _one(parser().parse_args(argv))
    print(table([result]))
    return 0


def _one(args: argparse.Namespace) -> Result:
    if args.scenario == "ingest":
        args.procs = 1
    _progress(f"{args.scenario} …")
    result = self_check(args) if args.scenario == "self-check" else run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return result


def replace_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers.

    How ``make bench`` writes its figures into docs/performance.md (the scripts in
    benchmarks/ use it too).
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    head, found, rest = doc.partition(start)
    if not found or end not in rest:
        raise SystemExit(f"{path} has no {start} … {end} section")
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")
