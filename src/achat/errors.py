"""The exceptions achat raises, all rooted at :class:`AchatError`.

The tree::

    AchatError
    ├── ProtocolError            a wire-level error with a protocol v1 ``code``
    │   ├── FrameError           framing broke (bad length): always fatal
    │   └── PeerRejected         a well-formed frame the peer may not send now
    ├── ServerError              the server refused us with an ``error`` frame
    │                            (raised by the client side)
    └── ConnectionClosed         the other side went away

A :class:`ProtocolError` says whose fault it was: ``peer_fault`` is true when
the other side sent something wrong (a bad frame, an invalid nick), false when
we hit our own limit or bug. Each one carries the wire ``code`` of the contract
so that a server can answer with exactly that code, and ``fatal`` telling
whether the connection must close after it.
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "FATAL_CODES",
    "AchatError",
    "ConnectionClosed",
    "FrameError",
    "PeerRejected",
    "ProtocolError",
    "ServerError",
]

#: Every error code of protocol v1.
ERROR_CODES: frozenset[str] = frozenset(
    {
        "bad_frame",
        "frame_too_large",
        "invalid_json",
        "unknown_type",
        "missing_field",
        "not_registered",
        "already_registered",
        "unsupported_version",
        "invalid_nick",
        "nick_taken",
        "bad_password",
        "invalid_room",
        "not_in_room",
        "no_such_nick",
        "text_too_long",
        "invalid_text",
        "rate_limited",
        "sendq_exceeded",
        "history_gap",
        "idle_timeout",
        "server_full",
        "server_shutdown",
        "unavailable",
    }
)

#: Codes after which the server always closes the connection.
FATAL_CODES: frozenset[str] = frozenset(
    {
        "bad_frame",
        "frame_too_large",
        "not_registered",
        "sendq_exceeded",
        "idle_timeout",
        "server_full",
        "server_shutdown",
    }
)


class AchatError(Exception):
    """Root of every exception achat raises on purpose."""


class ProtocolError(AchatError):
    """A protocol v1 error: carries the wire ``code``, ``fatal`` and whose fault it is."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        fatal: bool | None = None,
        peer_fault: bool = True,
        ref: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = code in FATAL_CODES if fatal is None else fatal
        self.peer_fault = peer_fault
        self.ref = ref
        #: For a refusal that is no one's fault: the seconds after which the frame may go
        #: again as it was (``rate_limited`` of a busy server).
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, fatal={self.fatal})"


class FrameError(ProtocolError):
    """The byte stream cannot be split into frames any more; the connection must close.

    ``frames`` holds the complete frames that arrived before the bad header,
    for a caller that wants to act on them before closing.
    """

    def __init__(self, code: str, message: str, frames: list[bytes] | None = None) -> None:
        super().__init__(code, message, fatal=True)
        self.frames = frames or []


class PeerRejected(ProtocolError):
    """A valid frame that the state of the session or the registry refuses."""


class ServerError(AchatError):
    """The server answered with an ``error`` frame (seen from the client side)."""

    def __init__(self, code: str, message: str, *, fatal: bool, ref: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal
        self.ref = ref


class ConnectionClosed(AchatError):
    """The connection ended; ``reason`` says how, in plain words."""

    def __init__(self, reason: str = "connection closed") -> None:
        super().__init__(reason)
        self.reason = reason
