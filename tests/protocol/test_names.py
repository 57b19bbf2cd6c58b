"""Naming rules: nicks (NFKC, scripts, confusables), rooms, text, topics and reasons."""

from __future__ import annotations

import string

import pytest

from achat.errors import ProtocolError
from achat.protocol import names
from achat.protocol.names import (
    nick_key,
    nick_skeleton,
    validate_nick,
    validate_reason,
    validate_room,
    validate_text,
    validate_topic,
)


def refused(func: object, *args: object) -> str:
    with pytest.raises(ProtocolError) as exc:
        func(*args)  # type: ignore[operator]
    return exc.value.code


@pytest.mark.parametrize(
    "nick", ["ana", "Ana_B", "x", "a" * 24, "zoë", "ana-2", "日本ひカ", "Ωμέγα"]
)
def test_valid_nicks(nick: str) -> None:
    """Letters, digits, _ and -, starting with a letter, up to 24 characters, are accepted."""
    assert validate_nick(nick) == nick


def test_nfkc_applies_before_the_rules() -> None:
    """Fullwidth letters are normalised; the case the user typed is kept."""
    assert validate_nick("Ａｎａ") == "Ana"


@pytest.mark.parametrize(
    "nick",
    [
        "",
        "a" * 25,
        "1ana",
        "_ana",
        "an a",
        "ana\x00",
        "ana\u200b",
        "ana\u202e",
        "ana\u2066",
        "ana😀",
        "ana.b",
        "abcд",
        "pаypal",
    ],
)
def test_invalid_nicks(nick: str) -> None:
    """Empty, too long, bad first character, spaces, controls, invisible, emoji, mixed scripts."""
    assert refused(validate_nick, nick) == "invalid_nick"


def test_nick_key_ignores_case() -> None:
    """Ana, ANA and ana are the same nick."""
    assert nick_key("Ana") == nick_key("ANA") == nick_key("ana")
    assert nick_key("Straße") == nick_key("STRASSE")


def test_skeleton_catches_look_alikes() -> None:
    """A Cyrillic а or a zero in place of o gives the same skeleton as the Latin nick."""
    assert nick_skeleton("pаypal") == nick_skeleton("paypal")
    assert nick_skeleton("l0l") == nick_skeleton("lol")
    assert nick_skeleton("modern") == nick_skeleton("modem")


def test_skeleton_keeps_distinct_ascii_nicks_apart() -> None:
    """Only 0/o and 1/l merge among ASCII letters and digits."""
    groups: dict[str, set[str]] = {}
    for ch in string.ascii_lowercase + string.digits:
        groups.setdefault(nick_skeleton("a" + ch), set()).add(ch)
    merged = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    assert merged == [["0", "o"], ["1", "l"]]


@pytest.mark.parametrize("room", ["general", "a", "x" * 32, "team-1_b"])
def test_valid_rooms(room: str) -> None:
    """Lower-case a-z, digits, _ and -, 1 to 32 characters."""
    assert validate_room(room) == room


@pytest.mark.parametrize("room", ["", "x" * 33, "#general", "General", "a b", "é", "a\n"])
def test_invalid_rooms(room: str) -> None:
    """Anything else is invalid_room (the # is a client-side decoration)."""
    assert refused(validate_room, room) == "invalid_room"


def test_text_strips_trailing_whitespace_and_keeps_newlines() -> None:
    """Trailing whitespace goes; newlines and tabs inside stay."""
    assert validate_text("line one\n\tline two  \n\n", 100) == "line one\n\tline two"


def test_text_limits_count_characters() -> None:
    """max_text counts characters, not bytes; one more is text_too_long."""
    assert validate_text("é" * 10, 10) == "é" * 10
    assert refused(validate_text, "é" * 11, 10) == "text_too_long"


@pytest.mark.parametrize("text", ["", "   \n", "a\x1b[2Jb", "a\rb", "a\x7f", "a\x9b", "\x00"])
def test_bad_text(text: str) -> None:
    """Empty text and control characters other than newline and tab are invalid_text."""
    assert refused(validate_text, text, 100) == "invalid_text"


def test_topic_rules() -> None:
    """Topics are 0-300 characters on one line."""
    assert validate_topic("") == ""
    assert validate_topic(" x ") == "x"
    assert refused(validate_topic, "x" * 301) == "text_too_long"
    assert refused(validate_topic, "a\nb") == "invalid_text"


def test_reason_rules() -> None:
    """A reason is optional, one line, at most 300 characters."""
    assert validate_reason(None) is None
    assert validate_reason("  ") is None
    assert validate_reason("gone") == "gone"
    assert refused(validate_reason, "a\x1bb") == "invalid_text"
    assert refused(validate_reason, "r" * 301) == "text_too_long"


def test_preload_builds_the_look_alike_table() -> None:
    names._prototypes.cache_clear()
    names.preload()
    assert names._prototypes.cache_info().currsize == 1
    assert names.nick_skeleton("\u0430na") == names.nick_skeleton("ana")
