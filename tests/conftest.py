"""Shared test set-up: Hypothesis profiles and a real server on a loopback port."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import settings

from achat.server.app import Server
from achat.server.config import ServerConfig
from achat.server.limits import FloodPolicy
from achat.server.session import SessionLimits
from achat.store.memory import MemoryStore

# No per-example deadline: a loaded CI machine must not turn a slow example into a failure.
settings.register_profile("default", deadline=None)
settings.register_profile("fuzz", deadline=None, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def no_achat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``ACHAT_*`` variable of the shell that runs the tests reaches them: servers and
    clients started here, in this process or as children, would take them for options
    (a developer's ``ACHAT_PASSWORD`` would turn every test's server away)."""
    for name in [name for name in os.environ if name.startswith("ACHAT_")]:
        monkeypatch.delenv(name)


def make_config(port: int = 0, **limits: Any) -> ServerConfig:
    """A loopback config with flood limits off unless a test sets them (tests send bursts)."""
    limits.setdefault("flood", FloodPolicy(rate=0))
    return ServerConfig(host="127.0.0.1", port=port, limits=SessionLimits(**limits))


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A started server with an in-memory store on 127.0.0.1 and a free port."""
    srv = Server(make_config(), MemoryStore())
    await srv.start()
    yield srv
    # close() may wait close_timeout (5 s) for a peer that does not read; never forever.
    async with asyncio.timeout(10):
        await srv.close()
