"""The generator's receive path: frames counted, not parsed, however the stream is split."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from achat.bench import load
from achat.bench.histogram import Histogram
from achat.bench.load import (
    DRAIN_FRAME,
    DRAIN_REF,
    KEEPALIVE_POLL,
    KEEPALIVE_REF,
    KEEPALIVE_SECONDS,
    REF_MARK,
    ClientPlan,
    WorkerPlan,
    WorkerReport,
    _BenchClient,
    _drain,
    _keep_alive,
    _Window,
    answered,
    connect_pause,
    settled,
    wall_offset,
)
from achat.protocol.frames import encode_frame
from achat.protocol.messages import (
    Ack,
    Error,
    Joined,
    Message,
    Names,
    Parted,
    Ping,
    Pong,
    encode,
)
from tests.helpers.clocks import time_with


class Wire:
    """The transport end the client writes to (the receive path is what is tested)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None


def message(seq: int, sent_ns: int | None = None, text: str = "xxxxxxxx") -> bytes:
    """A message frame as the server encodes it, stamped ``sent_ns`` (now by default)."""
    stamp = time.time_ns() if sent_ns is None else sent_ns
    return encode(Message(room="r", seq=seq, ts=1, sender="a", text=f"t={stamp} {text}"))


# The greeting a client meets, as the server encodes it.
GREETING = b"".join(
    [
        encode_frame(b'{"type":"welcome","nick":"b0","server":"s","version":1}'),
        encode(Joined(room="r", nick="b0", ts=1)),
        encode(Names(room="r", nicks=["b0"], topic="", seq=0)),
    ]
)


def answers() -> list[bytes]:
    """The answers to says 1-3 and a message between them, as a client meets them: say 2
    refused before say 1 is stored (answers need not come in order)."""
    return [
        encode(Error(code="rate_limited", message="slow down", fatal=False, ref=REF_MARK + "2")),
        encode(Ack(ref=REF_MARK + "1", ts=1, room="r", seq=4)),
        message(4),
        encode(Ack(ref=REF_MARK + "3", ts=1, room="r", seq=5)),
    ]


def fresh_stream() -> bytes:
    """The frames a client meets after saying 3 things (refs 1-3), its messages stamped now.

    Built for each test, not once at import: a test run long after its module was
    collected would otherwise time messages said minutes ago.
    """
    return GREETING + b"".join(
        [
            message(1),
            message(2),
            encode(Ping(ref="keepalive")),  # the server's own: not looked at, not answered
            message(3),
            *answers(),
        ]
    )


STREAM_LENGTH = len(fresh_stream())  # the same whenever built: stamps have 19 digits


def feed(
    chunks: list[bytes],
    says: int = 3,
    checks: bool = False,
    room: str = "r",
    pipeline: int = 0,
    clients: list[_BenchClient] | None = None,
    span: tuple[int, int] = (0, 2**63),
    window_s: tuple[float, float] = (0.0, float("inf")),
) -> tuple[WorkerReport, Wire]:
    """Feed ``chunks`` to one client that has sent ``says`` says; its report and its writes.

    With a ``pipeline``, the client keeps that many says out instead. Acks count when
    read in ``window_s`` (monotonic s); messages count if sent in ``span`` (ns since
    the epoch). The client is appended to ``clients`` if given.
    """

    async def run() -> tuple[WorkerReport, Wire]:
        window = _Window()
        window.start, window.end = window_s
        window.start_ns, window.end_ns = span
        plan = WorkerPlan("127.0.0.1", 1, [], duration=1.0, warmup=0.0, seed=1, pipeline=pipeline)
        report = WorkerReport()
        client = _BenchClient(
            plan, ClientPlan("b0", room, 0.0), report, window, random.Random(1), checks
        )
        if clients is not None:
            clients.append(client)
        wire = Wire()
        client.connection_made(wire)  # type: ignore[arg-type]
        if pipeline:
            client._start_sending()
        else:
            for _ in range(says):
                client._write_say()
        for chunk in chunks:
            client.data_received(chunk)
        window.settle(report)
        return report, wire

    return asyncio.run(run())


def check(report: WorkerReport, wire: Wire) -> None:
    assert report.delivered == 4
    assert report.joined == 1
    assert report.errors == 1
    assert report.acked == 2
    assert report.codes == {"rate_limited": 1}
    assert not any(b"pong" in w for w in wire.written)  # the server's ping is not answered
    # Every message delivered has its latency (the stream was made just now).
    assert report.latency.total == report.delivered
    assert report.latency.quantile(1.0) < 60 * 10**9


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> int:
    """The wall clock's time (ns), stopped there for the generator: the latency it reads
    is then exactly a stamp's age, however long the test takes to get to its reads."""
    stopped = time.time_ns()
    monkeypatch.setattr(load, "time", time_with(time_ns=lambda: stopped))
    return stopped


