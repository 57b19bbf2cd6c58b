"""Typed frames and the strict JSON codec: every content error gets the contract's code."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from achat.errors import ProtocolError
from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder


def code_of(body: bytes) -> str:
    with pytest.raises(ProtocolError) as exc:
        m.decode_client(body)
    assert not exc.value.fatal
    return exc.value.code


CLIENT_FRAMES: list[tuple[dict[str, Any], type]] = [
    ({"type": "hello", "nick": "ana", "version": 1, "client": "x"}, m.Hello),
    ({"type": "join", "room": "a", "since": 4}, m.Join),
    ({"type": "part", "room": "a", "reason": "bye"}, m.Part),
    ({"type": "say", "room": "a", "text": "hi", "ref": "r"}, m.Say),
    ({"type": "dm", "to": "bob", "text": "hi"}, m.Dm),
    ({"type": "nick", "nick": "ana2"}, m.Nick),
    ({"type": "who", "room": "a"}, m.Who),
    ({"type": "rooms"}, m.RoomsRequest),
    ({"type": "history", "room": "a", "before": 9, "limit": 5}, m.HistoryRequest),
    ({"type": "topic", "room": "a", "topic": ""}, m.Topic),
    ({"type": "ping", "ref": "p"}, m.Ping),
    ({"type": "bye"}, m.Bye),
]


@pytest.mark.parametrize(("obj", "kind"), CLIENT_FRAMES)
def test_every_client_frame_decodes(obj: dict[str, Any], kind: type) -> None:
    """Each client frame type of protocol v1 decodes to its struct with its fields."""
    frame = m.decode_client(json.dumps(obj).encode())
    assert type(frame) is kind
    for key, value in obj.items():
        if key != "type":
            assert getattr(frame, key) == value


SERVER_FRAMES: list[msgspec.Struct] = [
    m.Welcome(nick="ana", server="s", version=1, max_frame=65536, max_text=4000, motd="hi"),
    m.Welcome(
        nick="ana", server="s", version=1, max_frame=1, max_text=1, send_rate=0.5, send_burst=2
    ),
    m.Message(room="a", seq=1, ts=2, sender="ana", text="hello\nworld"),
    m.DmEvent(sender="ana", to="bob", id=3, ts=4, text="psst"),
    m.Ack(ref="r", ts=5, room="a", seq=1),
    m.Ack(ref="r", ts=5, id=9),
    m.Joined(room="a", nick="ana", ts=1),
    m.Parted(room="a", nick="ana", ts=1, reason="quit"),
    m.Renamed(old="a", new="b", ts=1),
    m.Names(room="a", nicks=["ana", "bob"], topic="t", seq=7, ref="x"),
    m.Rooms(rooms=[m.RoomInfo(room="a", members=2, topic="")]),
    m.History(
        room="a", messages=[m.Message(room="a", seq=1, ts=2, sender="x", text="y")], more=True
    ),
    m.TopicEvent(room="a", topic="t", by="ana", ts=1),
    m.Error(code="not_in_room", message="no", fatal=False, ref="r"),
    m.Pong(ref="p"),
]


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_frames_round_trip(frame: msgspec.Struct) -> None:
    """Every server frame survives encode (with its length prefix) and decode_server."""
    data = m.encode(frame)
    [body] = FrameDecoder().receive_data(data)
    assert m.decode_server(body) == frame


@given(
    st.lists(
        st.builds(
            m.Message,
            room=st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True),
            seq=st.integers(min_value=1, max_value=2**53),
            ts=st.integers(min_value=0, max_value=2**53),
            sender=st.text(min_size=1, max_size=20),
            text=st.text(max_size=300),
        ),
        max_size=20,
    )
)
def test_frames_encoded_together_are_the_frames_encoded_one_by_one(
    messages: list[m.Message],
) -> None:
    """encode_many gives each frame's bytes, length prefix and all, one after another."""
    data = m.encode_many(messages)
    assert data == b"".join(map(m.encode, messages))
    bodies = FrameDecoder(max_frame=1 << 20).receive_data(data)
    assert [m.decode_server(body) for body in bodies] == messages


