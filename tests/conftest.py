"""Shared test set-up: Hypothesis profiles and a real server on a loopback port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from achat.server.app import Server
from achat.server.config import ServerConfig
from achat.server.session import SessionLimits
from achat.store.memory import MemoryStore

# No per-example deadline: a loaded CI machine must not turn a slow example into a failure.
settings.register_profile("default", deadline=None)
settings.register_profile("fuzz", deadline=None, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def make_config(**limits: float) -> ServerConfig:
    """A loopback config on port 0 with flood limits off unless a test sets them."""
    return ServerConfig(host="127.0.0.1", port=0, limits=SessionLimits(**limits))  # type: ignore[arg-type]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A started server with an in-memory store on 127.0.0.1 and a free port."""
    srv = Server(make_config(), MemoryStore())
    await srv.start()
    yield srv
    await srv.close()