def test_every_split_in_two() -> None:
    seen: list[_BenchClient] = []
    for at in range(1, STREAM_LENGTH):
        stream = fresh_stream()
        report, wire = feed([stream[:at], stream[at:]], clients=seen)
        check(report, wire)
        assert (seen[-1].unanswered, seen[-1].due) == (0, 0), at
    whole, _ = feed([fresh_stream()])
    assert whole.codes == {"rate_limited": 1}


@given(st.lists(st.integers(1, STREAM_LENGTH - 1), max_size=40))
def test_any_split(cuts: list[int]) -> None:
    stream = fresh_stream()
    points = [0, *sorted(set(cuts)), len(stream)]
    check(*feed([stream[a:b] for a, b in itertools.pairwise(points)]))


def test_answers_are_looked_for_only_while_due() -> None:
    """A client that said nothing takes no ack or error in its reads for its own."""
    seen: list[_BenchClient] = []
    report, _ = feed([fresh_stream()], says=0, clients=seen)
    assert (report.delivered, report.joined, report.errors, report.acked) == (4, 1, 0, 0)
    assert seen[0].due == 0
    # One of three says still out: the search goes on in the reads to come.
    report, _ = feed([fresh_stream()], says=4, clients=seen)
    assert (seen[1].unanswered, seen[1].due) == (1, 1)
    assert (report.errors, report.acked) == (1, 2)


def test_one_byte_at_a_time_and_the_pipeline_refills_for_ingest() -> None:
    seen: list[_BenchClient] = []
    stream = fresh_stream()
    report, wire = feed([stream[i : i + 1] for i in range(len(stream))], pipeline=4, clients=seen)
    check(report, wire)
    # Four says out at first, in one write, and one more for each of the three answers.
    says = [w.count(b'"type":"say"') for w in wire.written if b'"type":"say"' in w]
    assert says == [4, 1, 1, 1]
    assert seen[0].unanswered == 4


def test_a_quiet_client_pings_and_takes_its_pong() -> None:
    seen: list[_BenchClient] = []
    report, wire = feed([fresh_stream()], clients=seen)
    client = seen[0]
    quiet_since = client.last_sent
    client.keep_alive(quiet_since + KEEPALIVE_SECONDS - 0.5)
    assert client.pongs_due == 0
    client.keep_alive(quiet_since + KEEPALIVE_SECONDS)
    client.keep_alive(quiet_since + KEEPALIVE_SECONDS + 1)  # one ping per quiet spell
    assert wire.written[-1] == encode(Ping(ref=KEEPALIVE_REF))
    assert (client.pongs_due, client.due) == (1, 1)
    pong = message(5) + encode(Pong(ref=KEEPALIVE_REF)) + message(6)
    for at in range(1, len(pong)):
        client.pongs_due = client.due = 1
        client.data_received(pong[:at])
        client.data_received(pong[at:])
        assert (client.pongs_due, client.due) == (0, 0), at
    assert report.errors == 1


def test_a_refused_join_is_an_error_and_the_client_leaves() -> None:
    refused = encode_frame(b'{"type":"welcome","nick":"b0","server":"s","version":1}') + encode(
        Error(code="invalid_room", message="no such room name", fatal=False)
    )
    for at in range(1, len(refused)):
        report, wire = feed([refused[:at], refused[at:]], says=0)
        assert (report.joined, report.errors) == (0, 1), at
        assert report.codes == {"invalid_room": 1}
        assert wire.closed


def test_frame_lookalikes_in_texts_are_not_frames() -> None:
    lookalikes = (
        f'{{"type":"message","room":"r","seq":9}} {{"type":"ack","ref":"{REF_MARK}1"}} '
        f'"ref":"{REF_MARK}2" {{"type":"error","fatal":false,"ref":"{REF_MARK}3"}}'
    )
    stream = GREETING + b"".join(
        [
            message(1, text=lookalikes),
            message(2),
            message(3),
            *answers(),
            message(5),
            message(6, text=lookalikes),
        ]
    )
    for at in range(1, len(stream)):
        report, _ = feed([stream[:at], stream[at:]])
        assert report.delivered == 6
        assert (report.joined, report.errors, report.acked) == (1, 1, 2)


def test_a_fatal_error_that_answers_nothing_is_counted_by_its_code() -> None:
    fatal = encode(Error(code="sendq_exceeded", message="you read too slowly", fatal=True))
    stream = fresh_stream() + message(5) + fatal
    for at in range(1, len(stream)):
        seen: list[_BenchClient] = []
        report, _ = feed([stream[:at], stream[at:]], clients=seen)
        seen[0].connection_lost(None)  # the server closes after it
        assert report.errors == 2, at
        assert report.codes == {"rate_limited": 1, "sendq_exceeded": 1}, at
        assert report.closed == 1
    # A connection that ends on anything else had no error to count.
    report, _ = feed([fresh_stream()], clients=seen)
    seen[-1].connection_lost(None)
    assert (report.errors, report.closed) == (1, 1)


