"""Per-pool counters: histogram buckets and quantiles, stats periods, error classes."""

from __future__ import annotations

import bisect
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_doorman.stats.counters import (
    BUCKETS,
    EARLY_P99_AFTER,
    Histogram,
    PoolStats,
    bucket_of,
    error_class,
)


def _bucket_by_bounds(seconds: float) -> int:
    """The first bucket whose bound is >= seconds, found in BUCKETS itself."""
    return len(BUCKETS) if math.isnan(seconds) else bisect.bisect_left(BUCKETS, seconds)


def test_bucket_of_matches_the_bounds_at_and_around_each_one() -> None:
    """bucket_of spells the bounds out as comparisons: each bound lands in its own
    bucket, the next float above it in the next one."""
    for i, bound in enumerate(BUCKETS):
        assert bucket_of(bound) == i
        assert bucket_of(math.nextafter(bound, 0.0)) == _bucket_by_bounds(
            math.nextafter(bound, 0.0)
        )
        assert bucket_of(math.nextafter(bound, math.inf)) == i + 1
    for seconds in (0.0, -1.0, -0.0, 1e-12, 1e9, math.inf, -math.inf, math.nan):
        assert bucket_of(seconds) == _bucket_by_bounds(seconds), seconds


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_bucket_of_matches_the_bounds_for_any_float(seconds: float) -> None:
    assert bucket_of(seconds) == _bucket_by_bounds(seconds)


def test_histogram_buckets_are_cumulative_and_end_with_the_total() -> None:
    hist = Histogram()
    for seconds in (0.00005, 0.0003, 0.0003, 0.02, 100.0):
        hist.observe(seconds)
    cumulative = hist.cumulative()
    assert len(cumulative) == len(BUCKETS) + 1
    assert cumulative[0] == (0.0001, 1)
    assert dict(cumulative)[0.0005] == 3
    assert dict(cumulative)[0.025] == 4
    assert cumulative[-1] == (float("inf"), 5)  # 100 s lands in +Inf
    assert hist.total == 5 and hist.sum == pytest.approx(100.02065)


@pytest.mark.parametrize("reads_between", [False, True])
def test_histogram_counts_stay_exact_across_the_small_int_fold(reads_between: bool) -> None:
    """Counts gather below 256 per bucket and fold into the totals; every read and
    every merge sees them all, whenever it comes."""
    hist, other = Histogram(), Histogram()
    expected = [0] * (len(BUCKETS) + 1)
    for n in range(1, 1500):
        i = (n * 7) % 3  # buckets 0, 1 and 2, unevenly
        hist.add(i)
        expected[i] += 1
        if reads_between and n % 97 == 0:
            assert hist.counts == expected
    for _ in range(300):
        other.add(len(BUCKETS))  # +Inf
    assert hist.counts == expected
    hist.merge(other)
    expected[len(BUCKETS)] += 300
    assert hist.counts == expected
    assert other.counts[len(BUCKETS)] == 300


def test_quantiles_interpolate_inside_the_bucket() -> None:
    hist = Histogram()
    for _ in range(100):
        hist.observe(0.003)  # bucket (0.0025, 0.005]
    assert 0.0025 < hist.quantile(0.5) <= 0.005
    assert hist.quantile(0.99) <= 0.005
    assert Histogram().quantile(0.5) == 0.0


def test_quantile_since_counts_only_later_observations() -> None:
    hist = Histogram()
    for _ in range(1000):
        hist.observe(2.0)
    before = list(hist.counts)
    for _ in range(10):
        hist.observe(0.0002)
    assert hist.quantile(0.99) > 1.0
    assert hist.quantile(0.99, before) <= 0.00025


