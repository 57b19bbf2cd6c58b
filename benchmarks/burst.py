"""A burst of says taken at once: does the server cut off the members that read?

Listeners and talkers join one room of an ``achat-server`` with its default
limits (flood limit on: ten frames at once). Then every talker writes
``--says`` messages of ``--text`` characters in one write, all at the same
moment (a class pasting at once), optionally while the server is stopped
(``--stop`` seconds of ``SIGSTOP``: everything said meanwhile is read at
once when it goes on). The server takes them in one go and fans them out:
over the send limit for every member (item 64 of
``docs/performance-history.md``). Every listener reads all the time.

It reports, per run, the messages taken (acked) and refused, the listeners
cut off (``sendq_exceeded``), the fewest and most messages a listener got,
and the server's warnings.

    python benchmarks/burst.py [--listeners 200] [--talkers 100] [--says 10]
                               [--text 2000] [--stop 0] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.procs import ServerProcess

from achat.protocol.frames import FrameDecoder
from achat.protocol.messages import (
    Ack,
    Error,
    Hello,
    Join,
    Message,
    Names,
    Ping,
    Pong,
    Say,
    decode_server,
    encode,
)
from achat.server.limits import FloodPolicy

ROOM = "burst"
#: The ref of the ping that ends a run.
DONE = "done"
#: Seconds any wait may take before the run gives up on it.
WAIT = 60.0


class Member(asyncio.Protocol):
    """One connection in the room: counts what it reads, by kind."""

    def __init__(self, nick: str) -> None:
        self.nick = nick
        self.decoder = FrameDecoder(max_frame=10**7)
        self.transport: asyncio.Transport | None = None
        self.joined = asyncio.Event()
        self.messages = self.acks = 0
        self.done = False  # the last ping answered (a pong, or refused by the flood limit)
        self.errors: Counter[str] = Counter()
        # Says refused, by why: the flood limit ("slow down"), or the server busy.
        self.refusals: Counter[str] = Counter()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.write(Hello(nick=self.nick, version=1), Join(room=ROOM))

    def write(self, *frames: Hello | Join | Say | Ping) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(encode(f) for f in frames))

    def data_received(self, data: bytes) -> None:
        for body in self.decoder.receive_data(data):
            frame = decode_server(body)
            if isinstance(frame, Message):
                self.messages += 1
            elif isinstance(frame, Ack):
                self.acks += 1
            elif isinstance(frame, Pong) or (isinstance(frame, Error) and frame.ref == DONE):
                self.done = True
            elif isinstance(frame, Names):
                self.joined.set()
            elif isinstance(frame, Error):
                self.errors[frame.code] += 1
                if frame.code == "rate_limited":
                    busy = frame.message.startswith("the server is busy")
                    self.refusals["server busy" if busy else "flood limit"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    @property
    def answered(self) -> int:
        return self.acks + self.errors["rate_limited"]


@dataclass
class Run:
    """What one burst came to."""

    said: int
    acked: int
    refused: int
    cut_off: int
    fewest: int
    most: int
    talker_errors: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Look every 10 ms until ``condition()``, WAIT at most."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"burst.py: {what} took over {WAIT:g} s")
        await asyncio.sleep(0.01)


async def one_run(
    port: int, pid: int, listeners: int, talkers: int, says: int, text: int, stop: float
) -> tuple[list[Member], list[Member]]:
    loop = asyncio.get_running_loop()

    async def member(nick: str) -> Member:
        _, protocol = await loop.create_connection(lambda: Member(nick), "127.0.0.1", port)
        return protocol

    heard: list[Member] = []
    said: list[Member] = []
    try:
        for i in range(listeners):
            heard.append(await member(f"l{i}"))
        for i in range(talkers):
            said.append(await member(f"t{i}"))
        await burst(heard, said, pid, says, text, stop)
    finally:
        for m in heard + said:
            if m.transport is not None:
                m.transport.abort()
        await asyncio.wait_for(asyncio.gather(*(m.closed.wait() for m in heard + said)), WAIT)
    return heard, said


async def burst(
    heard: list[Member], said: list[Member], pid: int, says: int, text: int, stop: float
) -> None:
    """Every talker writes ``says`` says at once (the server stopped meanwhile for
    ``stop`` seconds); back once every say is answered and every message read."""
    everyone = heard + said
    await asyncio.wait_for(asyncio.gather(*(m.joined.wait() for m in everyone)), WAIT)
    if stop:
        os.kill(pid, signal.SIGSTOP)
    try:
        for talker in said:
            body = "x" * text
            talker.write(
                *(Say(room=ROOM, text=f"{talker.nick} {i} {body}", ref=str(i)) for i in range(says))
            )
        if stop:
            await asyncio.sleep(stop)
    finally:
        if stop:
            os.kill(pid, signal.SIGCONT)
    await until(lambda: all(t.answered >= says or t.closed.is_set() for t in said), "the answers")
    # A ping after every say is answered is answered after every message (the server
    # writes a connection's frames in the order it queued them): then all are in.
    for m in everyone:
        if not m.closed.is_set():
            m.write(Ping(ref=DONE))
    await until(lambda: all(m.done or m.closed.is_set() for m in everyone), "the pongs")


def measure(
    listeners: int, talkers: int, says: int, text: int, stop: float, extra: tuple[str, ...] = ()
) -> Run:
    """One run against a fresh server with the default limits (and ``extra`` options)."""
    policy = FloodPolicy()
    with tempfile.TemporaryDirectory(prefix="achat-burst-") as tmp:
        server = ServerProcess(
            Path(tmp), "--rate", f"{policy.rate:g}", "--burst", f"{policy.burst:g}", *extra
        )
        server.start()
        assert server.proc is not None
        try:
            heard, said = asyncio.run(
                one_run(server.port, server.proc.pid, listeners, talkers, says, text, stop)
            )
        finally:
            server.stop()
        log = server.log.read_text().splitlines()
    got = [m.messages for m in heard]
    errors: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    for t in said:
        errors.update(t.errors)
        refusals.update(t.refusals)
    return Run(
        said=talkers * says,
        acked=sum(t.acks for t in said),
        refused=errors["rate_limited"],
        cut_off=sum(1 for m in heard if m.errors["sendq_exceeded"]),
        fewest=min(got),
        most=max(got),
        talker_errors=dict(errors),
        refusals=dict(refusals),
        warnings=[line for line in log if "WARNING" in line],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", type=int, default=200)
    parser.add_argument("--talkers", type=int, default=100)
    parser.add_argument("--says", type=int, default=10, help="each talker's, in one write")
    parser.add_argument("--text", type=int, default=2000, help="characters a message")
    parser.add_argument("--stop", type=float, default=0.0, help="seconds the server is stopped")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for n in range(1, args.runs + 1):
        run = measure(args.listeners, args.talkers, args.says, args.text, args.stop)
        stopped = f", server stopped {args.stop:g} s" if args.stop else ""
        why = f" {run.refusals}" if run.refused else ""
        print(
            f"run {n}: {run.said:,} said at once ({args.talkers} talkers x {args.says}"
            f" x {args.text:,} characters{stopped}):"
            f" {run.acked:,} acked, {run.refused:,} refused{why};"
            f" {run.cut_off} of {args.listeners} listeners cut off;"
            f" a listener got {run.fewest:,}-{run.most:,} messages;"
            f" the talkers' errors: {run.talker_errors or 'none'}"
        )
        for line in run.warnings[:3]:
            print(f"  server: {line}")


if __name__ == "__main__":
    main()