def test_answers_beyond_those_due_are_not_taken() -> None:
    seen: list[_BenchClient] = []
    report, _ = feed([fresh_stream()], says=1, clients=seen)
    # The say was answered by the error; the acks after it answer nothing this client said.
    assert (report.errors, report.acked) == (1, 0)
    assert (seen[0].unanswered, seen[0].due) == (0, 0)


def test_acks_count_only_when_read_inside_the_window() -> None:
    later = (time.monotonic() + 3600, time.monotonic() + 7200)
    report, _ = feed([fresh_stream()], window_s=later)
    assert (report.acked, report.errors) == (0, 1)


def test_the_pipeline_refills_on_errors_and_stops_with_the_window() -> None:
    refused = encode(
        Error(code="rate_limited", message="slow down", fatal=False, ref=REF_MARK + "1")
    )
    seen: list[_BenchClient] = []
    _, wire = feed([GREETING, refused], pipeline=2, clients=seen)
    assert sum(w.count(b'"type":"say"') for w in wire.written) == 3  # 2, then 1 for the error
    assert seen[0].unanswered == 2
    # Once the window is over, nothing more is said, whatever comes back...
    _, wire = feed([fresh_stream()], pipeline=2, window_s=(0.0, time.monotonic()))
    assert not any(b'"type":"say"' in w for w in wire.written)
    # ...on the stamps' clock too: none is stamped at or after the window's end.
    _, wire = feed([fresh_stream()], pipeline=2, span=(0, time.time_ns()))
    assert not any(b'"type":"say"' in w for w in wire.written)


def test_a_window_opens_on_the_wall_offset_it_is_given() -> None:
    window = _Window()
    window.open(100.0, 10.0, wall=5)
    assert (window.start_ns, window.end_ns) == (100 * 10**9 + 5, 110 * 10**9 + 5)
    window.open(100.0, 10.0)  # measured here
    assert abs(window.start_ns - (100 * 10**9 + wall_offset())) < 10**7


def test_the_worst_disorder_seen_in_a_read_is_reported() -> None:
    start, ms = 10**18, 10**6
    # Read whole, well inside the window: only its two ends are seen, 30 ms apart.
    stamps = [start + 500 * ms, start + 510 * ms, start + 470 * ms]
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(stamps, 1))
    report, _ = feed([stream], span=(start, 2**62))
    assert report.disorder_ns == 30 * ms
    # Near the start every stamp is read: the worst is 40 ms, in the middle.
    stamps = [start + 10 * ms, start + 50 * ms, start + 10 * ms, start + 60 * ms]
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(stamps, 1))
    report, _ = feed([stream], span=(start, 2**62))
    assert (report.delivered, report.disorder_ns) == (4, 40 * ms)


def test_saying_something_keeps_a_client_from_pinging() -> None:
    seen: list[_BenchClient] = []
    feed([fresh_stream()], says=0, clients=seen)
    client = seen[0]
    client.last_sent -= KEEPALIVE_SECONDS  # quiet for long enough...
    client._write_say()  # ...until it says something
    client.keep_alive(time.monotonic())
    assert client.pongs_due == 0
    # Nor does a client whose connection is closing ping at all.
    assert client.transport is not None
    client.transport.close()
    client.keep_alive(time.monotonic() + KEEPALIVE_SECONDS)
    assert client.pongs_due == 0


def test_the_worker_has_quiet_clients_ping_in_time_for_the_contract() -> None:
    # The contract has an idle client ping every 30 s; the worker looks once a poll.
    assert KEEPALIVE_SECONDS + KEEPALIVE_POLL < 30

    async def run() -> tuple[_BenchClient, _BenchClient]:
        plan = WorkerPlan("127.0.0.1", 1, [], duration=1.0, warmup=0.0, seed=1)
        report, window, rng = WorkerReport(), _Window(), random.Random(1)
        seen = [
            _BenchClient(plan, ClientPlan(nick, "r", 0.0), report, window, rng)
            for nick in ("quiet", "talkative")
        ]
        for client in seen:
            client.connection_made(Wire())  # type: ignore[arg-type]
        quiet, talkative = seen
        quiet.last_sent = time.monotonic() - KEEPALIVE_SECONDS
        task = asyncio.create_task(_keep_alive(seen, every=0.001))
        for _ in range(10_000):
            if quiet.pongs_due:
                break
            await asyncio.sleep(0)
        task.cancel()
        return quiet, talkative

    quiet, talkative = asyncio.run(run())
    assert (quiet.pongs_due, talkative.pongs_due) == (1, 0)


