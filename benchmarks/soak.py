"""A bounded soak: one real server under mixed hostile load, on loopback only.

For ``--seconds`` it runs, against one ``achat-server`` with its default
limits (SQLite store, flood limits on):

- bystanders: clients in one room, each saying one message a second with a
  send timestamp; they measure delivered ratio and latency;
- churners: clients that connect, join, say something, and quit, over and over;
- slow readers: raw connections that join the busy room and never read
  (the server must cut them off with ``sendq_exceeded``);
- flooders: clients that send as fast as they can (``rate_limited``, then dropped);
- garbage senders: raw connections that send junk, bad JSON, oversized
  headers and half frames, then vanish.

It reports the server's RSS (start, max, end), open fds and tasks at start
and end (from the server's own stats, logged on SIGUSR1), bystander delivered
ratio and p99 latency, and disconnects by reason (from the server log).

    python benchmarks/soak.py [--seconds 60] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.procs import ServerProcess

from achat.bench.cli import replace_section
from achat.client.connection import Client
from achat.errors import AchatError
from achat.protocol.frames import encode_frame
from achat.protocol.messages import Message

ROOM = "soak"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _drain(reader: asyncio.StreamReader) -> None:
    """Read and drop everything until the server closes the connection."""
    with contextlib.suppress(OSError):
        while await reader.read(65536):
            pass


class Soak:
    def __init__(self, port: int, seconds: float, rng: random.Random) -> None:
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.rng = rng
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.received: Counter[str] = Counter()
        self.bystanders = 0
        self.counts: Counter[str] = Counter()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def bystander(self, i: int) -> None:
        client = Client("127.0.0.1", self.port, f"bystander{i}")
        await client.connect()
        await client.join(ROOM)
        me = client.nick

        async def read() -> None:
            async for event in client.events():
                if isinstance(event, Message) and event.sender.startswith("bystander"):
                    self.received[me] += 1
                    started = self.sent.get(event.text)
                    if started is not None:
                        self.latencies.append(time.monotonic() - started)

        reader = asyncio.create_task(read())
        await asyncio.sleep(self.rng.random())
        k = 0
        while self.running():
            # Padded so that history pages are big, which slow readers lean on.
            text = f"{me} {k} " + "~" * 300
            k += 1
            self.sent[text] = time.monotonic()
            try:
                await client.say(ROOM, text, timeout=10)
            except (AchatError, TimeoutError):
                self.counts["bystander send failed"] += 1
            await asyncio.sleep(1.0)
        await asyncio.sleep(1.0)  # let the last messages arrive
        reader.cancel()
        await client.close()

    async def churner(self, i: int) -> None:
        k = 0
        while self.running():
            k += 1
            try:
                async with Client("127.0.0.1", self.port, f"churn{i}x{k}") as c:
                    await c.join(ROOM)
                    await c.say(ROOM, "passing through")
            except (AchatError, TimeoutError):
                self.counts["churn failed"] += 1
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))

    async def slow_reader(self, i: int) -> None:
        k = 0
        while self.running():
            k += 1
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
                hello = b'{"type":"hello","nick":"sloth%dx%d","version":1}' % (i, k)
                await loop.sock_sendall(sock, encode_frame(hello))
                await loop.sock_sendall(sock, encode_frame(b'{"type":"join","room":"soak"}'))
                # Ask for big history pages and never read them, until the server gives up.
                history = encode_frame(b'{"type":"history","room":"soak","limit":500}')
                while self.running():
                    await asyncio.sleep(0.25)
                    try:
                        await loop.sock_sendall(sock, history)
                    except OSError:
                        break
            except OSError:
                pass
            finally:
                sock.close()

    async def flooder(self, i: int) -> None:
        """A hostile client: raw frames as fast as it can write them, its input drained.

        Not achat's Client, which keeps under the server's flood limit by itself.
        """
        spam = encode_frame(b'{"type":"say","room":"soak","text":"spam"}') * 50
        k = 0
        while self.running():
            k += 1
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                hello = b'{"type":"hello","nick":"flood%dx%d","version":1}' % (i, k)
                writer.write(encode_frame(hello) + encode_frame(b'{"type":"join","room":"soak"}'))
                drained = asyncio.create_task(_drain(reader))
                while not drained.done() and self.running():
                    writer.write(spam)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                drained.cancel()
            except OSError:
                pass
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(0.2)

    async def garbage(self, i: int) -> None:
        junk = [
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            encode_frame(b"{not json"),
            encode_frame(b'{"type":"hello","nick":"\\ud800","version":1}'),
            encode_frame(b'{"type":"say"}'),
            b"\x00\x00\x01\x00{half",
            os.urandom(64),
        ]
        while self.running():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(self.rng.choice(junk))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(4096), 0.2)
                writer.transport.abort()
            except OSError:
                pass
            await asyncio.sleep(self.rng.uniform(0.01, 0.1))


async def logged_stats(log: Path, count: int, timeout: float = 10.0) -> None:
    """Wait until the server has logged its stats ``count`` times (it does on SIGUSR1):
    the start's must be taken before the first client connects."""
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(log.read_text)).count("achat.server stats ") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server logged no stats in {timeout} s")
        await asyncio.sleep(0.02)


