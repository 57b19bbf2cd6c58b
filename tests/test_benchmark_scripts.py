"""The benchmark scripts still run against the code they measure (tiny numbers, no figures).

``make bench`` runs them for real; here each is loaded from ``benchmarks/`` and driven
just far enough to go through the server's code as the benchmark does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
