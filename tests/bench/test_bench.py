"""A smoke run of achat-bench with tiny numbers: the tool works end to end."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from achat.bench.cli import (
    Result,
    _answer_pings,
    _load_cpu,
    _note_ceiling,
    _note_trouble,
    _Server,
    _summarise,
    parser,
)
from achat.bench.load import KEEPALIVE_REF, NEAR_NS, WorkerReport
from achat.protocol.frames import encode_frame
from tests.helpers.procs import ServerProcess, script


@pytest.mark.parametrize(
    "argv",
    [
        ["busy-room", "-n", "4", "-r", "5"],
        ["many-rooms", "-n", "6", "-k", "3", "-r", "5"],
        ["idle", "-n", "5"],
        ["ingest", "--pipeline", "16"],
        ["self-check", "-n", "4"],
    ],
    ids=lambda a: a[0],
)
def test_scenario_smoke(tmp_path: Path, argv: list[str]) -> None:
    """Each scenario starts its own server, joins every client and reports JSON figures."""
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            script("achat-bench"),
            *argv,
            "-d",
            "1",
            "--warmup",
            "0.3",
            "--procs",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    clients = int(argv[2]) if argv[0] != "ingest" else 1
    assert result["joined"] == clients
    assert result["errors"] == 0
    assert "| " + argv[0] in run.stdout
    if argv[0] == "idle":
        assert result["rss_per_client_kib"] is not None
    elif argv[0] == "self-check":
        # Its sink never stops sending: the run ends with the window, without a drain,
        # and the checking clients' counts still agree (they compare at stamps).
        assert result["delivered_per_s"] > 0
        assert not any("disagree" in note for note in result["notes"])
    elif argv[0] == "ingest":
        assert result["acked_per_s"] > 0
    else:
        assert result["sent"] > 0
        room = {"busy-room": 4, "many-rooms": 3}[argv[0]]
        # Offered is what was said inside the 1 s window, times the room's members.
        assert result["offered_per_s"] == result["sent"] * room
        # Every message said in the window was read, counted by seq, and the clients
        # that counted every frame as well found the seqs right.
        assert result["delivered_ratio"] == 1.0
        assert not any("disagree" in note for note in result["notes"])
        assert result["latency_ms"]["p99"] > 0


def test_a_server_it_starts_listens_on_the_port_it_names() -> None:
    """The server achat-bench starts listens where its port file says, and is gone,
    with its data, once stopped."""
    server = _Server(["--store", "memory"], None)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(encode_frame(b'{"type":"hello","nick":"probe","version":1}'))
            assert b'"welcome"' in sock.recv(65536)
    finally:
        server.stop()
    assert server.proc.returncode is not None
    assert not Path(server.tmp.name).exists()


def test_a_server_that_does_not_start_stops_the_run() -> None:
    """When its server exits at start (here, a bad option), achat-bench says so and
    stops, rather than run the load against nothing."""
    with pytest.raises(
        SystemExit, match=r"^achat-bench: the server exited \(2\) before listening$"
    ):
        _Server(["--rate", "-1"], None)


def test_errors_by_code_and_lost_connections_are_noted() -> None:
    """A report says what went wrong, adding up the workers, and says nothing otherwise."""
    fine = WorkerReport()
    result = Result("busy-room", {}, 1.0)
    _note_trouble(result, [fine, fine])
    assert result.notes == []
    one = WorkerReport(errors=3, codes={"rate_limited": 2, "unknown": 1}, closed=1)
    other = WorkerReport(errors=2, codes={"rate_limited": 2}, closed=2)
    _note_trouble(result, [one, fine, other])
    assert result.notes[0] == "errors from the server: rate_limited ×4, unknown ×1"
    assert result.notes[1].startswith("3 connection(s) ended before the run did")
    # Checking clients whose frames and seqs disagree: the run is not to be trusted.
    result = Result("busy-room", {}, 1.0)
    _note_trouble(result, [WorkerReport(checked=3), WorkerReport(checked=2, unaccounted=7)])
    assert len(result.notes) == 1
    assert result.notes[0].startswith("frames and seqs disagree: 5 client(s) that counted")
    assert "found 7 that the seqs do not account for" in result.notes[0]
    # Stamps out of order by more than the count at the window's start allows.
    result = Result("busy-room", {}, 1.0)
    _note_trouble(result, [WorkerReport(disorder_ns=NEAR_NS - 1)])
    assert result.notes == []
    _note_trouble(result, [WorkerReport(disorder_ns=NEAR_NS + 2 * 10**7)])
    assert result.notes[0].startswith("stamps out of order by up to 120 ms within a read")
    # A drain that gave up: what was still on the way counts as lost, and the run says so.
    result = Result("busy-room", {}, 1.0)
    _note_trouble(result, [fine, WorkerReport(drained=False)])
    assert result.notes == [
        "1 worker(s) gave up after 10 s waiting for what was said in the window: "
        "messages still on the way then count as not delivered"
    ]


def test_self_check_says_whether_the_sink_or_the_generator_set_its_figure() -> None:
    result = Result("self-check", {}, 2.0)
    busy = WorkerReport(delivered=8_000_000, cpu_seconds=1.9, window_seconds=2.0)
    _note_ceiling(result, [busy], duration=2.0)
    assert result.notes == ["a sink floods the generator; this is the most it can count"]
    # Two workers, each alone on its CPU at half of it: 2 M/s each, 4 M/s per CPU second.
    result = Result("self-check", {}, 2.0, load_cpu_pct=50.0)
    idle = [
        WorkerReport(delivered=4_000_000, cpu_seconds=1.0, window_seconds=2.0, cpu=cpu)
        for cpu in (1, 2)
    ]
    _note_ceiling(result, idle, duration=2.0)
    assert len(result.notes) == 1
    assert "was the limit" in result.notes[0]
    assert "about 8.0 M deliveries/s" in result.notes[0]
    # The same two sharing one CPU kept it busy: that is the generator's ceiling.
    for report in idle:
        report.cpu = 1
    result = Result("self-check", {}, 2.0)
    _note_ceiling(result, idle, duration=2.0)
    assert result.notes == ["a sink floods the generator; this is the most it can count"]
    assert _load_cpu(idle) == 100.0


def test_offered_is_what_was_said_and_trouble_is_noted() -> None:
    """The summary offers what was said in the window, not the nominal rate."""
    args = argparse.Namespace(duration=2.0, scenario="busy-room", clients=2, rate=100.0)
    behind = WorkerReport(
        sent=150,
        delivered=600,
        errors=1,
        codes={"rate_limited": 1},
        cpu_seconds=1.9,
        window_seconds=2.0,
    )
    result = Result("busy-room", {}, 2.0)
    _summarise(args, result, [behind], room_size=4)  # a rate of 100/s would offer 800/s
    assert result.offered_per_s == 300
    assert result.delivered_ratio == 1.0
    assert result.errors == 1
    assert result.load_cpu_pct == 95.0
    assert result.notes[0] == "errors from the server: rate_limited ×1"
    # It said less than planned: its clients' timers ran late, so the load is the limit.
    assert len(result.notes) == 2
    assert "generator may be the limit" in result.notes[1]
    assert "37.5% of the 800 deliveries/s planned" in result.notes[1]
    assert "95%" in result.notes[1]


@pytest.mark.parametrize(
    ("sent", "cpu_seconds", "noted"),
    [
        (400, 1.0, False),  # all that was planned, half a CPU: the server is measured
        (397, 1.0, False),  # within 1 %: a window's edges cut a few messages either way
        (395, 1.0, True),  # 1.25 % short: the clients' timers ran late
        (400, 1.8, True),  # all of it, but with no CPU to spare
    ],
)
def test_the_generator_is_named_when_it_may_be_the_limit(
    sent: int, cpu_seconds: float, noted: bool
) -> None:
    """A note says so when the load fell short of its plan or its worker had no CPU left."""
    args = argparse.Namespace(duration=2.0, scenario="busy-room", clients=2, rate=100.0)
    report = WorkerReport(
        sent=sent, delivered=sent * 2, cpu_seconds=cpu_seconds, window_seconds=2.0
    )
    result = Result("busy-room", {}, 2.0)
    _summarise(args, result, [report], room_size=2)
    assert any("generator may be the limit" in n for n in result.notes) == noted


def test_the_sink_answers_every_keep_alive_ping_however_it_is_split() -> None:
    """self-check's sink pongs, or its clients would search every read for the pong."""
    ping = encode_frame(b'{"type":"ping","ref":"%s"}' % KEEPALIVE_REF.encode())

    class Writer:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    async def answers(reads: list[bytes]) -> bytes:
        reader = asyncio.StreamReader()
        writer = Writer()
        task = asyncio.create_task(_answer_pings(reader, writer))  # type: ignore[arg-type]
        for data in reads:
            reader.feed_data(data)
            await asyncio.sleep(0)  # one read per piece
        reader.feed_eof()
        await task
        return writer.data

    stream = ping + encode_frame(b'{"type":"say","room":"busy","text":"t=1 x","ref":"1"}') + ping
    for at in range(1, len(stream)):
        answered = asyncio.run(answers([stream[:at], stream[at:]]))
        assert answered.count(b'{"type":"pong"') == 2, at


