"""Logging helpers: peer-controlled strings are escaped so one event stays one log line."""

from __future__ import annotations

__all__ = ["esc"]

_MAX_LOGGED = 200


def esc(value: str) -> str:
    """``value`` with every non-printable character escaped, cut to 200 characters."""
    if len(value) > _MAX_LOGGED:
        value = value[:_MAX_LOGGED] + "…"
    if value.isprintable() and " " not in value:
        return value
    # repr() escapes controls, newlines, bidi and other non-printables; keep its quotes
    # so that spaces cannot make one field look like two.
    return repr(value)
