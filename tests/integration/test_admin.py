"""The admin console: logins, SHOW commands against a known workload, errors."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import find_pg_bin


def admin(proc: PoolerProcess, database: str = "pgdoorman") -> w.PgWire:
    return w.PgWire.connect(proc.host, proc.port, "admin", database, "admin")


def show(conn: w.PgWire, what: str) -> tuple[list[str], list[tuple[str | None, ...]]]:
    got = conn.simple_query(f"SHOW {what}")
    error = w.first_error(got)
    assert error is None, error
    columns = next(w.row_description(p) for t, p in got if t == b"T")
    return columns, w.rows(got)


def test_show_commands_after_known_workload(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        for i in range(25):
            conn.execute("select %s::int", (i,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        console = admin(proc)
        try:
            columns, rows = show(console, "STATS")
            assert columns[:4] == ["database", "user", "total_xact_count", "total_query_count"]
            mine = next(r for r in rows if r[1] == user.name)
            assert int(mine[2] or 0) >= 26 and int(mine[3] or 0) >= 26
            assert int(mine[9] or 0) == 1  # one error
            columns, rows = show(console, "POOLS")
            assert columns[:3] == ["database", "user", "pool_mode"]
            mine = next(r for r in rows if r[1] == user.name)
            assert mine[2] == "transaction" and mine[3] == "1"  # this client, idle
            assert mine[9] == "4"  # pool_size
            columns, rows = show(console, "CLIENTS")
            assert "client_id" in columns
            assert any(r[2] == user.name for r in rows)
            columns, rows = show(console, "SERVERS")
            assert any(r[3] == user.name and int(r[1] or 0) > 0 for r in rows)
            _, rows = show(console, "VERSION")
            assert rows[0][0] is not None and rows[0][0].startswith("pg_doorman")
            _, rows = show(console, "HELP")
            assert ("SHOW POOLS",) in rows
        finally:
            console.close()


def test_unknown_command_errors_and_session_continues(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc, "pgbouncer")
    try:
        error = w.first_error(console.simple_query("FROBNICATE"))
        assert error is not None and error.sqlstate == "42601" and error.severity == "ERROR"
        _, rows = show(console, "VERSION")
        assert rows
        # Extended protocol is refused with a clear error.
        console.send_raw(w.parse("", "SHOW POOLS") + w.sync())
        error = w.first_error(console.wait_closed())
        assert error is not None and error.sqlstate == "08P01"
    finally:
        console.close_socket()


def test_admin_login_needs_admin_credentials(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, "admin", "pgdoorman", "wrong")
    assert info.value.sqlstate == "28P01"
    with pytest.raises(w.ServerError):
        w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, "pgdoorman", "test")


def test_psql_can_use_the_console(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    result = subprocess.run(
        [str(find_pg_bin() / "psql"), "-X", "-h", proc.host, "-p", str(proc.port), "-U", "admin",
         "-d", "pgdoorman", "-c", "SHOW POOLS", "-c", "SHOW VERSION"],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": "admin"},
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "example_db" in result.stdout and "pg_doorman" in result.stdout