def test_one_worker_per_cpu_the_load_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default --procs counts the CPUs this process may run on, not the machine's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert parser().parse_args(["busy-room"]).procs == 1  # CPU 0 is the server's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert parser().parse_args(["busy-room"]).procs == 4


def test_clients_keep_a_short_idle_timeout_server_with_their_pings(tmp_path: Path) -> None:
    """Against a real server that drops a client after 1 s of silence, idle clients stay
    with a keep-alive under it, and without one are dropped, each with idle_timeout."""
    server = ServerProcess(tmp_path / "server", "--idle-timeout", "1")
    server.start()
    try:

        def bench(keepalive: str, out: Path) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [
                    *(script("achat-bench"), "idle", "-n", "4", "-k", "2", "-d", "2"),
                    *("--warmup", "0.2", "--procs", "1", "--port", str(server.port)),
                    *("--keepalive", keepalive, "--json", str(out)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        runs = {
            k: (bench(k, tmp_path / f"{k}.json"), tmp_path / f"{k}.json") for k in ("0.3", "60")
        }
        results = {}
        for keepalive, (proc, out) in runs.items():
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
            results[keepalive] = json.loads(out.read_text())
    finally:
        server.stop()
    kept = results["0.3"]
    assert (kept["joined"], kept["closed"], kept["errors"]) == (4, 0, 0)
    dropped = results["60"]
    assert (dropped["joined"], dropped["closed"], dropped["errors"]) == (4, 4, 4)
    assert "errors from the server: idle_timeout ×4" in dropped["notes"]


def test_keepalive_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["idle", "--keepalive", "0"])


def test_ingest_against_a_running_server_fits_its_send_queue(tmp_path: Path) -> None:
    """Against a server it did not start (whose send queue is the default 1 MiB), ingest
    keeps no more says in flight than their replies fit in under the quarter of it past
    which the server refuses says, and says what a deeper pipeline would need: it is
    not cut off with sendq_exceeded, and its replies never swamp the server."""
    server = ServerProcess(tmp_path / "server", "--rate", "0")
    server.start()
    out = tmp_path / "ingest.json"
    try:
        run = subprocess.run(
            [
                *(script("achat-bench"), "ingest", "-d", "1", "--warmup", "0.3"),
                *("--port", str(server.port), "--json", str(out)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["errors"], result["closed"]) == (0, 0)
    assert result["acked_per_s"] > 0
    assert result["params"]["pipeline"] == 512
    assert any("--sendq-limit must be at least 1048576" in note for note in result["notes"])
    assert "bytes queued for one connection" not in server.log.read_text()


def _read_until(stream: IO[bytes], mark: bytes, seen: bytearray, timeout: float = 60) -> None:
    """Read ``stream`` (achat-bench's progress) into ``seen`` until ``mark`` shows."""
    deadline = time.monotonic() + timeout
    while mark not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {mark!r} in {timeout} s: {bytes(seen)[-2000:]!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"achat-bench ended before {mark!r}: {bytes(seen)[-2000:]!r}")
        seen += chunk


#: How long the server stays stopped past the window's end in the test of a stall: longer
#: than the quiet that once ended achat-bench's drain (0.3 s).
STALL_PAST_END = 1.0


@pytest.mark.parametrize("procs", [1, 2])
def test_a_stall_of_the_server_across_the_windows_end_loses_no_deliveries(
    tmp_path: Path, procs: int
) -> None:
    """The server stopped (SIGSTOP) from the window's middle to past its end: what was
    said meanwhile reaches everyone once it goes on, and the drain waits for it rather
    than take the quiet for the end (it counted 91 % so, in runs by hand), whichever
    worker's clients said it."""
    # A connection queued for writing just before the stop would look 1 s behind after
    # it, and the server would refuse says for a while (--write-lag, 0.5 s by default).
    server = ServerProcess(tmp_path / "server", "--write-lag", "30")
    server.start()
    assert server.proc is not None
    out = tmp_path / "stall.json"
    bench = subprocess.Popen(
        [
            *(script("achat-bench"), "busy-room", "-n", "20", "-r", "10"),
            *("--duration", "2", "--warmup", "0.3", "--procs", str(procs)),
            *("--port", str(server.port), "--json", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert bench.stderr is not None
    progress = bytearray()
    try:
        _read_until(bench.stderr, b"/2 s  sent", progress)  # the window's first tick: 1 s in
        if b"  2.0/2 s" in progress:  # the first tick came at the window's end
            pytest.skip("the machine was too slow to stop the server inside the window")
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            _read_until(bench.stderr, b"  2.0/2 s", progress)  # its end (a tick's time stops there)
            # The stall goes on past it, or until achat-bench ends without what it
            # stalled (the drain gave up).
            with contextlib.suppress(subprocess.TimeoutExpired):
                bench.wait(STALL_PAST_END)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        _, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
        server.stop()
    assert bench.returncode == 0, (bytes(progress) + err)[-2000:]
    result = json.loads(out.read_text())
    assert (result["errors"], result["closed"]) == (0, 0)
    assert result["offered_per_s"] > 0
    assert result["delivered_ratio"] == 1.0
