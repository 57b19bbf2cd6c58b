"""achat against the C IRC daemons issue 4 measures it by, on this machine.

Issue 4 asks for "a server that sustains more than twice the fan-out of the C
IRC daemons on one core", and quotes ngircd 26 and InspIRCd 3 on machines of
this kind: about 1.8–2.2 million deliveries/s in one busy room of 1,350–1,500
members, collapsing by 2,000. This runs the same busy room against both
daemons and against achat, on this host, in turn:

- **achat**: ``achat-bench busy-room -n N -r 1``, which starts
  ``achat-server`` as ``make bench`` does (SQLite store on, default limits);
- **ngircd** and **inspircd**: the Debian packages (``apt-get install ngircd
  inspircd``), each started here from a configuration written for the run:
  loopback only, no DNS or ident lookups, no limit on connections from one
  address or on channels, and their flood limits off (ngircd's penalties,
  InspIRCd's command rate, threshold and fake lag), as the issue configured
  them. What each does with a member that cannot keep up is left as it ships
  (ngircd's fixed write buffer, InspIRCd's default send queues): that is how
  they collapse.

Every server is pinned to the first CPU and the load to the others. The IRC
load is written here, in one process on uvloop as achat-bench's worker is:
N clients register, join ``#bench``, and once all have joined each says a
60-byte text carrying its send time (``PRIVMSG``) once a second at a random
phase, through a 2 s warm-up and the measured window. A read's messages are
counted with one ``bytes.count`` and timed from the stamps of its first and
last, spread between them as achat-bench does; only messages said inside the
window count, and the clients read on after it until all of them are in
(10 s at most). An IRC server does not echo a message to its sender, so a
message is offered to N − 1 members here and to N in achat's room.

    python benchmarks/ircd.py [--servers achat,ngircd,inspircd]
                              [--sizes 300,1000,1500,2000,2500] [--rounds 2]
                              [--seconds 10] [--update docs/performance.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from achat.bench.cli import _Server, replace_section
from achat.bench.histogram import Histogram
from achat.bench.load import DRAIN_SECONDS, SPREAD, TEXT_SIZE

SECTION = "ircd"
CHANNEL = b"#bench"
#: What a member is sent for a message said inside the window, up to its stamp: the text
#: of one said in the warm-up begins with WARM instead, so that a read's messages of the
#: window are counted exactly with one ``bytes.count``, however late or out of order.
MARK = b" PRIVMSG " + CHANNEL + b" :t="
WARM = b"w="
#: Registrations in flight at once, for each daemon: under ngircd's listen backlog (10),
#: whose overflow costs a connection a SYN sent again a second or more later; many for
#: InspIRCd, which here welcomes a client a second after its USER even when it has
#: nothing else to do, and listens with a backlog of 4,096.
CONNECTING = {"ngircd": 8, "inspircd": 400}
JOIN_TIMEOUT = 120.0
#: A line is never this long; a member that holds more without a newline is broken.
LINE_LIMIT = 1 << 16


# -- the daemons ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ngircd_config(port: int, include_dir: Path) -> str:
    """ngircd's configuration: loopback, no lookups, no per-address or channel limits,
    penalties (its flood limit) off."""
    return f"""[Global]
	Name = bench.achat.invalid
	Info = achat benchmark
	Listen = 127.0.0.1
	Ports = {port}
	MotdPhrase = achat benchmark
	AdminInfo1 = achat benchmark
	AdminInfo2 = loopback
	AdminEMail = bench@achat.invalid
	IncludeDir = {include_dir}
[Limits]
	MaxConnections = 0
	MaxConnectionsIP = 0
	MaxJoins = 0
	MaxNickLength = 16
	MaxPenaltyTime = 0
	PingTimeout = 600
	PongTimeout = 600
[Options]
	DNS = no
	Ident = no
	PAM = no