async def soak(seconds: float, bystanders: int) -> dict[str, object]:
    rng = random.Random(42)
    with tempfile.TemporaryDirectory() as tmp:
        # The project's default limits, not the test helper's --rate 0.
        server = ServerProcess(Path(tmp), "--rate", "5", "--burst", "10", "--log-level", "info")
        await asyncio.to_thread(server.start)
        assert server.proc is not None
        pid = server.proc.pid
        try:
            os.kill(pid, signal.SIGUSR1)
            await logged_stats(server.log, 1)
            rss_start = rss_kb(pid)
            run = Soak(server.port, seconds, rng)
            tasks = [asyncio.create_task(run.bystander(i)) for i in range(bystanders)]
            tasks += [asyncio.create_task(run.churner(i)) for i in range(10)]
            tasks += [asyncio.create_task(run.slow_reader(i)) for i in range(10)]
            tasks += [asyncio.create_task(run.flooder(i)) for i in range(5)]
            tasks += [asyncio.create_task(run.garbage(i)) for i in range(5)]
            rss_max = rss_start
            while run.running():
                await asyncio.sleep(0.5)
                rss_max = max(rss_max, rss_kb(pid))
                remaining = int(run.deadline - time.monotonic())
                print(f"\rsoak: {remaining:4d} s left, server RSS {rss_max // 1024} MiB ", end="")
            print()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGUSR1)
            await logged_stats(server.log, 2)
            rss_end = rss_kb(pid)
        finally:
            server.stop()
        log = server.log.read_text()
    stats = re.findall(r"stats (.*)", log)
    start, end = (dict(kv.split("=") for kv in line.split()) for line in (stats[0], stats[-1]))
    reasons = Counter[str]()
    patterns = {
        "sendq_exceeded": r"sendq exceeded",
        "flooding (rate_limited)": r"flooding addr",
        "bad frame": r"bad frame addr",
        "hello refused": r"refused addr",
        "timeout": r"timeout addr",
        "quit (bye)": r"bye nick=",
    }
    for name, pattern in patterns.items():
        reasons[name] = len(re.findall(pattern, log))
    sent = len(run.sent)
    expected = sent * bystanders
    delivered = sum(run.received.values())
    lat = sorted(run.latencies)
    p99 = statistics.quantiles(lat, n=100)[98] if len(lat) > 1 else 0.0
    return {
        "seconds": seconds,
        "bystanders": bystanders,
        "rss_kib": {"start": rss_start, "max": rss_max, "end": rss_end},
        "server_start": start,
        "server_end": end,
        "bystander_messages": sent,
        "delivered_ratio": round(delivered / expected, 5) if expected else 0.0,
        "p99_ms": round(p99 * 1000, 1),
        "disconnects": dict(reasons),
        "client_side_failures": dict(run.counts),
    }


def table(r: dict[str, object]) -> str:
    rss = r["rss_kib"]
    start, end = r["server_start"], r["server_end"]
    assert isinstance(rss, dict)
    assert isinstance(start, dict)
    assert isinstance(end, dict)
    disconnects = r["disconnects"]
    assert isinstance(disconnects, dict)
    lines = [
        f"{r['seconds']:g} s; {r['bystanders']} bystanders saying 1 message/s in one room, "
        "10 churners, 10 slow readers, 5 flooders, 5 garbage senders; default limits:",
        "",
        "| measure | value |",
        "|---|---|",
        f"| server RSS start / max / end | {rss['start'] // 1024} / {rss['max'] // 1024} / "
        f"{rss['end'] // 1024} MiB |",
        f"| open fds start / end | {start['fds']} / {end['fds']} |",
        f"| asyncio tasks start / end | {start['tasks']} / {end['tasks']} |",
        f"| connections start / end | {start['connections']} / {end['connections']} |",
        f"| bystander messages | {r['bystander_messages']} |",
        f"| bystander delivered ratio | {r['delivered_ratio']} |",
        f"| bystander p99 latency | {r['p99_ms']} ms |",
    ]
    for reason, count in disconnects.items():
        lines.append(f"| disconnects: {reason} | {count} |")
    return "\n".join(lines)


def main() -> None:
    # Flooders write into connections the server has closed; asyncio would log each one.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bystanders", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--update", type=Path, help="replace the soak section of this file")
    args = parser.parse_args()
    result = asyncio.run(soak(args.seconds, args.bystanders))
    print(json.dumps(result, indent=2) if args.json else table(result))
    if args.update is not None:
        replace_section(args.update, "soak", table(result))


if __name__ == "__main__":
    main()
