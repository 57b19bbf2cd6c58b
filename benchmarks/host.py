"""What the machine under the benchmarks can do, so their figures can be read against it.

The reference machine is "2 cores, 24 GiB", but the host under it changes
from run to run, and the server's costs are mostly the kernel's: a
``send`` per member, a ``recv`` per read. This measures, on one core:

- the interpreter (a small loop of Python);
- one system call (``getppid``);
- a 110-byte frame sent and received over loopback TCP (what a delivery costs
  the kernel, both ends on one core);
- bulk loopback TCP in 64 KiB writes (what the generator reads through).

    taskset -c 0 python benchmarks/host.py [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from achat.bench.cli import replace_section

FRAME = b"x" * 110
BULK = b"x" * 65536


def best_us(fn: Callable[[], object], number: int) -> float:
    """The best of five timings of ``number`` calls, per call, in µs."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def frame_us() -> float:
    a, b = tcp_pair()
    with a, b:

        def once() -> None:
            a.send(FRAME)
            b.recv(4096)

        return best_us(once, 20_000)


def bulk_mb_s(seconds: float = 1.0) -> float:
    a, b = tcp_pair()
    with a, b:
        moved, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a.sendall(BULK)
            left = len(BULK)
            while left:
                left -= len(b.recv(left))
            moved += len(BULK)
        return moved / (time.perf_counter() - start) / 1e6


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table() -> str:
    rows = [
        ("CPU", cpu_model()),
        ("kernel", platform.release()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("`sum(range(100))`", f"{best_us(lambda: sum(range(100)), 200_000):.2f} µs"),
        ("one system call (`getppid`)", f"{best_us(os.getppid, 200_000):.2f} µs"),
        ("a 110-byte frame over loopback TCP, sent and read", f"{frame_us():.2f} µs"),
        ("loopback TCP in 64 KiB writes, sent and read", f"{bulk_mb_s():,.0f} MB/s"),
    ]
    lines = ["| host, one core | |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, help="replace the host section of this file")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.update is not None:
        replace_section(args.update, "host", text)


if __name__ == "__main__":
    main()
