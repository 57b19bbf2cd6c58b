"""One client connection on the server: bytes in, frames to the registry, queued bytes out.

Theory of operation: :meth:`Session.run` reads whatever chunk the socket has,
feeds it to the frame decoder and hands every complete frame to the
registry. Output never goes straight to the socket: :meth:`Session.send`
appends to an outbox and has the connection written in the next round of
:class:`FlushRounds` (the end of the current loop tick, or later when the
loop is saturated), so a connection gets at most one ``write`` per round
whatever the number of events. When the bytes the transport could not send
yet plus the outbox pass ``sendq_limit``, the outbox is dropped and the peer gets a fatal
``sendq_exceeded``; nobody else ever waits for a slow reader.

Timeouts are deadlines on the read: ``hello`` within ``hello_timeout`` of
connecting, a started frame completed within ``frame_timeout``, and some
frame at least every ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..errors import FrameError, ProtocolError
from ..protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder
from ..protocol.messages import Bye, ClientFrame, Error, Hello, Ping, decode_client, encode
from .limits import FloodPolicy, TokenBucket
from .log import esc
from .registry import Member, Registry

__all__ = ["FlushRounds", "Session", "SessionLimits"]

log = logging.getLogger("achat.server")

READ_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits (all sizes in bytes, times in seconds)."""

    max_frame: int = DEFAULT_MAX_FRAME
    sendq_limit: int = 1024 * 1024
    hello_timeout: float = 10.0
    frame_timeout: float = 10.0
    idle_timeout: float = 120.0
    close_timeout: float = 5.0
    flood: FloodPolicy = field(default_factory=FloodPolicy)


