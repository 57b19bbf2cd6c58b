"""What the user typed, turned into a command. Pure: no I/O, no prompt_toolkit.

A line that does not start with ``/`` is a message to the current room; a
line starting with ``//`` is a message that starts with one ``/``.
``/me waves`` sends the text ``/me waves``, which clients show as an action
(``* ana waves``): a client-side convention, not part of the protocol.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "COMMANDS",
    "Command",
    "CommandError",
    "DmCmd",
    "HelpCmd",
    "HistoryCmd",
    "JoinCmd",
    "MeCmd",
    "NickCmd",
    "PartCmd",
    "QuitCmd",
    "RoomsCmd",
    "SayCmd",
    "TopicCmd",
    "WhoCmd",
    "normalise_room",
    "parse",
]


class CommandError(ValueError):
    """The line is not a valid command; the message says how to write it."""


class SayCmd(msgspec.Struct, frozen=True, gc=False):
    text: str


class MeCmd(msgspec.Struct, frozen=True, gc=False):
    action: str


class JoinCmd(msgspec.Struct, frozen=True, gc=False):
    room: str


class PartCmd(msgspec.Struct, frozen=True, gc=False):
    room: str | None
    reason: str | None


class DmCmd(msgspec.Struct, frozen=True, gc=False):
    nick: str
    text: str


class NickCmd(msgspec.Struct, frozen=True, gc=False):
    nick: str


class WhoCmd(msgspec.Struct, frozen=True, gc=False):
    room: str | None


class RoomsCmd(msgspec.Struct, frozen=True, gc=False):
    pass


class TopicCmd(msgspec.Struct, frozen=True, gc=False):
    room: str | None
    topic: str | None  # None shows the topic instead of setting it


class HistoryCmd(msgspec.Struct, frozen=True, gc=False):
    limit: int


class HelpCmd(msgspec.Struct, frozen=True, gc=False):
    pass


class QuitCmd(msgspec.Struct, frozen=True, gc=False):
    reason: str | None


Command = (
    SayCmd
    | MeCmd
    | JoinCmd
    | PartCmd
    | DmCmd
    | NickCmd
    | WhoCmd
    | RoomsCmd
    | TopicCmd
    | HistoryCmd
    | HelpCmd
    | QuitCmd
)

#: Every command with its usage and what it does, in the order /help lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "/join": ("/join #room", "join a room (or switch to it) and make it current"),
    "/part": ("/part [#room] [reason]", "leave the current room or the one named"),
    "/msg": ("/msg NICK TEXT", "send a direct message"),
    "/me": ("/me ACTION", "say what you are doing: * ana waves"),
    "/nick": ("/nick NEWNICK", "change your nick"),
    "/who": ("/who [#room]", "list the people in a room"),
    "/rooms": ("/rooms", "list the rooms on the server"),
    "/topic": ("/topic [#room] [TEXT]", "show the topic, or set it to TEXT"),
    "/history": ("/history [N]", "show the last N messages of the room (default 20)"),
    "/help": ("/help", "show this help"),
    "/quit": ("/quit [reason]", "leave the chat"),
}

_ALIASES = {"/exit": "/quit", "/leave": "/part", "/dm": "/msg", "/query": "/msg", "/list": "/rooms"}


def normalise_room(raw: str) -> str:
    """``#General`` or ``general`` as typed by a person -> ``general`` as on the wire."""
    return raw.strip().removeprefix("#").lower()


def parse(line: str) -> Command | None:
    """Turn one input line into a command; None for a blank line.

    Raises :class:`CommandError` for an unknown command or missing arguments.
    """
    if not line.strip():
        return None
    if not line.startswith("/"):
        return SayCmd(line)
    if line.startswith("//"):
        return SayCmd(line[1:])
    head, _, rest = line.partition(" ")
    name = _ALIASES.get(head.lower(), head.lower())
    rest = rest.strip()
    if name == "/join":
        if not rest or " " in rest:
            raise CommandError(f"usage: {COMMANDS['/join'][0]}")
        return JoinCmd(normalise_room(rest))
    if name == "/part":
        first, _, reason = rest.partition(" ")
        if first.startswith("#"):
            return PartCmd(normalise_room(first), reason.strip() or None)
        return PartCmd(None, rest or None)
    if name == "/msg":
        nick, _, text = rest.partition(" ")
        if not nick or not text.strip():
            raise CommandError(f"usage: {COMMANDS['/msg'][0]}")
        return DmCmd(nick, text)
    if name == "/me":
        if not rest:
            raise CommandError(f"usage: {COMMANDS['/me'][0]}")
        return MeCmd(rest)
    if name == "/nick":
        if not rest or " " in rest:
            raise CommandError(f"usage: {COMMANDS['/nick'][0]}")
        return NickCmd(rest)
    if name == "/who":
        return WhoCmd(normalise_room(rest) if rest else None)
    if name == "/rooms":
        return RoomsCmd()
    if name == "/topic":
        first, _, text = rest.partition(" ")
        if first.startswith("#"):
            return TopicCmd(normalise_room(first), text.strip() or None)
        return TopicCmd(None, rest or None)
    if name == "/history":
        if not rest:
            return HistoryCmd(20)
        if not rest.isdigit() or not 1 <= int(rest) <= 500:
            raise CommandError("usage: /history [N], N from 1 to 500")
        return HistoryCmd(int(rest))
    if name == "/help":
        return HelpCmd()
    if name == "/quit":
        return QuitCmd(rest or None)
    raise CommandError(
        f"unknown command {head}; /help lists them (// sends a line starting with /)"
    )
