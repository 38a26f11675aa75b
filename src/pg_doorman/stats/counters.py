"""Per-pool counters and latency histograms, updated once per transaction.

Everything is plain ints and lists so that updates cost a few attribute operations and
so that counters from several worker processes can be merged by addition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Bucket upper bounds in seconds: 0.1 ms .. 60 s, roughly x2 apart (Prometheus style).
# bucket_of spells them out: change both together.
# Typed as a variable-length tuple: mypyc keeps a fixed-length one unboxed and would
# box every element again on each iteration.
BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def bucket_of(seconds: float) -> int:
    """Index of the first bucket whose bound is >= seconds (len(BUCKETS) for +Inf).

    The bounds of BUCKETS written out, in order: compiled, each test is one comparison
    of unboxed floats, where a walk over the tuple unboxes every bound it reads (three
    times per transaction); most durations land in the first few buckets. A test checks
    this against BUCKETS. NaN compares false everywhere and lands in +Inf.
    """
    if seconds <= 0.0001:
        return 0
    if seconds <= 0.00025:
        return 1
    if seconds <= 0.0005:
        return 2
    if seconds <= 0.001:
        return 3
    if seconds <= 0.0025:
        return 4
    if seconds <= 0.005:
        return 5
    if seconds <= 0.01:
        return 6
    if seconds <= 0.025:
        return 7
    if seconds <= 0.05:
        return 8
    if seconds <= 0.1:
        return 9
    if seconds <= 0.25:
        return 10
    if seconds <= 0.5:
        return 11
    if seconds <= 1.0:
        return 12
    if seconds <= 2.5:
        return 13
    if seconds <= 5.0:
        return 14
    if seconds <= 10.0:
        return 15
    if seconds <= 30.0:
        return 16
    if seconds <= 60.0:
        return 17
    return 18


class Histogram:
    """Cumulative-on-read histogram over BUCKETS (the last slot counts +Inf).

    Observations first count in `_recent`, whose items stay below 256: CPython keeps
    one object for each int up to 256, so storing such a count allocates nothing,
    where every new total above it is a new int object (and the old one freed), three
    times per transaction. Reading `counts` folds them into the totals.
    """

    __slots__ = ("_counts", "_recent", "sum", "total")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self._recent = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.total = 0

    @property
    def counts(self) -> list[int]:
        """Observations per bucket (the list itself: callers copy it to keep it)."""
        counts = self._counts
        recent = self._recent
        for i in range(len(recent)):
            if recent[i]:
                counts[i] = counts[i] + recent[i]
                recent[i] = 0
        return counts

    def add(self, i: int) -> None:
        """One observation in bucket `i`."""
        # `x[i] = x[i] + 1`, not `+=`: the compiled build adds an item in place as two
        # generic objects, and this way as native ints.
        recent = self._recent
        n = recent[i] + 1
        if n < 256:
            recent[i] = n
        else:
            counts = self._counts
            counts[i] = counts[i] + n
            recent[i] = 0

    def observe(self, seconds: float) -> None:
        self.observe_in(bucket_of(seconds), seconds)

    def observe_in(self, bucket: int, seconds: float) -> None:
        """One observation of `seconds` whose bucket the caller already found."""
        self.add(bucket)
        self.sum += seconds
        self.total += 1

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, count in enumerate(other.counts):
            counts[i] = counts[i] + count
        self.sum += other.sum
        self.total += other.total

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, count of observations <= bound), ending with (+inf, total)."""
        return cumulative_of(self.counts)

    def quantile(self, q: float, since: list[int] | None = None) -> float:
        """Estimated q-quantile in seconds (linear inside the bucket), 0 when empty.

        `since`: bucket counts taken earlier; only observations after them count.
        """
        return quantile_of(self.counts, q, since)


def cumulative_of(counts: list[int]) -> list[tuple[float, int]]:
    """(upper bound, observations <= bound) for bucket counts, ending with (+inf, all)."""
    running = 0
    out = []
    for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
        running += count
        out.append((bound, running))
    return out


def recent_count_of(counts: list[int], since: list[int]) -> int:
    """Observations in bucket counts after the earlier counts `since`."""
    return sum(counts) - sum(since)