"""


def inspircd_config(port: int, tmp: Path) -> str:
    """InspIRCd's configuration: loopback, no lookups, no per-address limits, its flood
    limits off (command rate, threshold, fake lag); its send and receive queues at
    their defaults (unset)."""
    return f"""<server name="bench.achat.invalid" description="achat benchmark" network="bench">
<admin name="bench" nick="bench" email="bench@achat.invalid">
<bind address="127.0.0.1" port="{port}" type="clients">
<connect allow="*" timeout="60" pingfreq="600" threshold="1000000000"
         commandrate="1000000000" fakelag="no" localmax="1000000" globalmax="1000000"
         maxchans="20" resolvehostnames="no">
<pid file="{tmp}/inspircd.pid">
<files motd="{tmp}/motd">
<performance softlimit="20000" somaxconn="4096" quietbursts="yes">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{tmp}/log">
"""


class Daemon(_Server):
    """An IRC daemon on a loopback port, pinned to CPU ``pin``, until :meth:`stop`
    (achat-bench's server's CPU time, RSS and stop, with a start of its own: a daemon
    writes no port file)."""

    def __init__(self, kind: str, pin: int) -> None:
        self.kind = kind
        self.tmp = tempfile.TemporaryDirectory(prefix=f"achat-{kind}-")
        tmp = Path(self.tmp.name)
        os.chmod(tmp, 0o755)  # ngircd run as root drops to nobody, who must read its files
        self.port = _free_port()
        if kind == "ngircd":
            (tmp / "conf.d").mkdir()
            conf = tmp / "ngircd.conf"
            conf.write_text(ngircd_config(self.port, tmp / "conf.d"))
            cmd = ["ngircd", "--nodaemon", "--config", str(conf)]
        elif kind == "inspircd":
            (tmp / "motd").write_text("achat benchmark\n")
            conf = tmp / "inspircd.conf"
            conf.write_text(inspircd_config(self.port, tmp))
            cmd = ["inspircd", "--nofork", f"--config={conf}"]
            if os.geteuid() == 0:
                cmd.append("--runasroot")
        else:
            raise ValueError(kind)
        for path in tmp.iterdir():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        with open(tmp / "stdout", "wb") as log:  # the daemon keeps its own copy
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(pin), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = (tmp / "stdout").read_text(errors="replace")[-2000:]
                self.stop()
                raise SystemExit(f"{kind} did not listen on port {self.port}:\n{said}")
            time.sleep(0.05)


# -- counting what a member reads (pure) ----------------------------------------------------


def stamp_at(chunk: bytes, pos: int) -> int:
    """The stamp of the message whose MARK begins at ``pos``."""
    start = pos + len(MARK)
    return int(chunk[start : chunk.index(b" ", start)])


@dataclass
class Tally:
    """Messages said inside the window and read by members, with their latencies.

    A read's messages are counted at once, their latencies spread from the newest
    stamp's to the oldest's, kept as three numbers and counted into the histogram after
    the window (:meth:`fold`), so that the work stays out of the reads being timed.
    """

    delivered: int = 0
    latency: Histogram = field(default_factory=Histogram)
    spreads: array[int] = field(default_factory=lambda: array("q"))

    def read(self, chunk: bytes, count: int, now_ns: int) -> None:
        """Count a read of complete lines holding ``count`` messages of the window, read
        at ``now_ns``."""
        first = stamp_at(chunk, chunk.find(MARK))
        last = stamp_at(chunk, chunk.rfind(MARK)) if count > 1 else first
        self.delivered += count
        self.spreads.extend((now_ns - max(first, last), now_ns - min(first, last), count))

    def fold(self) -> None:
        spreads, add = self.spreads, self.latency.add_between
        for i in range(0, len(spreads), 3):
            add(spreads[i], spreads[i + 1], spreads[i + 2], SPREAD)
        del spreads[:]


def privmsg(now_ns: int, warm: bool = False) -> bytes:
    """A say: its send time (ns since the epoch) padded to TEXT_SIZE, as achat-bench's,
    marked as said in the warm-up or in the window."""
    head = (WARM if warm else b"t=") + b"%d " % now_ns
    return b"PRIVMSG " + CHANNEL + b" :" + head + b"x" * max(0, TEXT_SIZE - len(head)) + b"\r\n"


def pongs(chunk: bytes) -> bytes:
    """The answers to the server's pings among these lines."""
    out = []
    for line in chunk.split(b"\n"):
        if line.startswith(b"PING"):
            out.append(b"PONG" + line[4:].rstrip(b"\r") + b"\r\n")
    return b"".join(out)


