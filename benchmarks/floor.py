"""What this host allows a busy room, whatever the server: achat against a floor.

Busy-room 300's p99 moves with the host (5 ms is met in its quick spells,
not in its slow ones), and the profile puts most of a fan-out's time in the
kernel's loopback writes. This tells the host's share from the server's. It
runs ``achat-bench busy-room`` against two servers in turn, each pinned to
the first CPU as ``achat-bench`` pins its own, in alternating pairs so that
both see the same spells of the host:

- **achat**: ``achat-server`` with its SQLite store, as ``make bench`` runs
  it;
- **floor**: the least a server of this design does for the scenario, in
  this file. The same loop (uvloop), the same protocol core (each frame
  decoded strictly, its text checked, its message encoded once per tick for
  all its members), and one write per member per tick, but no store, no
  refs, no flood limit, no pacing of writes and no acks held for a commit:
  a ``say`` is fanned out and acked in the loop iteration that read it.

The floor's latency is what the kernel's writes and the loop cost on this
host at that moment; achat's, less the floor's, is what achat adds.

    python benchmarks/floor.py [--pairs 6] [--clients 300] [--seconds 10]
                               [--update docs/performance.md]

The floor speaks only what achat-bench's busy room needs (``hello``,
``join``, ``say``, ``ping``, ``bye``); it is a measuring tool, not a server.
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
from typing import cast

from achat.bench.cli import _Server, replace_section
from achat.errors import FrameError, ProtocolError
from achat.portfile import write_port_file
from achat.protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder
from achat.protocol.messages import (
    Ack,
    Bye,
    Hello,
    Join,
    Joined,
    Message,
    Names,
    Ping,
    PongReply,
    Say,
    Welcome,
    decode_client,
    encode,
    encode_many,
)
from achat.protocol.names import validate_text
from achat.server.registry import DEFAULT_MAX_TEXT

SECTION = "floor"


# -- the floor server ---------------------------------------------------------------------


class _Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.members: dict[str, _Conn] = {}
        self.said: list[Message] = []  # this tick's, not fanned out yet


class Floor:
    """The rooms and what this tick owes: fanned out once, at the tick's end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rooms: dict[str, _Room] = {}
        self.due: list[_Room] = []
        self.scheduled = False

    def said(self, room: _Room, message: Message) -> None:
        if not room.said:
            self.due.append(room)
        room.said.append(message)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.fan_out)

    def fan_out(self) -> None:
        self.scheduled = False
        due, self.due = self.due, []
        for room in due:
            data = encode_many(room.said)
            room.said = []
            for member in room.members.values():
                if member.acks:
                    member.transport.write(encode_many(member.acks) + data)
                    member.acks = []
                else:
                    member.transport.write(data)


class _Conn(asyncio.Protocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.nick: str | None = None
        self.rooms: list[_Room] = []
        self.acks: list[Ack] = []
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        for room in self.rooms:
            room.members.pop(self.nick or "", None)

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.decoder.receive_data(data)
        except FrameError:
            self.transport.close()
            return
        for body in bodies:
            try:
                self._handle(decode_client(body))
            except ProtocolError:
                self.transport.close()
                return

    def _handle(self, frame: object) -> None:
        floor = self.floor
        if isinstance(frame, Say):
            room = floor.rooms.get(frame.room)
            if room is None or room.members.get(self.nick or "") is not self:
                self.transport.close()  # achat-bench says only in the room it joined
                return
            text = validate_text(frame.text, DEFAULT_MAX_TEXT)
            room.seq += 1
            ts = time.time_ns() // 1_000_000
            assert self.nick is not None
            floor.said(
                room, Message(room=room.name, seq=room.seq, ts=ts, sender=self.nick, text=text)
            )
            if frame.ref:
                self.acks.append(Ack(ref=frame.ref, ts=ts, room=room.name, seq=room.seq))
        elif isinstance(frame, Hello):
            self.nick = frame.nick
            self.transport.write(
                encode(
                    Welcome(
                        nick=frame.nick,
                        server="floor",
                        version=1,
                        max_frame=DEFAULT_MAX_FRAME,
                        max_text=DEFAULT_MAX_TEXT,
                    )
                )
            )
        elif isinstance(frame, Join):
            assert self.nick is not None
            room = floor.rooms.get(frame.room) or floor.rooms.setdefault(
                frame.room, _Room(frame.room)
            )
            room.members[self.nick] = self
            self.rooms.append(room)
            joined = encode(Joined(room=room.name, nick=self.nick, ts=time.time_ns() // 1_000_000))
            for member in room.members.values():
                member.transport.write(joined)
            nicks = list(room.members)
            self.transport.write(encode(Names(room=room.name, nicks=nicks, topic="", seq=room.seq)))
        elif isinstance(frame, Ping):
            self.transport.write(encode(PongReply(ref=frame.ref)))
        elif isinstance(frame, Bye):
            self.transport.close()


async def serve(port_file: Path) -> None:
    """Serve on a loopback port the kernel picks, and name it in ``port_file``."""
    loop = asyncio.get_running_loop()
    floor = Floor(loop)
    server = await loop.create_server(lambda: _Conn(floor), "127.0.0.1", 0, backlog=4096)
    write_port_file(port_file, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class _FloorServer(_Server):
    """The floor in its own process, pinned as achat-bench pins achat-server."""

    def __init__(self, pin: int) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        port_file = Path(self.tmp.name) / "port"
        self._start([sys.executable, __file__, "--serve", str(port_file)], port_file, pin)


# -- the alternating runs -----------------------------------------------------------------

#: The servers compared, by name: what each is, for the table's legend.
KINDS = {
    "achat": "`achat-server`, SQLite store (as `make bench` runs it)",
    "memory": "`achat-server --store memory`: the same server, its history in memory only",
    "floor": "the floor (`benchmarks/floor.py`): no store, refs, limits or pacing",
}


@dataclass
class Run:
    p50: float
    p99: float
    p999: float
    ratio: float
    cpu: float  # % of one core, over the whole run (joining included)


def _start(kind: str) -> _Server:
    if kind == "floor":
        return _FloorServer(0)
    return _Server(["--store", "memory"] if kind == "memory" else [], 0)


def run_one(kind: str, clients: int, seconds: float, warmup: float = 2.0) -> Run:
    """One ``achat-bench busy-room`` against a fresh server of ``kind``."""
    server = _start(kind)
    bench = str(Path(sys.executable).parent / "achat-bench")
    try:
        with tempfile.TemporaryDirectory(prefix="achat-floor-") as tmp:
            out = Path(tmp) / "result.json"
            # The load on the other CPUs, as achat-bench keeps it off the server it starts.
            others = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)) if cpu != 0)
            cmd = ["taskset", "-c", others, bench, "busy-room", "-n", str(clients), "-r", "1"]
            cmd += ["--port", str(server.port), "--duration", str(seconds), "--json", str(out)]
            cmd += ["--warmup", str(warmup)]
            before, start = server.cpu_seconds(), time.monotonic()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            cpu = (server.cpu_seconds() - before) / (time.monotonic() - start) * 100
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"achat-bench failed against {kind}:\n{done.stderr[-2000:]}")
            result = json.loads(out.read_text())
    finally:
        server.stop()
    latency = result["latency_ms"]
    if not latency.get("p99"):
        raise RuntimeError(f"nothing was delivered by {kind}")
    return Run(
        float(latency["p50"]),
        float(latency["p99"]),
        float(latency["p99.9"]),
        float(result["delivered_ratio"]),
        cpu,
    )


