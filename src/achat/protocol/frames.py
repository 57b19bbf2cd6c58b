"""Length-prefixed framing of protocol v1: a 4-byte big-endian length, then the body.

Theory of operation: :class:`FrameDecoder` is fed whatever chunks the socket
gives (:meth:`FrameDecoder.receive_data`) and hands back every complete frame
body in them. It reads the 4-byte header first and refuses a length of 0 or
above ``max_frame`` *before* it buffers a single byte of the body, so a peer
cannot make it allocate more than ``max_frame`` plus one read chunk.
"""

from __future__ import annotations

import struct

from ..errors import FrameError

__all__ = ["DEFAULT_MAX_FRAME", "HEADER", "HEADER_SIZE", "FrameDecoder", "encode_frame"]

DEFAULT_MAX_FRAME = 65_536
HEADER_SIZE = 4
#: A header as ``struct`` packs it: the body's length, 4 bytes, big-endian.
HEADER = struct.Struct(">I")


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` (one encoded JSON object) with its length."""
    return len(body).to_bytes(HEADER_SIZE, "big") + body


class FrameDecoder:
    """Incremental decoder: bytes in, complete frame bodies out.

    After a :class:`~achat.errors.FrameError` the stream is unusable and the
    decoder refuses further data; the caller sends the error and closes.
    """

    __slots__ = ("_broken", "_buffer", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        # Length of the body being read, or None while reading a header.
        self._need: int | None = None
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held right now."""
        return len(self._buffer)

    @property
    def in_frame(self) -> bool:
        """True while part of a frame (header or body) has arrived but not all of it."""
        return bool(self._buffer) or self._need is not None

    def receive_data(self, data: bytes) -> list[bytes]:
        """Consume ``data`` and return the bodies of every frame it completed, in order.

        Raises :class:`FrameError` (``bad_frame`` for a zero length,
        ``frame_too_large`` above ``max_frame``) as soon as a bad header is seen;
        the frames completed before it are on the exception's ``frames``.

        The bodies are ``bytes`` of their own (slices of ``data``, which is made
        ``bytes`` first if it is a ``bytearray`` or a view of someone's buffer).
        """
        if self._broken:
            raise FrameError("bad_frame", "stream already failed")
        buf = self._buffer
        need = self._need
        if data.__class__ is not bytes:
            data = bytes(data)
        if buf:
            buf += data
            if need is not None and len(buf) < need:
                return []  # still inside a body: nothing to look at yet
            data = bytes(buf)
            buf.clear()
        # ``data`` is bytes: a frame's body is one slice of it, and what is left of it
        # goes back to the buffer once, instead of the buffer shifting after every read.
        frames: list[bytes] = []
        pos = 0
        end = len(data)
        unpack = HEADER.unpack_from
        while True:
            if need is None:
                if end - pos < HEADER_SIZE:
                    break
                (need,) = unpack(data, pos)
                pos += HEADER_SIZE
                if need == 0:
                    self._fail()
                    raise FrameError("bad_frame", "frame length 0", frames)
                if need > self.max_frame:
                    self._fail()
                    raise FrameError(
                        "frame_too_large",
                        f"frame of {need} bytes is over the limit of {self.max_frame}",
                        frames,
                    )
            stop = pos + need
            if stop > end:
                break
            frames.append(data[pos:stop])
            pos = stop
            need = None
        if pos < end:
            buf += memoryview(data)[pos:]
        self._need = need
        return frames

    def _fail(self) -> None:
        self._broken = True
        self._buffer.clear()
        self._need = None
