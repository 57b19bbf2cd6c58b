"""Rendering events: readable lines, and nothing from the network reaches the terminal raw."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import pyte
import pytest
from hypothesis import given
from hypothesis import strategies as st

from achat.client.render import Renderer, nick_style, plain, visible
from achat.protocol import messages as m

UTC = UTC


@pytest.fixture
def r() -> Renderer:
    return Renderer(tz=UTC, me=lambda: "ana", clock=lambda: 0.0)  # "today" is 1 January 1970


def msg(text: str, sender: str = "bob", room: str = "general", ts: int = 0) -> m.Message:
    return m.Message(room=room, seq=1, ts=ts, sender=sender, text=text)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "␛[2J"),
        ("a\rb", "a␍b"),
        ("bell\x07", "bell␇"),
        ("del\x7f", "del␡"),
        ("\x9b31m", "<U+009B>31m"),
        ("evil\u202eexe.txt", "evil<U+202E>exe.txt"),
        ("zero\u200bwidth", "zero<U+200B>width"),
        ("iso\u2066late", "iso<U+2066>late"),
        ("line\u2028sep", "line<U+2028>sep"),
        ("tab\tbed", "tab    bed"),
        ("two\nlines", "two↵lines"),
        ("plain ✓ ünïcode 日本", "plain ✓ ünïcode 日本"),
    ],
)
def test_visible_replaces_what_could_act_on_a_terminal(raw: str, shown: str) -> None:
    """Controls, C1, bidi and invisible format characters become visible stand-ins."""
    assert visible(raw) == shown


_ACTS_ON_A_TERMINAL = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


@given(st.text(), st.booleans())
def test_nothing_that_acts_on_a_terminal_comes_through(raw: str, keep_newlines: bool) -> None:
    """Whatever the text, no control, format or unassigned character is left (but newlines)."""
    shown = visible(raw, keep_newlines=keep_newlines)
    left = {
        ch
        for ch in shown
        if unicodedata.category(ch) in _ACTS_ON_A_TERMINAL and not (keep_newlines and ch == "\n")
    }
    assert not left


def test_visible_keeps_newlines_when_asked() -> None:
    """Multi-line messages keep their newlines."""
    assert visible("a\nb", keep_newlines=True) == "a\nb"


def test_combining_mark_runs_are_cut_short() -> None:
    """A long run of combining marks keeps two and shows an ellipsis for the rest."""
    shown = visible("Z" + "\u0301" * 500 + "!")
    assert shown == "Z\u0301\u0301⋯!"


def test_nick_style_is_stable_and_case_blind() -> None:
    """A nick has the same colour every time, whatever its case; styles differ between nicks."""
    assert nick_style("Ana") == nick_style("ana") == nick_style("ANA")
    assert len({nick_style(f"user{i}") for i in range(40)}) > 5


def test_message_line(r: Renderer) -> None:
    """A message shows time, <nick> and text; another room's message shows the room."""
    assert plain(r.message(msg("hi"), show_room=False)) == "00:00 <bob> hi"
    assert plain(r.message(msg("hi", room="ops"), show_room=True)) == "00:00 #ops <bob> hi"
    assert r.event(msg("hi", room="ops"), current_room="general")[0][1] == ("class:room", "#ops ")


def test_multiline_message_is_indented(r: Renderer) -> None:
    """Continuation lines of a message line up under the text."""
    assert plain(r.message(msg("one\ntwo"), show_room=False)) == "00:00 <bob> one\n      two"


def test_action_and_mention(r: Renderer) -> None:
    """/me shows as an action; a message naming me is highlighted."""
    assert plain(r.message(msg("/me waves"), show_room=False)) == "00:00 * bob waves"
    line = r.message(msg("hey Ana, look"), show_room=False)
    assert ("class:mention", "hey Ana, look") in line
    mine = r.message(msg("I am ana", sender="ana"), show_room=False)
    assert all(style != "class:mention" for style, _ in mine)


def test_notices(r: Renderer) -> None:
    """Joins, parts, renames, topics, DMs, names, rooms and history read as sentences."""
    cases = [
        (m.Joined(room="general", nick="bob", ts=0), "00:00 -- bob joined #general"),
        (
            m.Parted(room="general", nick="bob", ts=0, reason="quit"),
            "00:00 -- bob left #general (quit)",
        ),
        (m.Renamed(old="bob", new="rob", ts=0), "00:00 -- bob is now known as rob"),
        (
            m.TopicEvent(room="general", topic="plans", by="bob", ts=0),
            "00:00 -- bob set the topic of #general: plans",
        ),
        (m.DmEvent(sender="bob", to="ana", id=1, ts=0, text="psst"), "00:00 *bob* → you: psst"),
    ]
    for event, text in cases:
        assert [plain(line) for line in r.event(event, current_room="general")] == [text]
    names = r.event(m.Names(room="g", nicks=["ana", "bob"], topic="t", seq=0), current_room=None)
    assert [plain(x) for x in names] == ["-- #g: ana, bob (2 people)", "-- topic of #g: t"]
    rooms = r.event(m.Rooms(rooms=[m.RoomInfo(room="g", members=1, topic="")]), current_room=None)
    assert [plain(x) for x in rooms] == ["-- 1 room:", "--   #g (1)"]
    page = m.History(room="g", messages=[msg("old")], more=True)
    assert [plain(x) for x in r.event(page, current_room="g")][1] == "00:00 <bob> old"
    assert plain(r.dm_sent("bob", "hi", 0)) == "00:00 you → *bob*: hi"


