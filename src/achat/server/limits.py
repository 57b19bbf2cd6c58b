"""Flood limits, pure and clock-injected: a token bucket per connection, counters per address.

Nothing here does I/O or reads a clock itself: every method takes ``now``
(seconds, any monotonic origin), so tests drive time directly.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

__all__ = ["AddressLimits", "FloodPolicy", "TokenBucket", "is_exempt"]


@dataclass(frozen=True, slots=True)
class FloodPolicy:
    """How much one connection may send, and how much refusal it takes before it is dropped.

    ``rate`` frames per second on average, ``burst`` at once; a connection
    that is refused ``strikes`` times within ``strike_window`` seconds is
    disconnected. ``rate = 0`` turns the limit off.
    """

    rate: float = 5.0
    burst: float = 10.0
    strikes: int = 20
    strike_window: float = 10.0


class TokenBucket:
    """The classic bucket: ``burst`` tokens, refilled at ``rate`` per second; a frame costs one."""

    __slots__ = ("_policy", "_strikes", "_tokens", "_updated")

    def __init__(self, policy: FloodPolicy, now: float) -> None:
        self._policy = policy
        self._tokens = policy.burst
        self._updated = now
        # Most connections never strike: the deque (~600 bytes) is made on the first.
        self._strikes: deque[float] | None = None

    def take(self, now: float) -> bool:
        """Spend one token; False (and a strike) when the bucket is empty."""
        policy = self._policy
        if policy.rate <= 0:
            return True
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(policy.burst, self._tokens + elapsed * policy.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        strikes = self._strikes
        if strikes is None:
            strikes = self._strikes = deque()
        strikes.append(now)
        while strikes and strikes[0] < now - policy.strike_window:
            strikes.popleft()
        return False

    def flooding(self) -> bool:
        """True once the connection has been refused too often, too recently."""
        return self._strikes is not None and len(self._strikes) >= self._policy.strikes


def is_exempt(host: str) -> bool:
    """Loopback addresses are not limited per address (local tools, bridges, load tests)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class AddressLimits:
    """Per-address caps on concurrent connections and on new connections per minute.

    The defaults leave room for a classroom behind one NAT (a few dozen
    people joining within a minute) while stopping one host from taking
    every slot.
    """

    max_concurrent: int = 64
    max_per_minute: int = 120
    exempt_loopback: bool = True
    _open: dict[str, int] = field(default_factory=dict)
    _recent: dict[str, deque[float]] = field(default_factory=dict)
    _admitted: int = 0

    def admit(self, host: str, now: float) -> str | None:
        """Count a new connection from ``host``; the reason it is refused, or None to accept.

        Every accepted connection must be :meth:`release`\\ d when it ends.
        """
        self._admitted += 1
        if self._admitted % 1024 == 0:
            self._sweep(now)
        if self.exempt_loopback and is_exempt(host):
            self._open[host] = self._open.get(host, 0) + 1
            return None
        recent = self._recent.setdefault(host, deque())
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if self._open.get(host, 0) >= self.max_concurrent:
            return f"too many connections from {host} (limit {self.max_concurrent})"
        if len(recent) >= self.max_per_minute:
            return f"too many new connections from {host} (limit {self.max_per_minute} a minute)"
        recent.append(now)
        self._open[host] = self._open.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        """Forget one connection from ``host``."""
        left = self._open.get(host, 0) - 1
        if left > 0:
            self._open[host] = left
        else:
            self._open.pop(host, None)
            recent = self._recent.get(host)
            if recent is not None and not recent:
                del self._recent[host]

    def _sweep(self, now: float) -> None:
        # Hosts gone for a minute need no memory of their connection times.
        for host in [h for h, times in self._recent.items() if not times or times[-1] <= now - 60]:
            if host not in self._open:
                del self._recent[host]

    def connections(self, host: str) -> int:
        return self._open.get(host, 0)
