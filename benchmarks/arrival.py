"""Where a busy room's latency goes: the server's side, measured where it ends.

``achat-bench busy-room`` times a message from its send stamp to the moment a
worker process reads it. With 300 clients on one core, that includes the
worker's own pass over its sockets, which a person's client, alone on its
socket, never waits for. This separates the two (Linux):

- a few *observers* join the load's room, some before the load's clients
  (the server writes them first in each pass over the room) and some after
  (written last);
- they read with ``SO_TIMESTAMPNS``: the kernel stamps each read with when
  its data reached the socket. On loopback that is inside the server's own
  ``write()``, so *stamp to arrival* is the server's latency alone: reading
  the ``say``, storing it, fanning it out, writing it;
- *stamp to read* is the same message read by the observer's process, and
  the load's own figure is achat-bench's, read by its worker.

    python benchmarks/arrival.py [--clients 300] [--observers 10] [--seconds 10]
                                 [--update docs/performance.md]

The server runs pinned to the first CPU and everything else on the others,
as ``achat-bench`` does. Observers only read, so the room has the load's
clients plus twice ``--observers`` members.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from achat.bench.cli import _cpus, _Server, replace_section
from achat.bench.load import STAMPS
from achat.protocol.frames import encode_frame

ROOM = "busy"  # achat-bench's busy room
#: Not in Python 3.11's socket module; the value on Linux.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
#: Enough of a read's end to hold a stamp cut by the read's end.
_TAIL = 64


@dataclass
class Latencies:
    """Milliseconds from send stamp to arrival (kernel) and to read (process)."""

    arrival: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)


class Observers:
    """Clients that join a room and only read, each read stamped by the kernel."""

    def __init__(self, port: int, prefix: str, count: int) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.tails: dict[int, bytes] = {}
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            nick = f"{prefix}{i}".encode()
            sock.sendall(
                encode_frame(b'{"type":"hello","nick":"%s","version":1}' % nick)
                + encode_frame(b'{"type":"join","room":"%s"}' % ROOM.encode())
            )
            self.socks[sock.fileno()] = sock
            self.tails[sock.fileno()] = b""

    def read(self, poller: select.epoll, window: tuple[int, int], into: Latencies) -> None:
        """Read what is ready (waiting up to 0.1 s); keep the latencies of the messages
        said inside ``window`` (wall-clock ns)."""
        for fd, _ in poller.poll(0.1):
            sock = self.socks.get(fd)
            if sock is None:
                continue
            data, ancillary, _, _ = sock.recvmsg(1 << 20, 64)
            read_ns = time.time_ns()
            if not data:
                raise ConnectionError("the server closed an observer")
            arrival_ns = None
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanos = _TIMESPEC.unpack(raw[: _TIMESPEC.size])
                    arrival_ns = seconds * 1_000_000_000 + nanos
            tail = self.tails[fd]
            stream = tail + data
            self.tails[fd] = stream[-_TAIL:]
            for match in STAMPS.finditer(stream):
                if match.end() <= len(tail):
                    continue  # counted with the read before
                said = int(match[1])
                if not window[0] <= said < window[1]:
                    continue
                into.read.append((read_ns - said) / 1e6)
                if arrival_ns is not None:
                    # A read's stamp is its last segment's: later than, or as late as,
                    # its earlier messages arrived (an upper bound for them).
                    into.arrival.append((arrival_ns - said) / 1e6)

    def register(self, poller: select.epoll) -> None:
        for fd in self.socks:
            poller.register(fd, select.EPOLLIN)

    def ask_who(self) -> None:
        next(iter(self.socks.values())).sendall(
            encode_frame(b'{"type":"who","room":"%s"}' % ROOM.encode())
        )

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


_NICKS = re.compile(rb'"type":"names","room":"busy","nicks":\[([^\]]*)\]')


def _wait_for_members(observers: Observers, count: int, timeout: float) -> None:
    """Ask who is in the room until ``count`` are (the load's clients have joined)."""
    sock = next(iter(observers.socks.values()))
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        observers.ask_who()
        sock.settimeout(0.2)
        try:
            seen = (seen + sock.recv(1 << 20))[-(1 << 16) :]
        except TimeoutError:
            continue
        finally:
            sock.settimeout(None)
        for match in _NICKS.finditer(seen):
            if match[1].count(b",") + 1 >= count:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the room did not reach {count} members")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(
    port: int,
    *,
    clients: int,
    observers: int,
    seconds: float,
    warmup: float = 2.0,
    load_cpus: list[int] | None = None,
) -> dict[str, object]:
    """Run ``achat-bench busy-room`` against ``port`` with observers first and last in
    its room; return every figure of :func:`table`."""
    first = Observers(port, "obsfirst", observers)
    bench = str(Path(sys.executable).parent / "achat-bench")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [bench, "busy-room", "-n", str(clients), "-r", "1", "--port", str(port)]
        cmd += ["--warmup", str(warmup), "--duration", str(seconds + 2), "--json", str(out)]
        if load_cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, load_cpus)
        log = (Path(tmp) / "bench.log").open("wb")  # its progress lines, or why it failed
        load = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        last: Observers | None = None
        try:
            _wait_for_members(first, clients + observers, timeout=60)
            last = Observers(port, "obslast", observers)
            poller = select.epoll()
            first.register(poller)
            last.register(poller)
            begin = time.time_ns() + 500_000_000  # the last observers are in by then
            window = (begin, begin + int(seconds * 1e9))
            early, late = Latencies(), Latencies()
            while time.time_ns() < window[1] + 200_000_000:
                first.read(poller, window, early)
                last.read(poller, window, late)
            poller.close()
            if load.wait(seconds + warmup + 60) != 0:
                log.close()
                raise RuntimeError("achat-bench failed:\n" + (Path(tmp) / "bench.log").read_text())
            result = json.loads(out.read_text())
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
            log.close()
            first.close()
            if last is not None:
                last.close()

    def figures(values: list[float]) -> list[float]:
        return [_percentile(values, q) for q in (0.5, 0.99, 0.999)]

    return {
        "clients": clients,
        "observers": observers,
        "seconds": seconds,
        "first_arrival": figures(early.arrival),
        "last_arrival": figures(late.arrival),
        "last_read": figures(late.read),
        "counted": min(len(early.arrival), len(late.arrival)),
        "load": [result["latency_ms"].get(k, float("nan")) for k in ("p50", "p99", "p99.9")],
        "load_delivered": result["delivered_ratio"],
    }


