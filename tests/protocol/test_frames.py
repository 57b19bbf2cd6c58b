"""The length-prefix codec: every split point, limits checked on the header."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from achat.errors import FrameError
from achat.protocol.frames import FrameDecoder, encode_frame

BODIES = [b'{"type":"ping"}', b"{}", b'{"type":"say","room":"a","text":"' + b"x" * 300 + b'"}']
STREAM = b"".join(encode_frame(b) for b in BODIES)


def feed(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += decoder.receive_data(chunk)
    return out


def test_encode_prefixes_big_endian_length() -> None:
    """encode_frame puts the body's length in 4 big-endian bytes before it."""
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 300)[:4] == b"\x00\x00\x01\x2c"


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_every_single_split_point(cut: int) -> None:
    """Cutting the stream in two at any byte yields the same frames in order."""
    assert feed(FrameDecoder(), [STREAM[:cut], STREAM[cut:]]) == BODIES


def test_byte_by_byte() -> None:
    """Feeding one byte at a time yields every frame exactly when its last byte arrives."""
    decoder = FrameDecoder()
    got: list[bytes] = []
    ends = []
    pos = 0
    for body in BODIES:
        pos += 4 + len(body)
        ends.append(pos)
    for i in range(len(STREAM)):
        frames = decoder.receive_data(STREAM[i : i + 1])
        if frames:
            assert i + 1 in ends
        got += frames
    assert got == BODIES
    assert not decoder.in_frame


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_hypothesis_splits(cuts: list[int]) -> None:
    """Any set of split points yields the same frames."""
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert feed(FrameDecoder(), chunks) == BODIES


@given(st.lists(st.binary(min_size=1, max_size=200), max_size=10), st.data())
def test_hypothesis_round_trip(bodies: list[bytes], data: st.DataObject) -> None:
    """Arbitrary bodies survive encode, arbitrary chunking and decode."""
    stream = b"".join(encode_frame(b) for b in bodies)
    size = data.draw(st.integers(min_value=1, max_value=max(1, len(stream))))
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert feed(FrameDecoder(max_frame=200), chunks) == bodies


def test_zero_length_is_bad_frame() -> None:
    """A length of 0 is refused with bad_frame."""
    with pytest.raises(FrameError) as exc:
        FrameDecoder().receive_data(b"\x00\x00\x00\x00")
    assert exc.value.code == "bad_frame"
    assert exc.value.fatal


def test_oversize_refused_on_the_header_alone() -> None:
    """A length over max_frame is refused as soon as the 4 header bytes arrive, nothing buffered."""
    decoder = FrameDecoder(max_frame=1000)
    assert decoder.receive_data(b"\x00\x00") == []
    with pytest.raises(FrameError) as exc:
        decoder.receive_data(b"\x03\xe9")  # 1001
    assert exc.value.code == "frame_too_large"
    assert decoder.buffered == 0


def test_exact_limit_is_accepted() -> None:
    """A frame of exactly max_frame bytes is fine."""
    body = b"y" * 1000
    assert FrameDecoder(max_frame=1000).receive_data(encode_frame(body)) == [body]


def test_huge_header_does_not_allocate() -> None:
    """A 4 GiB length is refused without waiting for or buffering any body."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.receive_data(b"\xff\xff\xff\xff" + b"z" * 100)
    assert decoder.buffered == 0


def test_good_frames_before_a_bad_header_are_not_returned_after_failure() -> None:
    """After a framing error the decoder refuses all further data."""
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(FrameError):
        decoder.receive_data(encode_frame(b"ok") + b"\x00\x00\x00\x00")
    with pytest.raises(FrameError):
        decoder.receive_data(encode_frame(b"ok"))


def test_in_frame_tracks_partial_frames() -> None:
    """in_frame is true while a header or body is incomplete, false between frames."""
    decoder = FrameDecoder()
    assert not decoder.in_frame
    decoder.receive_data(b"\x00")
    assert decoder.in_frame
    decoder.receive_data(b"\x00\x00\x02a")
    assert decoder.in_frame
    assert decoder.buffered == 1
    assert decoder.receive_data(b"b") == [b"ab"]
    assert not decoder.in_frame