def table(rounds: list[dict[str, Run]], kinds: list[str], clients: int, seconds: float) -> str:
    lines = [
        f"`python benchmarks/floor.py --rounds {len(rounds)} --clients {clients} "
        f"--seconds {seconds:g} --kinds {','.join(kinds)}`: busy-room {clients}, 1 message/s "
        "each, against each server in turn, in a round; the order turns by one each round.",
        "",
        *(f"- **{kind}**: {KINDS[kind]}" for kind in kinds),
        "",
        "| round | " + " | ".join(f"{k} p50 | {k} p99 | {k} p99.9 | {k} CPU" for k in kinds) + " |",
        "|---:|" + "---:|" * (4 * len(kinds)),
    ]
    for i, runs in enumerate(rounds, 1):
        cells = (
            f"{r.p50:.2f} ms | **{r.p99:.2f} ms** | {r.p999:.2f} ms | {r.cpu:.0f} %"
            for r in (runs[k] for k in kinds)
        )
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines.append("")
    for kind in kinds:
        p99 = [runs[kind].p99 for runs in rounds]
        lines.append(
            f"- {kind}: p99 median {statistics.median(p99):.2f} ms "
            f"({min(p99):.2f}–{max(p99):.2f}), under 5 ms in {sum(v <= 5 for v in p99)} of "
            f"{len(p99)} runs; delivered {min(r[kind].ratio for r in rounds) * 100:.2f} % "
            "at least."
        )
    first = kinds[0]
    for kind in kinds[1:]:
        lower = sum(runs[first].p99 < runs[kind].p99 for runs in rounds)
        diff = statistics.median(runs[first].p99 - runs[kind].p99 for runs in rounds)
        lines.append(
            f"- {first} against {kind}: p99 lower in {lower} of {len(rounds)} rounds, by "
            f"{-diff:.2f} ms at the median of the rounds' differences."
            if diff <= 0
            else f"- {first} against {kind}: p99 lower in {lower} of {len(rounds)} rounds; "
            f"higher by {diff:.2f} ms at the median of the rounds' differences."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=Path, metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", "-n", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--kinds", default="achat,memory,floor", help="the servers to compare: " + ", ".join(KINDS)
    )
    parser.add_argument("--update", type=Path, help="replace the floor section of this file")
    args = parser.parse_args()
    if args.serve is not None:
        import uvloop

        uvloop.run(serve(args.serve))
        return
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"):
        sys.exit("floor.py needs taskset and two CPUs: the server on the first, the load on others")
    rounds: list[dict[str, Run]] = []
    for i in range(args.rounds):
        # The order turns each round, so that no server always meets a spell first.
        order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
        runs = {kind: run_one(kind, args.clients, args.seconds) for kind in order}
        rounds.append(runs)
        print(
            f"round {i + 1}: "
            + ", ".join(f"{k} p99 {runs[k].p99:.2f} ms ({runs[k].cpu:.0f} % CPU)" for k in order),
            file=sys.stderr,
        )
    text = table(rounds, kinds, args.clients, args.seconds)
    print(text)
    if args.update:
        replace_section(args.update, SECTION, text)


if __name__ == "__main__":
    main()