def quantile_of(counts: list[int], q: float, since: list[int] | None = None) -> float:
    """q-quantile in seconds of bucket counts (minus `since`), linear inside a bucket."""
    if since is not None:
        counts = [now - then for now, then in zip(counts, since, strict=True)]
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    running = 0
    lower = 0.0
    for bound, count in zip(BUCKETS, counts, strict=False):
        if running + count >= rank and count:
            return lower + (bound - lower) * (rank - running) / count
        running += count
        lower = bound
    return BUCKETS[-1]


# Labels of the errors counter.
ERROR_CLASSES: Final = ("08", "53", "57", "25P02", "26000", "other")


def error_class(sqlstate: str) -> str:
    """Label for the errors counter: the classes operators act on, else `other`."""
    if sqlstate in ("25P02", "26000"):
        return sqlstate
    prefix = sqlstate[:2]
    if prefix in ("08", "53", "57"):
        return prefix
    return "other"


# Reported by SHOW LATENCY and the percentile gauges.
PERCENTILES: Final = (0.5, 0.9, 0.95, 0.99)

# Stats period, as in PgDoorman: averages and SHOW percentiles cover recent periods.
STATS_PERIOD: Final = 15.0

# Until a stats period with transactions has closed, the pool's p99 transaction time is
# estimated from the transactions timed so far once there are this many, and again each
# time their number doubles (see current_xact_p99).
EARLY_P99_AFTER: Final = 64


class PeriodAverages:
    """Rates (per second) and mean durations (µs) over the last closed stats period."""

    __slots__ = (
        "errors",
        "query_count",
        "query_time",
        "received",
        "sent",
        "wait_time",
        "xact_count",
        "xact_time",
    )

    def __init__(self) -> None:
        self.xact_count = 0
        self.query_count = 0
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.xact_time = 0
        self.query_time = 0
        self.wait_time = 0


def _counts(stats: PoolStats) -> tuple[int, int, int, int, int, int]:
    return (
        stats.xact_count,
        stats.query_count,
        stats.bytes_received,
        stats.bytes_sent,
        stats.total_errors,
        stats.wait_count,
    )


def _times(stats: PoolStats) -> tuple[float, float, float]:
    return (stats.xact_time, stats.query_time, stats.wait_time)


def _per(delta_time: float, count: int) -> int:
    return int(delta_time / count * 1e6) if count else 0