def table(r: dict[str, object]) -> str:
    def row(name: str, values: object) -> str:
        assert isinstance(values, list)
        return f"| {name} | " + " | ".join(f"{v:.2f} ms" for v in values) + " |"

    n, k = r["clients"], r["observers"]
    return "\n".join(
        [
            f"`achat-bench busy-room -n {n} -r 1` with {k} observers joined before its "
            f"clients and {k} after, {r['seconds']:.0f} s, {r['counted']:,} deliveries "
            "timed in each group:",
            "",
            "| from a message's send stamp to | p50 | p99 | p99.9 |",
            "|---|---:|---:|---:|",
            row("its arrival at the members written first (kernel stamp)", r["first_arrival"]),
            row("its arrival at the members written last (kernel stamp)", r["last_arrival"]),
            row("its read by those last members' process", r["last_read"]),
            row(f"its read by achat-bench's worker (all {n} clients)", r["load"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--observers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--update", type=Path, help="replace the arrival section of this file")
    args = parser.parse_args()
    cpus = _cpus()
    server = _Server([], cpus[0] if len(cpus) > 1 else None)
    try:
        result = measure(
            server.port,
            clients=args.clients,
            observers=args.observers,
            seconds=args.seconds,
            load_cpus=cpus[1:] or cpus,
        )
    finally:
        server.stop()
    text = table(result)
    print(text)
    if args.update is not None:
        replace_section(args.update, "arrival", text)


if __name__ == "__main__":
    main()