def test_a_refused_hello_is_one_error_though_the_server_closes_after_it() -> None:
    refused = encode(Error(code="server_full", message="the server is full", fatal=True))
    for at in range(1, len(refused)):
        seen: list[_BenchClient] = []
        report, wire = feed([refused[:at], refused[at:]], says=0, clients=seen)
        seen[0].connection_lost(None)
        assert (report.errors, report.codes) == (1, {"server_full": 1}), at
        assert wire.closed


def test_connections_are_paced_on_a_schedule_not_by_sub_millisecond_sleeps() -> None:
    # 10 a millisecond: the 10th is due 1 ms after the start, the 5th only 0.5 ms after.
    assert connect_pause(100.0, 10, 10_000.0, now=100.0) == pytest.approx(0.001)
    assert connect_pause(100.0, 5, 10_000.0, now=100.0) == 0.0
    # Behind the schedule (a slow start), no wait until it is caught up.
    assert connect_pause(100.0, 10, 10_000.0, now=100.5) == 0.0
    assert connect_pause(100.0, 20_000, 10_000.0, now=100.5) == pytest.approx(1.5)


def test_deliveries_count_by_when_the_message_was_said() -> None:
    # Said at 1,000,000,000 + k ms; the window is [1.010, 1.020) s.
    base = 10**18
    said = [base + k * 1_000_000 for k in range(30)]
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(said, 1))
    span = (base + 10_000_000, base + 20_000_000)
    for at in range(1, len(stream)):
        report, _ = feed([stream[:at], stream[at:]], span=span)
        assert report.delivered == 10, at
    # Many reads, each spanning a few messages: the ones across an edge read each stamp.
    for size in (40, 100, 333):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        report, _ = feed(chunks, span=span)
        assert report.delivered == 10, size
        assert report.latency.total == 10, size


def test_latency_is_counted_per_message_spread_between_a_reads_ends(now: int) -> None:
    said = [now - s * 10**9 for s in (40, 39, 31, 30)]  # 40 s ago, ..., 30 s ago
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(said, 1))
    report, _ = feed([stream])
    assert report.delivered == report.latency.total == 4
    # Read whole: only the oldest and newest stamps are read, and the four messages
    # stand evenly between them (40, 36.7, 33.3 and 30 s).
    assert 30 <= report.latency.quantile(0.0) / 1e9 < 30.5
    assert 33.3 <= report.latency.quantile(0.5) / 1e9 < 33.9
    assert 40 <= report.latency.quantile(1.0) / 1e9 < 40.7
    # A read that spans the window's start: only what was said inside it, stamp by stamp.
    report, _ = feed([stream], span=(now - 35 * 10**9, now))
    assert report.delivered == report.latency.total == 2
    assert 30 <= report.latency.quantile(0.0) / 1e9 < 30.5
    assert 31 <= report.latency.quantile(1.0) / 1e9 < 31.5


def test_a_big_read_spreads_its_latencies_rather_than_piling_them_at_two_ends(now: int) -> None:
    said = [now - 10**9 - k * 250_000 for k in range(400)]  # over 100 ms, a second ago
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(reversed(said), 1))
    report, _ = feed([stream])
    assert report.delivered == 400
    middle = report.latency.quantile(0.5) / 1e6 - 1000  # ms over the second
    assert 50 - 100 / 7 <= middle <= 50 + 100 / 7 + 2


def shuffled_in_blocks(said: list[int], block: int, seed: int) -> list[int]:
    """``said`` in the order a server might take them: shuffled within blocks."""
    rng, order = random.Random(seed), []
    for at in range(0, len(said), block):
        part = said[at : at + block]
        rng.shuffle(part)
        order += part
    return order


def test_a_big_read_across_the_start_counts_what_was_said_inside_it(now: int) -> None:
    # 800 messages said a ms apart, from 2 s ago, taken by the server out of order by up
    # to 40 ms; the window starts at the 300th said, so 500 were said inside it.
    said = [now - 2 * 10**9 + k * 1_000_000 for k in range(800)]
    order = shuffled_in_blocks(said, 40, seed=4)
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(order, 1))
    report, _ = feed([stream], span=(said[300], now))
    assert report.delivered == report.latency.total == 500
    # The latencies are those of the 500 inside: 1.2 to 1.7 s, with their middle at 1.45.
    assert 1.2 <= report.latency.quantile(0.0) / 1e9 < 1.25
    assert 1.4 <= report.latency.quantile(0.5) / 1e9 < 1.5
    assert 1.67 <= report.latency.quantile(1.0) / 1e9 < 1.73


