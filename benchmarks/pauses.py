"""How long the server stops for its table of refs, alone and under ingest.

Every ``say`` with a ref is remembered for ten minutes (``server/refs.py``),
so a busy server holds millions of refs. A Python dict that fills up copies
all it holds into a new table at once, with the loop stopped: as one dict,
the table of three million refs stopped it for 0.13–0.14 s as it grew and for
0.3–0.65 s once full, a ref expiring for each new one (item 59 of
docs/performance-history.md). This measures the longest stop two ways:

- **the table alone**, in this process, pinned to the first CPU:
  ``RecentRefs`` driven as the registry drives it, a read of ``--batch``
  says at a time (the expiry, the deadline, then for each say its key, its
  receipt and its claim), on a clock that runs at the rate that keeps
  ``--live`` refs in force. It first grows to ``--live`` refs, then goes on
  for ``--churn`` times as many, each new one expiring an old one. The
  longest read in each phase, the time per say in each, and the process's
  resident memory per ref in force once grown and at the end (what "Sizing
  a server" in the README quotes). ``--shards 1`` is the table as one
  dict, as it was before item 59;
- **under ingest**: ``achat-server`` (pinned to CPU 0, flood limit off) fed
  by ``achat-bench ingest`` for ``--seconds`` (on the other CPUs), while a
  bystander on its own connection, on the load's CPUs, sends a ``ping``
  2 ms after each ``pong``, from just after the load is started until it
  ends. Its longest wait is the longest the loop was away, give or take
  the bystander's own share of its CPU.

    python benchmarks/pauses.py [--live 3000000] [--churn 2] [--batch 100]
        [--shards 64] [--seconds 25] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from achat.bench.cli import INGEST_PIPELINE, _Server, ingest_sendq, replace_section
from achat.protocol.frames import HEADER
from achat.protocol.messages import (
    Hello,
    Message,
    Ping,
    Pong,
    ServerFrame,
    Welcome,
    decode_server,
    encode,
)
from achat.server.refs import SHARDS, RecentRefs, receipt_of, ref_key
from achat.store.base import REF_TTL_MS

SECTION = "pauses"
NOW = 1_764_090_000_000
#: The bystander's ping interval, seconds.
PING_EVERY = 0.002
#: The server's send queue for achat-bench's says in flight (it starts its own so).
INGEST_SENDQ = ingest_sendq(INGEST_PIPELINE)
#: The longest an ingest run may take beyond its --seconds (start-up, warm-up, drain).
INGEST_SLACK = 60.0


@dataclass
class TableRun:
    live: int
    claims: int
    batch: int
    shards: int
    longest_growing_ms: float
    longest_full_ms: float | None  # None with no full phase (--churn 0)
    growing_us: float  # per say: its key, receipt and claim, and its read's expiry
    full_us: float | None
    held: int  # refs in force at the end
    rss_per_ref: float  # bytes of resident memory per ref in force, once grown to ``live``
    rss_per_ref_full: float | None  # the same at the end of the full phase


def _rss() -> int:
    """This process's resident memory, bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table_alone(live: int, churn: float, batch: int, shards: int = SHARDS) -> TableRun:
    """Drive a RecentRefs as the registry does and time every read's worth of says."""
    if live % batch:
        raise ValueError("live must be a multiple of batch")
    refs: RecentRefs[object] = RecentRefs(granularity=1000, shards=shards)
    claims = live + int(live * churn) // batch * batch
    growing: list[float] = []
    full: list[float] = []
    nick = "someone"
    clock = time.perf_counter
    start_rss = grown_rss = _rss()
    for done in range(0, claims, batch):
        now = NOW + done * REF_TTL_MS // live  # ``live`` says every REF_TTL_MS
        message = Message(room="lobby", seq=done + 1, ts=now, sender=nick, text="")
        t = clock()
        refs.expire(now)
        refs.deadline(now + REF_TTL_MS)
        for i in range(done, done + batch):
            refs.claim(ref_key(nick, f"c0ffee-{i}"), receipt_of(message))
        (growing if done < live else full).append(clock() - t)
        if done + batch == live:
            grown_rss = _rss()
    return TableRun(
        live,
        claims,
        batch,
        shards,
        max(growing) * 1000,
        max(full) * 1000 if full else None,
        sum(growing) / live * 1e6,
        sum(full) / (claims - live) * 1e6 if full else None,
        len(refs),
        (grown_rss - start_rss) / live,
        (_rss() - start_rss) / len(refs) if full else None,
    )


@dataclass
class IngestRun:
    seconds: float
    acked_per_s: float
    ingest_p999_ms: float
    pings: int
    pong_p50_ms: float
    pong_p99_ms: float
    pong_max_ms: float
    rss_mib: float