def test_from_is_the_wire_name_of_sender() -> None:
    """Message and dm carry the sender under the JSON key 'from'."""
    body = m.encode_body(m.Message(room="a", seq=1, ts=2, sender="ana", text="x"))
    assert json.loads(body)["from"] == "ana"
    assert "sender" not in json.loads(body)


def test_error_always_says_whether_fatal() -> None:
    """An error frame carries fatal even when false."""
    body = m.encode_body(m.Error(code="x", message="y", fatal=False))
    assert json.loads(body)["fatal"] is False


def test_unknown_fields_are_ignored() -> None:
    """Fields a frame does not define are ignored, for forward compatibility."""
    frame = m.decode_client(b'{"type":"ping","future":{"a":[1,2]},"x":null}')
    assert isinstance(frame, m.Ping)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"type":"say","room":"a","text":"\xff"}', "invalid_json"),
        (b'{"type":"say","room":"a","text":"\\ud800"}', "invalid_json"),
        (b'{"type":"say","room":"a","text":"a\x01b"}', "invalid_json"),
        (b'{"type":"ping","x":"a\nb"}', "invalid_json"),
        (b'{"type":"ping","x":NaN}', "invalid_json"),
        (b'{"type":"ping","x":Infinity}', "invalid_json"),
        (b'{"type":"ping","x":-Infinity}', "invalid_json"),
        (b'{"type":"ping"', "invalid_json"),
        (b"[1,2]", "invalid_json"),
        (b'"ping"', "invalid_json"),
        (b'{"type":"ping","ref":"a","ref":"b"}', "invalid_json"),
        (b'{"type":"ping","r\\u0065f":"a","ref":"b"}', "invalid_json"),
        (b'{"type":"ping","x":{"k":1,"k":2}}', "invalid_json"),
        (b'{"type":"teleport"}', "unknown_type"),
        (b'{"room":"a"}', "unknown_type"),
        (b'{"type":"say","room":"a"}', "missing_field"),
        (b'{"type":"say","room":5,"text":"x"}', "missing_field"),
        (b'{"type":"join","room":"a","since":-1}', "missing_field"),
        (b'{"type":"join","room":"a","since":123456789012345678901234567890}', "invalid_json"),
        (b'{"type":"ping","x":1.000000000000000000001}', "invalid_json"),
        (b'{"type":"ping","x":1e000000000000000000001}', "invalid_json"),
        (b'{"type":"ping","x":-123456789012345678901}', "invalid_json"),
        (b'{"type":"history","room":"a","limit":0}', "missing_field"),
        (b'{"type":"history","room":"a","limit":501}', "missing_field"),
        (b'{"type":"ping","ref":"' + b"r" * 65 + b'"}', "missing_field"),
    ],
)
def test_content_errors_have_contract_codes(body: bytes, code: str) -> None:
    """Each kind of bad content is refused, non-fatally, with the contract's code."""
    assert code_of(body) == code


def test_nesting_limit_is_eight() -> None:
    """Eight levels of nesting are accepted, nine are refused."""
    eight = b'{"type":"ping","x":' + b"[" * 7 + b"1" + b"]" * 7 + b"}"
    nine = b'{"type":"ping","x":' + b"[" * 8 + b"1" + b"]" * 8 + b"}"
    assert isinstance(m.decode_client(eight), m.Ping)
    assert code_of(nine) == "invalid_json"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """A text full of brackets is not mistaken for deep nesting."""
    frame = m.decode_client(b'{"type":"say","room":"a","text":"[[[[[[[[[[{{{{{{{{{{"}')
    assert isinstance(frame, m.Say)


def test_same_key_in_different_objects_is_fine() -> None:
    """Repeating a key in two different objects is not a duplicate."""
    assert isinstance(m.decode_client(b'{"type":"ping","a":{"k":1},"b":{"k":2}}'), m.Ping)


