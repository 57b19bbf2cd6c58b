"""The achat client: an async API for programs and a terminal UI for people."""

from .connection import Client, Disconnected, LocalNotice

__all__ = ["Client", "Disconnected", "LocalNotice"]
