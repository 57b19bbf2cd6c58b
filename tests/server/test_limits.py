"""Flood limits: the token bucket and per-address caps, driven by an explicit clock."""

from __future__ import annotations

import dataclasses

from achat.client.connection import Client
from achat.protocol import messages as m
from achat.server.app import Server
from achat.server.limits import AddressLimits, FloodPolicy, TokenBucket, is_exempt
from achat.store.memory import MemoryStore
from tests.conftest import make_config
from tests.server.test_app import Raw


def test_bucket_allows_a_burst_then_the_rate() -> None:
    """A full bucket gives `burst` frames at once, then one per 1/rate seconds."""
    bucket = TokenBucket(FloodPolicy(rate=5, burst=10), now=0.0)
    assert all(bucket.take(0.0) for _ in range(10))
    assert not bucket.take(0.0)
    assert not bucket.take(0.1)
    assert bucket.take(0.21)
    assert not bucket.take(0.22)
    assert all(bucket.take(100.0) for _ in range(10))  # refills up to burst, not beyond
    assert not bucket.take(100.0)


def test_bucket_flags_a_persistent_flooder() -> None:
    """Enough refusals within the window mark the connection as flooding; old ones expire."""
    policy = FloodPolicy(rate=1, burst=1, strikes=3, strike_window=10)
    bucket = TokenBucket(policy, now=0.0)
    bucket.take(0.0)
    for t in (0.1, 0.2):
        assert not bucket.take(t)
    assert not bucket.flooding()
    bucket.take(0.3)
    assert bucket.flooding()
    slow = TokenBucket(dataclasses.replace(policy, rate=0.01), now=0.0)
    slow.take(0.0)
    assert not slow.take(0.1)
    assert not slow.take(0.2)
    assert not slow.take(20.5)  # refused, but the earlier strikes are out of the window
    assert not slow.flooding()


def test_rate_zero_means_no_limit() -> None:
    """rate=0 turns the bucket off."""
    bucket = TokenBucket(FloodPolicy(rate=0), now=0.0)
    assert all(bucket.take(0.0) for _ in range(10_000))


def test_address_limits() -> None:
    """Concurrent and per-minute caps per address; loopback exempt; release frees a slot."""
    limits = AddressLimits(max_concurrent=2, max_per_minute=3)
    assert limits.admit("10.0.0.1", 0) is None
    assert limits.admit("10.0.0.1", 1) is None
    assert "too many connections" in (limits.admit("10.0.0.1", 2) or "")
    assert limits.admit("10.0.0.2", 2) is None  # another address is not affected
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1", 3) is None
    limits.release("10.0.0.1")
    assert "a minute" in (limits.admit("10.0.0.1", 4) or "")
    assert limits.admit("10.0.0.1", 61) is None  # the minute has passed
    for _ in range(100):
        assert limits.admit("127.0.0.1", 5) is None
    assert limits.connections("127.0.0.1") == 100


def test_loopback_detection() -> None:
    """IPv4 and IPv6 loopback are exempt; other addresses and garbage are not."""
    assert is_exempt("127.0.0.1")
    assert is_exempt("::1")
    assert is_exempt("127.5.5.5")
    assert not is_exempt("192.168.1.2")
    assert not is_exempt("not-an-ip")


async def test_flooding_connection_is_throttled_then_dropped() -> None:
    """Over the limit: rate_limited errors (non-fatal), then a fatal one for a persistent flood."""
    config = make_config(flood=FloodPolicy(rate=1, burst=3, strikes=5, strike_window=60))
    server = Server(config, MemoryStore())
    await server.start()
    try:
        raw = await Raw.open(server.port)
        await raw.hello("flood")
        for i in range(3):
            raw.send({"type": "ping", "ref": f"ok{i}"})
            assert await raw.next() == m.Pong(ref=f"ok{i}")
        raw.send({"type": "ping", "ref": "over"})
        error = await raw.next()
        assert (error.code, error.fatal, error.ref) == ("rate_limited", False, "over")
        for i in range(10):
            raw.send({"type": "ping", "ref": f"x{i}"})
        fatal = await raw.until(m.Error)
        while not fatal.fatal:
            fatal = await raw.until(m.Error)
        assert fatal.code == "rate_limited"
        assert await raw.closed()
        async with Client("127.0.0.1", server.port, "bystander") as other:
            await other.ping()
    finally:
        await server.close()


async def test_per_address_limit_over_the_wire() -> None:
    """With loopback not exempt, the connection over the per-address cap is refused."""
    config = dataclasses.replace(make_config(), max_per_ip=2, exempt_loopback=False)
    server = Server(config, MemoryStore())
    await server.start()
    try:
        first = await Raw.open(server.port)
        await first.hello("one")
        second = await Raw.open(server.port)
        await second.hello("two")
        third = await Raw.open(server.port)
        error = await third.next()
        assert (error.code, error.fatal) == ("rate_limited", True)
        assert "too many connections" in error.message
    finally:
        await server.close()