async def _bystander(port: int, load: subprocess.Popen[bytes]) -> list[float]:
    """Ping every PING_EVERY seconds until ``load`` ends; each pong's wait."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def receive() -> ServerFrame:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        return decode_server(await reader.readexactly(size))

    writer.write(encode(Hello(nick="bystander", version=1)))
    if not isinstance(await receive(), Welcome):
        raise RuntimeError("the server did not welcome the bystander")
    waits: list[float] = []
    n = 0
    while load.poll() is None:
        n += 1
        sent = time.monotonic()
        writer.write(encode(Ping(ref=str(n))))
        while not isinstance(await receive(), Pong):
            pass
        waits.append(time.monotonic() - sent)
        await asyncio.sleep(PING_EVERY)
    writer.close()
    return waits


def under_ingest(seconds: float) -> IngestRun:
    mine = os.sched_getaffinity(0)
    others = [cpu for cpu in sorted(mine) if cpu != 0]
    server = _Server(["--rate", "0", "--sendq-limit", str(INGEST_SENDQ)], 0)
    try:
        os.sched_setaffinity(0, others)  # the bystander with the load, off the server's CPU
        bench = str(Path(sys.executable).parent / "achat-bench")
        with tempfile.TemporaryDirectory(prefix="achat-pauses-") as tmp:
            out, log = Path(tmp) / "result.json", Path(tmp) / "stderr"
            cmd = ["taskset", "-c", ",".join(map(str, others)), bench, "ingest"]
            cmd += ["--port", str(server.port), "--pipeline", str(INGEST_PIPELINE)]
            cmd += ["--duration", f"{seconds:g}", "--json", str(out)]
            with log.open("wb") as err:
                load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
                try:
                    waits = asyncio.run(
                        asyncio.wait_for(_bystander(server.port, load), seconds + INGEST_SLACK)
                    )
                    load.wait(timeout=INGEST_SLACK)
                finally:
                    if load.poll() is None:
                        load.kill()
                        load.wait()
            if load.returncode != 0 or not out.exists():
                raise RuntimeError(f"achat-bench ingest failed:\n{log.read_text()[-2000:]}")
            result = json.loads(out.read_text())
        rss = server.rss_kib() / 1024
    finally:
        os.sched_setaffinity(0, mine)
        server.stop()
    waits.sort()
    return IngestRun(
        seconds,
        float(result["acked_per_s"]),
        float(result["latency_ms"].get("p99.9", "nan")),
        len(waits),
        statistics.median(waits) * 1000,
        waits[int(len(waits) * 0.99)] * 1000,
        waits[-1] * 1000,
        rss,
    )


def report(alone: TableRun, ingest: IngestRun | None) -> str:
    churn = (alone.claims - alone.live) / alone.live
    lines = [
        f"`python benchmarks/pauses.py --live {alone.live} --churn {churn:g} --batch "
        f"{alone.batch} --shards {alone.shards} --seconds {ingest.seconds if ingest else 0:g}`"
        f" (the table split into {alone.shards:,} dicts):",
        "",
        "| measured | figure |",
        "|---|---:|",
        f"| the table alone: longest read of {alone.batch} says while it grew to "
        f"{alone.live:,} refs | {alone.longest_growing_ms:.1f} ms |",
    ]
    if alone.longest_full_ms is not None:
        lines.append(
            f"| the table alone: longest read of {alone.batch} while it stayed full "
            f"({alone.claims - alone.live:,} more) | {alone.longest_full_ms:.1f} ms |"
        )
    per_say = f"{alone.growing_us:.2f} µs"
    if alone.full_us is not None:
        per_say += f" / {alone.full_us:.2f} µs"
    lines.append(
        "| the table alone: a say's key, receipt, claim and share of the expiry, "
        f"as it grew{' / full' if alone.full_us is not None else ''} | {per_say} |"
    )
    rss = f"{alone.rss_per_ref:.0f} B"
    if alone.rss_per_ref_full is not None:
        rss += f" / {alone.rss_per_ref_full:.0f} B"
    lines.append(
        f"| the table alone: resident memory per ref in force, at {alone.live:,}"
        f"{' / at the end' if alone.rss_per_ref_full is not None else ''} | {rss} |"
    )
    if ingest is not None:
        lines += [
            f"| under ingest: `say`/s acked | {ingest.acked_per_s:,.0f} |",
            f"| under ingest: the bystander's pong, p50 / p99 of {ingest.pings:,} over the "
            f"run | {ingest.pong_p50_ms:.1f} / {ingest.pong_p99_ms:.1f} ms |",
            f"| under ingest: the bystander's longest wait for a pong | "
            f"**{ingest.pong_max_ms:.1f} ms** |",
            f"| under ingest: the ingest client's p99.9 | {ingest.ingest_p999_ms:.1f} ms |",
            f"| under ingest: the server's memory at the end | {ingest.rss_mib:,.0f} MiB |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=3_000_000, help="refs in force when full")
    parser.add_argument(
        "--churn", type=float, default=2.0, help="says once full, as a multiple of --live"
    )
    parser.add_argument("--batch", type=int, default=100, help="says a read")
    parser.add_argument("--shards", type=int, default=SHARDS, help="dicts (a power of two)")
    parser.add_argument(
        "--seconds", type=float, default=25.0, help="of ingest with a bystander (0: none)"
    )
    parser.add_argument("--update", type=Path, help="replace the pauses section of this file")
    args = parser.parse_args()
    if args.batch < 1 or args.live < args.batch or args.live % args.batch:
        parser.error("--live must be a multiple of --batch, which is at least 1")
    if args.churn < 0 or args.seconds < 0 or args.shards < 1 or args.shards & (args.shards - 1):
        parser.error("--churn and --seconds are at least 0; --shards is a power of two")
    mine = os.sched_getaffinity(0)
    if args.seconds and (len(mine) < 2 or not shutil.which("taskset")):
        sys.exit("pauses.py --seconds needs taskset and two CPUs (or --seconds 0)")
    ingest = under_ingest(args.seconds) if args.seconds else None
    os.sched_setaffinity(0, {min(mine)})
    try:
        alone = table_alone(args.live, args.churn, args.batch, args.shards)
    finally:
        os.sched_setaffinity(0, mine)
    text = report(alone, ingest)
    print(text)
    if args.update:
        replace_section(args.update, SECTION, text)


if __name__ == "__main__":
    main()