class PoolStats:
    """Counters of one (database, user) pool. Times are in seconds."""

    __slots__ = (
        "_early_p99_at",
        "_period_counts",
        "_period_start_counts",
        "_period_times",
        "_window_base",
        "averages",
        "bytes_received",
        "bytes_sent",
        "errors",
        "query_count",
        "query_histogram",
        "query_time",
        "wait_count",
        "wait_histogram",
        "wait_time",
        "xact_count",
        "xact_histogram",
        "xact_p99",
        "xact_time",
    )

    def __init__(self) -> None:
        self.xact_count = 0
        self.query_count = 0
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.xact_time = 0.0
        self.query_time = 0.0
        self.wait_time = 0.0
        self.wait_count = 0
        self.errors: dict[str, int] = {}
        self.xact_histogram = Histogram()
        self.query_histogram = Histogram()
        self.wait_histogram = Histogram()
        self.averages = PeriodAverages()
        # The 99th percentile transaction time of the last stats period with any (s; 0:
        # none yet): how long a queued client may wait for a server to come back.
        # Estimated earlier by current_xact_p99.
        self.xact_p99 = 0.0
        # The transaction count at which current_xact_p99 estimates next; 0 once a
        # period with transactions has closed and set xact_p99 for good.
        self._early_p99_at = EARLY_P99_AFTER
        self._period_counts = _counts(self)
        self._period_times = _times(self)
        # Histogram counts at the start of the previous period: SHOW percentiles cover
        # the last one or two periods, never less than one full period once running.
        zero = [0] * (len(BUCKETS) + 1)
        self._window_base: tuple[list[int], list[int], list[int]] = (zero, zero, zero)
        self._period_start_counts = self._window_base

    def close_period(self, elapsed: float) -> None:
        """End a stats period of `elapsed` seconds: recompute averages, move the window."""
        counts, times = _counts(self), _times(self)
        xacts, queries, received, sent, errors, waits = (
            a - b for a, b in zip(counts, self._period_counts, strict=True)
        )
        xact_time, query_time, wait_time = (
            a - b for a, b in zip(times, self._period_times, strict=True)
        )
        self._period_counts, self._period_times = counts, times
        avg = self.averages
        seconds = max(elapsed, 1e-9)
        avg.xact_count = round(xacts / seconds)
        avg.query_count = round(queries / seconds)
        avg.received = round(received / seconds)
        avg.sent = round(sent / seconds)
        avg.errors = round(errors / seconds)
        avg.xact_time = _per(xact_time, xacts)
        avg.query_time = _per(query_time, queries)
        avg.wait_time = _per(wait_time, waits)
        if xacts:
            self.xact_p99 = self._xact_p99_this_period()
            self._early_p99_at = 0
        self._window_base = self._period_start_counts
        self._period_start_counts = (
            list(self.query_histogram.counts),
            list(self.xact_histogram.counts),
            list(self.wait_histogram.counts),
        )

    def _recent(self, which: str) -> tuple[Histogram, list[int]]:
        if which == "query":
            return self.query_histogram, self._window_base[0]
        if which == "transaction":
            return self.xact_histogram, self._window_base[1]
        return self.wait_histogram, self._window_base[2]

    def recent_quantile(self, which: str, q: float) -> float:
        """q-quantile in seconds of `query`, `transaction` or `wait` durations lately."""
        histogram, base = self._recent(which)
        return histogram.quantile(q, base)

    def window_bases(self) -> tuple[list[int], list[int], list[int]]:
        """Bucket counts (query, transaction, wait) where the recent window starts."""
        return self._window_base

    def recent_count(self, which: str) -> int:
        """How many `query`, `transaction` or `wait` durations recent_quantile covers."""
        histogram, base = self._recent(which)
        return recent_count_of(histogram.counts, base)

    def current_xact_p99(self) -> float:
        """xact_p99, estimated from this period's transactions so far while no period
        with any has closed: a pool that starts under load would otherwise wait a whole
        period (while its queued clients wait the cold patience, longer than most queue
        waits, and it opens no servers beyond the warm threshold). The estimate is
        redone each time the count doubles; each costs a pass over the buckets."""
        at = self._early_p99_at
        if at and self.xact_count >= at:
            self._early_p99_at = at * 2
            self.xact_p99 = self._xact_p99_this_period()
        return self.xact_p99

    def _xact_p99_this_period(self) -> float:
        return quantile_of(self.xact_histogram.counts, 0.99, since=self._period_start_counts[1])

    def record_transaction(self, seconds: float, received: int, sent: int) -> None:
        self._transaction_in(bucket_of(seconds), seconds, received, sent)

    def record_query(self, seconds: float) -> None:
        self._query_in(bucket_of(seconds), seconds)

    def record_one_query_transaction(self, seconds: float, received: int, sent: int) -> None:
        """`record_query` and `record_transaction` of one duration (a transaction of a
        single query, as most are), with one bucket search for both histograms."""
        bucket = bucket_of(seconds)
        self._query_in(bucket, seconds)
        self._transaction_in(bucket, seconds, received, sent)

    def _transaction_in(self, bucket: int, seconds: float, received: int, sent: int) -> None:
        self.xact_count += 1
        self.xact_time += seconds
        self.xact_histogram.observe_in(bucket, seconds)
        self.bytes_received += received
        self.bytes_sent += sent

    def _query_in(self, bucket: int, seconds: float) -> None:
        self.query_count += 1
        self.query_time += seconds
        self.query_histogram.observe_in(bucket, seconds)

    def record_no_wait(self) -> None:
        """A server was idle at once: a zero wait, without the bucket search."""
        self.wait_count += 1
        hist = self.wait_histogram
        hist.add(0)
        hist.total += 1

    def record_wait(self, seconds: float) -> None:
        self.wait_count += 1
        self.wait_time += seconds
        self.wait_histogram.observe(seconds)

    def record_error(self, sqlstate: str) -> None:
        label = error_class(sqlstate)
        self.errors[label] = self.errors.get(label, 0) + 1

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def merge(self, others: Iterable[PoolStats]) -> None:
        for other in others:
            self.xact_count += other.xact_count
            self.query_count += other.query_count
            self.bytes_received += other.bytes_received
            self.bytes_sent += other.bytes_sent
            self.xact_time += other.xact_time
            self.query_time += other.query_time
            self.wait_time += other.wait_time
            self.wait_count += other.wait_count
            for label, count in other.errors.items():
                self.errors[label] = self.errors.get(label, 0) + count
            self.xact_histogram.merge(other.xact_histogram)
            self.query_histogram.merge(other.query_histogram)
            self.wait_histogram.merge(other.wait_histogram)
