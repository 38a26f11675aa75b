"""Prometheus metrics with PgDoorman's names, built from a pooler snapshot.

The snapshot is taken on the event loop (plain numbers, see admin/snapshot.py) and may
come from several worker processes; turning it into metric families and formatting them
(prometheus_client's exposition) can run in a worker thread, so a scrape never holds the
loop for longer than the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest

from pg_doorman import __version__
from pg_doorman.admin.snapshot import PoolData, Snapshot
from pg_doorman.pool.fallback import DURATION_BUCKETS, FAILURE_REASONS
from pg_doorman.stats.counters import ERROR_CLASSES, PERCENTILES, cumulative_of, quantile_of
from pg_doorman.stats.sockets import totals_by_kind

POOL_LABELS = ["user", "database"]
_LOG_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
}


class _Families:
    """Metric families of one snapshot, shaped like a registry for generate_latest()."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return iter(_collect(self._snapshot))


def render(snapshot: Snapshot) -> bytes:
    """Prometheus text exposition of a snapshot (safe to call off the loop)."""
    return generate_latest(_Families(snapshot))


def _histogram(family: HistogramMetricFamily, labels: list[str], h: dict[str, object]) -> None:
    counts = h["counts"]
    assert isinstance(counts, list)
    total = h["sum"]
    assert isinstance(total, float | int)
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in cumulative_of(counts)
    ]
    family.add_metric(labels, buckets, float(total))


