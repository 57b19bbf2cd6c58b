"""Latency percentiles from a histogram: never below the true value, at most 1/64 above."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from achat.bench.histogram import Histogram

values = st.lists(st.integers(0, 2**50), min_size=1, max_size=300)
quantiles = st.floats(0.0, 1.0)


def nearest_rank(data: list[int], q: float) -> int:
    ordered = sorted(data)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@given(values, quantiles)
def test_a_quantile_is_the_true_one_rounded_up_by_at_most_a_64th(data: list[int], q: float) -> None:
    h = Histogram()
    for v in data:
        h.add(v)
    true = min(nearest_rank(data, q), 2**45 - 1)  # the last bucket holds all above
    assert true <= h.quantile(q) <= true + true // 64
    assert h.total == len(data)


def test_small_values_are_exact_and_the_extremes_are_bounded() -> None:
    h = Histogram()
    for v in (0, 1, 127, -5, -200, -(10**9)):  # a clock stepped back: counted as 0
        h.add(v)
    assert [h.quantile(q) for q in (0.0, 0.5, 4 / 6, 5 / 6, 1.0)] == [0, 0, 0, 1, 127]
    h.add(10**30)
    assert h.quantile(1.0) == 2**45 - 1


@given(values, values)
def test_merging_is_adding_every_value_to_one(a: list[int], b: list[int]) -> None:
    one, two, both = Histogram(), Histogram(), Histogram()
    for v in a:
        one.add(v)
        both.add(v)
    for v in b:
        two.add(v)
        both.add(v)
    one.merge(two)
    assert (one.counts, one.total) == (both.counts, both.total)


@given(st.lists(st.tuples(st.integers(0, 10**12), st.integers(1, 50)), min_size=1), quantiles)
def test_a_count_weighs_as_that_many_values(pairs: list[tuple[int, int]], q: float) -> None:
    weighted, repeated = Histogram(), Histogram()
    for v, n in pairs:
        weighted.add(v, n)
        for _ in range(n):
            repeated.add(v)
    assert weighted.quantile(q) == repeated.quantile(q)
    assert weighted.total == sum(n for _, n in pairs)


@given(
    st.integers(-(10**9), 2**50),
    st.integers(-(10**9), 2**50),
    st.integers(1, 1000),
    st.integers(1, 16),
)
def test_adding_between_two_values_is_adding_at_evenly_spaced_points(
    low: int, high: int, count: int, points: int
) -> None:
    at_once, one_by_one = Histogram(), Histogram()
    at_once.add_between(low, high, count, points)
    n = min(count, points)
    each, more = divmod(count, n)
    for i in range(n):
        one_by_one.add(low + (round((high - low) / (n - 1) * i) if n > 1 else 0), each + (i < more))
    assert (at_once.counts, at_once.total) == (one_by_one.counts, one_by_one.total)
    assert at_once.total == count


def test_empty_and_bad_quantiles() -> None:
    assert Histogram().quantile(0.99) == 0
    with pytest.raises(ValueError, match="between 0 and 1"):
        Histogram().quantile(1.5)
