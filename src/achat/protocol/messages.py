"""Typed frames of protocol v1 and their strict JSON codec.

Every frame is an immutable :mod:`msgspec` struct whose ``type`` field is its
tag. :func:`decode_client` and :func:`decode_server` turn one frame body into
a struct or raise :class:`~achat.errors.ProtocolError` with the contract's
code; :func:`encode` turns a struct into a complete length-prefixed frame,
once, so that the same bytes can be handed to every recipient.

Strictness beyond what msgspec checks by itself (duplicate keys, nesting
depth) is done by cheap byte scans that only fall back to a full parse in the
rare cases they cannot decide.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from typing import Annotated, Any, TypeVar

import msgspec

from ..errors import ProtocolError
from .frames import HEADER, HEADER_SIZE, encode_frame

__all__ = [
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Ack",
    "Bye",
    "ClientFrame",
    "Dm",
    "DmEvent",
    "Error",
    "Hello",
    "History",
    "HistoryRequest",
    "Join",
    "Joined",
    "Message",
    "Names",
    "Nick",
    "Part",
    "Parted",
    "Ping",
    "Pong",
    "PongReply",
    "Renamed",
    "RoomInfo",
    "Rooms",
    "RoomsRequest",
    "Say",
    "ServerFrame",
    "Topic",
    "TopicEvent",
    "Welcome",
    "Who",
    "decode_client",
    "decode_client_many",
    "decode_server",
    "encode",
    "encode_body",
    "encode_many",
]

PROTOCOL_VERSION = 1
MAX_DEPTH = 8
#: Longest run of digits allowed in a JSON number (integer or fraction part, or exponent).
MAX_DIGITS = 20
MAX_REF = 64

Ref = Annotated[str, msgspec.Meta(max_length=MAX_REF)]
# Sequence numbers fit comfortably in 63 bits; bigger numbers are refused.
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


# gc=False: frames hold only strings, numbers and lists of them, so they can never be part
# of a reference cycle; untracked, the many a busy server keeps alive cost the cyclic
# garbage collector nothing.
class _Frame(
    msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True, kw_only=True, gc=False
):
    pass


# -- client -> server -------------------------------------------------------


class Hello(_Frame, tag="hello", frozen=True, kw_only=True):
    nick: str
    version: int
    password: str | None = None
    client: str | None = None
    ref: Ref | None = None


class Join(_Frame, tag="join", frozen=True, kw_only=True):
    room: str
    since: Seq | None = None
    ref: Ref | None = None


class Part(_Frame, tag="part", frozen=True, kw_only=True):
    room: str
    reason: str | None = None
    ref: Ref | None = None


class Say(_Frame, tag="say", frozen=True, kw_only=True):
    room: str
    text: str
    ref: Ref | None = None


class Dm(_Frame, tag="dm", frozen=True, kw_only=True):
    to: str
    text: str
    ref: Ref | None = None


class Nick(_Frame, tag="nick", frozen=True, kw_only=True):
    nick: str
    ref: Ref | None = None


class Who(_Frame, tag="who", frozen=True, kw_only=True):
    room: str
    ref: Ref | None = None


class RoomsRequest(_Frame, tag="rooms", frozen=True, kw_only=True):
    ref: Ref | None = None


class HistoryRequest(_Frame, tag="history", frozen=True, kw_only=True):
    room: str
    before: Seq | None = None
    after: Seq | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    ref: Ref | None = None


class Topic(_Frame, tag="topic", frozen=True, kw_only=True):
    room: str
    topic: str
    ref: Ref | None = None


class Ping(_Frame, tag="ping", frozen=True, kw_only=True):
    ref: Ref | None = None


class Bye(_Frame, tag="bye", frozen=True, kw_only=True):
    reason: str | None = None
    ref: Ref | None = None


class PongReply(_Frame, tag="pong", frozen=True, kw_only=True):
    """A client's answer to a server's ``ping`` (the contract lets either side ping)."""

    ref: Ref | None = None


ClientFrame = (
    Hello
    | Join
    | Part
    | Say
    | Dm
    | Nick
    | Who
    | RoomsRequest
    | HistoryRequest
    | Topic
    | Ping
    | PongReply
    | Bye
)

# -- server -> client -------------------------------------------------------


class Welcome(_Frame, tag="welcome", frozen=True, kw_only=True):
    nick: str
    server: str
    version: int
    max_frame: int
    max_text: int
    motd: str | None = None
    # Extension: the server's flood limit, so that a client can pace itself under it:
    # ``send_rate`` frames a second on average (0: no limit), ``send_burst`` at once. Any
    # value strict JSON allows is taken: an added field a client cannot use is ignored, as
    # an unknown one would be, not a reason to refuse the welcome (connection.pace_under).
    send_rate: object = None
    send_burst: object = None
    # Extension: names the server's numbering of messages; when it changes, every room's
    # seq has started again from 1 (the server lost its messages). Any value, as above.
    history_id: object = None


class Message(_Frame, tag="message", frozen=True, kw_only=True):
    room: str
    seq: int
    ts: int
    sender: str = msgspec.field(name="from")
    text: str


class DmEvent(_Frame, tag="dm", frozen=True, kw_only=True):
    sender: str = msgspec.field(name="from")
    to: str
    id: int
    ts: int
    text: str


class Ack(_Frame, tag="ack", frozen=True, kw_only=True):
    ref: str
    ts: int
    room: str | None = None
    seq: int | None = None
    id: int | None = None


class Joined(_Frame, tag="joined", frozen=True, kw_only=True):
    room: str
    nick: str
    ts: int


class Parted(_Frame, tag="parted", frozen=True, kw_only=True):
    room: str
    nick: str
    ts: int
    reason: str | None = None


class Renamed(_Frame, tag="renamed", frozen=True, kw_only=True):
    old: str
    new: str
    ts: int


class Names(_Frame, tag="names", frozen=True, kw_only=True):
    room: str
    nicks: list[str]
    topic: str
    seq: int
    ref: str | None = None
    # Extension: a list too long for one frame is split; all but the last part say more.
    more: bool = False


class RoomInfo(msgspec.Struct, frozen=True, gc=False):
    room: str
    members: int
    topic: str


class Rooms(_Frame, tag="rooms", frozen=True, kw_only=True):
    rooms: list[RoomInfo]
    ref: str | None = None
    # Extension: a list too long for one frame is split; all but the last part say more.
    more: bool = False


class History(_Frame, tag="history", frozen=True, kw_only=True):
    room: str
    messages: list[Message]
    more: bool
    ref: str | None = None


class TopicEvent(_Frame, tag="topic", frozen=True, kw_only=True):
    room: str
    topic: str
    by: str
    ts: int


class Error(_Frame, tag="error", frozen=True, kw_only=True):
    code: str
    message: str
    fatal: bool
    ref: str | None = None
    #: Added: seconds after which the refused frame may be sent again as it was (a busy
    #: server's ``rate_limited``, which is no sign of sending too fast).
    retry_after: float | None = None


class Pong(_Frame, tag="pong", frozen=True, kw_only=True):
    ref: str | None = None


ServerFrame = (
    Welcome
    | Message
    | DmEvent
    | Ack
    | Joined
    | Parted
    | Renamed
    | Names
    | Rooms
    | History
    | TopicEvent
    | Error
    | Pong
    | Ping
)

# -- codec -------------------------------------------------------------------

_ENCODER = msgspec.json.Encoder()
_NO_HEADER = bytes(HEADER_SIZE)
_CLIENT_DECODER: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)
_CLIENT_LIST_DECODER: msgspec.json.Decoder[list[ClientFrame]] = msgspec.json.Decoder(
    list[ClientFrame]
)
# float_hook: a number too large for a float in an untyped (added) field is infinity, for
# the client to ignore, rather than a reason to refuse the frame.
_SERVER_DECODER: msgspec.json.Decoder[ServerFrame] = msgspec.json.Decoder(
    ServerFrame, float_hook=float
)

# A JSON string, written so that the regex engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
# Every digit made "0": a run of MAX_DIGITS + 1 zeros is then a run of that many digits
# (a translate and a substring search: a fifth of what a regex takes on a short frame).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * (MAX_DIGITS + 1)
_BIGGEST = 10**MAX_DIGITS
# An int: ``in`` then finds one byte with memchr (a bytes needle takes twelve times as long).
_BACKSLASH = ord("\\")
_OPEN, _CLOSE = ord("{"), ord("}")
_KEY = re.compile(rb'"([^"\\]*+(?:\\.[^"\\]*+)*+)"\s*+:')

F = TypeVar("F", bound=msgspec.Struct)


def encode_body(frame: msgspec.Struct) -> bytes:
    """Encode ``frame`` as a JSON object without the length prefix (for WebSocket)."""
    return _ENCODER.encode(frame)


def encode(frame: msgspec.Struct) -> bytes:
    """Encode ``frame`` as one complete length-prefixed frame."""
    return encode_frame(_ENCODER.encode(frame))


def encode_many(frames: Iterable[msgspec.Struct]) -> bytes:
    """Encode ``frames`` as complete frames one after another, the bytes of
    ``b"".join(map(encode, frames))`` built in one buffer (a room's messages for a
    fan-out: no bytes object per frame, nor per body)."""
    buffer = bytearray()
    encode_into, write_header = _ENCODER.encode_into, HEADER.pack_into
    for frame in frames:
        start = len(buffer)
        buffer += _NO_HEADER  # a placeholder, filled in once the body's length is known
        encode_into(frame, buffer, -1)
        write_header(buffer, start, len(buffer) - start - HEADER_SIZE)
    return bytes(buffer)


def decode_client(body: bytes) -> ClientFrame:
    """Decode one client frame body; raise ``ProtocolError`` with the contract's code."""
    # Client frames are flat, each decoded as a member of the union, whose tag is
    # required: the quick duplicate check (_only_its_fields) holds for them.
    return _decode(body, _CLIENT_DECODER, quick=True)


