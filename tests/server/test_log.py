"""Log lines: whatever a peer chose, one event stays one line."""

from __future__ import annotations

import logging

import pytest

from achat.protocol import messages as m
from achat.server.log import esc
from achat.server.registry import Registry
from achat.store.memory import MemoryStore
from tests.server.test_registry import FakePeer


@pytest.mark.parametrize(
    "hostile",
    ["a\nFAKE 2026 INFO admin logged in", "x\r\x1b[2K", "bidi\u202etxt", "spa ce", "'quote\""],
)
def test_esc_keeps_one_line_and_no_controls(hostile: str) -> None:
    """Escaped values have no newline, carriage return, escape or bidi character left."""
    shown = esc(hostile)
    assert shown.isprintable()
    assert "\n" not in shown
    assert "\r" not in shown


def test_plain_values_are_left_alone() -> None:
    """Ordinary nicks and rooms are logged as they are; long values are cut."""
    assert esc("ana") == "ana"
    assert len(esc("x" * 1000)) < 250


def test_client_name_in_hello_cannot_forge_a_line(caplog: pytest.LogCaptureFixture) -> None:
    """A hello whose client name holds a newline produces exactly one log record line."""
    reg = Registry(MemoryStore(), clock=lambda: 0)
    with caplog.at_level(logging.INFO, logger="achat.server"):
        reg.register(FakePeer(), m.Hello(nick="ana", version=1, client="x\nINFO forged line"))
    assert len(caplog.records) == 1
    assert "\n" not in caplog.records[0].getMessage()
