"""The benchmark scripts still run against the code they measure (tiny numbers, no figures).

``make bench`` runs them for real; here each is loaded from ``benchmarks/`` and driven
just far enough to go through the server's code as the benchmark does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any
from xml.etree import ElementTree

import pytest

from achat.bench.cli import Result
from tests.helpers.procs import ServerProcess

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_say_cost_drives_the_registry_and_store_until_every_say_is_acked() -> None:
    say_cost = load("say_cost")
    # It polls until every say is stored and fanned out: a fan-out that never comes
    # (the registry's API moved under it) would poll forever.
    run = say_cost.registry_and_store(says=400, tick=100)
    loop_us, store_us = asyncio.run(asyncio.wait_for(run, timeout=30))
    assert loop_us > 0
    assert store_us >= 0
    # The store's commit alone: it checks that every row is there.
    assert say_cost.store_commit_us(says=450, tick=100) > 0


@pytest.mark.parametrize("stop", [0.0, 0.3])
def test_burst_takes_says_all_at_once_and_cuts_off_no_listener(stop: float) -> None:
    """400 KB said at once (20 talkers, ten messages of 2,000 characters each), over the
    smallest send limit the server takes, with the server stopped meanwhile or not:
    every say is acked or refused, and every listener gets every message acked."""
    burst = load("burst")
    run = burst.measure(
        listeners=5, talkers=20, says=10, text=2000, stop=stop, extra=("--sendq-limit", "196608")
    )
    assert run.acked + run.refused == run.said
    assert run.acked > 196608 // 2000  # more than the limit was taken
    assert run.cut_off == 0
    assert run.fewest == run.most == run.acked
    assert set(run.talker_errors) <= {"rate_limited"}
    assert any("queued for one connection" in line for line in run.warnings)


def test_arrival_times_a_busy_room_at_its_observers_sockets(tmp_path: Path) -> None:
    arrival = load("arrival")
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        result = arrival.measure(server.port, clients=4, observers=2, seconds=1.0, warmup=0.5)
    finally:
        server.stop()
    # Four clients saying once a second for a second: each observer group saw messages,
    # every one timed by the kernel's stamp, and the kernel's arrival is before the read.
    assert result["counted"] >= 2
    first_p50, last_p50, read_p50 = (
        result[k][0] for k in ("first_arrival", "last_arrival", "last_read")
    )
    assert 0 < first_p50 < 1000
    assert 0 < last_p50 <= read_p50
    assert result["lag"][0] >= 0
    assert 0 <= result["shared"] <= 1  # measured over the window, not left unknown
    assert result["load_delivered"] > 0.9


def test_row_layouts_times_each_layout() -> None:
    """Each of the five layouts is timed, the blob one with the tick's messages in a row,
    and the store's own last."""
    text = load("row_layouts").table(messages=450, tick=100)
    rows = [line for line in text.splitlines() if line.endswith(" µs |")]
    assert len(rows) == 5
    assert "100 messages in one blob" in rows[-2]
    assert "the store's (schema 5)" in rows[-1]


def _sweep_point(members: int, ratio: float = 1.0, p50: float | None = 2.0) -> Any:
    sweep = load("sweep")
    return sweep.Point(
        members=members,
        offered=members * members,
        delivered=members * members * ratio,
        ratio=ratio,
        p50=p50,
        p99=None if p50 is None else p50 * 3,
        p999=None if p50 is None else p50 * 4,
        server_cpu=90.0,
        load_cpu=80.0,
        generator_limit=False,
    )


def test_sweep_runs_achat_bench_at_each_size_and_reads_its_figures() -> None:
    sweep = load("sweep")
    points = sweep.measure((5, 3), seconds=1.0, warmup=0.3, settle=0.0, rate=5.0)
    assert [p.members for p in points] == [3, 5]  # smallest first
    for p in points:
        assert p.ratio == 1.0
        assert p.offered == p.delivered > 0
        assert p.offered % p.members == 0  # messages said times the room's members
        assert p.p50 is not None
        assert p.p99 is not None
        assert 0 < p.p50 <= p.p99
        assert p.cut_off == 0
        assert p.errors == ""
        assert p.server_cpu is not None
    text = sweep.table(points, 1.0)
    # A row is marked when its run noted that the load may have been the limit, as a
    # run this small does whenever one of its 25 says comes late (it said under 99 %).
    assert [line.split(" | ")[0] for line in text.splitlines() if line[:3] in ("| 3", "| 5")] == [
        f"| {p.members}" + (" ¹" if p.generator_limit else "") for p in points
    ]