def test_errors_in_plain_words(r: Renderer) -> None:
    """Known codes are explained; unknown codes are shown with the server's message."""
    known = r.event(m.Error(code="nick_taken", message="in use", fatal=False), current_room=None)
    assert plain(known[0]) == "! that nick is taken: in use (nick_taken)"
    odd = r.event(m.Error(code="quantum_flux", message="try later", fatal=False), current_room=None)
    assert plain(odd[0]) == "! try later (quantum_flux)"


def test_welcome_with_motd(r: Renderer) -> None:
    """welcome names the server and shows the message of the day."""
    w = m.Welcome(nick="ana", server="school", version=1, max_frame=1, max_text=1, motd="be kind")
    assert [plain(x) for x in r.event(w, current_room=None)] == [
        "-- connected to school as ana",
        "-- be kind",
    ]


HOSTILE = [
    "\x1b[2J\x1b[H wiped",
    "\x1b]0;pwned title\x07",
    "\x1b]52;c;cGF5bG9hZA==\x07",
    "\x9b31mred via C1",
    "\x1b[10A\x1b[5Cmoved",
    "overwrite\rXXXX",
    "\u202egnp.exe",
    "Z" + "\u0336" * 500,
    "\x1bP+q544e\x1b\\",
    "\x1b[?1049h alt screen",
]


def test_hostile_text_cannot_touch_the_terminal(r: Renderer) -> None:
    """Rendered hostile messages leave a terminal's title, modes and earlier lines untouched."""
    screen = pyte.Screen(80, 40)
    stream = pyte.Stream(screen)
    stream.feed("KEEP THIS LINE\r\n")
    for i, text in enumerate(HOSTILE):
        for line in r.event(msg(text, sender=f"m\x1b[31m{i}"), current_room="general"):
            stream.feed(plain(line).replace("\n", "\r\n") + "\r\n")
    assert screen.display[0].rstrip() == "KEEP THIS LINE"
    assert screen.title == ""
    assert screen.cursor.y == len(HOSTILE) + 1  # one line per message, nothing moved it
    assert not any(char.fg != "default" for row in screen.buffer.values() for char in row.values())
    shown = "\n".join(screen.display)
    assert "␛]0;pwned title␇" in shown
    assert "<U+009B>31mred via C1" in shown
    assert "overwrite␍XXXX" in shown
    assert "<U+202E>gnp.exe" in shown


def test_mentions_are_whole_words() -> None:
    """A nick inside another word is not a mention; next to punctuation it is."""
    r = Renderer(tz=UTC, me=lambda: "al")
    assert all(s != "class:mention" for s, _ in r.message(msg("also fine"), show_room=False))
    assert ("class:mention", "hi Al!") in r.message(msg("hi Al!"), show_room=False)


def test_error_words_are_not_repeated(r: Renderer) -> None:
    """When the server's message already says it, the plain words are not added again."""
    shut = m.Error(code="server_shutdown", message="the server is shutting down", fatal=True)
    assert plain(r.event(shut, current_room=None)[0]) == (
        "! the server is shutting down (server_shutdown)"
    )


def _ms(text: str) -> int:
    """Milliseconds since the epoch of an ISO date and time in UTC."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_a_line_of_another_day_is_preceded_by_its_day() -> None:
    """History from yesterday is marked as such, and so is the return to today."""
    today = _ms("2026-12-05T09:00") / 1000
    r = Renderer(tz=UTC, clock=lambda: today)
    page = m.History(
        room="general",
        messages=[
            msg("late", ts=_ms("2026-12-04T23:59")),
            msg("later", ts=_ms("2026-12-04T23:59:30")),
            msg("early", ts=_ms("2026-12-05T00:01")),
        ],
        more=False,
    )
    assert [plain(line) for line in r.history(page)] == [
        "-- history of #general:",
        "-- Friday 4 December 2026 --",
        "23:59 <bob> late",
        "23:59 <bob> later",
        "-- Saturday 5 December 2026 --",
        "00:01 <bob> early",
    ]
    live = r.event(msg("now", ts=_ms("2026-12-05T09:00")), current_room="general")
    assert [plain(line) for line in live] == ["09:00 <bob> now"]


def test_todays_first_line_needs_no_day() -> None:
    """A session that sees only today's lines never shows a day line."""
    today = _ms("2026-12-05T09:00") / 1000
    r = Renderer(tz=UTC, clock=lambda: today)
    joined = m.Joined(room="general", nick="bob", ts=_ms("2026-12-05T08:00"))
    assert [plain(line) for line in r.event(joined, current_room="general")] == [
        "08:00 -- bob joined #general"
    ]


def test_times_before_1970_and_offsets_with_seconds_are_right() -> None:
    """The per-minute shortcut holds only where a UTC minute is a local one."""
    r = Renderer(tz=UTC, clock=lambda: 0.0)
    assert r.time(-1) == ("class:time", "23:59 ")
    monrovia = timezone(-timedelta(minutes=44, seconds=30))  # Liberia's offset until 1972
    r = Renderer(tz=monrovia, clock=lambda: 0.0)
    for ts in (1_000, 30_000, 59_000):
        expected = datetime.fromtimestamp(ts / 1000, tz=monrovia).strftime("%H:%M ")
        assert r.time(ts) == ("class:time", expected)
