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
