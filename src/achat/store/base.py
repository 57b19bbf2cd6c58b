"""The storage interface the server's registry writes to and reads history from.

A store keeps rooms (name, topic, latest ``seq``), room messages and direct
messages. The registry assigns ``seq`` and DM ids itself, so appends never
need to wait for the store to answer; the store calls ``on_stored`` once the
record is durable as far as that backend goes, and only then does the sender
get its ``ack``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..protocol.messages import DmEvent, Message

__all__ = ["HistoryPage", "RoomRecord", "Store"]


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """What a store remembers of a room between runs."""

    name: str
    topic: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a room's history, oldest first.

    ``more`` is true when older (for ``before``/latest) or newer (for
    ``after``) messages exist beyond this page. ``gap`` is true when messages
    the request asked for have expired from the store.
    """

    messages: list[Message]
    more: bool
    gap: bool = False


class Store(Protocol):
    """What the registry needs from a message store. No method may block for long."""

    def load_rooms(self) -> list[RoomRecord]:
        """Every room the store knows, with its topic and latest ``seq``."""
        ...

    def last_dm_id(self) -> int:
        """The highest DM id ever stored (0 if none)."""
        ...

    def append(self, message: Message, on_stored: Callable[[], None]) -> None:
        """Store a room message whose ``seq`` the registry assigned; call ``on_stored`` when kept."""
        ...

    def append_dm(self, dm: DmEvent, on_stored: Callable[[], None]) -> None:
        """Store a direct message; call ``on_stored`` when kept."""
        ...

    def set_topic(self, room: str, topic: str) -> None:
        """Remember a room's topic (creates the room record if needed)."""
        ...

    def history(
        self, room: str, *, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        """Up to ``limit`` messages of ``room``: after ``after``, before ``before``, or the latest."""
        ...

    def close(self) -> None:
        """Flush and release resources; idempotent."""
        ...