def test_sweep_point_reads_the_notes_of_a_run_cut_short() -> None:
    sweep = load("sweep")
    result = asdict(
        Result(
            scenario="busy-room",
            params={"clients": 4000, "rate": 1.0},
            seconds=5.0,
            offered_per_s=12e6,
            delivered_per_s=2e6,
            delivered_ratio=0.17,
            latency_ms={"p50": 440.0, "p99": 1400.0, "p99.9": 1500.0},
            closed=3200,
            server_cpu_pct=98.0,
            load_cpu_pct=42.0,
            notes=[
                "errors from the server: sendq_exceeded ×3,200",
                "the generator may be the limit here: it offered 79% of ...",
            ],
        )
    )
    point = sweep.Point.from_result(result)
    assert point.members == 4000
    assert point.cut_off == 3200
    assert point.errors == "sendq_exceeded ×3,200"
    assert point.generator_limit
    row = next(line for line in sweep.table([point], 5.0).splitlines() if "4,000" in line)
    assert "4,000 ¹" in row
    assert "17.00 %" in row
    assert "| 3,200 | sendq_exceeded ×3,200 |" in row
    # Nothing delivered: no latency, which the chart then leaves out.
    result["latency_ms"] = {"p50": 0.0, "p99": 0.0, "p99.9": 0.0}
    assert sweep.Point.from_result(result).p99 is None


def test_sweep_chart_draws_every_size_hollow_where_it_fell_short() -> None:
    sweep = load("sweep")
    points = [_sweep_point(300), _sweep_point(2500, p50=30.0), _sweep_point(4000, ratio=0.2)]
    svg = ElementTree.fromstring(sweep.chart(points))  # well-formed, one document
    ns = "{http://www.w3.org/2000/svg}"
    circles = svg.findall(f"{ns}circle")
    # Three latency series and the delivered line, one marker each per size.
    assert len(circles) == 4 * 3
    hollow = [c for c in circles if c.get("fill") == "white"]
    assert len(hollow) == 4  # the size that fell short, in every series
    assert {float(c.get("cx", 0)) for c in hollow} == {max(float(c.get("cx", 0)) for c in circles)}
    texts = [t.text or "" for t in svg.iter(f"{ns}text")]
    assert "20 % delivered" in texts
    assert "target 5 ms" in texts
    assert "target 250 ms" in texts
    # Higher latency is drawn higher up (a smaller y), on the log scale.
    p99 = [c for c in circles if c.get("stroke") == "#d62728"]
    ys = [float(c.get("cy", 0)) for c in sorted(p99, key=lambda c: float(c.get("cx", 0)))]
    assert ys[0] > ys[1]


def test_sweep_chart_leaves_out_a_size_with_no_latency() -> None:
    sweep = load("sweep")
    svg = ElementTree.fromstring(sweep.chart([_sweep_point(300), _sweep_point(5000, 0.0, None)]))
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 3 * 1 + 2  # latency: the first size only; delivered: both
    with pytest.raises(ValueError, match="nothing to draw"):
        sweep.chart([])


def test_pauses_drives_the_refs_table_full_at_its_live_count() -> None:
    pauses = load("pauses")
    for shards in (1, 64):
        run = pauses.table_alone(live=3_000, churn=1.0, batch=100, shards=shards)
        assert run.claims == 6_000
        assert run.shards == shards
        # The clock runs so that --live refs stay in force (deadlines rounded up to a
        # second keep a second's worth more): expiry ran, and the full phase was full.
        assert 3_000 <= run.held <= 3_000 + 3_000 // 600 + 100
        assert run.longest_full_ms is not None
        assert run.full_us is not None
    grown = pauses.table_alone(live=3_000, churn=0.0, batch=100)
    assert grown.held == grown.claims == 3_000
    assert grown.longest_full_ms is None  # no full phase: nothing to report for it
    with pytest.raises(ValueError, match="multiple"):
        pauses.table_alone(live=3_050, churn=0.0, batch=100)


