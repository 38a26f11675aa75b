"""The admin console: every SHOW table against a known workload, logins, errors, psql."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import find_pg_bin

N_TRANSACTIONS = 25

COLUMNS = {
    "CONFIG": ["key", "value", "default", "changeable"],
    "DATABASES": [
        "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
        "reserve_pool", "pool_mode", "max_connections", "current_connections",
        "current_client_connections", "paused",
    ],
    "POOLS": [
        "database", "user", "pool_mode", "cl_idle", "cl_active", "cl_waiting",
        "cl_cancel_req", "sv_active", "sv_idle", "sv_used", "sv_login", "pool_size",
        "maxwait", "maxwait_us", "avg_xact_time", "paused", "fallback_active",
        "oldest_active_age_ms",
    ],
    "POOLS_EXTENDED": [
        "database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
        "sv_login", "pool_size", "maxwait", "maxwait_us", "pool_mode", "bytes_recieved",
        "bytes_sent", "query_0.99", "transaction_0.99", "query_0.95", "transaction_0.95",
        "query_0.5", "transaction_0.5",
    ],
    "POOLS_MEMORY": [
        "database", "user", "pool_prepared_count", "pool_prepared_bytes",
        "client_prepared_count", "client_prepared_bytes", "client_named_count",
        "client_anonymous_count", "client_anonymous_evictions_alive", "async_clients",
    ],
    "CLIENTS": [
        "client_id", "database", "user", "application_name", "addr", "tls", "state", "wait",
        "transaction_count", "query_count", "error_count", "age_seconds", "port",
    ],
    "SERVERS": [
        "server_id", "server_process_id", "database_name", "user", "application_name",
        "tls", "state", "wait", "transaction_count", "query_count", "bytes_sent",
        "bytes_received", "age_seconds", "prepare_cache_hit", "prepare_cache_miss",
        "prepare_cache_size",
    ],
    "STATS": [
        "database", "user", "total_xact_count", "total_query_count", "total_received",
        "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
        "total_errors", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
        "avg_errors", "avg_xact_time", "avg_query_time", "avg_wait_time",
    ],
    "CONNECTIONS": ["total", "errors", "tls", "plain", "cancel"],
    "LISTS": ["list", "items"],
    "USERS": ["name", "pool_mode"],
    "VERSION": ["version"],
    "LOG_LEVEL": ["log_level"],
    "PREPARED_STATEMENTS": [
        "pool", "hash", "name", "query", "count_used", "kind", "hits", "misses",
    ],
    "LATENCY": ["database", "user", "kind", "count", "p50", "p90", "p95", "p99"],
    "HELP": ["item"],
}  # fmt: skip


def admin_psycopg(proc: PoolerProcess) -> psycopg.Connection[tuple[object, ...]]:
    # ClientCursor sends plain Query messages: the console speaks simple protocol only.
    return psycopg.connect(
        proc.dsn("admin", "admin", "pgdoorman"),
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
    )


def show(conn: w.PgWire, what: str) -> tuple[list[str], list[tuple[str | None, ...]]]:
    got = conn.simple_query(f"SHOW {what}")
    error = w.first_error(got)
    assert error is None, error
    columns = next(w.row_description(p) for t, p in got if t == b"T")
    return columns, w.rows(got)


def table(
    conn: psycopg.Connection[tuple[object, ...]], what: str
) -> tuple[list[str], list[dict[str, object]]]:
    cur = conn.execute(f"SHOW {what}")
    assert cur.description is not None
    columns = [d.name for d in cur.description]
    return columns, [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def only(rows: Sequence[dict[str, object]], **match: object) -> dict[str, object]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_every_show_table_after_a_known_workload(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user.name
    with (
        psycopg.connect(
            proc.dsn(user, "test"), autocommit=True, application_name="workload"
        ) as conn,
        admin_psycopg(proc) as console,
    ):
        backend_pids = set()
        for i in range(N_TRANSACTIONS):
            row = conn.execute("select pg_backend_pid(), %s::int", (i,), prepare=True).fetchone()
            assert row is not None
            backend_pids.add(row[0])
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        # prepare=True sends its first Parse with a Sync of its own: one more round trip.
        transactions = N_TRANSACTIONS + 2

        seen = {}
        for what, expected in COLUMNS.items():
            columns, rows = table(console, what)
            assert columns == expected, what
            seen[what] = rows

        stats = only(seen["STATS"], user=user)
        assert stats["database"] == "example_db"
        assert stats["total_xact_count"] == transactions
        assert stats["total_query_count"] == transactions
        assert stats["total_errors"] == 1
        assert int(str(stats["total_received"])) > 0 and int(str(stats["total_sent"])) > 0
        assert int(str(stats["total_xact_time"])) > 0

        pool = only(seen["POOLS"], user=user)
        assert (pool["pool_mode"], pool["cl_idle"], pool["cl_active"]) == ("transaction", 1, 0)
        assert (pool["pool_size"], pool["paused"], pool["sv_active"]) == (4, 0, 0)
        assert 1 <= int(str(pool["sv_idle"])) <= 4

        extended = only(seen["POOLS_EXTENDED"], user=user)
        assert int(str(extended["query_0.5"])) > 0
        assert int(str(extended["query_0.99"])) >= int(str(extended["query_0.5"]))
        assert extended["bytes_recieved"] == stats["total_received"]

        client = only(seen["CLIENTS"], user=user)
        assert client["application_name"] == "workload" and client["state"] == "idle"
        assert client["transaction_count"] == transactions
        assert client["error_count"] == 1
        assert client["addr"] == "127.0.0.1"

        servers = [s for s in seen["SERVERS"] if s["user"] == user]
        assert {s["server_process_id"] for s in servers} >= backend_pids
        assert sum(int(str(s["transaction_count"])) for s in servers) == transactions
        assert sum(int(str(s["prepare_cache_miss"])) for s in servers) == len(servers)

        database = only(seen["DATABASES"], force_user=user)
        assert (database["name"], database["host"], database["port"]) == (
            "example_db",
            pg.host,
            pg.port,
        )
        assert database["current_client_connections"] == 1

        memory = only(seen["POOLS_MEMORY"], user=user)
        assert memory["pool_prepared_count"] == 1
        assert int(str(memory["pool_prepared_bytes"])) > 0

        statement = only(seen["PREPARED_STATEMENTS"], pool=f"{user}@example_db")
        assert statement["query"] == "select pg_backend_pid(), $1::int"
        # The driver parsed it once (sent to a server: a miss), then only bound it.
        assert (statement["misses"], statement["hits"], statement["count_used"]) == (1, 0, 1)
        assert statement["kind"] == "named"
        # Every Bind found the statement on its server.
        assert sum(int(str(s["prepare_cache_hit"])) for s in servers) == N_TRANSACTIONS

        latency = {r["kind"]: r for r in seen["LATENCY"] if r["user"] == user}
        assert latency["transaction"]["count"] == transactions
        assert latency["query"]["count"] == transactions
        for row in latency.values():
            p50, p90, p95, p99 = (int(str(row[f"p{p}"])) for p in (50, 90, 95, 99))
            assert p50 <= p90 <= p95 <= p99
        assert int(str(latency["query"]["p50"])) > 0

        lists = {r["list"]: r["items"] for r in seen["LISTS"]}
        assert (lists["databases"], lists["users"], lists["pools"]) == (1, 3, 3)
        assert lists["free_clients"] >= 1
        assert {r["name"] for r in seen["USERS"]} == set(pg.users)
        connections = seen["CONNECTIONS"][0]
        assert int(str(connections["total"])) >= 2 and connections["tls"] == 0
        assert seen["LOG_LEVEL"] == [{"log_level": "debug"}]  # the harness runs -l debug
        assert str(seen["VERSION"][0]["version"]).startswith("pg_doorman ")
        config = {r["key"]: r for r in seen["CONFIG"]}
        assert config["general.port"]["value"] == str(proc.port)
        assert config["general.port"]["changeable"] == "no"
        assert config["general.query_wait_timeout"]["changeable"] == "yes"
        assert config["general.admin_password"]["value"] == "********"
        assert config["pools.example_db.pool_mode"]["value"] == "transaction"
        assert config["general.worker_threads"]["changeable"] == "no"  # not implemented
        assert config["web.enabled"]["changeable"] == "no"  # needs a restart
        help_items = [r["item"] for r in seen["HELP"]]
        assert "RELOAD" in help_items and "KILL [<db>]" in help_items


def test_stats_averages_follow_the_stats_period(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """avg_* cover the last 15 s period: zero before it ends, the workload's rate after."""
    proc = pooler()
    user = pg.md5_user.name
    with (
        psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn,
        admin_psycopg(proc) as console,
    ):
        for _ in range(30):
            conn.execute("select 1")
        proc.wait_for_log("stats period closed", timeout=20)
        _, rows = table(console, "STATS")
        stats = only(rows, user=user)
        assert stats["avg_xact_count"] in (1, 2)  # 30 transactions in one 15 s period
        assert int(str(stats["avg_xact_time"])) > 0


