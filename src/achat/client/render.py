"""Events from the server turned into styled lines for the terminal. Pure: no I/O.

Everything that came from the network passes through :func:`visible` before
it is shown: control characters (C0, DEL, C1 — so no escape sequence can
reach the terminal), bidi and other invisible format characters are replaced
with visible stand-ins, and long runs of combining marks are cut short.

A line is a list of ``(style, text)`` fragments, the shape prompt_toolkit's
``FormattedText`` takes; styles are prompt_toolkit style strings.
"""

from __future__ import annotations

import time
import unicodedata
import zlib
from collections.abc import Callable
from datetime import date, datetime, tzinfo

from ..protocol.messages import (
    DmEvent,
    Error,
    History,
    Joined,
    Message,
    Names,
    Parted,
    Pong,
    Renamed,
    Rooms,
    TopicEvent,
    Welcome,
)
from ..protocol.names import nick_key

__all__ = [
    "Fragment",
    "Line",
    "Renderer",
    "nick_style",
    "plain",
    "visible",
]

Fragment = tuple[str, str]
Line = list[Fragment]

MAX_MARKS = 2
ERROR_WORDS: dict[str, str] = {
    "nick_taken": "that nick is taken",
    "invalid_nick": "that nick is not allowed",
    "invalid_room": "that is not a valid room name",
    "not_in_room": "you are not in that room",
    "no_such_nick": "nobody by that name is online",
    "text_too_long": "the message is too long",
    "invalid_text": "the message has characters that are not allowed",
    "rate_limited": "slow down: you are sending too fast",
    "sendq_exceeded": "the connection was too slow to keep up",
    "history_gap": "some older messages have expired",
    "idle_timeout": "disconnected for being idle",
    "server_shutdown": "the server is shutting down",
    "server_full": "the server is full",
    "bad_password": "wrong password",
}

_PALETTE = (
    "ansired",
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightyellow",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
)