def test_stats_period_averages_and_recent_window() -> None:
    stats = PoolStats()
    for _ in range(30):
        stats.record_transaction(0.002, received=100, sent=300)
        stats.record_query(0.002)
        stats.record_no_wait()
    stats.record_wait(0.5)
    stats.record_error("08006")
    stats.close_period(15.0)
    avg = stats.averages
    assert (avg.xact_count, avg.query_count) == (2, 2)  # 30 in 15 s
    assert (avg.received, avg.sent) == (200, 600)
    assert avg.xact_time == 2000 and avg.query_time == 2000  # µs
    assert avg.wait_time == 500_000 // 31
    # The window is the last closed period plus the running one.
    assert stats.recent_count("transaction") == 30
    stats.record_transaction(0.2, received=1, sent=1)
    assert stats.recent_count("transaction") == 31
    for _ in range(9):
        stats.record_transaction(0.2, received=1, sent=1)
    stats.close_period(15.0)
    assert stats.averages.xact_time == 200_000 and stats.averages.xact_count == 1
    assert stats.recent_count("transaction") == 10
    assert stats.recent_quantile("transaction", 0.5) > 0.1
    stats.close_period(15.0)  # an idle period
    assert stats.averages.xact_count == 0 and stats.averages.xact_time == 0
    assert stats.recent_count("transaction") == 0


def test_the_p99_is_estimated_before_the_first_period_closes() -> None:
    stats = PoolStats()
    for _ in range(EARLY_P99_AFTER - 1):
        stats.record_one_query_transaction(0.002, received=1, sent=1)
    assert stats.current_xact_p99() == 0.0  # too few to tell: the pool stays cold
    stats.record_transaction(0.002, received=1, sent=1)
    early = stats.current_xact_p99()
    assert 0.001 < early <= 0.0025
    # Slower transactions move the estimate only when the count has doubled.
    for _ in range(EARLY_P99_AFTER - 1):
        stats.record_transaction(0.2, received=1, sent=1)
    assert stats.current_xact_p99() == early
    stats.record_transaction(0.2, received=1, sent=1)
    assert 0.1 < stats.current_xact_p99() <= 0.25
    # Once a period with transactions closes, its p99 holds until the next one.
    stats.close_period(15.0)
    closed = stats.xact_p99
    assert 0.1 < closed <= 0.25
    for _ in range(8 * EARLY_P99_AFTER):
        stats.record_transaction(0.0002, received=1, sent=1)
    assert stats.current_xact_p99() == closed
    stats.close_period(15.0)
    assert stats.current_xact_p99() <= 0.00025


def test_an_idle_first_period_leaves_the_estimate_to_the_next_transactions() -> None:
    stats = PoolStats()
    stats.close_period(15.0)  # nothing ran
    assert stats.current_xact_p99() == 0.0
    for _ in range(EARLY_P99_AFTER):
        stats.record_transaction(0.03, received=1, sent=1)
    assert 0.025 < stats.current_xact_p99() <= 0.05


@pytest.mark.parametrize(
    ("code", "label"),
    [("08006", "08"), ("53300", "53"), ("57P01", "57"), ("25P02", "25P02"),
     ("26000", "26000"), ("22012", "other"), ("42P01", "other")],
)  # fmt: skip
def test_error_classes(code: str, label: str) -> None:
    assert error_class(code) == label


def _recorded(stats: PoolStats) -> tuple[object, ...]:
    return (
        stats.query_count,
        stats.query_time,
        stats.xact_count,
        stats.xact_time,
        stats.bytes_received,
        stats.bytes_sent,
        list(stats.query_histogram.counts),
        stats.query_histogram.sum,
        stats.query_histogram.total,
        list(stats.xact_histogram.counts),
        stats.xact_histogram.sum,
        stats.xact_histogram.total,
    )


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1e6),
            st.integers(min_value=0, max_value=1 << 40),
            st.integers(min_value=0, max_value=1 << 40),
        ),
        max_size=600,
    )
)
def test_a_one_query_transaction_records_as_its_query_and_its_transaction(
    transactions: list[tuple[float, int, int]],
) -> None:
    """The relay's shortcut for a transaction of one query leaves the counters and both
    histograms exactly as recording the query and the transaction apart does."""
    apart, together = PoolStats(), PoolStats()
    for seconds, received, sent in transactions:
        apart.record_query(seconds)
        apart.record_transaction(seconds, received, sent)
        together.record_one_query_transaction(seconds, received, sent)
    assert _recorded(together) == _recorded(apart)