def test_unknown_command_errors_and_session_continues(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc, "pgbouncer")
    try:
        error = w.first_error(console.simple_query("FROBNICATE"))
        assert error is not None and error.sqlstate == "42601" and error.severity == "ERROR"
        error = w.first_error(console.simple_query("SHOW NOTHING"))
        assert error is not None and error.sqlstate == "42601"
        _, rows = show(console, "VERSION")
        assert rows
        # Extended protocol is refused with a clear error.
        console.send_raw(w.parse("", "SHOW POOLS") + w.sync())
        error = w.first_error(console.wait_closed())
        assert error is not None and error.sqlstate == "08P01"
    finally:
        console.close_socket()


@pytest.mark.parametrize(
    "refused",
    [w.parse("", "SHOW POOLS") + w.sync(), b"e\x00\x00\x00\x04"],
    ids=["extended-protocol", "no-message"],
)
def test_queries_before_a_refused_message_are_answered_first(
    pg: ExamplePostgres, pooler: PoolerFactory, refused: bytes
) -> None:
    """As PostgreSQL answers what came before a message it refuses: the queries sent
    with it are answered, then the FATAL comes."""
    proc = pooler()
    console = admin(proc)
    try:
        console.send_raw(w.query("SHOW VERSION") + w.query("SHOW LISTS") + refused)
        replies = console.wait_closed()
    finally:
        console.close_socket()
    types = w.msg_types(replies)
    assert types.startswith("TDCZTD") and types.endswith("CZE"), types
    error = w.first_error(replies)
    assert error is not None and (error.severity, error.sqlstate) == ("FATAL", "08P01")


