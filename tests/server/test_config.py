"""What the server's configuration says about the memory its refs may take."""

from __future__ import annotations

import logging

import pytest

from achat.server.config import REF_BYTES, ServerConfig
from achat.server.limits import FloodPolicy
from achat.server.session import SessionLimits

GIB = 2**30


def config(max_clients: int = 10_000, rate: float = 5.0, burst: float = 10.0) -> ServerConfig:
    flood = FloodPolicy(rate=rate, burst=burst)
    return ServerConfig(max_clients=max_clients, limits=SessionLimits(flood=flood))


def test_the_refs_bound_is_every_client_at_the_flood_limit_for_ten_minutes() -> None:
    # 601 s: a ref's deadline is rounded up to the next second; the burst comes on top.
    assert config().refs_memory_bound() == 10_000 * (5 * 601 + 10) * REF_BYTES
    assert config().refs_memory_bound() == ServerConfig().refs_memory_bound()  # defaults
    assert config(max_clients=1_000, rate=2).refs_memory_bound() == 1_000 * 1_212 * REF_BYTES


def test_no_flood_limit_has_no_bound() -> None:
    assert config(rate=0).refs_memory_bound() is None
    level, line = config(rate=0).memory_warning(64 * GIB) or (None, "")
    assert level == logging.INFO
    assert "--rate 0" in line
    assert f"{REF_BYTES} B a message" in line


def test_a_bound_over_half_the_memory_is_warned_of_with_its_figures() -> None:
    bound = config().refs_memory_bound()
    assert bound is not None
    assert config().memory_warning(2 * bound) is None  # exactly half: room enough
    assert config().memory_warning(None) is None  # the machine's memory unknown
    level, line = config().memory_warning(2 * bound - 1) or (None, "")
    assert level == logging.WARNING
    assert "--max-clients 10000 and --rate 5" in line
    assert f"up to {bound / GIB:.1f} GiB" in line
    assert f"of the {(2 * bound - 1) / GIB:.1f} GiB this server may use" in line


@pytest.mark.parametrize(("max_clients", "rate"), [(1_000, 2.0), (200, 5.0), (10_000, 0.1)])
def test_smaller_limits_fit_a_small_machine(max_clients: int, rate: float) -> None:
    assert config(max_clients=max_clients, rate=rate).memory_warning(1 * GIB) is None
