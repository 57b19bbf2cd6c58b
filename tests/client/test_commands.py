"""What people type, parsed into commands."""

from __future__ import annotations

import pytest

from achat.client import commands as c


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello there", c.SayCmd("hello there")),
        ("  indented", c.SayCmd("  indented")),
        ("//shrug", c.SayCmd("/shrug")),
        ("/join #General", c.JoinCmd("general")),
        ("/join ops", c.JoinCmd("ops")),
        ("/part", c.PartCmd(None, None)),
        ("/part see you", c.PartCmd(None, "see you")),
        ("/part #ops bye all", c.PartCmd("ops", "bye all")),
        ("/leave #ops", c.PartCmd("ops", None)),
        ("/msg bob hi there", c.DmCmd("bob", "hi there")),
        ("/dm bob hi", c.DmCmd("bob", "hi")),
        ("/query bob hi", c.DmCmd("bob", "hi")),
        ("/me waves", c.MeCmd("waves")),
        ("/nick anna", c.NickCmd("anna")),
        ("/who", c.WhoCmd(None)),
        ("/who #ops", c.WhoCmd("ops")),
        ("/rooms", c.RoomsCmd()),
        ("/list", c.RoomsCmd()),
        ("/topic", c.TopicCmd(None, None)),
        ("/topic plans for today", c.TopicCmd(None, "plans for today")),
        ("/topic #ops", c.TopicCmd("ops", None)),
        ("/topic #ops deploys", c.TopicCmd("ops", "deploys")),
        ("/history", c.HistoryCmd(20)),
        ("/history 100", c.HistoryCmd(100)),
        ("/help", c.HelpCmd()),
        ("/quit", c.QuitCmd(None)),
        ("/quit gone home", c.QuitCmd("gone home")),
        ("/exit", c.QuitCmd(None)),
        ("/JOIN #x", c.JoinCmd("x")),
    ],
)
def test_parse(line: str, command: c.Command) -> None:
    """Each command and alias parses to its command object."""
    assert c.parse(line) == command


def test_blank_lines_do_nothing() -> None:
    """An empty or all-space line is no command at all."""
    assert c.parse("") is None
    assert c.parse("   ") is None


def test_multiline_text_is_one_message() -> None:
    """A line with newlines (typed with Esc Enter) is one message."""
    assert c.parse("first\nsecond") == c.SayCmd("first\nsecond")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("/frobnicate", "unknown command /frobnicate"),
        ("/msg bob", "usage: /msg"),
        ("/msg", "usage: /msg"),
        ("/join", "usage: /join"),
        ("/join a b", "usage: /join"),
        ("/nick", "usage: /nick"),
        ("/me", "usage: /me"),
        ("/history 0", "usage: /history"),
        ("/history 501", "usage: /history"),
        ("/history lots", "usage: /history"),
    ],
)
def test_errors_say_how_to_write_it(line: str, needle: str) -> None:
    """Unknown commands and missing arguments raise CommandError with a usage hint."""
    with pytest.raises(c.CommandError, match=needle):
        c.parse(line)


def test_every_command_is_documented() -> None:
    """/help's table names every command the parser knows."""
    for name in c.COMMANDS:
        usage, what = c.COMMANDS[name]
        assert usage.startswith(name)
        assert what


def test_normalise_room() -> None:
    """#Room and room give the wire name room."""
    assert c.normalise_room("#General") == "general"
    assert c.normalise_room(" ops ") == "ops"