def test_ref_is_salvaged_for_the_error() -> None:
    """A frame that fails validation still has its ref echoed on the error."""
    with pytest.raises(ProtocolError) as exc:
        m.decode_client(b'{"type":"say","room":"a","ref":"r-7"}')
    assert exc.value.ref == "r-7"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(body: bytes) -> None:
    """Any byte string either decodes or raises ProtocolError, never anything else."""
    code = None
    try:
        m.decode_client(body)
    except ProtocolError as exc:
        code = exc.code
    assert code in {None, "invalid_json", "unknown_type", "missing_field"}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.sampled_from(["say", "join", "dm", "history", "hello", "zzz", "ping"]),
    st.dictionaries(st.sampled_from(["room", "text", "to", "ref", "limit", "since", "nick"]), JSON),
)
def test_arbitrary_objects_raise_only_protocol_errors(kind: str, fields: dict[str, Any]) -> None:
    """Frames with arbitrary field values either decode or raise ProtocolError."""
    body = json.dumps({"type": kind, **fields}).encode()
    code = None
    try:
        m.decode_client(body)
    except ProtocolError as exc:
        code = exc.code
    assert code in {None, "invalid_json", "unknown_type", "missing_field"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"say","room":"a","room":"a","text":"x"}',
        b'{"type":"say","room":"a","text":"x","text":"y","ref":"1"}',
        b'{"type":"say","type":"say","room":"a","text":"x"}',
        b'{"type":"say","room" :"a","room":"b","text":"x"}',
        b'{"type":"say","ref":null,"ref":null,"room":"a","text":"x"}',
        b'{"type":"ping","x":1,"x":2}',
        b'{"type":"ping","ref":"r","x":{"y":1,"y":":"}}',
        b'{"type":"join","room":"a","since":1,"since":2}',
    ],
)
def test_duplicates_in_frames_that_decode_are_refused(body: bytes) -> None:
    """A frame the decoder accepts is still refused when a key repeats, whatever its shape."""
    m._CLIENT_DECODER.decode(body)  # the fast decoder alone lets it through
    assert code_of(body) == "invalid_json"


@pytest.mark.parametrize(
    "body",
    [
        # A message inside history may leave out its "type"; its duplicates still count.
        b'{"type":"history","room":"r","messages":[{"room":"r","seq":1,"ts":1,"from":"a",'
        b'"text":"b","text":"c"}],"more":false}',
        b'{"type":"history","room":"r","messages":[{"room":"r","seq":2,"seq":3,"ts":1,'
        b'"from":"a","text":"b"}],"more":false}',
        b'{"type":"history","room":"r","room":"q","messages":[{"room":"r","seq":1,"ts":1,'
        b'"from":"a","text":"b"}],"more":false}',
        b'{"type":"history","type":"history","room":"r","messages":[],"more":false}',
    ],
)
def test_duplicates_in_server_frames_are_refused(body: bytes) -> None:
    """The client refuses a server frame with a repeated key, nested ones included."""
    m._SERVER_DECODER.decode(body)  # the fast decoder alone lets it through
    with pytest.raises(ProtocolError) as exc:
        m.decode_server(body)
    assert exc.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("limit", "rate", "burst"),
    [
        (b'"send_rate":5,"send_burst":10', 5, 10),
        (b'"send_rate":-1', -1, None),
        (b'"send_rate":"5/s","send_burst":[10]', "5/s", [10]),
        (b'"send_burst":0.5', None, 0.5),
        (b'"send_rate":1e999', float("inf"), None),
    ],
)
def test_a_welcome_takes_any_flood_limit_as_given(
    limit: bytes, rate: object, burst: object
) -> None:
    """The announced flood limit is an added field: whatever a server puts there, the
    welcome is valid (the client decides what it can use), as with an unknown field."""
    body = b'{"type":"welcome","nick":"a","server":"s","version":1,"max_frame":9,"max_text":9,'
    welcome = m.decode_server(body + limit + b"}")
    assert isinstance(welcome, m.Welcome)
    assert (welcome.send_rate, welcome.send_burst) == (rate, burst)


_SEPARATORS = st.sampled_from(["", " ", "\n"])
_EXTRA_KEYS = st.sampled_from(["room", "text", "ref", "since", "version", "x", "type"])


