"""Prometheus metrics with PgDoorman's names, read from the running pooler.

`snapshot()` runs on the event loop and only copies numbers into metric families;
formatting them (prometheus_client's exposition) can then run in a worker thread, so a
scrape never holds the loop for longer than the copy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from pg_doorman import __version__
from pg_doorman.net.server import ServerConnection
from pg_doorman.stats.counters import ERROR_CLASSES, PERCENTILES, Histogram

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler
    from pg_doorman.net.client import ClientConnection
    from pg_doorman.pool.pool import Pool

POOL_LABELS = ["user", "database"]
_LOG_LEVELS = {
    logging.DEBUG: 4,
    logging.INFO: 3,
    logging.WARNING: 2,
    logging.ERROR: 1,
}
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in hist.cumulative()
    ]
    family.add_metric(labels, buckets, hist.sum)


class _Families:
    """A fixed list of metric families, shaped like a registry for generate_latest()."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: list[Metric]) -> bytes:
    """Prometheus text exposition of a snapshot (safe to call off the loop)."""
    return generate_latest(_Families(families))


def snapshot(pooler: Pooler) -> list[Metric]:
    """Every metric of the pooler right now."""
    return list(_collect(pooler))


def _collect(pooler: Pooler) -> Iterable[Metric]:
    info = GaugeMetricFamily("pg_doorman_build_info", "Version of pg_doorman", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily(
        "pg_doorman_total_memory", "Resident memory of the process, bytes", resident_memory()
    )
    yield GaugeMetricFamily(
        "pg_doorman_log_level",
        "Log level: 0 off, 1 error, 2 warn, 3 info, 4 debug",
        _LOG_LEVELS.get(logging.getLogger().level, 0),
    )
    yield GaugeMetricFamily(
        "pg_doorman_users_configured",
        "Configured (database, user) pools",
        len(pooler.entries),
    )
    connections = CounterMetricFamily(
        "pg_doorman_connections_total", "Client sockets accepted, by type", labels=["type"]
    )
    connections.add_metric(["total"], pooler.accepted_total)
    connections.add_metric(["plain"], pooler.accepted_total - pooler.cancel_requests)
    connections.add_metric(["tls"], 0)
    connections.add_metric(["cancel"], pooler.cancel_requests)
    yield connections
    yield GaugeMetricFamily(
        "pg_doorman_connection_count", "Client connections open now", len(pooler.clients)
    )
    yield from _pool_metrics(pooler)


def _pool_metrics(pooler: Pooler) -> Iterable[Metric]:
    def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=POOL_LABELS + (extra or []))

    def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=POOL_LABELS + (extra or []))

    def histogram(name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, labels=POOL_LABELS)

    clients = gauge("pg_doorman_pools_clients", "Clients by state", ["status"])
    servers = gauge("pg_doorman_pools_servers", "Server connections by state", ["status"])
    pool_size = gauge("pg_doorman_pool_size", "Configured pool_size")
    paused = gauge("pg_doorman_pools_paused", "1 while the pool is paused")
    maxwait = gauge("pg_doorman_pools_maxwait_microseconds", "Wait of the oldest queued client, µs")
    oldest = gauge(
        "pg_doorman_pools_oldest_active_age_ms", "Age of the oldest running transaction, ms"
    )
    bytes_total = counter("pg_doorman_pools_bytes_total", "Bytes relayed", ["direction"])
    errors = counter(
        "pg_doorman_pools_errors_total", "Errors from servers by SQLSTATE class", ["sqlstate"]
    )
    queries = counter("pg_doorman_pools_queries_total", "Queries completed")
    transactions = counter("pg_doorman_pools_transactions_total", "Transactions completed")
    query_time = histogram("pg_doorman_pools_query_duration_seconds", "Query duration")
    xact_time = histogram("pg_doorman_pools_transaction_duration_seconds", "Transaction duration")
    wait_time = histogram(
        "pg_doorman_pools_wait_duration_seconds", "Time clients waited for a server"
    )
    query_percentiles = gauge(
        "pg_doorman_pools_queries_percentile",
        "Query duration percentile over the recent stats periods, µs",
        ["percentile"],
    )
    xact_percentiles = gauge(
        "pg_doorman_pools_transactions_percentile",
        "Transaction duration percentile over the recent stats periods, µs",
        ["percentile"],
    )
    cache_entries = gauge(
        "pg_doorman_pool_prepared_cache_entries", "Distinct prepared statements of the pool"
    )
    cache_bytes = gauge("pg_doorman_pool_prepared_cache_bytes", "Bytes of those statements")
    client_entries = gauge(
        "pg_doorman_clients_prepared_cache_entries", "Statements prepared by connected clients"
    )
    hits = counter("pg_doorman_servers_prepared_hits_total", "Statement uses a server had prepared")
    misses = counter(
        "pg_doorman_servers_prepared_misses_total", "Statements (re)prepared on a server"
    )

    by_pool: dict[Pool, list[ClientConnection]] = {}
    for client in pooler.clients.values():
        if client.pool is not None:
            by_pool.setdefault(client.pool, []).append(client)
    now = time.monotonic()
    loop_now = pooler.loop.time()
    for (database, user), entry in pooler.entries.items():
        pool = entry.pool
        labels = [user, database]
        pool_clients = by_pool.get(pool, [])
        states = [client.state_name for client in pool_clients]
        for status in ("idle", "waiting", "active"):
            clients.add_metric([*labels, status], states.count(status))
        servers.add_metric([*labels, "active"], pool.active)
        servers.add_metric([*labels, "idle"], len(pool.idle))
        servers.add_metric([*labels, "login"], pool.connecting)
        pool_size.add_metric(labels, pool.settings.pool_size)
        paused.add_metric(labels, int(pool.paused))
        maxwait.add_metric(labels, int(pool.oldest_wait(loop_now) * 1_000_000))
        oldest_age = 0.0
        client_statements = 0
        for server in pool.servers:
            if isinstance(server, ServerConnection) and server.client is not None:
                oldest_age = max(oldest_age, now - server.xact_started)
        for client in pool_clients:
            if client.rewriter is not None:
                client_statements += len(client.rewriter.named)
                client_statements += client.rewriter.unnamed is not None
        oldest.add_metric(labels, int(oldest_age * 1000))
        st = pool.stats
        bytes_total.add_metric([*labels, "received"], st.bytes_received)
        bytes_total.add_metric([*labels, "sent"], st.bytes_sent)
        # Every class, zeros included, so rate() and alerts see a series from the start.
        for sqlstate in ERROR_CLASSES:
            errors.add_metric([*labels, sqlstate], st.errors.get(sqlstate, 0))
        queries.add_metric(labels, st.query_count)
        transactions.add_metric(labels, st.xact_count)
        _histogram(query_time, labels, st.query_histogram)
        _histogram(xact_time, labels, st.xact_histogram)
        _histogram(wait_time, labels, st.wait_histogram)
        for q in PERCENTILES:
            label = str(round(q * 100))
            query_percentiles.add_metric(
                [*labels, label], int(st.recent_quantile("query", q) * 1_000_000)
            )
            xact_percentiles.add_metric(
                [*labels, label], int(st.recent_quantile("transaction", q) * 1_000_000)
            )
        cache_entries.add_metric(labels, len(pool.statements))
        cache_bytes.add_metric(labels, pool.statements.bytes)
        client_entries.add_metric(labels, client_statements)
        hit_count, miss_count = pool.prepared_hits_misses()
        hits.add_metric(labels, hit_count)
        misses.add_metric(labels, miss_count)
    yield from (
        clients, servers, pool_size, paused, maxwait, oldest, bytes_total, errors, queries,
        transactions, query_time, xact_time, wait_time, query_percentiles, xact_percentiles,
        cache_entries, cache_bytes, client_entries, hits, misses,
    )  # fmt: skip
