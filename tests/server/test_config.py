"""What the server's configuration says about the memory its refs take."""

from __future__ import annotations

from achat.server.config import ServerConfig
from achat.server.limits import FloodPolicy, TokenBucket
from achat.server.refs import DEADLINE_STEP_MS, REF_BYTES, RecentRefs, ref_key
from achat.server.session import SessionLimits
from achat.store.base import REF_TTL_MS


def config(max_clients: int = 10_000, rate: float = 5.0, burst: float = 10.0) -> ServerConfig:
    flood = FloodPolicy(rate=rate, burst=burst)
    return ServerConfig(max_clients=max_clients, limits=SessionLimits(flood=flood))


def most_refs_of_one_client(rate: float, burst: float, seconds: int) -> int:
    """The most refs in force for a client that says whenever its flood limit lets it, on
    a clock of milliseconds, each say's ref kept as the registry keeps it."""
    bucket = TokenBucket(FloodPolicy(rate=rate, burst=burst), 0.0)
    refs: RecentRefs[object] = RecentRefs(granularity=DEADLINE_STEP_MS)
    most = said = 0
    for now in range(0, seconds * 1000, 10):  # a try every 10 ms
        refs.expire(now)
        while bucket.take(now / 1000):
            refs.deadline(now + REF_TTL_MS)
            said += 1
            refs.claim(ref_key("ana", f"r{said}"), b"receipt")
        most = max(most, len(refs))
    return most


def test_the_estimate_counts_the_refs_a_client_at_its_flood_limit_keeps() -> None:
    # The registry's table, fed as fast as the token bucket allows for 15 minutes: the
    # refs in force peak at what the estimate counts per client: a ref is kept 600 to 601
    # s, by when in its second it was said, so the peak comes within two seconds' worth.
    for rate, burst in ((5.0, 10.0), (2.0, 40.0)):
        estimate = config(max_clients=1, rate=rate, burst=burst).refs_memory_estimate()
        assert estimate is not None
        most = most_refs_of_one_client(rate, burst, seconds=900)
        assert estimate - 2 * rate * REF_BYTES <= most * REF_BYTES <= estimate


def test_the_estimate_grows_with_the_clients_and_their_rate() -> None:
    one = config(max_clients=1).refs_memory_estimate()
    assert one is not None
    assert config().refs_memory_estimate() == ServerConfig().refs_memory_estimate()  # defaults
    assert config(max_clients=10_000).refs_memory_estimate() == 10_000 * one
    slower = config(max_clients=1, rate=2.5).refs_memory_estimate()
    assert slower is not None
    assert slower < one < 2 * slower + 1  # the burst is not halved


def test_no_flood_limit_has_no_estimate() -> None:
    assert config(rate=0).refs_memory_estimate() is None