@st.composite
def _objects_with_repeats(draw: st.DrawFn) -> bytes:
    """A frame-like JSON object whose keys may repeat, spaced and (or not) escaped in any way."""
    kind = draw(st.sampled_from(["say", "ping", "join", "hello"]))
    required = {"say": ["room", "text"], "ping": [], "join": ["room"], "hello": ["nick", "version"]}
    keys = required[kind] + draw(st.lists(_EXTRA_KEYS, max_size=4))
    # Without a backslash anywhere the quick check decides; with one, the full one.
    escapes = draw(st.booleans())
    texts = ["a", "b", ":", "é", "{", " "] + (["\\", 'x"y'] if escapes else [])
    pairs = [("type", json.dumps(kind))]
    for key in keys:
        if key in ("room", "text", "ref", "nick"):
            value = json.dumps(draw(st.sampled_from(texts)), ensure_ascii=False)
        elif key == "since":
            value = json.dumps(draw(st.integers(min_value=0, max_value=10)))
        elif key == "version":
            # Any size: msgspec takes any integer here, the digit limit must still hold.
            digits = draw(st.integers(min_value=1, max_value=25))
            number = draw(st.integers(min_value=10 ** (digits - 1), max_value=10**digits - 1))
            value = str(number * draw(st.sampled_from([1, -1])))
        elif key == "type":
            value = json.dumps(kind)
        else:
            value = json.dumps(draw(JSON if escapes else st.integers() | st.booleans()))
        pairs.append((key, value))
    parts = []
    for key, value in draw(st.permutations(pairs)):
        spelled = json.dumps(key)
        if escapes and draw(st.booleans()):
            spelled = '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'
        parts.append(spelled + draw(_SEPARATORS) + ":" + draw(_SEPARATORS) + value)
    return ("{" + ",".join(parts) + "}").encode()


@settings(max_examples=400)
@given(_objects_with_repeats())
def test_the_quick_duplicate_check_agrees_with_the_full_one(body: bytes) -> None:
    """For every frame that decodes, checking with the frame decides as the full check does."""
    try:
        frame = m._CLIENT_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return
    outcomes: list[str | None] = []
    for with_frame in (frame, None):
        try:
            m._check_json(body, with_frame)
            outcomes.append(None)
        except ProtocolError as exc:
            outcomes.append(exc.code)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    ("version", "code"),
    [
        (b"99999999999999999999", None),
        (b"-99999999999999999999", None),
        (b"100000000000000000000", "invalid_json"),
        (b"-100000000000000000000", "invalid_json"),
    ],
)
def test_an_unbounded_integer_field_keeps_the_digit_limit(version: bytes, code: str | None) -> None:
    """A frame with exactly its own fields skips the byte scans, but not the digit limit."""
    body = b'{"type":"hello","nick":"ana","version":' + version + b"}"
    assert isinstance(m._CLIENT_DECODER.decode(body), m.Hello)  # msgspec takes any int
    if code is None:
        assert m.decode_client(body) == m.Hello(nick="ana", version=int(version))
    else:
        assert code_of(body) == code


def test_long_digit_runs_inside_strings_are_fine() -> None:
    """A phone number or id in a text is not a number: only JSON numbers are limited."""
    frame = m.decode_client(b'{"type":"say","room":"a","text":"call 0012345678901234567890123"}')
    assert isinstance(frame, m.Say)
    assert isinstance(m.decode_client(b'{"type":"ping","x":12345678901234567890}'), m.Ping)


# -- several frames at once ---------------------------------------------------------


def _each(bodies: list[bytes]) -> list[m.ClientFrame] | str:
    """What decoding each body alone gives: every frame, or the first error's code."""
    frames = []
    for body in bodies:
        try:
            frames.append(m.decode_client(body))
        except ProtocolError as exc:
            return exc.code
    return frames