def test_pauses_counts_the_memory_each_ref_in_force_takes() -> None:
    # In a process of its own: in this one, memory freed by earlier tests would be
    # taken again without the process growing.
    script = (
        f"import json, sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import pauses; "
        "run = pauses.table_alone(live=200_000, churn=1.0, batch=1_000); "
        "print(json.dumps([run.rss_per_ref, run.rss_per_ref_full, pauses.report(run, None)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    grown, full, text = json.loads(done.stdout)
    # A key (a 22-character str, 80 bytes as allocated) and its receipt (64) at least,
    # and not twice what the reference machine measures at three million (194 B).
    assert 144 < grown < 400
    assert 144 < full < 400
    assert f"at 200,000 / at the end | {grown:.0f} B / {full:.0f} B |" in text


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"), reason="needs two CPUs"
)
def test_pauses_times_a_bystanders_pongs_under_ingest() -> None:
    pauses = load("pauses")
    affinity = os.sched_getaffinity(0)
    run = pauses.under_ingest(seconds=1.0)
    assert os.sched_getaffinity(0) == affinity  # the caller's CPUs given back
    assert run.acked_per_s > 0
    assert run.pings > 10
    assert 0 < run.pong_p50_ms <= run.pong_p99_ms <= run.pong_max_ms
    text = pauses.report(pauses.table_alone(300, 0.0, 100), run)
    assert f"**{run.pong_max_ms:.1f} ms**" in text
    assert "--churn 0 --batch 100 --shards 64 --seconds 1`" in text
    assert "stayed full" not in text  # --churn 0 has no full phase


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None,
    reason="floor.py pins its server to the first CPU and the load to the others",
)
def test_floor_serves_a_busy_room_that_achat_bench_checks() -> None:
    """The floor speaks enough of the protocol for achat-bench: every message said is
    delivered to every member, in seq order (its checking client would count a gap)."""
    floor = load("floor")
    run = floor.run_one("floor", clients=4, seconds=1.0, warmup=0.3)
    assert run.ratio == 1.0
    assert 0 < run.p50 <= run.p99 <= run.p999


def test_floor_table_compares_each_server_with_the_first() -> None:
    floor = load("floor")

    def run(p99: float) -> Any:
        return floor.Run(p50=p99 / 2, p99=p99, p999=p99 * 1.5, ratio=1.0, cpu=50.0)

    rounds = [
        {"achat": run(4.5), "floor": run(6.0)},
        {"achat": run(5.5), "floor": run(5.0)},
        {"achat": run(4.8), "floor": run(7.0)},
    ]
    text = floor.table(rounds, ["achat", "floor"], clients=300, seconds=10.0)
    assert "--rounds 3 --clients 300 --seconds 10 --kinds achat,floor" in text
    assert [
        line.split(" | ")[0] for line in text.splitlines() if line[:3] in ("| 1", "| 2", "| 3")
    ] == [
        "| 1",
        "| 2",
        "| 3",
    ]
    assert "- achat: p99 median 4.80 ms (4.50–5.50), under 5 ms in 2 of 3 runs" in text
    assert "- floor: p99 median 6.00 ms (5.00–7.00), under 5 ms in 1 of 3 runs" in text
    # The differences are -1.5, +0.5 and -2.2 ms: achat is lower in two, by 1.5 at the median.
    assert "- achat against floor: p99 lower in 2 of 3 rounds, by 1.50 ms" in text


def _pairs_runs(pairs: Any, cpus: Sequence[tuple[float, float]], effect: float) -> list[Any]:
    """Runs whose metric is 0.1 per per cent of CPU, the new version's ``effect`` more,
    and a little noise that depends on neither."""
    noise = [0.03, -0.02, 0.01, -0.04, 0.02, 0.0, -0.01, 0.03]
    runs = []
    for i, (base_cpu, new_cpu) in enumerate(cpus):
        runs.append(pairs.Run("base", 0.1 * base_cpu - 0.5 + noise[i % 8], base_cpu))
        runs.append(pairs.Run("new", 0.1 * new_cpu - 0.5 + effect - noise[(i + 3) % 8], new_cpu))
    return runs


