"""What durability costs: stored messages/s and ack latency for each durability mode.

Starts a real ``achat-server`` (SQLite store, group commit) per mode on a
fresh data directory, then ``--clients`` clients in this process each keep
``--window`` ``say`` frames in flight for ``--seconds``. A message counts
once its ``ack`` arrives, which the server sends only after the commit.

    python benchmarks/durability.py [--seconds 5] [--clients 4] [--window 32] [--update FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.procs import ServerProcess

from achat.bench.cli import replace_section
from achat.client.connection import Client
from achat.protocol.messages import Ack, Say


async def run_mode(mode: str, seconds: float, clients: int, window: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), "--durability", mode)
        await asyncio.to_thread(server.start)
        try:
            return await _load(server.port, seconds, clients, window)
        finally:
            server.stop()


async def _load(port: int, seconds: float, clients: int, window: int) -> dict[str, float]:
    latencies: list[float] = []
    acked = 0
    deadline = time.perf_counter() + seconds

    async def one(i: int) -> None:
        nonlocal acked
        # The server's flood limit is off (ServerProcess): so is the client's own.
        async with Client("127.0.0.1", port, f"bench{i}", send_rate=0) as client:
            await client.join("bench")
            sent: dict[str, float] = {}
            free = asyncio.Semaphore(window)
            done = asyncio.Event()

            async def read() -> None:
                nonlocal acked
                async for event in client.events():
                    if isinstance(event, Ack) and event.ref in sent:
                        latencies.append(time.perf_counter() - sent.pop(event.ref))
                        acked += 1
                        free.release()
                        if not sent and time.perf_counter() > deadline:
                            done.set()

            reader = asyncio.create_task(read())
            k = 0
            while time.perf_counter() < deadline:
                await free.acquire()
                ref = f"{i}-{k}"
                k += 1
                sent[ref] = time.perf_counter()
                client.send(
                    Say(room="bench", text=f"benchmark message {k:08d} " + "x" * 30, ref=ref)
                )
            if sent:
                await asyncio.wait_for(done.wait(), 30)
            reader.cancel()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=1000) if len(latencies) > 1 else [0.0] * 999
    return {
        "messages": acked,
        "seconds": round(elapsed, 2),
        "stored_per_s": round(acked / elapsed),
        "ack_p50_ms": round(q[499] * 1000, 2),
        "ack_p99_ms": round(q[989] * 1000, 2),
    }


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.clients} clients × {args.window} `say` in flight, {args.seconds:g} s per mode, "
        "server and clients on this machine (2 cores):",
        "",
        "| durability | stored messages/s | ack p50 | ack p99 |",
        "|---|---:|---:|---:|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| `{mode}` | {r['stored_per_s']:,.0f} | {r['ack_p50_ms']} ms | {r['ack_p99_ms']} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--update", type=Path, help="replace the durability section of this Markdown file"
    )
    args = parser.parse_args()
    results = {
        mode: asyncio.run(run_mode(mode, args.seconds, args.clients, args.window))
        for mode in ("normal", "full")
    }
    print(json.dumps(results, indent=2) if args.json else table(results, args))
    if args.update is not None:
        replace_section(args.update, "durability", table(results, args))


if __name__ == "__main__":
    main()