def test_a_run_of_plain_frames_is_decoded_at_once() -> None:
    """Frames without braces in their strings take the one pass, and give what decoding
    each alone gives."""
    bodies = [json.dumps(obj, separators=(",", ":")).encode() for obj, _ in CLIENT_FRAMES]
    bodies += [
        b'{ "type" : "say", "room": "a", "text": "caf\xc3\xa9 \xf0\x9f\x99\x82", "ref": "7" }',
        b'{"type":"say","room":"a","text":"two\\nlines\\ttab \\u00e9 [x]"}',
        b'{"type":"say","room":"a","\\u0074ext":"a key spelled with escapes"}',
    ]
    frames = m.decode_client_many(bodies)
    assert frames is not None
    assert frames == _each(bodies)


@pytest.mark.parametrize(
    "bodies",
    [
        # Each is wrong alone; joined by commas, they would make two valid frames.
        [b'{"type":"ping"},{"type":"ping"', b'"ref":"x"}'],
        [b'{"type":"say","room":"a","text":"x"}', b'{"type":"ping","ref":"}', b'{"type":"ping"}'],
        [b'{"type":"say","room":"a","text":"[1,"}', b'"2]"}'],
        # Two bodies with a brace each, read as one frame with the braces in its text.
        [b'{"type":"say","room":"a","text":"}', b'{","ref":"1"}'],
        # A repeated key, or one frame's quotes made up by another's missing ones.
        [b'{"type":"ping","ref":"a","ref":"b"}', b'{"type":"ping"}'],
        [b'{"type":"say","room":"a","text":"x","x":"1"}', b'{"type":"ping","ref":1}'],
        # Legal frames that only the slow way takes: a brace in a text, an escaped quote,
        # a field given its default.
        [b'{"type":"say","room":"a","text":"{}"}', b'{"type":"ping"}'],
        [b'{"type":"say","room":"a","text":"a\\"b"}', b'{"type":"ping"}'],
        [b'{"type":"join","room":"a","since":null}', b'{"type":"ping"}'],
        # An integer too long for the quick count, twice, to hide two extra quotes.
        [b'{"type":"hello","nick":"a","version":1' + b"0" * 25 + b',"x":""}'] * 2,
    ],
)
def test_bodies_that_need_a_closer_look_are_left_to_decode_one_by_one(
    bodies: list[bytes],
) -> None:
    """None whenever the one pass could read the bodies differently from one by one."""
    assert m.decode_client_many(bodies) is None


@st.composite
def _cut_frames(draw: st.DrawFn) -> list[bytes]:
    """Valid frames written one after another with commas between them, then split into
    bodies at any of its commas (inside a frame or between two): joined again with commas,
    the bodies are the valid stream, though most of them are invalid alone."""
    objects = draw(st.lists(st.sampled_from([obj for obj, _ in CLIENT_FRAMES]), min_size=1))
    texts = draw(st.lists(st.sampled_from(["x", "{", "}", "[", "]", '"', ",", "a]", "}{"])))
    objects = [
        obj | {"text": text} if "text" in obj else obj
        for obj, text in zip(objects, texts + ["x"] * len(objects), strict=False)
    ]
    stream = ",".join(json.dumps(obj, separators=(",", ":")) for obj in objects)
    commas = [i for i, c in enumerate(stream) if c == ","]
    cuts = sorted(draw(st.sets(st.sampled_from(commas)))) if commas else []
    edges = [-1, *cuts, len(stream)]
    bodies = [stream[a + 1 : b].encode() for a, b in itertools.pairwise(edges)]
    return [body for body in bodies if body]  # the framing never gives an empty one


_BODY = (
    _objects_with_repeats()
    | st.sampled_from([json.dumps(obj).encode() for obj, _ in CLIENT_FRAMES])
    | st.binary(min_size=1, max_size=40)
    | st.text(alphabet='{}[]",:\\ ab1', min_size=1, max_size=30).map(str.encode)
)


@settings(max_examples=600)
@given(st.lists(_BODY, min_size=1, max_size=6) | _cut_frames())
def test_the_one_pass_decodes_as_one_by_one_or_not_at_all(bodies: list[bytes]) -> None:
    """Whatever the bodies, the one pass gives exactly what decoding each alone gives
    (and only when every one of them decodes), or leaves them to that."""
    frames = m.decode_client_many(bodies)
    if frames is not None:
        assert frames == _each(bodies)