def decode_client_many(bodies: list[bytes]) -> list[ClientFrame] | None:
    """Decode several client frame bodies in one pass, or None if any needs a closer look.

    A read that brings many frames (a client pipelining ``say``) then costs
    one decoder call instead of one per frame. None leaves nothing decided:
    the caller decodes each body with :func:`decode_client`, which finds the
    error of a bad one, if any, with its code.

    The bodies are decoded as the elements of one JSON array, which gives
    each body's frame only when each element is exactly one body. That holds
    when every body starts with ``{`` and ends with ``}`` and the bodies hold
    no other brace: as many objects as bodies decoded means that every brace
    is one, not part of a string, so each object runs from its body's first
    byte to its last, read as the same tokens as alone (and a body invalid
    alone makes the array invalid). A brace inside a text is legal, and only
    sends the read the slow way. The duplicate-key and size checks of
    :func:`decode_client` come down to one count of quotes, as in
    :func:`_only_its_fields`: each frame's fields came from its body, so
    each body holds at least the quotes its frame accounts for (a key
    spelled with escapes has its two; an escaped quote is one more), and
    equal sums leave no room for another key.
    """
    for body in bodies:  # never empty: the framing refuses a length of 0
        if body[0] != _OPEN or body[-1] != _CLOSE:
            return None
    joined = b",".join(bodies)
    count = len(bodies)
    if joined.count(b"{") != count or joined.count(b"}") != count:
        return None
    try:
        frames = _CLIENT_LIST_DECODER.decode(b"[" + joined + b"]")
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return None
    # A frame _quotes cannot vouch for counts -1, so the sum then falls short.
    if len(frames) != len(bodies) or joined.count(b'"') != sum(map(_quotes, frames)):
        return None
    return frames