def test_a_read_out_of_order_well_inside_the_window_is_counted_whole(now: int) -> None:
    ms = 10**6
    said = [now - 1000 * ms, now - 1080 * ms, now - 1060 * ms]  # the first is the newest
    stream = GREETING + b"".join(message(k, t) for k, t in enumerate(said, 1))
    report, _ = feed([stream], span=(now - 10 * 10**9, now))
    assert report.delivered == report.latency.total == 3
    # Only the first and last stamps are read: the three stand evenly between them, at
    # 1.0, 1.03 and 1.06 s (read stamp by stamp, they would be 1.0, 1.06 and 1.08).
    assert 1.0 <= report.latency.quantile(0.0) / 1e9 < 1.017
    assert 1.03 <= report.latency.quantile(0.5) / 1e9 < 1.047
    assert 1.06 <= report.latency.quantile(1.0) / 1e9 < 1.077
    # Across the window's start, the same read counts only the two said inside it.
    report, _ = feed([stream], span=(now - 1070 * ms, now))
    assert report.delivered == report.latency.total == 2


def test_stamps_out_of_order_near_an_edge_are_counted_one_by_one() -> None:
    start = 10**18
    inside, outside = start + 1_000, start - 1_000
    for stamps, counted in (([inside, outside], 1), ([inside, outside, start + 2_000], 2)):
        stream = GREETING + b"".join(message(k, t) for k, t in enumerate(stamps, 1))
        report, _ = feed([stream], span=(start, start + 10**9))
        assert report.delivered == counted


def test_a_nick_sent_as_typed_can_be_long_and_its_message_is_still_counted() -> None:
    # 24 characters after NFKC, 216 bytes as typed (conjoining jamo): the seq is further
    # before the stamp than a short nick puts it.
    nick, room = "\u1100\u1161\u11a8" * 24, "r" * 32
    greeting = GREETING.replace(b'"room":"r"', b'"room":"%s"' % room.encode())
    stream = greeting + b"".join(
        encode(Message(room=room, seq=k, ts=1, sender=nick, text=f"t={time.time_ns()} x"))
        for k in (1, 2, 3)
    )
    for at in range(1, len(stream)):
        seen: list[_BenchClient] = []
        report, _ = feed([stream[:at], stream[at:]], room=room, checks=True, clients=seen)
        assert (report.delivered, seen[0].unaccounted()) == (3, 0), at


def test_a_greeting_without_the_rooms_seq_ends_in_an_error_not_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("achat.bench.load.GREETING_LIMIT", 2000)
    names = encode_frame(b'{"type":"names","room":"r","nicks":["%s"]' % (b"n" * 3000))
    seen: list[_BenchClient] = []
    report, wire = feed([GREETING[:60], names[:1000], names[1000:]], says=0, clients=seen)
    assert (report.joined, report.errors, report.codes) == (0, 1, {"no_names_seq": 1})
    assert wire.closed
    assert seen[0].greeting == b""


SAID = [10**18 + k * 1_000_000 for k in range(30)]  # 1,000,000,000 s + k ms
TIMED = GREETING + b"".join(message(k, t) for k, t in enumerate(SAID, 1))


@given(st.lists(st.integers(1, len(TIMED) - 1), max_size=30), st.integers(0, 29))
def test_a_window_counts_exactly_what_was_said_in_it_however_the_stream_is_split(
    cuts: list[int], begin: int
) -> None:
    # Each message belongs to the read its stamp completes in, whether that read is
    # counted whole (by seq) or, across an edge of the window, stamp by stamp.
    span = (SAID[begin], SAID[begin] + 7_000_000)
    points = [0, *sorted(set(cuts)), len(TIMED)]
    report, _ = feed([TIMED[a:b] for a, b in itertools.pairwise(points)], span=span)
    assert report.delivered == report.latency.total == min(7, 30 - begin)


SAID_OUT_OF_ORDER = shuffled_in_blocks([10**18 + k * 1_000_000 for k in range(400)], 20, seed=7)
UNORDERED = GREETING + b"".join(message(k, t) for k, t in enumerate(SAID_OUT_OF_ORDER, 1))


@given(st.lists(st.integers(1, len(UNORDERED) - 1), max_size=40), st.integers(0, 399))
def test_a_window_counts_exactly_what_was_said_in_it_though_taken_out_of_order(
    cuts: list[int], begin: int
) -> None:
    # Out of order by up to 20 ms, split anywhere; the window starts at any message and
    # ends after the last (nothing is said after it): reads are counted whole, split
    # at the start by seq, or kept and counted stamp by stamp, and always exactly.
    start = 10**18 + begin * 1_000_000
    points = [0, *sorted(set(cuts)), len(UNORDERED)]
    report, _ = feed([UNORDERED[a:b] for a, b in itertools.pairwise(points)], span=(start, 2**62))
    assert report.delivered == report.latency.total == 400 - begin


