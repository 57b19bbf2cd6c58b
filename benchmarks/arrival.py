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
- a read's stamp is that of its newest data: a write that waited unread in
  the socket when the next one came takes the next one's time. So the
  observers read at a raised priority when they may (root), and their lag
  from a read's stamp to the read is reported: while it stays well under
  the time between two writes to a member (a pass over the room, ~3 ms at
  300 members), no write waited for another, and the stamps are exact;
- *stamp to read* is the same message read by the observer's process, and
  the load's own figure is achat-bench's, read by its worker, over the same
  window.

    python benchmarks/arrival.py [--clients 300] [--observers 10] [--seconds 10]
                                 [--update docs/performance.md]

The server runs pinned to the first CPU and everything else on the others,
as ``achat-bench`` does. Observers only read, so the room has the load's
clients plus twice ``--observers`` members.
"""

from __future__ import annotations

import argparse
import contextlib
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
#: A silent observer is closed at the server's idle timeout (120 s by default).
MAX_SECONDS = 100.0
#: How much the observers' priority is raised, when the process may (root).
NICE = -10
_MEMBERS = re.compile(rb'"room":"busy","members":(\d+)')
#: Where struct tcp_info (linux/tcp.h) keeps tcpi_data_segs_in: segments with data
#: received, counted as they come in, before the kernel merges any in the queue.
_DATA_SEGS_IN = struct.Struct("@I")
_DATA_SEGS_IN_AT = 152


@dataclass
class Group:
    """Observers at one place in the room, and what they measured (ms)."""

    name: str
    arrival: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)


class Observers:
    """Clients that join the room and only read, each read stamped by the kernel."""

    def __init__(self, port: int, stack: contextlib.ExitStack) -> None:
        self.port = port
        self.poller = stack.enter_context(select.epoll())
        self.socks: dict[int, tuple[socket.socket, Group]] = {}
        self.tails: dict[int, bytes] = {}
        self.reads = 0
        self._stack = stack

    def join(self, group: Group, count: int) -> None:
        for i in range(count):
            sock = self._stack.enter_context(socket.create_connection(("127.0.0.1", self.port)))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            nick = f"{group.name}{i}".encode()
            sock.sendall(
                encode_frame(b'{"type":"hello","nick":"%s","version":1}' % nick)
                + encode_frame(b'{"type":"join","room":"%s"}' % ROOM.encode())
            )
            self.socks[sock.fileno()] = (sock, group)
            self.tails[sock.fileno()] = b""
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def read(self, window: tuple[int, int], timeout: float = 0.1) -> None:
        """Read what is ready; keep the figures of the messages said inside ``window``
        (wall-clock ns)."""
        for fd, _ in self.poller.poll(timeout):
            sock, group = self.socks[fd]
            data, ancillary, _, _ = sock.recvmsg(1 << 16, 64)
            read_ns = time.time_ns()
            self.reads += 1
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
            counted = False
            for match in STAMPS.finditer(stream):
                if match.end() <= len(tail):
                    continue  # counted with the read before
                said = int(match[1])
                if not window[0] <= said < window[1]:
                    continue
                counted = True
                group.read.append((read_ns - said) / 1e6)
                if arrival_ns is not None:
                    group.arrival.append((arrival_ns - said) / 1e6)
            if counted and arrival_ns is not None:
                group.lag.append((read_ns - arrival_ns) / 1e6)

    def counts(self) -> tuple[int, int]:
        """Reads so far, and data segments the observers' sockets have received."""
        segments = 0
        for sock, _ in self.socks.values():
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            segments += _DATA_SEGS_IN.unpack_from(info, _DATA_SEGS_IN_AT)[0]
        return self.reads, segments


def _members(sock: socket.socket, load: subprocess.Popen[bytes], count: int) -> None:
    """Ask for the room list until the room has ``count`` members (the load's clients
    have joined); fail if the load ends first or it takes over a minute."""
    deadline = time.monotonic() + 60
    seen = b""
    sock.settimeout(0.2)
    try:
        while time.monotonic() < deadline:
            if load.poll() is not None:
                raise RuntimeError("achat-bench ended before its clients had joined")
            sock.sendall(encode_frame(b'{"type":"rooms"}'))
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                try:
                    seen = (seen + sock.recv(1 << 16))[-(1 << 16) :]
                except TimeoutError:
                    break
                if any(int(m[1]) >= count for m in _MEMBERS.finditer(seen)):
                    return
            time.sleep(0.1)
    finally:
        sock.settimeout(None)
    raise TimeoutError(f"the room did not reach {count} members")


def _percentiles(values: list[float]) -> list[float]:
    return [_at(values, q) for q in (0.5, 0.99, 0.999)]