def _least_squares(runs: list[Any]) -> tuple[float, float, float, float]:
    """The fit worked out in exact fractions, by elimination: a, b, c and c's error."""
    rows = [(Fraction(1), Fraction(r.cpu), Fraction(r.version == "new")) for r in runs]
    ys = [Fraction(r.metric) for r in runs]
    m = [[sum((x[i] * x[j] for x in rows), Fraction(0)) for j in range(3)] for i in range(3)]
    # [XᵀX | Xᵀy | I]: eliminated, the fit and the inverse's corner come out together.
    aug: list[list[Fraction]] = [
        m[i]
        + [sum((x[i] * y for x, y in zip(rows, ys, strict=True)), Fraction(0))]
        + [Fraction(i == k) for k in range(3)]
        for i in range(3)
    ]
    for col in range(3):
        pivot = next(r for r in range(col, 3) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        aug[col] = [v / aug[col][col] for v in aug[col]]
        for r in range(3):
            if r != col:
                aug[r] = [v - aug[r][col] * w for v, w in zip(aug[r], aug[col], strict=True)]
    a, b, c = (aug[i][3] for i in range(3))
    residuals = [y - (a + b * x[1] + c * x[2]) for x, y in zip(rows, ys, strict=True)]
    variance = sum((e * e for e in residuals), Fraction(0)) / (len(runs) - 3)
    return float(a), float(b), float(c), math.sqrt(variance * aug[2][6])


def test_pairs_fit_is_least_squares() -> None:
    pairs = load("pairs")
    cpus = [(55, 49), (52, 50), (48, 46), (50, 49), (53, 54), (96, 91), (51, 47), (94.5, 92)]
    runs = _pairs_runs(pairs, cpus, effect=-0.3)
    runs[3] = pairs.Run("new", runs[3].metric + 0.4, runs[3].cpu)  # one run way off
    fitted = pairs.fit(runs)
    a, b, c, se = _least_squares(runs)
    assert fitted.intercept == pytest.approx(a, rel=1e-9)
    assert fitted.per_cpu == pytest.approx(b, rel=1e-9)
    assert fitted.new == pytest.approx(c, rel=1e-9)
    assert fitted.new_se == pytest.approx(se, rel=1e-9)
    assert se > 0.05  # the run that is off shows in the error


def test_pairs_fit_tells_a_change_from_quicker_spells() -> None:
    pairs = load("pairs")
    # The new version met quicker spells in every pair but one, and does nothing itself.
    cpus = [(55, 49), (52, 50), (48, 46), (50, 49), (53, 54), (56, 54), (51, 47), (54, 50)]
    lucky = _pairs_runs(pairs, cpus, effect=0.0)
    text = pairs.report(list(zip(lucky[::2], lucky[1::2], strict=True)), "p99", "main", "x")
    assert "- new lower in 7 of 8 pairs, higher in 1;" in text  # what the medians say
    fitted = pairs.fit(lucky)
    assert abs(fitted.new) < 0.05  # what the fit says
    assert abs(fitted.per_cpu - 0.1) < 0.01
    assert f"- with the server's CPU fitted out: new {fitted.new:+,.3f}" in text
    # A change worth -0.3 on the same spells is found as such.
    better = pairs.fit(_pairs_runs(pairs, cpus, effect=-0.3))
    assert abs(better.new + 0.3) < 0.05
    # And one that meets slower spells is not blamed for them.
    slower = pairs.fit(_pairs_runs(pairs, [(b, n + 6) for b, n in cpus], effect=0.0))
    assert abs(slower.new) < 0.05
    # Nor does a busy server's CPU, near a full core, keep the fit from telling.
    busy = pairs.fit(_pairs_runs(pairs, [(b + 40, n + 40) for b, n in cpus], effect=-0.3))
    assert busy is not None
    assert abs(busy.new + 0.3) < 0.05


def test_pairs_fit_declines_what_it_cannot_tell() -> None:
    pairs = load("pairs")
    assert pairs.fit(_pairs_runs(pairs, [(50, 50)], effect=0.0)) is None  # two runs
    # The CPU never moved: its slope and the intercept cannot be told apart.
    flat = _pairs_runs(pairs, [(50, 50)] * 4, effect=0.1)
    assert pairs.fit(flat) is None
    text = pairs.report(list(zip(flat[::2], flat[1::2], strict=True)), "p99", "a", "b")
    assert "too few runs, or no spread, to tell" in text
    # The CPU moved, but only with the version: the two cannot be told apart either.
    confounded = [
        pairs.Run(r.version, r.metric, 60.0 if r.version == "new" else 50.0) for r in flat
    ]
    assert pairs.fit(confounded) is None


def test_pairs_takes_only_what_it_can_fit() -> None:
    pairs = load("pairs")
    assert pairs.check_scenario(["busy-room", "-n", "300"], "p99") is None
    assert pairs.check_scenario(["ingest"], "acked_per_s") is None
    assert "no --port" in pairs.check_scenario(["busy-room", "--port", "7000"], "p99")
    assert "no --port" in pairs.check_scenario(["busy-room", "--port=7000"], "p99")
    assert "one of" in pairs.check_scenario(["idle", "-n", "10000"], "p99")
    assert "one of" in pairs.check_scenario([], "p99")
    assert "does not measure acked_per_s" in pairs.check_scenario(["busy-room"], "acked_per_s")


def test_pairs_runs_the_code_of_each_version(tmp_path: Path) -> None:
    """Each run imports its own copy of achat, server and load alike: a copy that
    cannot start fails its run instead of silently measuring the installed code."""
    pairs = load("pairs")
    scenario = ["busy-room", "-n", "3", "-r", "2", "--duration", "0.5", "--warmup", "0.3"]
    good = pairs.copy_out("worktree", tmp_path / "good")
    marks = tmp_path / "imported"
    # The copy's server package says which programs imported it.
    with (good / "achat" / "server" / "__init__.py").open("a") as f:
        f.write(f"\nimport sys as _s\nwith open({str(marks)!r}, 'a') as _f:\n")
        f.write("    _f.write(_s.argv[0] + '\\n')\n")
    run = pairs.run_one("new", good, scenario, "p99")
    assert run.version == "new"
    assert run.metric > 0
    assert run.cpu >= 0
    assert any(line.endswith("achat-server") for line in marks.read_text().splitlines())
    broken = pairs.copy_out("worktree", tmp_path / "broken")
    (broken / "achat" / "__init__.py").write_text("raise SystemExit('not this copy')\n")
    with pytest.raises(RuntimeError, match="achat-bench failed with base"):
        pairs.run_one("base", broken, scenario, "p99")


@pytest.mark.skipif(
    not (Path(__file__).resolve().parent.parent / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout",
)
def test_pairs_copies_a_git_revision_out(tmp_path: Path) -> None:
    pairs = load("pairs")
    src = pairs.copy_out("HEAD", tmp_path / "head")
    assert (src / "achat" / "server" / "session.py").is_file()
    with pytest.raises(SystemExit, match="cannot copy out 'no-such-revision-anywhere'"):
        pairs.copy_out("no-such-revision-anywhere", tmp_path / "none")


# -- ircd.py: achat against the C IRC daemons ----------------------------------------------


def _line(stamp: int, nick: str = "b1u0", warm: bool = False) -> bytes:
    """A message as an IRC daemon sends it to a member."""
    ircd = load("ircd")
    said: bytes = ircd.privmsg(stamp, warm)
    return b":%s!~%s@127.0.0.1 " % (nick.encode(), nick.encode()) + said


def test_ircd_privmsg_carries_its_stamp_in_a_text_of_achat_bench_s_size() -> None:
    ircd = load("ircd")
    said = ircd.privmsg(1_700_000_000_123_456_789)
    assert said.startswith(b"PRIVMSG #bench :t=1700000000123456789 x")
    assert said.endswith(b"x\r\n")
    assert len(said.split(b" :", 1)[1]) - 2 == ircd.TEXT_SIZE
    assert ircd.privmsg(5, warm=True).startswith(b"PRIVMSG #bench :w=5 x")
    line = _line(1_700_000_000_123_456_789)
    assert ircd.stamp_at(line, line.find(ircd.MARK)) == 1_700_000_000_123_456_789


def test_ircd_tally_counts_the_window_s_messages_of_a_read_and_spreads_their_latencies() -> None:
    ircd = load("ircd")
    ms = 1_000_000
    tally = ircd.Tally()
    # Out of order, as a daemon that fell behind relays them; a warm-up message among them.
    stamps = [1_000 * ms, 1_004 * ms, 998 * ms, 1_002 * ms]
    chunk = b"".join(_line(s) for s in stamps[:2]) + _line(990 * ms, warm=True)
    chunk += b"".join(_line(s) for s in stamps[2:])
    chunk += b":bench.achat.invalid NOTICE b1u1 :not a message\r\n"
    count = chunk.count(ircd.MARK)
    assert count == 4
    tally.read(chunk, count, 1_010 * ms)
    assert tally.delivered == 4
    assert tally.latency.total == 0  # spread after the window, not in it
    tally.read(_line(1_020 * ms), 1, 1_021 * ms)
    tally.fold()
    assert tally.delivered == tally.latency.total == 5
    assert 1 * ms <= tally.latency.quantile(0.0) <= 1 * ms * 65 / 64
    # The first read: from its first and last stamps (10 and 8 ms before it) to within 1/64,
    # not from its oldest (12 ms) or newest (6 ms), which are in between.
    assert 8 * ms <= tally.latency.quantile(0.3) <= 8 * ms * 65 / 64
    assert 10 * ms <= tally.latency.quantile(1.0) <= 10 * ms * 65 / 64


def test_ircd_answers_the_server_s_pings() -> None:
    ircd = load("ircd")
    chunk = b":x PRIVMSG #bench :t=1 x\r\nPING :bench.achat.invalid\r\nPING 123\r\n"
    assert ircd.pongs(chunk) == b"PONG :bench.achat.invalid\r\nPONG 123\r\n"
    assert ircd.pongs(b":x PRIVMSG #bench :t=1 PING\r\n") == b""


def _ircd_row(ircd: ModuleType, server: str, clients: int, **changes: Any) -> Any:
    values: dict[str, Any] = {
        "server": server,
        "clients": clients,
        "offered": clients * clients,
        "delivered": clients * clients,
        "ratio": 1.0,
        "p50": 1.0,
        "p99": 5.0,
        "p999": 8.0,
        "server_cpu": 50.0,
        "load_cpu": 40.0,
        "rss_mib": 10.0,
        "closed": 0,
        "join_s": 0.5,
    }
    values.update(changes)
    return ircd.Row(**values)


def test_ircd_table_finds_the_largest_room_each_server_sustains_in_every_round() -> None:
    ircd = load("ircd")
    sizes = [1000, 2000, 2500]
    runs = {
        ("achat", 1000): [_ircd_row(ircd, "achat", 1000)] * 2,
        ("achat", 2000): [_ircd_row(ircd, "achat", 2000)] * 2,
        ("achat", 2500): [
            _ircd_row(ircd, "achat", 2500, delivered=6_000_000.0),
            _ircd_row(ircd, "achat", 2500, delivered=6_200_000.0, p99=240.0),
        ],
        ("ngircd", 1000): [_ircd_row(ircd, "ngircd", 1000, delivered=999_000.0)] * 2,
        # Sustained in one round of two: not counted.
        ("ngircd", 2000): [
            _ircd_row(ircd, "ngircd", 2000),
            _ircd_row(ircd, "ngircd", 2000, ratio=0.95, closed=12, errors={"ERROR :x": 12}),
        ],
        ("ngircd", 2500): [_ircd_row(ircd, "ngircd", 2500, p99=3000.0)] * 2,
    }
    text = ircd.table(runs, ["achat", "ngircd"], sizes, rounds=2, seconds=10.0)
    assert "--servers achat,ngircd --sizes 1000,2000,2500 --rounds 2 --seconds 10`" in text
    assert "| 2,500 | achat | 6,000,000–6,200,000 | 100.00 % | 1.0 ms | 5.0–240.0 ms |" in text
    assert "| 2,000 | ngircd | 4,000,000 | 95.00–100.00 % |" in text
    assert (
        "- achat: sustains 2,500 members in every round, 6,000,000 deliveries/s at the least "
        "(the largest room measured)." in text
    )
    assert (
        "- ngircd: sustains 1,000 members in every round, 999,000 deliveries/s at the least; "
        "not 2,000 (the server said, over all runs: ERROR :x ×12)." in text
    )
    assert "the better daemon (ngircd), in the largest room each sustains: 6.01 times" in text


@pytest.mark.parametrize("daemon", ["ngircd", "inspircd"])
@pytest.mark.skipif(shutil.which("taskset") is None, reason="ircd.py pins its daemon")
def test_ircd_loads_a_real_daemon_s_busy_room(daemon: str) -> None:
    """Against the real daemon (.ci/run installs both): every member joins, every message
    said inside the window reaches every other member, and its latencies are counted."""
    if shutil.which(daemon) is None:
        pytest.skip(f"{daemon} is not installed (apt-get install {daemon})")
    ircd = load("ircd")
    row = ircd.run_daemon(daemon, clients=5, seconds=1.0, warmup=0.3)
    assert row.server == daemon
    assert row.closed == 0
    assert row.ratio == 1.0
    assert row.offered == row.delivered > 0
    assert 0 < row.p50 <= row.p99 <= row.p999
    assert row.rss_mib > 0