def test_checking_clients_catch_a_skipped_or_repeated_message() -> None:
    fine = GREETING + b"".join(message(k) for k in (1, 2, 3, 4))
    skipped = GREETING + b"".join(message(k) for k in (1, 2, 4, 5))
    repeated = GREETING + b"".join(message(k) for k in (1, 2, 2, 3))
    for stream, counted, off in ((fine, 4, 0), (skipped, 5, 1), (repeated, 3, 1)):
        for at in range(1, len(stream)):
            seen: list[_BenchClient] = []
            report, _ = feed([stream[:at], stream[at:]], checks=True, clients=seen)
            assert report.delivered == counted, at  # by seq: what the contract promises
            assert seen[0].unaccounted() == off, at
    # Only checking clients count frames.
    seen = []
    feed([skipped], clients=seen)
    assert seen[0].unaccounted() == 0
    # A skip and a repeat in different reads do not cancel out; in one read they would.
    twice = GREETING + b"".join(message(k) for k in (1, 2, 2, 4))
    cut = len(GREETING) + len(message(1)) + 2 * len(message(2)) + 5  # in message 4
    seen = []
    feed([twice[:cut], twice[cut:]], checks=True, clients=seen)
    assert seen[0].unaccounted() == 2


MIXED = GREETING + b"".join(
    [
        message(1),
        encode(Parted(room="r", nick="b7", ts=1, reason="quit")),
        message(2),
        message(3),
        encode(Ack(ref=REF_MARK + "9", ts=1, room="r", seq=3)),
        message(4),
        encode(Joined(room="r", nick="b8", ts=1)),
        message(5),
        message(6),
    ]
)


@given(st.lists(st.integers(1, len(MIXED) - 1), max_size=12))
def test_any_split_of_a_busy_stream_counts_every_message_once_and_the_checks_agree(
    cuts: list[int],
) -> None:
    points = [0, *sorted(set(cuts)), len(MIXED)]
    seen: list[_BenchClient] = []
    report, _ = feed(
        [MIXED[a:b] for a, b in itertools.pairwise(points)], says=0, checks=True, clients=seen
    )
    assert report.delivered == 6
    assert seen[0].unaccounted() == 0


def test_a_stream_cut_anywhere_leaves_the_two_counts_agreeing() -> None:
    # A sink that never stops (self-check) is read up to wherever its last read ended.
    stream = GREETING + b"".join(message(k) for k in range(1, 6))
    for end in range(len(GREETING), len(stream)):
        for at in (len(GREETING), (len(GREETING) + end) // 2):
            seen: list[_BenchClient] = []
            feed([stream[:at], stream[at:end]], checks=True, clients=seen)
            assert seen[0].unaccounted() == 0, (at, end)


def test_the_count_starts_from_the_seq_in_names_even_split_in_parts() -> None:
    parts = [
        encode(Names(room="r", nicks=["b0"], topic="", seq=41, more=True)),
        encode(Names(room="r", nicks=["b1"], topic="", seq=41)),
    ]
    stream = GREETING[: -len(encode(Names(room="r", nicks=["b0"], topic="", seq=0)))]
    stream += b"".join(parts) + b"".join(message(k) for k in (42, 43, 44))
    for at in range(1, len(stream)):
        report, _ = feed([stream[:at], stream[at:]], says=0)
        assert (report.joined, report.delivered) == (1, 3), at


def test_a_seq_that_is_not_a_number_is_not_counted_and_breaks_nothing() -> None:
    odd = message(2).replace(b'"seq":2,', b'"seq":2e0,')
    odd = encode_frame(odd[4:])
    stream = GREETING + message(1) + odd + message(3)
    for at in range(1, len(stream)):
        seen: list[_BenchClient] = []
        report, _ = feed([stream[:at], stream[at:]], checks=True, clients=seen)
        # Message 3's seq accounts for the odd one before it, and the frames agree; the
        # odd one is missed only when its stamp ends a read that message 3's stamp spans.
        assert report.delivered in (2, 3), at
        assert seen[0].unaccounted() == 0, at
    report, _ = feed([stream])
    assert report.delivered == 3


def test_a_read_is_placed_by_its_oldest_stamp_even_one_split_from_the_read_before() -> None:
    start, ms = 10**18, 10**6
    span = (start, start + 10 * 10**9)

    def delivered(stamps: list[int], cut_in: int | None = None) -> int:
        stream = GREETING + b"".join(message(k, t) for k, t in enumerate(stamps, 1))
        if cut_in is None:
            return feed([stream], span=span, says=0)[0].delivered
        # Cut inside the digits of message cut_in's stamp.
        at = stream.index(b"t=%d" % stamps[cut_in - 1]) + 6
        return feed([stream[:at], stream[at:]], span=span, says=0)[0].delivered

    # The oldest said just before the window, its stamp split: the read is near the edge.
    assert delivered([start - 10 * ms, start + 300 * ms, start + 310 * ms], cut_in=1) == 2
    assert delivered([start - 10 * ms, start + 300 * ms, start + 310 * ms]) == 2
    # Out of order, the one read last said before the window: the first is still inside.
    assert delivered([start + 50 * ms, start - 30 * ms]) == 1


def test_frames_whose_seq_cannot_be_read_are_unaccounted_for() -> None:
    # Another encoder's field order: every frame is a message, no seq where it is looked for.
    odd = b"".join(
        encode_frame(
            b'{"type":"message","room":"r","ts":1,"seq":%d,"from":"a","text":"t=%d x"}'
            % (k, time.time_ns())
        )
        for k in range(1, 50)
    )
    seen: list[_BenchClient] = []
    report, _ = feed([GREETING + odd], says=0, checks=True, clients=seen)
    assert report.delivered == 0
    assert seen[0].unaccounted() == 48  # all but one, which a cut stream may leave


def test_reads_that_hold_messages_are_counted_for_the_drain() -> None:
    stream = GREETING + b"".join(message(k) for k in (1, 2, 3))
    cut = len(GREETING) + len(message(1)) + 3
    report, _ = feed([stream[:cut], stream[cut:], encode(Ping(ref="x"))], says=0)
    assert report.message_reads == 2  # the ping holds none


def test_latencies_wait_for_the_window_end_unless_too_many_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window, report = _Window(), WorkerReport()
    window.spread(report, 10, 20, 3)
    window.spread(report, 5, 5, 1)
    assert report.latency.total == 0  # nothing spread while the window is open
    window.settle(report)
    # All there after it, spread as they would have been at once: 5, then 10, 15, 20.
    assert report.latency.total == 4
    assert [report.latency.quantile(q) for q in (0.25, 0.5, 0.75, 1.0)] == [5, 10, 15, 20]
    # Past the most that may wait, the newest FOLD_CHUNK are counted in the window.
    monkeypatch.setattr(load, "SPREADS_MAX", 3)
    monkeypatch.setattr(load, "FOLD_CHUNK", 2)
    for _ in range(2):
        window.spread(report, 1, 1, 1)
    assert report.latency.total == 4
    window.spread(report, 1, 1, 1)  # three waiting: two counted now, one still waits
    assert report.latency.total == 6
    assert list(window.spreads) == [1, 1, 1]
    # A latency no array of 64-bit integers holds (not from a stamp achat-bench wrote)
    # is counted at once and leaves the others in step.
    window.spread(report, -(2**64), 7, 2)
    assert report.latency.total == 8
    window.settle(report)
    assert report.latency.total == 9
    assert not window.spreads


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(10**6), 10**12), st.integers(0, 10**11), st.integers(1, 5000)),
        max_size=30,
    )
)
def test_latencies_spread_after_the_window_are_those_spread_at_once(
    reads: list[tuple[int, int, int]],
) -> None:
    window, later = _Window(), WorkerReport()
    at_once = Histogram()
    for low, width, count in reads:
        window.spread(later, low, low + width, count)
        at_once.add_between(low, low + width, count, load.SPREAD)
    window.settle(later)
    assert later.latency.counts == at_once.counts
    assert later.latency.total == at_once.total


