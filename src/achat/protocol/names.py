"""The naming rules of protocol v1: nicks, rooms, message text, topics.

Every function here is pure. Validators return the normalised value or raise
:class:`~achat.errors.ProtocolError` with the contract's code.

Nicks follow Unicode's advice for identifiers (UAX #31, UTS #39): NFKC, then
only letters, digits, ``_`` and ``-``, starting with a letter; one script per
nick (with the usual East Asian combinations allowed); and comparison by a
*skeleton* (casefolded, with look-alike characters mapped to one prototype),
so ``Ana``, ``ANA`` and ``Аna`` (Cyrillic A) all collide.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from ..errors import ProtocolError

__all__ = [
    "MAX_NICK",
    "MAX_ROOM",
    "MAX_TOPIC",
    "nick_key",
    "nick_skeleton",
    "preload",
    "validate_nick",
    "validate_reason",
    "validate_room",
    "validate_text",
    "validate_topic",
]

MAX_NICK = 24
MAX_ROOM = 32
MAX_TOPIC = 300
MAX_REASON = 300

_ROOM = re.compile(r"[a-z0-9_-]{1,32}")

# Script mixes that are normal in one name (UTS #39 "highly restrictive").
_ALLOWED_MIXES: tuple[frozenset[str], ...] = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})


def validate_nick(raw: str) -> str:
    """Return the NFKC form of ``raw`` if it is a valid nick, else raise ``invalid_nick``.

    The case the user typed is kept; compare nicks with :func:`nick_key` or
    :func:`nick_skeleton`, never with ``==``.
    """
    nick = unicodedata.normalize("NFKC", raw)
    if not 1 <= len(nick) <= MAX_NICK:
        raise ProtocolError("invalid_nick", f"a nick has 1 to {MAX_NICK} characters")
    if not _is_letter(nick[0]):
        raise ProtocolError("invalid_nick", "a nick starts with a letter")
    for ch in nick:
        if not (_is_letter(ch) or ch in "_-" or unicodedata.category(ch) == "Nd"):
            raise ProtocolError(
                "invalid_nick",
                f"a nick has only letters, digits, _ and -, not {_describe(ch)}",
            )
    if _mixes_scripts(nick):
        raise ProtocolError("invalid_nick", "a nick may not mix writing systems")
    return nick


def nick_key(nick: str) -> str:
    """The identity of a nick: two nicks are the same when their keys are equal."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", nick).casefold())


def nick_skeleton(nick: str) -> str:
    """A form in which look-alike nicks (``paypal``/``pаypal``, ``l0l``/``lol``) are equal."""
    key = nick_key(nick)
    proto = _prototypes()
    return "".join(proto.get(ch, ch) for ch in key.replace("rn", "m"))


def preload() -> None:
    """Load the Unicode data the nick rules use (about 15 MiB, read on first use otherwise).

    A server calls this at startup, so that its first ``hello`` does not wait
    for it and the memory shows up as the server's own, not as its first client's.
    """
    _prototypes()
    _mixes_scripts("a")


def validate_room(raw: str) -> str:
    """Return ``raw`` if it is a valid wire room name (no ``#``), else raise ``invalid_room``."""
    if not _ROOM.fullmatch(raw):
        raise ProtocolError(
            "invalid_room", f"a room name has 1 to {MAX_ROOM} characters of a-z 0-9 _ -"
        )
    return raw


def validate_text(raw: str, max_text: int) -> str:
    """Strip trailing whitespace and check a message body.

    Raises ``text_too_long`` above ``max_text`` characters and ``invalid_text``
    for an empty text or a control character other than newline and tab.
    """
    text = raw.rstrip()
    if not text:
        raise ProtocolError("invalid_text", "the message is empty")
    if len(text) > max_text:
        raise ProtocolError(
            "text_too_long", f"the message has {len(text)} characters; the limit is {max_text}"
        )
    bad = _first_control(text, allowed="\n\t")
    if bad is not None:
        raise ProtocolError("invalid_text", f"the message contains {_describe(bad)}")
    return text


def validate_topic(raw: str) -> str:
    """Check a topic: 0 to 300 characters on one line, no control characters."""
    topic = raw.strip()
    if len(topic) > MAX_TOPIC:
        raise ProtocolError("text_too_long", f"a topic has at most {MAX_TOPIC} characters")
    bad = _first_control(topic, allowed="")
    if bad is not None:
        raise ProtocolError("invalid_text", f"the topic contains {_describe(bad)}")
    return topic


def validate_reason(raw: str | None) -> str | None:
    """Check the free-text reason of ``part`` or ``bye`` (same rules as a topic)."""
    if raw is None:
        return None
    reason = raw.strip()
    if len(reason) > MAX_REASON:
        raise ProtocolError("text_too_long", f"a reason has at most {MAX_REASON} characters")
    bad = _first_control(reason, allowed="")
    if bad is not None:
        raise ProtocolError("invalid_text", f"the reason contains {_describe(bad)}")
    return reason or None


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


# Category Cc is exactly C0, DEL and C1; Cs (lone surrogates) cannot come out of valid
# UTF-8 but is refused too, so the rule does not depend on which decoder ran first.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_LAYOUT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _first_control(text: str, allowed: str) -> str | None:
    if text.isascii() and text.isprintable():  # most texts: half the regex's time
        return None
    pattern = _CONTROL_BUT_LAYOUT if allowed else _CONTROL
    found = pattern.search(text)
    return found.group() if found is not None else None


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def _mixes_scripts(nick: str) -> bool:
    from confusable_homoglyphs import categories

    scripts = {categories.alias(ch) for ch in nick} - _NEUTRAL_SCRIPTS
    if len(scripts) <= 1:
        return False
    return not any(scripts <= mix for mix in _ALLOWED_MIXES)


def _single_chars(candidates: Iterable[str]) -> Iterable[str]:
    # The data wraps some right-to-left glyphs in LRM marks; drop those marks.
    for c in candidates:
        c = c.replace("\u200e", "")
        if len(c) == 1:
            yield c


# Look-alikes inside ASCII, after casefolding (UTS #39 maps these the same way).
_ASCII_PROTOTYPES = {"0": "o", "1": "l", "|": "l"}


@functools.cache
def _prototypes() -> dict[str, str]:
    """Map each look-alike character to the ASCII character it imitates.

    Built once from the Unicode confusables data. Only direct pairs are used
    (no transitive closure), because chaining look-alikes soon makes ``t``
    equal to ``z``; characters with no ASCII twin map to themselves.
    """
    from confusable_homoglyphs import confusables

    proto: dict[str, str] = dict(_ASCII_PROTOTYPES)
    for raw, glyphs in confusables.confusables_data.items():
        for char in _single_chars([raw]):
            folded = char.casefold()
            twins = list(_single_chars(h["c"] for h in glyphs))
            if char.isascii():
                target = proto.get(folded, folded)
                for g in twins:
                    if not g.casefold().isascii():
                        proto.setdefault(g.casefold(), target)
            else:
                ascii_twins = sorted(g.casefold() for g in twins if g.isascii())
                if ascii_twins and len(folded) == 1 and not folded.isascii():
                    first = ascii_twins[0]
                    proto[folded] = proto.get(first, first)
    return proto