# -- the IRC load ---------------------------------------------------------------------------


class Load:
    """What every client of one run shares: the window, the tally, the says."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.tally = Tally()
        self.start = self.end = float("inf")  # the window, on the loop's clock
        self.said = 0  # inside the window
        self.closed = 0
        self.errors: dict[str, int] = {}
        self.saying = True
        #: Deliveries the window's messages make, once it is over; set when all are in.
        self.expected = float("inf")
        self.all_in = asyncio.Event()


class IrcClient(asyncio.Protocol):
    REGISTERING, JOINING, JOINED = range(3)

    def __init__(self, nick: str, load: Load, joined: asyncio.Future[None]) -> None:
        self.nick = nick.encode()
        self.load = load
        self.joined = joined
        self.state = self.REGISTERING
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(b"NICK %s\r\nUSER %s 0 * :achat bench\r\n" % (self.nick, self.nick))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.closed += 1
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(f"{self.nick.decode()} was closed"))

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        cut = buf.rfind(b"\n") + 1
        if not cut:
            self.tail = buf
            if len(buf) > LINE_LIMIT:
                raise RuntimeError("a line without end from the server")
            return
        chunk, self.tail = (buf, b"") if cut == len(buf) else (buf[:cut], buf[cut:])
        count = chunk.count(MARK)
        if count:
            load = self.load
            load.tally.read(chunk, count, time.time_ns())
            if load.tally.delivered >= load.expected:
                load.all_in.set()
        if self.state != self.JOINED:
            self._greeting(chunk)
        if b"PING" in chunk and self.transport is not None:
            self.transport.write(pongs(chunk))
        if b"ERROR :" in chunk:
            reason = chunk[chunk.find(b"ERROR :") :].split(b"\n", 1)[0].strip()
            key = re.sub(rb"\d+", b"N", reason).decode(errors="replace")
            self.load.errors[key] = self.load.errors.get(key, 0) + 1

    def _greeting(self, chunk: bytes) -> None:
        assert self.transport is not None
        if self.state == self.REGISTERING and b" 001 " in chunk:
            self.state = self.JOINING
            self.transport.write(b"JOIN " + CHANNEL + b"\r\n")
        if self.state == self.JOINING and b" 366 " in chunk:
            self.state = self.JOINED
            if not self.joined.done():
                self.joined.set_result(None)

    def tick(self, loop: asyncio.AbstractEventLoop, at: float, every: float) -> None:
        """Say one message (due at ``at`` on the loop's clock), and the next ``every``
        seconds after it, until the window's end: on time, however late this one ran."""
        if self.transport is None or not self.load.saying:
            return
        warm = at < self.load.start
        self.transport.write(privmsg(time.time_ns(), warm))
        self.load.said += not warm
        if (at := at + every) < self.load.end:
            loop.call_at(at, self.tick, loop, at, every)


@dataclass
class Row:
    server: str
    clients: int
    offered: float  # deliveries/s
    delivered: float
    ratio: float
    p50: float  # ms
    p99: float
    p999: float
    server_cpu: float  # % of one core over the window
    load_cpu: float
    rss_mib: float
    closed: int  # connections the server closed
    join_s: float
    errors: dict[str, int] = field(default_factory=dict)

    def sustains(self) -> bool:
        """Issue 4's bar for a busy room: 99.9 % delivered, p99 ≤ 250 ms, nobody cut off."""
        return self.ratio >= 0.999 and self.p99 <= 250 and self.closed == 0


async def irc_run(port: int, clients: int, seconds: float, warmup: float, daemon: Daemon) -> Row:
    loop = asyncio.get_running_loop()
    load = Load(clients)
    tag = os.getpid() % 10000
    members: list[IrcClient] = []
    gate = asyncio.Semaphore(CONNECTING[daemon.kind])
    begun = time.monotonic()

    async def connect(i: int) -> None:
        async with gate:
            joined: asyncio.Future[None] = loop.create_future()
            member = IrcClient(f"b{tag}u{i}", load, joined)
            try:
                await loop.create_connection(lambda: member, "127.0.0.1", port)
            except OSError as exc:
                key = f"connect: {exc.strerror or exc}"
                load.errors[key] = load.errors.get(key, 0) + 1
                load.closed += 1
                return
            members.append(member)
            # A daemon that cuts a member off while the room fills does not seat N: the
            # run goes on with those it seated, and counts the others as cut off.
            try:
                await asyncio.wait_for(joined, JOIN_TIMEOUT)
            except ConnectionError:
                pass
            except TimeoutError:
                key = f"not seated in {JOIN_TIMEOUT:g} s"
                load.errors[key] = load.errors.get(key, 0) + 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            seated = sum(m.joined.done() for m in members)
            print(f"  {daemon.kind}: {seated:,} of {clients:,} seated", file=sys.stderr)

    shown = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(connect(i) for i in range(clients)))
    finally:
        shown.cancel()
    join_s = time.monotonic() - begun
    seated = [m for m in members if m.transport is not None and m.joined.done()]
    for member in set(members) - set(seated):
        if member.transport is not None:
            member.transport.abort()
    members = seated
    if len(members) < 2:
        raise RuntimeError(f"{daemon.kind} seated {len(members)} of {clients} members")
    load.start = start = loop.time() + warmup
    load.end = end = start + seconds
    for member in members:  # at a random phase, once a second
        at = loop.time() + random.random()
        loop.call_at(at, member.tick, loop, at, 1.0)
    await asyncio.sleep(start - loop.time())
    cpu0, load0 = daemon.cpu_seconds(), time.process_time()
    await asyncio.sleep(end - loop.time())
    window = seconds + (loop.time() - end)
    server_cpu = (daemon.cpu_seconds() - cpu0) / window * 100
    load_cpu = (time.process_time() - load0) / window * 100
    rss = daemon.rss_kib() / 1024
    load.saying = False
    # Every message said in the window, to every other member seated when it opened.
    load.expected = expected = load.said * (len(members) - 1)
    if load.tally.delivered < expected:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.all_in.wait(), DRAIN_SECONDS)
    closed = load.closed  # by the server: the clients close nothing before this
    for member in members:
        if member.transport is not None:
            member.transport.abort()
    load.tally.fold()
    latency = load.tally.latency
    return Row(
        daemon.kind,
        clients,
        expected / seconds,
        load.tally.delivered / seconds,
        load.tally.delivered / expected if expected else 0.0,
        latency.quantile(0.50) / 1e6,
        latency.quantile(0.99) / 1e6,
        latency.quantile(0.999) / 1e6,
        server_cpu,
        load_cpu,
        rss,
        closed,
        join_s,
        load.errors,
    )