def _greeted(room: str) -> bytes:
    """The greeting of a client of ``room``, the room's seq 0."""
    return b"".join(
        [
            encode_frame(b'{"type":"welcome","nick":"b0","server":"s","version":1}'),
            encode(Joined(room=room, nick="b0", ts=1)),
            encode(Names(room=room, nicks=["b0"], topic="", seq=0)),
        ]
    )


def _in_room(room: str, *frames: bytes, says: int = 0) -> _BenchClient:
    """A client of ``room`` that said ``says`` things and then read ``frames``."""
    clients: list[_BenchClient] = []
    feed([_greeted(room), *frames], says=says, room=room, clients=clients)
    return clients[0]


def _said(room: str, seq: int) -> bytes:
    return encode(Message(room=room, seq=seq, ts=1, sender="a", text=f"t={time.time_ns()} x"))


def test_a_client_waiting_for_the_answer_to_a_say_has_not_answered() -> None:
    """Its message, and the others' that came before it, may still be on the way."""
    waiting = _in_room("r", _said("r", 1), says=1)
    assert not answered([waiting])
    acked = _in_room("r", _said("r", 1), _ack(1), says=1)
    assert answered([acked])
    refused = _in_room(
        "r",
        encode(Error(code="rate_limited", message="m", fatal=False, ref=REF_MARK + "1")),
        says=1,
    )
    assert answered([refused])  # a refused say delivers nothing
    assert not answered([acked, waiting])


def test_the_drain_does_not_wait_for_a_client_the_server_closed() -> None:
    """A client cut off, or never joined, is not waited for."""
    gone = _in_room("r", _said("r", 1), says=1)
    assert not answered([gone])
    gone.connection_lost(None)
    assert answered([gone])
    assert settled([gone])
    clients: list[_BenchClient] = []
    welcome = encode_frame(b'{"type":"welcome","nick":"b0","server":"s","version":1}')
    feed([welcome], says=1, clients=clients)  # its join never answered
    assert not clients[0].joined
    assert answered(clients)
    assert settled(clients)


