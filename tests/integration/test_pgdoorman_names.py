"""SHOW tables and /metrics read the way a PgDoorman dashboard or script reads them:
PgDoorman's column names and order, metric names, types, labels and units."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from typing import Any

import psycopg

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.console import admin_console, admin_rows, pool_row, show_table
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory
from pg_doorman.app.embedded_pg import free_port

N_QUERIES = 7
N_SLEEPS = 3


def web(port: int) -> dict[str, Any]:
    return {"enabled": True, "host": "127.0.0.1", "port": port}


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_show_clients_and_pools_extended_have_pgdoorman_columns(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user.name
    with psycopg.connect(proc.dsn(user, pg.md5_user.password), autocommit=True) as conn:
        for i in range(N_QUERIES):
            conn.execute("select %s::int", (i,), prepare=False)
        console = admin_console(proc)
        try:
            clients = show_table(console, "CLIENTS")
            extended = show_table(console, "POOLS_EXTENDED")
            stats = show_table(console, "STATS")
        finally:
            console.close()
    # PgDoorman's twelve columns in its order; `port` only after them.
    assert list(clients[0]) == [
        "client_id", "database", "user", "application_name", "addr", "tls", "state", "wait",
        "transaction_count", "query_count", "error_count", "age_seconds", "port",
    ]  # fmt: skip
    (mine,) = [c for c in clients if c["user"] == user]
    assert (mine["database"], mine["addr"], mine["tls"]) == (EXAMPLE_DB, "127.0.0.1", "false")
    assert mine["state"] == "idle" and mine["wait"] == "idle"
    assert int(mine["transaction_count"] or 0) == N_QUERIES
    assert int(mine["port"] or 0) > 0
    # PgDoorman's spelling, `bytes_recieved`, so scripts reading it by name find it.
    assert list(extended[0]) == [
        "database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
        "sv_login", "pool_size", "maxwait", "maxwait_us", "pool_mode", "bytes_recieved",
        "bytes_sent", "query_0.99", "transaction_0.99", "query_0.95", "transaction_0.95",
        "query_0.5", "transaction_0.5",
    ]  # fmt: skip
    (row,) = [r for r in extended if r["user"] == user]
    (totals,) = [r for r in stats if r["user"] == user]
    assert int(row["bytes_recieved"] or 0) == int(totals["total_received"] or 0) > 0


def test_show_pool_coordinator_and_its_metrics_have_pgdoorman_names(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A second client finds max_db_connections taken (no idle server may be closed for
    it): one exhaustion; it gets the server once the first transaction ends."""
    port = free_port()
    user = pg.md5_user
    proc = pooler(
        web=web(port),
        pools={
            EXAMPLE_DB: {
                "users": [{"username": user.name, "pool_size": 5}],
                "max_db_connections": 1,
                # A queued client asks for a server at once, not after waiting a while.
                "scaling_warm_pool_ratio": 100,
            }
        },
    )
    with (
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as holder,
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as waiter,
    ):
        holder.execute("begin")
        holder.execute("select 1")
        outcome: list[Any] = []
        thread = threading.Thread(
            target=lambda: outcome.append(waiter.execute("select 42").fetchone())
        )
        thread.start()
        console = admin_console(proc)
        try:
            for _ in range(500):
                if pool_row(console, user.name)["cl_waiting"] == "1":
                    break
                time.sleep(0.02)
            assert pool_row(console, user.name)["cl_waiting"] == "1"
        finally:
            console.close()
        holder.execute("commit")
        thread.join(10)
        assert outcome == [(42,)]
    rows = admin_rows(proc, "POOL_COORDINATOR")
    assert [list(r) for r in rows] == [
        [
            "database", "max_db_conn", "current", "reserve_size", "reserve_used", "evictions",
            "reserve_acq", "exhaustions", "waiting_users",
        ]
    ]  # fmt: skip
    (row,) = rows
    assert (row["database"], row["max_db_conn"], row["current"]) == (EXAMPLE_DB, "1", "1")
    assert (row["reserve_size"], row["reserve_used"], row["reserve_acq"]) == ("0", "0", "0")
    exhaustions = int(row["exhaustions"] or 0)
    assert exhaustions >= 1

    samples = scrape(port)["pg_doorman_pool_coordinator"]
    db = {"database": EXAMPLE_DB}
    gauge, counter = "pg_doorman_pool_coordinator", "pg_doorman_pool_coordinator_total"
    assert value(samples, gauge, type="max_connections", **db) == 1
    assert value(samples, gauge, type="connections", **db) == 1
    assert value(samples, gauge, type="reserve_pool_size", **db) == 0
    assert value(samples, gauge, type="reserve_in_use", **db) == 0
    assert value(samples, counter, type="exhaustions", **db) == exhaustions
    assert value(samples, counter, type="evictions", **db) == 0
    assert value(samples, counter, type="reserve_acquisitions", **db) == 0
    text = exposition(port)
    assert "# TYPE pg_doorman_pool_coordinator gauge" in text
    assert "# TYPE pg_doorman_pool_coordinator_total counter" in text


