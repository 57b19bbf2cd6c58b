"""Latency percentiles per message in a fixed, small amount of memory.

A log-linear histogram of nanoseconds, as HdrHistogram keeps them: values
under 128 have a bucket each, and every power of two above is cut into 64
buckets, so a bucket is never wider than 1/64 of the values in it. A
percentile read from it is the top of the bucket the true value is in: at
most 1.6 % above it, never below. Adding is one index worked out with
integer operations and one list increment, whatever the count (a read of
many messages adds them all at once), and the histograms of the worker
processes merge by adding their counts, so every message counts, not a
sample of them.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

__all__ = ["Histogram"]

_SUB_BITS = 6
_SUB = 1 << _SUB_BITS  # buckets per power of two
#: Values under 2**_BITS (9.8 hours in ns) have their bucket; larger ones count in the last.
_BITS = 45
_SIZE = ((_BITS - _SUB_BITS - 1) << _SUB_BITS) + 2 * _SUB


def _index(value: int) -> int:
    """The bucket ``value`` is counted in (negative values in the first)."""
    if value < 2 * _SUB:
        return value if value > 0 else 0
    if (shift := value.bit_length() - _SUB_BITS - 1) < _BITS - _SUB_BITS:
        return (shift << _SUB_BITS) + (value >> shift)
    return _SIZE - 1


def _top(index: int) -> int:
    """The largest value counted in bucket ``index``."""
    if index < 2 * _SUB:
        return index
    shift, top = divmod(index, _SUB)
    shift -= 1
    return ((top + _SUB + 1) << shift) - 1


class Histogram:
    """Counts of non-negative integers (ns), to within 1/64; negative ones count as 0."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        self.total = 0

    def add(self, value: int, count: int = 1) -> None:
        """Count ``value`` ``count`` times."""
        self.counts[_index(value)] += count
        self.total += count

    def add_between(self, low: int, high: int, count: int, points: int) -> None:
        """Count ``count`` values spread evenly from ``low`` to ``high``, at up to
        ``points`` points (as many calls of :meth:`add`, in one)."""
        points = min(count, points)
        if points == 1 or low == high:
            self.add(low, count)
            return
        each, more = divmod(count, points)
        step = (high - low) / (points - 1)
        counts = self.counts
        for i in range(points):
            counts[_index(low + round(step * i))] += each + (i < more)
        self.total += count

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts to these."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def quantile(self, q: float) -> int:
        """The ``q`` quantile (nearest rank) rounded up to its bucket's top; 0 if empty."""
        if not 0 <= q <= 1:
            raise ValueError("q must be between 0 and 1")
        if not self.total:
            return 0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return _top(index)
        raise AssertionError("counts add up to less than total")  # pragma: no cover