class FlushRounds:
    """Writes every connection that has queued output, all together, in rounds.

    A round is scheduled for the end of the current loop tick, but never
    sooner after the previous round than that round took (when it took more
    than ``min_pause``): writing is at most half of the loop's time, and while
    a round waits, everything queued meanwhile joins it. An idle server
    writes at once; a saturated one writes each connection less often and in
    bigger pieces, which is what keeps a 2,500-member room from spending all
    its time in ``write``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, min_pause: float = 0.0005) -> None:
        self._loop = loop
        self._min_pause = min_pause
        self._dirty: list[Session] = []
        self._scheduled = False
        self._not_before = 0.0
        self.rounds = 0

    def mark(self, session: Session) -> None:
        """Have ``session`` flushed in the next round."""
        self._dirty.append(session)
        if not self._scheduled:
            self._scheduled = True
            wait = self._not_before - time.monotonic()
            if wait > 0:
                self._loop.call_later(wait, self._round)
            else:
                self._loop.call_soon(self._round)

    def _round(self) -> None:
        self._scheduled = False
        self.rounds += 1
        started = time.monotonic()
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            session._flush()
        ended = time.monotonic()
        took = ended - started
        self._not_before = ended + took if took > self._min_pause else 0.0


class Session:
    """Drives one connection; implements the registry's :class:`~achat.server.registry.Peer`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        registry: Registry,
        limits: SessionLimits,
        rounds: FlushRounds,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._registry = registry
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._rounds = rounds
        self._decoder = FrameDecoder(limits.max_frame)
        self._bucket = TokenBucket(limits.flood, self._loop.time())
        self._out: list[bytes] = []
        self._scheduled = False
        self._closing = False
        self._member: Member | None = None
        self._quit_reason = "quit"
        peer = writer.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = str(peer[0]) if isinstance(peer, tuple) else str(peer)

    # -- Peer ---------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; it is written with everything else queued this tick."""
        if self._closing:
            return
        self._out.append(frame)
        if not self._scheduled:
            self._scheduled = True
            self._rounds.mark(self)

    def close(self, frame: bytes | None = None) -> None:
        """Flush what is queued, then ``frame``, then close. Idempotent."""
        if self._closing:
            return
        # Messages already stored reach this peer too before it goes.
        self._registry.fan_out()
        self._flush()
        if frame is not None and not self._writer.is_closing():
            self._writer.write(frame)
        self._closing = True
        self._out.clear()
        self._writer.close()
        # Wake the read loop now, so the member leaves the registry at once instead of
        # when the (possibly stuck) transport finally lets go.
        self._reader.feed_eof()
        # A peer that stops reading would keep a closing transport alive forever.
        self._loop.call_later(self._limits.close_timeout, self._abort)

    # -- driving ------------------------------------------------------------

    @property
    def nick(self) -> str | None:
        return self._member.nick if self._member is not None else None

    async def run(self) -> None:
        """Serve the connection until either side closes it; always cleans up."""
        try:
            await self._serve()
        except (ConnectionError, OSError) as exc:
            log.debug("connection error addr=%s: %s", self.addr, exc)
        finally:
            if self._member is not None:
                self._registry.unregister(self._member, self._quit_reason)
            self.close()

    def fail(self, exc: ProtocolError) -> None:
        """Answer with a fatal ``error`` built from ``exc`` and close."""
        self.close(encode(Error(code=exc.code, message=exc.message, fatal=True, ref=exc.ref)))

    async def _serve(self) -> None:
        loop = self._loop
        limits = self._limits
        connected = loop.time()
        last_frame = connected
        frame_started: float | None = None
        pinged = False
        while not self._closing:
            if self._member is None:
                deadline, why = connected + limits.hello_timeout, "no hello"
            elif not pinged:
                # Half-way through the idle time, ask a quiet client whether it is still there.
                deadline, why = last_frame + limits.idle_timeout / 2, "ping"
            else:
                deadline, why = last_frame + limits.idle_timeout, "idle"
            if frame_started is not None and frame_started + limits.frame_timeout < deadline:
                deadline, why = frame_started + limits.frame_timeout, "frame"
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._reader.read(READ_CHUNK)
            except TimeoutError:
                if why == "ping":
                    pinged = True
                    self.send(encode(Ping(ref="keepalive")))
                    continue
                self._timed_out(why)
                return
            if not data:
                return
            try:
                bodies = self._decoder.receive_data(data)
            except FrameError as exc:
                log.info("bad frame addr=%s code=%s", self.addr, exc.code)
                # Frames completed before the bad header are served, so that what happens
                # does not depend on how TCP happened to split the stream.
                for body in exc.frames:
                    if not self._dispatch(body) or self._closing:
                        return
                self.fail(exc)
                return
            now = loop.time()
            if bodies:
                last_frame = now
                pinged = False
            if not self._decoder.in_frame:
                frame_started = None
            elif frame_started is None or bodies:
                frame_started = now
            for body in bodies:
                if not self._dispatch(body) or self._closing:
                    return

    def _dispatch(self, body: bytes) -> bool:
        """Handle one frame body; False when the connection must end."""
        try:
            frame: ClientFrame = decode_client(body)
        except ProtocolError as exc:
            if self._member is None:
                self.fail(exc)
                return False
            # Garbage costs a token like any frame, so it cannot flood for free.
            if not self._bucket.take(self._loop.time()):
                return self._flooded(exc.ref)
            self._refuse(exc)
            return True
        if self._member is None:
            return self._hello(frame)
        if not isinstance(frame, Bye) and not self._bucket.take(self._loop.time()):
            return self._flooded(getattr(frame, "ref", None))
        try:
            self._registry.handle(self._member, frame)
        except ProtocolError as exc:
            if exc.ref is None:
                exc.ref = getattr(frame, "ref", None)
            self._refuse(exc)
            return not exc.fatal
        if isinstance(frame, Bye):
            if frame.reason:
                self._quit_reason = frame.reason
            log.info("bye nick=%s", esc(self._member.nick))
            return False
        return True

    def _flooded(self, ref: str | None) -> bool:
        """Refuse a frame over the rate limit; drop a connection that keeps flooding."""
        if self._bucket.flooding():
            log.info("flooding addr=%s nick=%s", self.addr, esc(self.nick or ""))
            self.fail(ProtocolError("rate_limited", "disconnected for flooding", fatal=True))
            return False
        policy = self._limits.flood
        self.send(
            encode(
                Error(
                    code="rate_limited",
                    message=f"slow down: at most {policy.rate:g} frames a second "
                    f"(bursts of {policy.burst:g}); this frame was dropped",
                    fatal=False,
                    ref=ref,
                )
            )
        )
        return True

    def _hello(self, frame: ClientFrame) -> bool:
        if not isinstance(frame, Hello):
            self.fail(ProtocolError("not_registered", "say hello first", fatal=True))
            return False
        try:
            self._member = self._registry.register(self, frame, self.addr)
        except ProtocolError as exc:
            log.info("refused addr=%s code=%s nick=%s", self.addr, exc.code, esc(frame.nick))
            self.fail(exc)
            return False
        return True

    def _refuse(self, exc: ProtocolError) -> None:
        if exc.fatal:
            self.fail(exc)
        else:
            self.send(encode(Error(code=exc.code, message=exc.message, fatal=False, ref=exc.ref)))

    def _timed_out(self, why: str) -> None:
        log.info("timeout addr=%s why=%s", self.addr, why)
        if why == "no hello":
            self.fail(ProtocolError("not_registered", "no hello in time", fatal=True))
        elif why == "frame":
            self.fail(ProtocolError("idle_timeout", "a frame took too long to arrive", fatal=True))
        else:
            self.fail(ProtocolError("idle_timeout", "nothing received for too long", fatal=True))

    def _flush(self) -> None:
        self._scheduled = False
        out = self._out
        if self._closing or not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self._transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > self._limits.sendq_limit:
            log.info("sendq exceeded addr=%s nick=%s", self.addr, esc(self.nick or ""))
            self.fail(
                ProtocolError(
                    "sendq_exceeded",
                    "you are reading too slowly; rejoin with since to catch up",
                    fatal=True,
                )
            )
            return
        transport.write(data)

    def _abort(self) -> None:
        # A no-op when the transport has already closed cleanly.
        self._writer.transport.abort()
