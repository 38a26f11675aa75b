"""The [web] listener: /metrics in Prometheus format checked against a known workload,
/health, bad requests, and the dashboard and alert rules shipped in docs/."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port

DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
N_TRANSACTIONS = 40


def web_pooler(pooler: PoolerFactory, *, section: str = "web") -> tuple[PoolerProcess, int]:
    port = free_port()
    proc = pooler({section: {"enabled": True, "host": "127.0.0.1", "port": port}})
    return proc, port


def test_metrics_match_a_known_workload(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc, port = web_pooler(pooler)
    user = pg.md5_user.name
    mine = {"user": user, "database": EXAMPLE_DB}
    with psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn:
        for i in range(N_TRANSACTIONS):
            conn.execute("select %s::int", (i,), prepare=False)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")
        families = scrape(port)
        transactions = N_TRANSACTIONS + 2

        xacts = families["pg_doorman_pools_transactions"]
        assert value(xacts, "pg_doorman_pools_transactions_total", **mine) == transactions
        queries = families["pg_doorman_pools_queries"]
        assert value(queries, "pg_doorman_pools_queries_total", **mine) == transactions
        errors = families["pg_doorman_pools_errors"]
        assert value(errors, "pg_doorman_pools_errors_total", sqlstate="other", **mine) == 2

        for name in ("transaction", "query", "wait"):
            hist = families[f"pg_doorman_pools_{name}_duration_seconds"]
            metric = f"pg_doorman_pools_{name}_duration_seconds"
            count = value(hist, f"{metric}_count", **mine)
            # Waits count checkouts: the pool's first login borrows a server once to
            # learn the server's parameters.
            assert count == transactions + (name == "wait")
            assert value(hist, f"{metric}_bucket", le="+Inf", **mine) == count
            buckets = [
                s.value for s in hist if s.name.endswith("_bucket") and s.labels["user"] == user
            ]
            assert buckets == sorted(buckets)  # cumulative
        assert value(families["pg_doorman_pools_query_duration_seconds"],
                     "pg_doorman_pools_query_duration_seconds_sum", **mine) > 0  # fmt: skip

        percentiles = families["pg_doorman_pools_queries_percentile"]
        p50, p99 = (
            value(percentiles, "pg_doorman_pools_queries_percentile", percentile=p, **mine)
            for p in ("50", "99")
        )
        assert 0 < p50 <= p99

        clients = families["pg_doorman_pools_clients"]
        assert value(clients, "pg_doorman_pools_clients", status="idle", **mine) == 1
        assert value(clients, "pg_doorman_pools_clients", status="waiting", **mine) == 0
        servers = families["pg_doorman_pools_servers"]
        assert value(servers, "pg_doorman_pools_servers", status="idle", **mine) >= 1
        assert value(families["pg_doorman_pool_size"], "pg_doorman_pool_size", **mine) == 4
        assert value(families["pg_doorman_pools_paused"], "pg_doorman_pools_paused", **mine) == 0
        bytes_total = families["pg_doorman_pools_bytes"]
        assert value(bytes_total, "pg_doorman_pools_bytes_total", direction="sent", **mine) > 0

        connections = families["pg_doorman_connections"]
        assert value(connections, "pg_doorman_connections_total", type="total") >= 1
        per_worker = families["pg_doorman_worker_connection_count"]
        assert [(s.labels, s.value) for s in per_worker] == [({"worker": "0"}, 1)]
        assert len(families["pg_doorman_users_configured"]) == 3
        assert value(families["pg_doorman_total_memory"], "pg_doorman_total_memory") > 10_000_000
        info = families["pg_doorman_build_info"]
        assert info[0].labels["version"] and info[0].value == 1

        # Prepared statements: one new statement, prepared once, then found on the server.
        def prepared() -> tuple[float, float, float]:
            families = scrape(port)
            return (
                value(families["pg_doorman_pool_prepared_cache_entries"],
                      "pg_doorman_pool_prepared_cache_entries", **mine),
                value(families["pg_doorman_servers_prepared_hits"],
                      "pg_doorman_servers_prepared_hits_total", **mine),
                value(families["pg_doorman_servers_prepared_misses"],
                      "pg_doorman_servers_prepared_misses_total", **mine),
            )  # fmt: skip

        entries, hits, misses = prepared()
        for _ in range(3):
            conn.execute("select %s::text", ("x",), prepare=True)
        # One Parse sent to the server, then three Binds that find it there.
        assert prepared() == (entries + 1, hits + 3, misses + 1)


def test_health_and_bad_requests(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    _, port = web_pooler(pooler, section="prometheus")  # the legacy section name
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        assert response.status == 200 and response.read() == b"OK\n"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert info.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    # The listener still serves after all that.
    assert "pg_doorman_build_info" in scrape(port)


def test_scrapes_during_traffic_do_not_disturb_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc, port = web_pooler(pooler)
    user = pg.md5_user.name
    stop = threading.Event()
    scrapes: list[int] = []

    def scraper() -> None:
        while not stop.is_set():
            scrape(port)
            scrapes.append(1)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        with psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn:
            for i in range(300):
                row = conn.execute("select %s::int", (i,), prepare=False).fetchone()
                assert row == (i,)
    finally:
        stop.set()
        thread.join(30)
    assert scrapes
    xacts = scrape(port)["pg_doorman_pools_transactions"]
    total = value(xacts, "pg_doorman_pools_transactions_total", user=user, database=EXAMPLE_DB)
    assert total == 300


def test_dashboard_and_alerts_use_only_exported_metrics(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    # With Patroni fallback configured, so that its families are exported too (the URL
    # is never asked: the pool's server is up).
    pooler(
        web={"enabled": True, "host": "127.0.0.1", "port": port},
        pools={EXAMPLE_DB: {"patroni_api_urls": [f"http://127.0.0.1:{free_port()}"]}},
    )
    exported = set()
    for family in scrape(port).values():
        exported.update(sample.name for sample in family)
    # Counters of events that have not happened yet are declared without samples.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        declared = re.findall(r"^# TYPE (\w+) counter$", response.read().decode(), re.M)
    assert "pg_doorman_backend_startup_parameter_errors_total" not in exported
    exported.update(declared)

    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yaml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) > 20
    used = {m for expr in expressions for m in re.findall(r"pg_doorman_\w+", expr)}
    missing = sorted(used - exported)
    assert not missing, f"not exported: {missing}"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop()
        out.append(panel)
        stack.extend(panel.get("panels", []))
    return out


def test_health_says_503_while_draining(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    import signal

    proc, port = web_pooler(pooler)
    with psycopg.connect(proc.dsn(pg.md5_user.name, "test")) as conn:
        conn.execute("select 1")  # a transaction stays open: shutdown waits for it
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_log("waiting up to")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
        assert info.value.code == 503
        assert "pg_doorman_pools_clients" in scrape(port)  # metrics still served
        conn.commit()
    assert proc.wait_exit(15) == 0