def test_metrics_have_pgdoorman_names_labels_and_units(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    proc = pooler(web=web(port))
    user = pg.md5_user
    mine = {"user": user.name, "database": EXAMPLE_DB}
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        for _ in range(N_SLEEPS):
            conn.execute("select pg_sleep(0.2)", prepare=False)
        # One named statement the client keeps prepared while connected.
        conn.execute("select %s::int + 1", (1,), prepare=True)
        families = scrape(port)
        text = exposition(port)
        (log_level,) = (r["log_level"] for r in admin_rows(proc, "LOG_LEVEL"))

    # Percentile gauges are milliseconds in PgDoorman: 200 ms sleeps, not 200000 µs.
    for family, name in (
        ("pg_doorman_pools_queries_percentile", "pg_doorman_pools_queries_percentile"),
        ("pg_doorman_pools_transactions_percentile", "pg_doorman_pools_transactions_percentile"),
    ):
        p99 = value(families[family], name, percentile="99", **mine)
        assert 150 <= p99 <= 10_000, (name, p99)

    # The deprecated gauge carries the accepted sockets by type, as connections_total.
    count = families["pg_doorman_connection_count"]
    total = families["pg_doorman_connections"]
    for kind in ("total", "plain", "tls", "cancel"):
        assert value(count, "pg_doorman_connection_count", type=kind) == value(
            total, "pg_doorman_connections_total", type=kind
        )
    assert value(count, "pg_doorman_connection_count", type="total") >= 2  # psycopg + admin

    # One series per (user, database, pool_mode), value 1.
    configured = {
        (s.labels["user"], s.labels["database"], s.labels["pool_mode"]): s.value
        for s in families["pg_doorman_users_configured"]
    }
    assert configured[(user.name, EXAMPLE_DB, "transaction")] == 1
    assert set(configured.values()) == {1}
    assert [(s.labels, s.value) for s in families["pg_doorman_log_level"]] == [
        ({"level": log_level}, 1)
    ]

    # The scaling gauge shares PgDoorman's name with its counter's base.
    scaling = families["pg_doorman_pool_scaling"]
    assert value(scaling, "pg_doorman_pool_scaling", type="inflight_creates", **mine) == 0
    assert value(scaling, "pg_doorman_pool_scaling_total", type="creates_started", **mine) >= 1
    assert re.search(r"^# TYPE pg_doorman_pool_scaling gauge$", text, re.M)
    assert re.search(r"^# TYPE pg_doorman_pool_scaling_total counter$", text, re.M)

    # Client-side prepared statement gauges, measured while the client was connected.
    named = families["pg_doorman_clients_prepared_named_entries"]
    assert value(named, "pg_doorman_clients_prepared_named_entries", **mine) == 1
    cache_bytes = families["pg_doorman_clients_prepared_cache_bytes"]
    assert value(cache_bytes, "pg_doorman_clients_prepared_cache_bytes", **mine) > 0
    assert "pg_doorman_clients_prepared_anonymous_entries" in families
    assert value(families["pg_doorman_async_clients_count"],
                 "pg_doorman_async_clients_count", **mine) == 0  # fmt: skip
    evictions = families["pg_doorman_clients_prepared_anonymous_evictions"]
    assert value(evictions, "pg_doorman_clients_prepared_anonymous_evictions_total", **mine) == 0