def decode_server(body: bytes) -> ServerFrame:
    """Decode one server frame body (the client's view of the server as untrusted)."""
    # Not quick: a message inside history may leave out its "type" (a nested struct's tag
    # is optional to msgspec), which encoding it again adds back, and those quotes could
    # hide a duplicate key.
    return _decode(body, _SERVER_DECODER, quick=False)


def _decode(body: bytes, decoder: msgspec.json.Decoder[F], *, quick: bool) -> F:
    try:
        frame = decoder.decode(body)
    except msgspec.ValidationError as exc:
        _check_json(body)
        raise _validation_error(str(exc), body) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"not valid JSON: {exc}") from None
    _check_json(body, frame if quick else None)
    return frame


def _check_json(body: bytes, frame: msgspec.Struct | None = None) -> None:
    """Refuse what the fast decoder lets through: duplicate keys, deep nesting, huge numbers.

    ``frame`` is what ``body`` decoded to, given when :func:`_only_its_fields` applies to
    it; when that finds exactly its fields, nothing else needs looking at.
    """
    if frame is not None and _only_its_fields(body, frame):
        return
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise ProtocolError("invalid_json", f"JSON nested deeper than {MAX_DEPTH} levels")
    # A long digit run is almost always inside a string; only then look closer.
    if _long_digit_run(body) and _long_digit_run(_STRING.sub(b'""', body)):
        raise ProtocolError("invalid_json", f"a number has more than {MAX_DIGITS} digits")
    keys = _KEY.findall(body)
    if len(set(keys)) == len(keys) and (_BACKSLASH not in body or _BACKSLASH not in b"".join(keys)):
        return
    # Repeated or escaped key spellings: let a full parse decide per object. Rare, so the
    # json module is loaded only then (8 ms of every client's start otherwise).
    import json

    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ProtocolError("invalid_json", f"duplicate key {exc.args[0]!r}") from None
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "not valid JSON") from None