def run_daemon(kind: str, clients: int, seconds: float, warmup: float) -> Row:
    import uvloop

    cpus = os.sched_getaffinity(0)
    daemon = Daemon(kind, min(cpus))
    # The load on the CPUs the daemon is not on, as achat-bench keeps its workers.
    os.sched_setaffinity(0, cpus - {min(cpus)} or cpus)
    try:
        return uvloop.run(irc_run(daemon.port, clients, seconds, warmup, daemon))
    finally:
        os.sched_setaffinity(0, cpus)
        daemon.stop()


def run_achat(clients: int, seconds: float, warmup: float) -> Row:
    """``achat-bench busy-room``, which starts and pins achat-server as ``make bench`` does."""
    bench = str(Path(sys.executable).parent / "achat-bench")
    with tempfile.TemporaryDirectory(prefix="achat-ircd-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [bench, "busy-room", "-n", str(clients), "-r", "1", "--duration", str(seconds)]
        cmd += ["--warmup", str(warmup), "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"achat-bench failed:\n{done.stderr[-2000:]}")
        r = json.loads(out.read_text())
    latency = r["latency_ms"]
    return Row(
        "achat",
        clients,
        float(r["offered_per_s"]),
        float(r["delivered_per_s"]),
        float(r["delivered_ratio"]),
        float(latency["p50"] or 0),
        float(latency["p99"] or 0),
        float(latency["p99.9"] or 0),
        float(r["server_cpu_pct"] or 0),
        float(r["load_cpu_pct"] or 0),
        float(r["server_rss_mib"] or 0),
        int(r["closed"]),
        float(r["connect_join_s"]),
        {"errors": int(r["errors"])} if r["errors"] else {},
    )


# -- the rounds and the table ---------------------------------------------------------------

#: The servers compared, by name: what each is, for the table's legend.
SERVERS = {
    "achat": "`achat-server`, SQLite store on, default limits (as `make bench` runs it), "
    "loaded by `achat-bench busy-room -n N -r 1`",
    "ngircd": "ngircd (Debian's package), penalties off (`MaxPenaltyTime = 0`), no "
    "per-address or channel limits, its write buffer per client as built",
    "inspircd": "InspIRCd (Debian's package), command rate, threshold and fake lag off, no "
    "per-address limits, its send and receive queues at their defaults",
}


def version(kind: str) -> str:
    """The daemon's version, as it prints it."""
    if kind == "achat":
        from importlib.metadata import version as dist_version

        return f"achat {dist_version('achat')}"
    if shutil.which(kind) is None:
        return kind
    done = subprocess.run([kind, "--version"], capture_output=True, text=True, check=False)
    words = (done.stdout + done.stderr).split()
    return " ".join(words[:2]) if words else kind


def run(kind: str, clients: int, seconds: float, warmup: float) -> Row:
    if kind == "achat":
        return run_achat(clients, seconds, warmup)
    return run_daemon(kind, clients, seconds, warmup)


def _cell(values: list[float], fmt: str, unit: str = "") -> str:
    """The lowest and highest of ``values`` ("4.2–5.0 ms"), or one if they read the same."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return (low if low == high else f"{low}–{high}") + unit


def table(
    runs: dict[tuple[str, int], list[Row]],
    servers: list[str],
    sizes: list[int],
    rounds: int,
    seconds: float,
) -> str:
    lines = [
        f"`python benchmarks/ircd.py --servers {','.join(servers)} "
        f"--sizes {','.join(map(str, sizes))} --rounds {rounds} --seconds {seconds:g}`: "
        f"one busy room of N members, each saying a 60-byte message a second, "
        f"{seconds:g} s measured after 2 s, each server in turn (the order turns each "
        f"round), pinned to CPU 0 and the load to CPU 1. A cell gives the lowest and "
        f"highest of the {rounds} rounds.",
        "",
        *(f"- **{k}** ({version(k)}): {SERVERS[k]}" for k in servers),
        "",
        "| N | server | delivered/s | delivered | p50 | p99 | p99.9 | server CPU | load CPU "
        "| server RSS | cut off |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for kind in servers:
            rows = runs[(kind, n)]
            cells = [
                _cell([r.delivered for r in rows], "{:,.0f}"),
                _cell([r.ratio * 100 for r in rows], "{:.2f}", " %"),
                _cell([r.p50 for r in rows], "{:.1f}", " ms"),
                _cell([r.p99 for r in rows], "{:.1f}", " ms"),
                _cell([r.p999 for r in rows], "{:.1f}", " ms"),
                _cell([r.server_cpu for r in rows], "{:.0f}", " %"),
                _cell([r.load_cpu for r in rows], "{:.0f}", " %"),
                _cell([r.rss_mib for r in rows], "{:.1f}", " MiB"),
                _cell([r.closed for r in rows], "{:,}"),
            ]
            lines.append(f"| {n:,} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    best: dict[str, Row | None] = {}
    for kind in servers:
        held = [n for n in sizes if all(r.sustains() for r in runs[(kind, n)])]
        top = max(held, default=None)
        best[kind] = None if top is None else min(runs[(kind, top)], key=lambda r: r.delivered)
        row = best[kind]
        lines.append(
            f"- {kind}: sustains no size measured (99.9 % delivered, p99 ≤ 250 ms, nobody "
            "cut off, in every round)"
            if row is None
            else f"- {kind}: sustains {row.clients:,} members in every round, "
            f"{row.delivered:,.0f} deliveries/s at the least"
            + (
                " (the largest room measured)"
                if row.clients == sizes[-1]
                else f"; not {_next(sizes, row.clients):,}"
            )
        )
        errors: dict[str, int] = {}
        for key, rows in runs.items():
            if key[0] == kind:
                for r in rows:
                    for reason, count in r.errors.items():
                        errors[reason] = errors.get(reason, 0) + count
        if errors:
            said = "; ".join(f"{reason} ×{count:,}" for reason, count in sorted(errors.items()))
            lines[-1] += f" (the server said, over all runs: {said})"
        lines[-1] += "."
    ours = best.get("achat")
    daemons = [(k, r) for k, r in best.items() if k != "achat" and r is not None]
    if ours is not None and daemons:
        kind, theirs = max(daemons, key=lambda kr: kr[1].delivered)
        lines.append(
            f"- achat against the better daemon ({kind}), in the largest room each sustains: "
            f"{ours.delivered / theirs.delivered:.2f} times the deliveries a second."
        )
    return "\n".join(lines)


def _next(sizes: list[int], n: int) -> int:
    return sizes[sizes.index(n) + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="achat,ngircd,inspircd")
    parser.add_argument("--sizes", default="300,1000,1500,2000,2500")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--update", type=Path, help="replace the ircd section of this file")
    args = parser.parse_args()
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    sizes = sorted(int(n) for n in args.sizes.split(","))
    if missing := [k for k in servers if k != "achat" and not shutil.which(k)]:
        sys.exit(
            f"ircd.py: not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})"
        )
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        sys.exit("ircd.py needs taskset and two CPUs: the server on the first, the load on others")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: dict[tuple[str, int], list[Row]] = {(k, n): [] for k in servers for n in sizes}
    for i in range(args.rounds):
        order = servers[i % len(servers) :] + servers[: i % len(servers)]
        for n in sizes:
            for kind in order:
                row = run(kind, n, args.seconds, args.warmup)
                runs[(kind, n)].append(row)
                print(
                    f"round {i + 1}, {n:,} members, {kind}: {row.delivered:,.0f}/s, "
                    f"{row.ratio * 100:.2f} %, p99 {row.p99:.1f} ms, server {row.server_cpu:.0f} %,"
                    f" load {row.load_cpu:.0f} %, cut off {row.closed}",
                    file=sys.stderr,
                )
                if args.json:
                    args.json.write_text(
                        json.dumps([r.__dict__ for rows in runs.values() for r in rows], indent=1)
                    )
    text = table(runs, servers, sizes, args.rounds, args.seconds)
    print(text)
    if args.update:
        replace_section(args.update, SECTION, text)


if __name__ == "__main__":
    main()