def _at(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered))))]


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
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be over 0 and at most {MAX_SECONDS:.0f}")
    first, last = Group("obsfirst"), Group("obslast")
    bench = str(Path(sys.executable).parent / "achat-bench")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if load_cpus and hasattr(os, "sched_setaffinity"):
            cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, load_cpus)
            stack.callback(os.sched_setaffinity, 0, cpus)
        reading = Observers(port, stack)
        reading.join(first, observers)
        log = stack.enter_context((tmp / "bench.log").open("wb"))  # progress, or why it failed
        cmd = [bench, "busy-room", "-n", str(clients), "-r", "1", "--port", str(port)]
        cmd += ["--warmup", str(warmup), "--duration", str(seconds), "--json", str(tmp / "r.json")]
        load = stack.enter_context(
            subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        )
        stack.callback(_stop, load)
        raised = _raise_priority(stack)  # after starting the load, which would inherit it
        room = clients + observers
        _members(next(iter(reading.socks.values()))[0], load, room)
        # achat-bench starts its window its warm-up after 0.2 s past all joined.
        begin = time.time_ns() + int((0.2 + warmup) * 1e9)
        window = (begin, begin + int(seconds * 1e9))
        reading.join(last, observers)
        # Writes that came while the one before was unread share its read, and its
        # stamp: counted over the window by the reads against the segments received.
        at_start = at_end = None
        while load.poll() is None:
            reading.read(window)
            now = time.time_ns()
            if at_start is None and now >= window[0]:
                at_start = reading.counts()
            elif at_end is None and now >= window[1]:
                at_end = reading.counts()
        if load.returncode != 0:
            log.flush()
            raise RuntimeError("achat-bench failed:\n" + (tmp / "bench.log").read_text())
        result = json.loads((tmp / "r.json").read_text())
    shared = float("nan")
    if at_start is not None and at_end is not None and at_end[1] > at_start[1]:
        reads, segments = at_end[0] - at_start[0], at_end[1] - at_start[1]
        shared = max(0, segments - reads) / segments
    return {
        "clients": clients,
        "observers": observers,
        "seconds": seconds,
        "raised": raised,
        "first_arrival": _percentiles(first.arrival),
        "last_arrival": _percentiles(last.arrival),
        "last_read": _percentiles(last.read),
        "lag": _percentiles(first.lag + last.lag),
        "shared": shared,
        # Were every write that took a later stamp among the slowest, the p99 of the
        # members written first would still be at least this.
        "first_p99_floor": _at(first.arrival, 0.99 - (shared if shared == shared else 0.01)),
        "counted": min(len(first.arrival), len(last.arrival)),
        "load": [result["latency_ms"].get(k, float("nan")) for k in ("p50", "p99", "p99.9")],
        "load_delivered": result["delivered_ratio"],
    }


def _raise_priority(stack: contextlib.ExitStack) -> bool:
    """Raise this thread's priority by NICE for the run, if allowed; whether it was."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, before + NICE)
    except (OSError, AttributeError):
        return False
    stack.callback(os.setpriority, os.PRIO_PROCESS, 0, before)
    return True


def _stop(load: subprocess.Popen[bytes]) -> None:
    if load.poll() is None:
        load.kill()
        load.wait()


def table(r: dict[str, object]) -> str:
    def row(name: str, values: object) -> str:
        assert isinstance(values, list)
        return f"| {name} | " + " | ".join(f"{v:.2f} ms" for v in values) + " |"

    n, k = r["clients"], r["observers"]
    assert isinstance(n, int)
    assert isinstance(k, int)
    priority = "at a raised priority" if r["raised"] else "at the load's priority (not root)"
    return "\n".join(
        [
            f"`achat-bench busy-room -n {n} -r 1` with {k} observers joined before its "
            f"clients and {k} after ({n + 2 * k} members), reading {priority}, over "
            f"achat-bench's {r['seconds']:.0f} s window; {r['counted']:,} deliveries "
            "timed in each group:",
            "",
            "| from a message's send stamp to | p50 | p99 | p99.9 |",
            "|---|---:|---:|---:|",
            row("its arrival at the members written first (kernel stamp)", r["first_arrival"]),
            row("its arrival at the members written last (kernel stamp)", r["last_arrival"]),
            row("its read by those last members' process", r["last_read"]),
            row(f"its read by achat-bench's worker ({n} clients)", r["load"]),
            row("(the observers' lag, from a read's kernel stamp to the read)", r["lag"]),
            "",
            f"Of the server's writes to the observers, {_share(r['shared'])} came while the one "
            "before was still unread, and took its read's later stamp (`tcp_info`: data "
            "segments received against reads). Were all of them among the slowest, the p99 "
            f"of the members written first would still be {r['first_p99_floor']:.2f} ms.",
        ]
    )


def _share(value: object) -> str:
    assert isinstance(value, float)
    return "an unknown share" if value != value else f"{100 * value:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--observers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help=f"at most {MAX_SECONDS:.0f}")
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
