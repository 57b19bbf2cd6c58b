"""The pure protocol core: framing, typed messages and naming rules. No I/O here."""

__all__ = ["DEFAULT_PORT"]

#: The TCP port a server listens on, and a client connects to, unless told otherwise.
DEFAULT_PORT = 7777