def _only_its_fields(body: bytes, frame: msgspec.Struct) -> bool:
    """True when ``body`` holds exactly the fields ``frame`` has, each once: nothing to refuse.

    Without a backslash every ``"`` in ``body`` opens or closes a string, and
    each key and string value has two. Every field that ``frame`` has set
    (its ``type`` too) was a key in ``body``, and each string-valued one had a
    string value: that is the number of quotes :func:`_quotes` counts, and
    any other key, repeated or unknown, adds two more. Equal counts therefore
    rule out a duplicate at a fifth of the cost of finding every key.

    They also settle the other checks, since ``frame`` is flat (every field a
    string, an integer or None) and ``body`` holds nothing else: it is nested
    one level deep, and its only numbers are the integers of ``frame``, whose
    sizes :func:`_quotes` checks.

    That needs every field ``frame`` has to have come from ``body``, which is
    true of a flat frame decoded as a member of a tagged union (its tag is
    required), as client frames are. It is not true of a struct nested in
    another: msgspec lets such a struct leave its tag out, and encoding adds
    it back.
    """
    return _BACKSLASH not in body and body.count(b'"') == _quotes(frame)


_NOT_FLAT = -1
# Per frame class: the quotes of its tag and required string fields, which every frame
# of the class has, and the (name, default) of the fields that need looking at.
_PLANS: dict[type, tuple[int, tuple[tuple[str, object], ...]]] = {}


def _quotes(frame: msgspec.Struct) -> int:
    """The quotes in ``frame`` encoded without spaces, or ``_NOT_FLAT`` if no body could match.

    ``_NOT_FLAT`` stands for a field that is neither a string nor an integer
    (a list, a nested struct), or an integer of more than ``MAX_DIGITS`` digits.
    """
    cls = frame.__class__
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _plan(cls)
    count, fields = plan
    for name, default in fields:
        value = getattr(frame, name)
        if value is None or value == default:
            continue  # left out when encoded (omit_defaults)
        kind = value.__class__
        if kind is str:
            count += 4
        elif kind is int and -_BIGGEST < value < _BIGGEST:
            count += 2
        else:
            return _NOT_FLAT
    return count


def _plan(cls: type) -> tuple[int, tuple[tuple[str, object], ...]]:
    fields = msgspec.structs.fields(cls)
    # A required field decoded as a string is always there, with its key's quotes and its
    # value's (a frame's fields are strings, integers or None, each given as in the body).
    constant = [f for f in fields if f.required and f.type is str]
    rest = tuple((f.name, f.default) for f in fields if f not in constant)
    return 4 + 4 * len(constant), rest


def _long_digit_run(data: bytes) -> bool:
    return _LONG_RUN in data.translate(_DIGITS_TO_ZERO)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


_BRACKETS = {ord("{"): 1, ord("["): 1, ord("}"): -1, ord("]"): -1}


def _depth(body: bytes) -> int:
    """Deepest nesting of objects and arrays in ``body`` (strings do not count)."""
    structure = _STRING.sub(b"", body)
    steps = (_BRACKETS.get(b, 0) for b in structure)
    return max(itertools.accumulate(steps, initial=0))


_MISSING = re.compile(r"missing required field `([^`]+)`")
_PATH = re.compile(r"at `\$\.?([^`]*)`")


def _validation_error(text: str, body: bytes) -> ProtocolError:
    ref = _salvage_ref(body)
    missing = _MISSING.search(text)
    if missing is not None:
        field = missing.group(1)
        if field == "type":
            return ProtocolError("unknown_type", "the frame has no type", ref=ref)
        return ProtocolError("missing_field", f"field {field!r} is missing", ref=ref)
    path = _PATH.search(text)
    where = path.group(1) if path is not None else ""
    if where == "type":
        return ProtocolError("unknown_type", "unknown frame type", ref=ref)
    if where == "" and "Expected `object`" in text:
        return ProtocolError("invalid_json", "a frame is one JSON object", ref=ref)
    detail = text.split(" - at ")[0]
    return ProtocolError(
        "missing_field", f"field {where or '?'!r} is mistyped or out of range: {detail}", ref=ref
    )


def _salvage_ref(body: bytes) -> str | None:
    """Best effort: the ``ref`` of a frame that failed validation, so the error can echo it."""
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict):
        ref = obj.get("ref")
        if isinstance(ref, str) and len(ref) <= MAX_REF:
            return ref
    return None