def _collect(snap: Snapshot) -> Iterable[Metric]:
    info = GaugeMetricFamily("pg_doorman_build_info", "Version of pg_doorman", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily(
        "pg_doorman_total_memory",
        "Resident memory of the pooler's processes, bytes",
        snap["memory"],
    )
    log_level = GaugeMetricFamily(
        "pg_doorman_log_level", "The log level, in the label `level` (always 1)", labels=["level"]
    )
    log_level.add_metric([_LOG_LEVELS.get(snap["log_level"], "off")], 1)
    yield log_level
    users = GaugeMetricFamily(
        "pg_doorman_users_configured",
        "One series per (user, database) pool, always 1",
        labels=[*POOL_LABELS, "pool_mode"],
    )
    for p in snap["pools"]:
        users.add_metric([p["user"], p["database"], p["pool_mode"]], 1)
    yield users
    yield GaugeMetricFamily(
        "pg_doorman_workers", "Worker processes serving clients", snap["workers"]
    )
    connections = CounterMetricFamily(
        "pg_doorman_connections_total", "Client sockets accepted, by type", labels=["type"]
    )
    # PgDoorman's older name for the same numbers, a gauge.
    connection_count = GaugeMetricFamily(
        "pg_doorman_connection_count",
        "Client sockets accepted, by type (deprecated: pg_doorman_connections_total)",
        labels=["type"],
    )
    for kind, key in (
        ("total", "accepted"), ("plain", "plain"), ("tls", "tls"), ("cancel", "cancel_requests"),
    ):  # fmt: skip
        connections.add_metric([kind], snap[key])
        connection_count.add_metric([kind], snap[key])
    yield connections
    yield connection_count
    per_worker = GaugeMetricFamily(
        "pg_doorman_worker_connection_count",
        "Client connections open now, by worker process",
        labels=["worker"],
    )
    for index, count in sorted(snap["worker_connections"].items(), key=lambda i: int(i[0])):
        per_worker.add_metric([index], count)
    yield per_worker
    if snap["sockets"] is not None:  # Linux only, as in PgDoorman
        sockets = GaugeMetricFamily(
            "pg_doorman_sockets",
            "Sockets the pooler's processes hold, by type: tcp, tcp6, unix, unknown",
            labels=["type"],
        )
        for kind, count in totals_by_kind(snap["sockets"]).items():
            sockets.add_metric([kind], count)
        yield sockets
    yield from _pool_metrics(snap["pools"])
    yield from _auth_query_metrics(snap["auth_query"])
    yield from _coordinator_metrics(snap["coordinator"])
    yield from _fallback_metrics(snap["fallback"])
    yield from _startup_parameter_metrics(
        snap["startup_parameter_errors"], snap["startup_parameters_dropped"]
    )


# PgDoorman's `type` labels of the coordinator's gauge and counter, by snapshot key.
COORDINATOR_GAUGES: Final = {
    "connections": "current_connections",
    "reserve_in_use": "reserve_in_use",
    "max_connections": "max_db_connections",
    "reserve_pool_size": "reserve_pool_size",
}
COORDINATOR_COUNTERS: Final = {
    "evictions": "evictions",
    "reserve_acquisitions": "reserve_opened",
    "exhaustions": "exhaustions",
}


def _coordinator_metrics(rows: list[dict[str, Any]]) -> Iterable[Metric]:
    """Per database with max_db_connections, as PgDoorman exports them."""
    labels = ["type", "database"]
    state = GaugeMetricFamily(
        "pg_doorman_pool_coordinator",
        "max_db_connections by type: connections (servers of the database now, opening "
        "ones included), reserve_in_use, max_connections, reserve_pool_size",
        labels=labels,
    )
    totals = CounterMetricFamily(
        "pg_doorman_pool_coordinator_total",
        "max_db_connections events by type: evictions (idle servers closed for another "
        "user), reserve_acquisitions (servers opened from the reserve), exhaustions "
        "(servers that could not open: clients wait)",
        labels=labels,
    )
    waiting = GaugeMetricFamily(
        "pg_doorman_pool_coordinator_waiting_users",
        "Users of the database whose clients wait for room under max_db_connections",
        labels=["database"],
    )
    for row in rows:
        db = row["database"]
        for kind, key in COORDINATOR_GAUGES.items():
            state.add_metric([kind, db], row[key])
        for kind, key in COORDINATOR_COUNTERS.items():
            totals.add_metric([kind, db], row[key])
        waiting.add_metric([db], row["waiting_users"])
    yield from (state, totals, waiting)


def _fallback_metrics(rows: list[dict[str, Any]]) -> Iterable[Metric]:
    """Per pool with patroni_api_urls; PgDoorman's names, labelled by `pool`."""
    labels = ["pool"]
    active = GaugeMetricFamily(
        "pg_doorman_fallback_active",
        "1 while the pool's server is unavailable and new servers open on another member",
        labels=labels,
    )
    host = GaugeMetricFamily(
        "pg_doorman_fallback_host",
        "The member new servers open on during a fallback (1)",
        labels=[*labels, "host", "port"],
    )
    connections = CounterMetricFamily(
        "pg_doorman_fallback_connections",
        "Servers opened on another Patroni member",
        labels=labels,
    )
    cache_hits = CounterMetricFamily(
        "pg_doorman_fallback_cache_hits",
        "Fallback servers opened on the member already chosen, without asking Patroni",
        labels=labels,
    )
    failures = CounterMetricFamily(
        "pg_doorman_fallback_candidate_failures",
        "Failed logins to fallback members, by reason",
        labels=[*labels, "reason"],
    )
    requests = CounterMetricFamily(
        "pg_doorman_patroni_api_requests",
        "GET /cluster rounds (every URL asked at once)",
        labels=labels,
    )
    errors = CounterMetricFamily(
        "pg_doorman_patroni_api_errors",
        "GET /cluster rounds no URL answered",
        labels=labels,
    )
    duration = HistogramMetricFamily(
        "pg_doorman_patroni_api_duration_seconds",
        "Time a GET /cluster round took",
        labels=labels,
    )
    for row in rows:
        pool = [row["database"]]
        active.add_metric(pool, row["active"])
        if row["host"] is not None:
            member_host, member_port = row["host"]
            host.add_metric([*pool, member_host, str(member_port)], 1)
        connections.add_metric(pool, row["connections"])
        cache_hits.add_metric(pool, row["cache_hits"])
        for reason in FAILURE_REASONS:
            failures.add_metric([*pool, reason], row["candidate_failures"].get(reason, 0))
        requests.add_metric(pool, row["api_requests"])
        errors.add_metric(pool, row["api_errors"])
        buckets = []
        total = 0
        for bound, count in zip(DURATION_BUCKETS, row["api_duration_counts"], strict=True):
            total += count
            buckets.append((f"{bound:g}", total))
        buckets.append(("+Inf", total + row["api_duration_over"]))
        duration.add_metric(pool, buckets, row["api_duration_sum"])
    yield from (active, host, connections, cache_hits, failures, requests, errors, duration)


def _startup_parameter_metrics(
    errors: list[list[Any]], dropped: list[list[Any]]
) -> Iterable[Metric]:
    """PgDoorman's two counters of configured startup parameters, labelled by `pool`."""
    refused = CounterMetricFamily(
        "pg_doorman_backend_startup_parameter_errors",
        "Server logins PostgreSQL refused over a configured startup parameter, by SQLSTATE",
        labels=["pool", "sqlstate"],
    )
    for database, code, count in errors:
        refused.add_metric([database, code], count)
    left_out = CounterMetricFamily(
        "pg_doorman_startup_parameters_dropped",
        "Looked-up startup parameters left out of the StartupMessage, by reason",
        labels=["pool", "reason"],
    )
    for database, reason, count in dropped:
        left_out.add_metric([database, reason], count)
    yield from (refused, left_out)


def _auth_query_metrics(rows: list[dict[str, Any]]) -> Iterable[Metric]:
    """Per pool with an auth_query. A gauge and a counter can't share a base name in
    the exposition format, so the gauges end in `_entries` and `_current`."""
    labels = ["database"]
    entries = GaugeMetricFamily(
        "pg_doorman_auth_query_cache_entries", "Users in the auth_query cache", labels=labels
    )
    cache = CounterMetricFamily(
        "pg_doorman_auth_query_cache_total",
        "auth_query cache lookups: hit, miss, refetch (after a failed password), "
        "rate_limited (a refetch refused by min_interval)",
        labels=[*labels, "result"],
    )
    auth = CounterMetricFamily(
        "pg_doorman_auth_query_auth_total",
        "Logins of users looked up by auth_query",
        labels=[*labels, "result"],
    )
    executor = CounterMetricFamily(
        "pg_doorman_auth_query_executor_total",
        "Lookups run on the auth_query connections",
        labels=[*labels, "result"],
    )
    pools_now = GaugeMetricFamily(
        "pg_doorman_auth_query_dynamic_pools_current",
        "Pools of looked-up users (passthrough mode)",
        labels=labels,
    )
    pools_total = CounterMetricFamily(
        "pg_doorman_auth_query_dynamic_pools_total",
        "Pools of looked-up users created and closed",
        labels=[*labels, "event"],
    )
    # PgDoorman's gauges of the same numbers, one family each, by `type` (or `result`).
    gauges = {
        name: GaugeMetricFamily(
            f"pg_doorman_auth_query_{name}",
            f"auth_query {name.replace('_', ' ')} by {label}",
            labels=[label, "database"],
        )
        for name, label in (
            ("cache", "type"), ("auth", "result"), ("executor", "type"), ("dynamic_pools", "type"),
        )
    }  # fmt: skip
    for row in rows:
        db = row["database"]
        for family, kind, key in AUTH_QUERY_GAUGES:
            gauges[family].add_metric([kind, db], row[key])
        entries.add_metric([db], row["cache_entries"])
        for result, key in (
            ("hit", "cache_hits"),
            ("miss", "cache_misses"),
            ("refetch", "cache_refetches"),
            ("rate_limited", "cache_rate_limited"),
        ):
            cache.add_metric([db, result], row[key])
        auth.add_metric([db, "success"], row["auth_success"])
        auth.add_metric([db, "failure"], row["auth_failure"])
        executor.add_metric([db, "ok"], row["executor_queries"] - row["executor_errors"])
        executor.add_metric([db, "error"], row["executor_errors"])
        pools_now.add_metric([db], row["dynamic_pools_current"])
        pools_total.add_metric([db, "created"], row["dynamic_pools_created"])
        pools_total.add_metric([db, "destroyed"], row["dynamic_pools_destroyed"])
    yield from (entries, cache, auth, executor, pools_now, pools_total, *gauges.values())


# (family, PgDoorman's label value, snapshot key) of the auth_query gauges.
AUTH_QUERY_GAUGES: Final = (
    ("cache", "entries", "cache_entries"),
    ("cache", "hits", "cache_hits"),
    ("cache", "misses", "cache_misses"),
    ("cache", "refetches", "cache_refetches"),
    ("cache", "rate_limited", "cache_rate_limited"),
    ("auth", "success", "auth_success"),
    ("auth", "failure", "auth_failure"),
    ("executor", "queries", "executor_queries"),
    ("executor", "errors", "executor_errors"),
    ("dynamic_pools", "current", "dynamic_pools_current"),
    ("dynamic_pools", "created", "dynamic_pools_created"),
    ("dynamic_pools", "destroyed", "dynamic_pools_destroyed"),
)


# SHOW POOL_SCALING columns and PgDoorman's `type` labels for them.
SCALING_TYPES: Final = {
    "creates": "creates_started",
    "gate_waits": "burst_gate_waits",
    "gate_budget_ex": "burst_gate_budget_exhausted",
    "antic_notify": "anticipation_wakes_notify",
    "antic_timeout": "anticipation_wakes_timeout",
    "create_fallback": "create_fallback",
    "replenish_def": "replenish_deferred",
}


def _pool_metrics(pools: list[PoolData]) -> Iterable[Metric]:
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
    durations = {
        "query": histogram("pg_doorman_pools_query_duration_seconds", "Query duration"),
        "transaction": histogram(
            "pg_doorman_pools_transaction_duration_seconds", "Transaction duration"
        ),
        "wait": histogram(
            "pg_doorman_pools_wait_duration_seconds", "Time clients waited for a server"
        ),
    }
    percentiles = {
        "query": gauge(
            "pg_doorman_pools_queries_percentile",
            "Query duration percentile over the recent stats periods, ms",
            ["percentile"],
        ),
        "transaction": gauge(
            "pg_doorman_pools_transactions_percentile",
            "Transaction duration percentile over the recent stats periods, ms",
            ["percentile"],
        ),
    }
    cache_entries = gauge(
        "pg_doorman_pool_prepared_cache_entries", "Distinct prepared statements of the pool"
    )
    cache_bytes = gauge("pg_doorman_pool_prepared_cache_bytes", "Bytes of those statements")
    client_entries = gauge(
        "pg_doorman_clients_prepared_cache_entries", "Statements prepared by connected clients"
    )
    client_bytes = gauge(
        "pg_doorman_clients_prepared_cache_bytes", "Bytes of the statements clients prepared"
    )
    client_named = gauge(
        "pg_doorman_clients_prepared_named_entries", "Named statements of connected clients"
    )
    client_anonymous = gauge(
        "pg_doorman_clients_prepared_anonymous_entries",
        "Connected clients holding an unnamed statement",
    )
    # PgDoorman's async (Flush-only) clients and their unnamed statement LRU: no such
    # thing here, exported at 0 so dashboards find the series.
    async_clients = gauge("pg_doorman_async_clients_count", "Async clients (always 0)")
    anonymous_evictions = counter(
        "pg_doorman_clients_prepared_anonymous_evictions_total",
        "Unnamed statements evicted from client caches (always 0)",
    )
    hits = counter("pg_doorman_servers_prepared_hits_total", "Statement uses a server had prepared")
    misses = counter(
        "pg_doorman_servers_prepared_misses_total", "Statements (re)prepared on a server"
    )
    # Labelled by `pool` (the database's name) alone, as in PgDoorman.
    tls_servers = GaugeMetricFamily(
        "pg_doorman_server_tls_connections", "Server connections using TLS", labels=["pool"]
    )
    tls_handshakes = SummaryMetricFamily(
        "pg_doorman_server_tls_handshake_duration_seconds",
        "TLS handshakes completed with servers",
        labels=["pool"],
    )
    tls_errors = CounterMetricFamily(
        "pg_doorman_server_tls_handshake_errors",
        "TLS handshakes with servers that failed",
        labels=["pool"],
    )
    # [servers using TLS, handshakes, failed handshakes] and handshake seconds, by pool.
    tls_counts: dict[str, list[int]] = {}
    tls_seconds: dict[str, float] = {}
    # PgDoorman's gauge (`type="inflight_creates"`) and counter (`..._total`).
    scaling = counter(
        "pg_doorman_pool_scaling", "How the pool opened servers under pressure, by type", ["type"]
    )
    inflight = gauge(
        "pg_doorman_pool_scaling", "Servers being opened now (type inflight_creates)", ["type"]
    )
    listen_clients = gauge(
        "pg_doorman_pools_listen_clients",
        "Clients listening through the pool's listening server (listen_fanout)",
    )
    listen_channels = gauge(
        "pg_doorman_pools_listen_channels", "Channels the pool's listening server listens on"
    )
    notifications = counter(
        "pg_doorman_pools_notifications_total",
        "Notifications passed on to listening clients (one per client reached)",
    )
    slow = counter(
        "pg_doorman_pools_slow_requests_total",
        "Requests that took at least log_min_duration_statement (each logged)",
    )
    pinned = gauge(
        "pg_doorman_pools_pinned_clients",
        "Transaction-mode clients keeping their server between transactions, by reason",
        ["reason"],
    )

    for p in pools:
        labels = [p["user"], p["database"]]
        for status in ("idle", "waiting", "active"):
            clients.add_metric([*labels, status], p[f"cl_{status}"])
        for status in ("active", "idle", "login"):
            servers.add_metric([*labels, status], p[f"sv_{status}"])
        pool_size.add_metric(labels, p["pool_size"])
        paused.add_metric(labels, p["paused"])
        maxwait.add_metric(labels, int(p["maxwait"] * 1_000_000))
        oldest.add_metric(labels, int(p["oldest_active"] * 1000))
        bytes_total.add_metric([*labels, "received"], p["bytes_received"])
        bytes_total.add_metric([*labels, "sent"], p["bytes_sent"])
        # Every class, zeros included, so rate() and alerts see a series from the start.
        for sqlstate in ERROR_CLASSES:
            errors.add_metric([*labels, sqlstate], p["errors"].get(sqlstate, 0))
        queries.add_metric(labels, p["query_count"])
        transactions.add_metric(labels, p["xact_count"])
        for kind, duration in durations.items():
            _histogram(duration, labels, p["histograms"][kind])
        for kind, percentile in percentiles.items():
            h = p["histograms"][kind]
            for q in PERCENTILES:
                seconds = quantile_of(h["counts"], q, h["base"])
                # Milliseconds, as in PgDoorman (SHOW POOLS_EXTENDED has µs).
                percentile.add_metric([*labels, str(round(q * 100))], seconds * 1000)
        cache_entries.add_metric(labels, len(p["statements"]))
        cache_bytes.add_metric(labels, sum(row[5] for row in p["statements"]))
        client_entries.add_metric(labels, p["client_named"] + p["client_anonymous"])
        client_bytes.add_metric(labels, p["client_prepared_bytes"])
        client_named.add_metric(labels, p["client_named"])
        client_anonymous.add_metric(labels, p["client_anonymous"])
        async_clients.add_metric(labels, 0)
        anonymous_evictions.add_metric(labels, 0)
        hits.add_metric(labels, p["hits"])
        misses.add_metric(labels, p["misses"])
        tls = tls_counts.setdefault(p["database"], [0, 0, 0])
        tls[0] += p["tls_servers"]
        tls[1] += p["tls_handshakes"]
        tls[2] += p["tls_handshake_errors"]
        tls_seconds[p["database"]] = (
            tls_seconds.get(p["database"], 0.0) + p["tls_handshake_seconds"]
        )
        inflight.add_metric([*labels, "inflight_creates"], p["sv_login"])
        for key, kind in SCALING_TYPES.items():
            scaling.add_metric([*labels, kind], p[key])
        listen_clients.add_metric(labels, p["listen_clients"])
        listen_channels.add_metric(labels, p["listen_channels"])
        notifications.add_metric(labels, p["notifications"])
        slow.add_metric(labels, p["slow_requests"])
        pinned.add_metric([*labels, "listen"], p["pinned_listen"])
        pinned.add_metric([*labels, "advisory_lock"], p["pinned_locks"])
    for database, (servers_now, handshakes, failed) in tls_counts.items():
        tls_servers.add_metric([database], servers_now)
        tls_handshakes.add_metric([database], handshakes, tls_seconds[database])
        tls_errors.add_metric([database], failed)
    yield from (
        clients, servers, pool_size, paused, maxwait, oldest, bytes_total, errors, queries,
        transactions, *durations.values(), *percentiles.values(), cache_entries, cache_bytes,
        client_entries, client_bytes, client_named, client_anonymous, async_clients,
        anonymous_evictions, hits, misses, tls_servers, tls_handshakes, tls_errors, scaling,
        inflight,
        listen_clients, listen_channels, notifications, slow, pinned,
    )  # fmt: skip