def visible(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with nothing left that could move the cursor, recolour or hide text.

    Newlines become ``↵`` unless ``keep_newlines``; tabs become spaces.
    """
    if text.isascii() and text.isprintable():
        # Space to tilde only: nothing to replace. Most text is this, and checking
        # it takes 0.2 µs where looking at each character takes 13 (a burst's worth).
        return text
    out: list[str] = []
    marks = 0
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me"):
            marks += 1
            if marks > MAX_MARKS:
                continue
            out.append(ch)
            continue
        if marks > MAX_MARKS:
            out.append("⋯")
        marks = 0
        if ch == "\n":
            out.append("\n" if keep_newlines else "↵")
        elif ch == "\t":
            out.append("    ")
        elif cat == "Cc":
            code = ord(ch)
            if code < 0x20:
                out.append(chr(0x2400 + code))  # ␛, ␍, ␇ …
            elif code == 0x7F:
                out.append("␡")
            else:
                out.append(f"<U+{code:04X}>")
        elif cat in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    if marks > MAX_MARKS:
        out.append("⋯")
    return "".join(out)


def nick_style(nick: str) -> str:
    """A colour that stays the same for a nick, whatever its case, in every session."""
    return "bold " + _PALETTE[zlib.crc32(nick_key(nick).encode()) % len(_PALETTE)]


def plain(line: Line) -> str:
    """The text of a line without styles (for transcripts and tests)."""
    return "".join(text for _, text in line)


class Renderer:
    """Turns events into lines, from the point of view of one user (``me``).

    Lines show the time of day only; a line of a day other than the one
    before it (today, for the first) is preceded by a line naming its day,
    so that history from yesterday never passes for today's.
    """

    def __init__(
        self,
        *,
        tz: tzinfo | None = None,
        me: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tz = tz
        self._me = me
        self._clock = clock
        self._day: date | None = None  # of the last line with a time
        # The last minute drawn (ms // 60,000), its day and its "HH:MM ": a burst is one.
        self._minute: tuple[int, date, str] | None = None

    def _local(self, ts: int) -> tuple[date | None, str]:
        minute = ts // 60_000
        cached = self._minute
        if cached is not None and cached[0] == minute:
            return cached[1], cached[2]
        try:
            when = datetime.fromtimestamp(ts / 1000, tz=self._tz)
            offset = (when if when.tzinfo is not None else when.astimezone()).utcoffset()
        except (OverflowError, OSError, ValueError):
            return None, "--:-- "
        day, hhmm = when.date(), when.strftime("%H:%M ")
        # A minute of UTC is a minute of local time only where the offset is whole
        # minutes (every zone today; some before 1980 had seconds in theirs).
        if offset is not None and offset.total_seconds() % 60 == 0:
            self._minute = (minute, day, hhmm)
        return day, hhmm

    def time(self, ts: int) -> Fragment:
        return ("class:time", self._local(ts)[1])

    def dated(self, ts: int, line: Line) -> list[Line]:
        """``line`` (stamped ``ts``), after a line naming its day if that is a new one."""
        day = self._local(ts)[0]
        if self._day is None:
            self._day = datetime.fromtimestamp(self._clock(), tz=self._tz).date()
        if day is None or day == self._day:
            return [line]
        self._day = day
        name = f"{day:%A} {day.day} {day:%B %Y}"
        return [[("class:day", f"-- {name} --")], line]

    def notice(self, text: str, ts: int | None = None) -> Line:
        line: Line = [self.time(ts)] if ts is not None else []
        return [*line, ("class:notice", "-- " + text)]

    def problem(self, text: str) -> Line:
        return [("class:error", "! " + text)]

    def message(self, msg: Message, *, show_room: bool) -> Line:
        """``12:04 <ana> hello``, with the room when it is not the current one."""
        line: Line = [self.time(msg.ts)]
        if show_room:
            line.append(("class:room", f"#{visible(msg.room)} "))
        sender = visible(msg.sender)
        text = visible(msg.text, keep_newlines=True)
        if text.startswith("/me "):
            line += [("class:action", "* "), (nick_style(msg.sender), sender)]
            line.append(("class:action", " " + _indent(text[4:])))
            return line
        style = "class:text"
        me = self._me()
        if (
            me
            and nick_key(msg.sender) != nick_key(me)
            and _mentions(nick_key(msg.text), nick_key(me))
        ):
            style = "class:mention"
        line += [("", "<"), (nick_style(msg.sender), sender), ("", "> "), (style, _indent(text))]
        return line

    def dm(self, dm: DmEvent) -> Line:
        return [
            self.time(dm.ts),
            ("class:dm", "*"),
            (nick_style(dm.sender), visible(dm.sender)),
            ("class:dm", "* → you: " + _indent(visible(dm.text, keep_newlines=True))),
        ]

    def dm_sent(self, to: str, text: str, ts: int) -> Line:
        return [
            self.time(ts),
            ("class:dm", "you → *"),
            (nick_style(to), visible(to)),
            ("class:dm", "*: " + _indent(visible(text, keep_newlines=True))),
        ]

    def event(self, event: object, *, current_room: str | None) -> list[Line]:
        """Lines for one server frame (empty for frames the UI shows another way)."""
        if isinstance(event, Message):
            return self.dated(event.ts, self.message(event, show_room=event.room != current_room))
        if isinstance(event, DmEvent):
            return self.dated(event.ts, self.dm(event))
        if isinstance(event, Joined):
            text = f"{visible(event.nick)} joined #{visible(event.room)}"
            return self.dated(event.ts, self.notice(text, event.ts))
        if isinstance(event, Parted):
            why = f" ({visible(event.reason)})" if event.reason else ""
            text = f"{visible(event.nick)} left #{visible(event.room)}{why}"
            return self.dated(event.ts, self.notice(text, event.ts))
        if isinstance(event, Renamed):
            text = f"{visible(event.old)} is now known as {visible(event.new)}"
            return self.dated(event.ts, self.notice(text, event.ts))
        if isinstance(event, TopicEvent):
            topic = visible(event.topic) or "(cleared)"
            text = f"{visible(event.by)} set the topic of #{visible(event.room)}: {topic}"
            return self.dated(event.ts, self.notice(text, event.ts))
        if isinstance(event, Names):
            return self.names(event.room, event.nicks, event.topic)
        if isinstance(event, Rooms):
            return self.rooms([(r.room, r.members, r.topic) for r in event.rooms])
        if isinstance(event, History):
            return self.history(event)
        if isinstance(event, Error):
            return [self.error(event.code, event.message)]
        if isinstance(event, Welcome):
            lines = [self.notice(f"connected to {visible(event.server)} as {visible(event.nick)}")]
            if event.motd:
                lines.append(self.notice(visible(event.motd)))
            return lines
        if isinstance(event, Pong):
            return []
        return []

    def names(self, room: str, nicks: list[str], topic: str) -> list[Line]:
        people = ", ".join(visible(n) for n in nicks) or "nobody"
        count = len(nicks)
        lines = [
            self.notice(
                f"#{visible(room)}: {people} ({count} {'person' if count == 1 else 'people'})"
            )
        ]
        if topic:
            lines.append(self.notice(f"topic of #{visible(room)}: {visible(topic)}"))
        return lines

    def rooms(self, rooms: list[tuple[str, int, str]]) -> list[Line]:
        if not rooms:
            return [self.notice("no rooms yet: /join #name creates one")]
        lines = [self.notice(f"{len(rooms)} room{'s' if len(rooms) != 1 else ''}:")]
        for name, members, topic in rooms:
            about = f" — {visible(topic)}" if topic else ""
            lines.append(self.notice(f"  #{visible(name)} ({members}){about}"))
        return lines

    def history(self, page: History) -> list[Line]:
        if not page.messages:
            return [self.notice(f"no messages in #{visible(page.room)} yet")]
        lines = [self.notice(f"history of #{visible(page.room)}:")]
        for m in page.messages:
            lines += self.dated(m.ts, self.message(m, show_room=False))
        if page.more:
            lines.append(self.notice("older messages exist: /history 500 shows more"))
        return lines

    def error(self, code: str, message: str) -> Line:
        words = ERROR_WORDS.get(code)
        detail = visible(message)
        # Skip the plain-words prefix when the server already said the same thing.
        text = f"{words}: {detail}" if words and words not in detail.lower() else detail
        return self.problem(f"{text} ({visible(code)})")


def _mentions(text: str, nick: str) -> bool:
    """True when ``nick`` stands in ``text`` as a word of its own (not inside another word)."""
    start = text.find(nick)
    while start >= 0:
        end = start + len(nick)
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if not _word_char(before) and not _word_char(after):
            return True
        start = text.find(nick, start + 1)
    return False


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_-"


def _indent(text: str) -> str:
    # Continuation lines of a multi-line message line up under its first line.
    return text.replace("\n", "\n      ")
