"""The generator's receive path: frames counted, not parsed, however the stream is split."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

from hypothesis import given
from hypothesis import strategies as st

from achat.bench.load import (
    BRACE,
    FRAME,
    ClientPlan,
    WorkerPlan,
    WorkerReport,
    _BenchClient,
    _Window,
)
from achat.protocol.frames import encode_frame


class Wire:
    """The transport end the client writes to (the receive path is what is tested)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


def message(seq: int, sent_ns: int | None = None) -> bytes:
    """A message frame stamped ``sent_ns`` (now by default)."""
    text = b"t=%d xxxxxxxx" % (time.time_ns() if sent_ns is None else sent_ns)
    return encode_frame(
        b'{"type":"message","room":"r","seq":%d,"ts":1,"from":"a","text":"%s"}' % (seq, text)
    )


STREAM = b"".join(
    [
        encode_frame(b'{"type":"welcome","nick":"b0","server":"s","version":1}'),
        encode_frame(b'{"type":"joined","room":"r","nick":"b0","ts":1}'),
        encode_frame(b'{"type":"names","room":"r","nicks":["b0"]}'),
        message(1),
        message(2),
        encode_frame(b'{"type":"ping","ref":"keepalive"}'),
        message(3),
        encode_frame(b'{"type":"error","code":"rate_limited","message":"m","fatal":false}'),
        encode_frame(b'{"type":"ack","ref":"1","ts":1,"room":"r","seq":4}'),
        message(4),
        encode_frame(b'{"type":"ack","ref":"2","ts":1,"room":"r","seq":5}'),
    ]
)


def feed(
    chunks: list[bytes],
    pipeline: int = 0,
    clients: list[_BenchClient] | None = None,
    span: tuple[int, int] = (0, 2**63),
) -> tuple[WorkerReport, Wire]:
    """Feed ``chunks`` to one client; its report and what it wrote.

    Acks count throughout; messages count if sent in ``span`` (ns since the epoch).
    The client is appended to ``clients`` if given.
    """

    async def run() -> tuple[WorkerReport, Wire]:
        window = _Window()
        window.start, window.end = 0.0, float("inf")
        window.start_ns, window.end_ns = span
        plan = WorkerPlan("127.0.0.1", 1, [], duration=1.0, warmup=0.0, seed=1, pipeline=pipeline)
        report = WorkerReport()
        client = _BenchClient(plan, ClientPlan("b0", "r", 0.0), report, window, random.Random(1))
        if clients is not None:
            clients.append(client)
        wire = Wire()
        client.connection_made(wire)  # type: ignore[arg-type]
        client.in_flight = pipeline  # as if that many says were out
        for chunk in chunks:
            client.data_received(chunk)
        return report, wire

    return asyncio.run(run())


def check(report: WorkerReport, wire: Wire) -> None:
    assert report.delivered == 4
    assert report.joined == 1
    assert report.errors == 1
    assert sum(b"pong" in w for w in wire.written) == 1
    # At most the first and last stamp of each read; a stamp cut by a split is skipped.
    assert all(0 <= x < 60 for x in report.latencies)


def test_every_split_in_two() -> None:
    for at in range(1, len(STREAM)):
        report, wire = feed([STREAM[:at], STREAM[at:]])
        check(report, wire)
        assert 1 <= len(report.latencies) <= 4, at


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=40))
def test_any_split(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(STREAM)]
    check(*feed([STREAM[a:b] for a, b in itertools.pairwise(points)]))


def test_every_ping_in_a_read_gets_its_pong() -> None:
    ping = encode_frame(b'{"type":"ping","ref":"keepalive"}')
    report, wire = feed([STREAM + ping + message(5) + ping])
    assert report.delivered == 5
    assert b"".join(wire.written).count(b'"pong"') == 3


def test_one_byte_at_a_time_and_acks_count_for_ingest() -> None:
    report, wire = feed([STREAM[i : i + 1] for i in range(len(STREAM))], pipeline=4)
    check(report, wire)
    assert report.acked == 2


def test_braces_and_frame_lookalikes_in_texts_are_not_frames() -> None:
    braces = encode_frame(
        b'{"type":"message","room":"r","seq":9,"ts":1,"from":"{x}",'
        b'"text":"t=%d {\\"type\\":\\"ping\\"} {{"}' % time.time_ns()
    )
    stream = braces + STREAM + braces
    for at in range(1, len(stream)):
        report, wire = feed([stream[:at], stream[at:]])
        assert report.delivered == 6
        assert report.joined == 1
        assert report.errors == 1
        assert sum(b"pong" in w for w in wire.written) == 1


def sized_message(seq: int, size: int) -> bytes:
    """A message frame whose body is ``size`` bytes long."""
    head = b'{"type":"message","room":"r","seq":%d,"ts":1,"from":"a","text":"t=%d ' % (
        seq,
        time.time_ns(),
    )
    return encode_frame(head + b"x" * (size - len(head) - 2) + b'"}')


def test_frames_are_counted_by_their_brace_while_that_holds() -> None:
    seen: list[_BenchClient] = []
    stream = STREAM + b"".join(sized_message(5 + i, 150) for i in range(20))
    report, _ = feed([stream[i : i + 100] for i in range(0, len(stream), 100)], clients=seen)
    assert report.delivered == 24
    assert seen[0].starts == BRACE
    assert report.fallbacks == 0


def test_length_prefixes_that_look_like_braces_switch_to_the_exact_count() -> None:
    seen: list[_BenchClient] = []
    lookalikes = b"".join(sized_message(5 + i, ord("{")) for i in range(20))
    assert lookalikes.count(b"{") == 40  # each frame's length prefix ends in a brace
    stream = STREAM + lookalikes
    report, wire = feed([stream[i : i + 100] for i in range(0, len(stream), 100)], clients=seen)
    check_counts = report.delivered, report.joined, report.errors
    assert check_counts == (24, 1, 1)
    assert sum(b"pong" in w for w in wire.written) == 1
    assert seen[0].starts == FRAME
    assert report.fallbacks == 1  # reported once, however many more lookalikes come


def test_deliveries_count_by_when_the_message_was_said() -> None:
    # Said at 1,000,000,000 + k ms; the window is [1.010, 1.020) s.
    base = 10**18
    said = [base + k * 1_000_000 for k in range(30)]
    stream = b"".join(message(k, t) for k, t in enumerate(said))
    span = (base + 10_000_000, base + 20_000_000)
    for at in range(1, len(stream)):
        report, _ = feed([stream[:at], stream[at:]], span=span)
        assert report.delivered == 10, at
    # Many reads, each spanning a few messages: the ones across an edge read each stamp.
    for size in (40, 100, 333):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        report, _ = feed(chunks, span=span)
        assert report.delivered == 10, size
        assert report.latencies, size