def test_set_log_level_at_runtime(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        got = console.simple_query("SET log_level = 'info,pg_doorman.pool=debug'")
        assert w.first_error(got) is None and (
            "SET" in [w.command_tag(p) for t, p in got if t == b"C"]
        )
        assert show(console, "LOG_LEVEL")[1] == [("info,pg_doorman.pool=debug",)]
        error = w.first_error(console.simple_query("SET log_level = 'loud'"))
        assert error is not None and error.sqlstate == "42601" and "loud" in error.message
        error = w.first_error(console.simple_query("SET pool_size = 10"))
        assert error is not None and error.sqlstate == "42601" and "RELOAD" in error.message
        # Drivers' session settings are accepted and ignored.
        assert w.first_error(console.simple_query("SET application_name = 'x'")) is None
        assert show(console, "LOG_LEVEL")[1] == [("info,pg_doorman.pool=debug",)]
        console.simple_query("SET log_level TO default")
        assert show(console, "LOG_LEVEL")[1] == [("debug",)]
    finally:
        console.close()


def test_admin_login_needs_admin_credentials(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, "admin", "pgdoorman", "wrong")
    assert info.value.sqlstate == "28P01"
    with pytest.raises(w.ServerError):
        w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, "pgdoorman", "test")


def psql(proc: PoolerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_pg_bin() / "psql"), "-X", "-h", proc.host, "-p", str(proc.port), "-U", "admin",
         "-d", "pgdoorman", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": "admin"},
        timeout=30,
    )  # fmt: skip


def test_psql_runs_every_show_command(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with psycopg.connect(proc.dsn(pg.md5_user.name, "test"), autocommit=True) as conn:
        conn.execute("select 1")
        args = [a for what in COLUMNS for a in ("-c", f"SHOW {what}")]
        result = psql(proc, "-A", *args)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    for what, columns in COLUMNS.items():
        assert "|".join(columns) in lines, what
    assert "example_db|example_user_md5|transaction" in result.stdout


def test_psql_catalog_queries_are_answered_harmlessly(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    result = psql(proc, "-c", r"\d", "-c", r"\dt", "-c", "SHOW USERS")
    assert result.returncode == 0, result.stderr
    assert "Did not find any relations" in result.stderr
    assert "example_user_md5" in result.stdout


def test_console_survives_arbitrary_input(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Random statements built from the console's words and junk: each gets a result or
    an ERROR, always followed by ReadyForQuery, and the session stays usable."""
    import random

    words = [
        "SHOW", "SET", "PAUSE", "RESUME", "RECONNECT", "KILL", "RELOAD", "SELECT", "WITH",
        "pools", "stats", "log_level", "=", "TO", "'info'", "'nope'", "example_db", "nope",
        "pg_catalog", "\"x\"", "''", "\x00x", "é", "1", ";", "--", "\\", "(", ")",
    ]  # fmt: skip
    rng = random.Random(4242)
    proc = pooler()
    console = admin(proc)
    try:
        for _ in range(300):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))
            if "KILL" in text.upper() or "PAUSE" in text.upper():
                continue  # they act on the pools; covered by test_operations.py
            got = console.simple_query(text.replace("\x00", ""))
            assert got[-1][0] == b"Z", text
            errors = [p for t, p in got if t == b"E"]
            assert all(w.error_fields(p)["S"] == "ERROR" for p in errors), text
        assert show(console, "VERSION")[1]
    finally:
        console.close()