def _joined(room: str, says: int) -> tuple[_BenchClient, Wire]:
    """A client of ``room`` in the running loop, joined, that sent ``says`` says."""
    plan = WorkerPlan("127.0.0.1", 1, [], duration=1.0, warmup=0.0, seed=1)
    client = _BenchClient(
        plan, ClientPlan("b0", room, 0.0), WorkerReport(), _Window(), random.Random(1)
    )
    wire = Wire()
    client.connection_made(wire)  # type: ignore[arg-type]
    client.data_received(_greeted(room))
    for _ in range(says):
        client._write_say()
    return client, wire


def _ack(n: int) -> bytes:
    return encode(Ack(ref=f"{REF_MARK}{n}", ts=1, room="r", seq=n))


async def _step(drain: asyncio.Task[bool]) -> None:
    """Let the drain take its next look (it looks every DRAIN_STEP)."""
    await asyncio.wait([drain], timeout=2 * load.DRAIN_STEP)


async def test_the_drain_pings_once_every_workers_says_are_answered_and_ends_at_the_answers() -> (
    None
):
    """The worker tells the parent once its own says are answered; only on the parent's
    word (every worker's are) does each client ping, and the drain ends when every
    client has read the answer, which the server writes after every message it queued
    for that client before."""
    talker, talker_wire = _joined("r", says=2)
    listener, listener_wire = _joined("r", says=0)
    parent, child = multiprocessing.Pipe()
    drain = asyncio.create_task(_drain([talker, listener], child, time.monotonic() + 30))
    await _step(drain)
    assert not parent.poll()  # a say is still out
    talker.data_received(_ack(1) + _ack(2))
    await _step(drain)
    assert parent.recv() == ("answered",)
    await _step(drain)
    assert DRAIN_FRAME not in talker_wire.written + listener_wire.written
    parent.send(("settle",))
    await _step(drain)
    assert talker_wire.written[-1] == DRAIN_FRAME == listener_wire.written[-1]
    talker.data_received(_said("r", 1) + encode(Pong(ref=DRAIN_REF)))
    await _step(drain)
    assert not drain.done()  # the listener has not had its answer yet
    # An answer it is, even a refusal: the server queued it after everything before it.
    listener.data_received(
        _said("r", 1) + encode(Error(code="rate_limited", message="m", fatal=False, ref=DRAIN_REF))
    )
    assert await asyncio.wait_for(drain, 2)


async def test_the_drain_gives_up_at_its_deadline() -> None:
    """A say never answered, or the parent's word never come: the drain ends anyway."""
    talker, _ = _joined("r", says=1)
    parent, child = multiprocessing.Pipe()
    assert not await asyncio.wait_for(_drain([talker], child, time.monotonic() + 0.1), 2)
    assert not parent.poll()
    talker.data_received(_ack(1))
    assert not await asyncio.wait_for(_drain([talker], child, time.monotonic() + 0.1), 2)
    assert parent.recv() == ("answered",)


async def test_a_refused_ping_answers_the_ping_not_a_say() -> None:
    """A server with its flood limit on may refuse a keep-alive or the drain's ping: the
    error answers that ping (its ref says so), and the say is still waited for."""
    client, wire = _joined("r", says=1)
    client.keep_alive(time.monotonic() + KEEPALIVE_SECONDS)
    client.drain_ping()
    assert wire.written[-2:] == [load.KEEPALIVE_FRAME, DRAIN_FRAME]
    refused = [
        encode(Error(code="rate_limited", message="m", fatal=False, ref=ref))
        for ref in (KEEPALIVE_REF, DRAIN_REF)
    ]
    client.data_received(b"".join(refused))
    assert (client.pongs_due, client.unanswered) == (0, 1)
    assert not answered([client])
    assert client.report.errors == 2
    assert client.report.codes == {"rate_limited": 2}
    client.data_received(_ack(1))
    assert answered([client])
    assert settled([client])


async def test_a_refused_ping_split_anywhere_answers_the_ping() -> None:
    """Which ping or say an error answers is told by its ref's character after REF, so
    a read that ends right after REF (or is shorter than it) leaves the answer to the
    next: it is never taken for the say's."""
    refused = encode(Error(code="rate_limited", message="m", fatal=False, ref=DRAIN_REF))
    ref_end = refused.index(load.REF) + len(load.REF)
    cuts = [(a, b) for a in range(1, len(refused)) for b in range(a, min(a + 40, len(refused)))]
    assert any(b == ref_end for _, b in cuts)
    for a, b in cuts:
        client, _ = _joined("r", says=1)
        client.drain_ping()
        for piece in (refused[:a], refused[a:b], refused[b:]):
            if piece:
                client.data_received(piece)
        assert (client.pongs_due, client.unanswered) == (0, 1), (a, b)
        client.data_received(_ack(1))
        assert (client.unanswered, client.due) == (0, 0), (a, b)
