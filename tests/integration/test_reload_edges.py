"""Reloads that lower pool_size, remove a pool in use, change pg_hba, fail, or replace
a paused pool; settings refused at start; the admin console's reading of statements."""

from __future__ import annotations

import time

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import pool_row, show_table
from helpers.metrics import scrape
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port


def client(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    return w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, "test")


def _md5_user(proc: PoolerProcess, pg: ExamplePostgres) -> dict[str, object]:
    users = proc.config["pools"][EXAMPLE_DB]["users"]
    return next(u for u in users if u["username"] == pg.md5_user.name)


def test_lowered_pool_size_limits_servers_in_use_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """pool_size 3 -> 1 by a reload while 3 servers are idle: from then on at most one
    transaction holds a server at a time; the idle servers above the new size are
    closed at once (as PgBouncer does), not handed out."""
    proc = pooler(pools={EXAMPLE_DB: {"users": [{"username": pg.md5_user.name, "pool_size": 3}]}})
    conns = [client(proc, pg) for _ in range(3)]
    console = admin(proc)
    try:
        # Three transactions at once: the pool opens its three servers.
        for conn in conns:
            assert w.first_error(conn.simple_query("begin; select 1")) is None
        for conn in conns:
            assert w.first_error(conn.simple_query("commit")) is None
        assert pool_row(console, pg.md5_user.name)["sv_idle"] == "3"

        _md5_user(proc, pg)["pool_size"] = 1
        proc.reload_and_wait(proc.config)
        row = pool_row(console, pg.md5_user.name)
        assert row["pool_size"] == "1"

        # Three transactions again: only one may get a server now.
        for conn in conns:
            conn.send_raw(w.query("begin; select pg_backend_pid()"))
        time.sleep(0.5)
        answered = [conn for conn in conns if conn.read_available(0.2)]
        row = pool_row(console, pg.md5_user.name)
        assert len(answered) == 1, (
            f"{len(answered)} transactions hold a server with pool_size = 1; "
            f"SHOW POOLS: sv_active={row['sv_active']} sv_idle={row['sv_idle']}"
        )
    finally:
        for conn in conns:
            conn.close_socket()
        console.close()


def test_reload_removing_a_pool_lets_a_transaction_finish_then_tells_the_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    conn = client(proc, pg)
    try:
        assert w.first_error(conn.simple_query("begin; select 1")) is None
        users = proc.config["pools"][EXAMPLE_DB]["users"]
        proc.config["pools"][EXAMPLE_DB]["users"] = [
            u for u in users if u["username"] != pg.md5_user.name
        ]
        proc.reload_and_wait(proc.config)
        # The transaction goes on and commits.
        got = conn.simple_query("select 2; commit")
        assert w.first_error(got) is None, got
        assert [w.command_tag(p) for t, p in got if t == b"C"] == ["SELECT 1", "COMMIT"]
        # Then the client is told why it is disconnected.
        error = w.first_error(conn.wait_closed(5))
        assert error is not None and error.sqlstate == "57P01", error
        assert "reload" in error.message
    finally:
        conn.close_socket()


def test_reload_of_pg_hba_applies_to_new_logins_only(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user.name
    with psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn:
        conn.execute("select 1")
        hba = proc.config["general"]["pg_hba"]
        proc.config["general"]["pg_hba"] = f"host all {user} 0.0.0.0/0 reject\n" + hba
        proc.reload_and_wait(proc.config)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proc.dsn(user, "test"))
        assert conn.execute("select 2").fetchone() == (2,)


def test_sighup_with_an_invalid_file_logs_the_key_and_keeps_serving(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    _md5_user(proc, pg)["pool_sise"] = 3  # a typo: warned, not refused
    _md5_user(proc, pg)["pool_size"] = 0
    proc.reload(proc.config)
    proc.wait_for_log("reload failed")
    assert f"pools.{EXAMPLE_DB}.users[0].pool_size" in proc.log_text()
    console = admin(proc)
    try:
        assert pool_row(console, pg.md5_user.name)["pool_size"] == "4"
    finally:
        console.close()
    with psycopg.connect(proc.dsn(pg.md5_user.name, "test")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "general",
    [{"query_wait_timeout": 0}, {"connect_timeout": 0}],
    ids=["query_wait_timeout", "connect_timeout"],
)
def test_a_zero_wait_or_connect_timeout_is_refused_at_start(
    pg: ExamplePostgres, pooler: PoolerFactory, general: dict[str, int]
) -> None:
    """Either would make every login that needs a new server fail at once (53300 or a
    connect timeout): refused with exit code 2, the key named."""
    proc = pooler(general=general, start=False)
    proc.spawn()
    deadline = time.monotonic() + 10
    while proc.running and time.monotonic() < deadline:
        try:
            with psycopg.connect(proc.dsn(pg.md5_user.name, "test"), connect_timeout=3) as conn:
                conn.execute("select 1")
                break
        except psycopg.OperationalError as exc:
            if "connection refused" in str(exc).lower():
                time.sleep(0.1)
                continue
            pytest.fail(f"accepted {general} and the first login fails: {exc}")
    assert proc.wait_exit(10) == 2
    assert next(iter(general)) in proc.log_text()


def test_console_statement_text_with_a_quoted_semicolon(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A driver's `SET application_name = 'a;b'` is one statement, not two."""
    proc = pooler()
    console = admin(proc)
    try:
        got = console.simple_query("SET application_name = 'etl;nightly'")
        assert got[-1][0] == b"Z"
        assert w.first_error(got) is None, w.first_error(got)
        assert [w.command_tag(p) for t, p in got if t == b"C"] == ["SET"]
    finally:
        console.close()


def test_console_odd_spellings_and_arguments_each_get_an_answer(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        cases = {
            "show pools": None,
            "  Show   Pools ;  ": None,
            "SHOW POOLS;;;": None,
            "show version; show lists": None,
            "RESUME": None,  # not paused: harmless
            f"resume {EXAMPLE_DB}": None,
            f'RECONNECT "{EXAMPLE_DB}"': None,
            "KILL nope": "3D000",
            "PAUSE nope": "3D000",
            "RESUME nope": "3D000",
            "PAUSE a b": "42601",
            "SET log_level = ''": "42601",
            "SET log_level": "42601",
            "SET log_level = 'pg_doorman.pool'": "42601",
            "SHOW": "42601",
            "SHOW nope": "42601",
            "show pools extra": "42601",
            ";": None,
            "": None,
        }
        for text, sqlstate in cases.items():
            got = console.simple_query(text)
            assert got and got[-1][0] == b"Z", text
            error = w.first_error(got)
            if sqlstate is None:
                assert error is None, (text, error)
            else:
                assert error is not None and error.sqlstate == sqlstate, (text, error)
        # An error stops the rest of a multi-statement query, as in PostgreSQL.
        got = console.simple_query("SHOW nope; SHOW VERSION")
        assert not w.rows(got) and w.first_error(got) is not None
        assert w.rows(console.simple_query("SHOW VERSION"))
    finally:
        console.close()


def test_a_database_removed_by_a_reload_leaves_show_pool_coordinator_and_metrics(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    web_port = free_port()
    second = {
        "server_host": pg.host,
        "server_port": pg.port,
        "server_database": EXAMPLE_DB,
        "max_db_connections": 2,
        "users": [{"username": pg.md5_user.name, "password": pg.md5_user.pooler_password,
                   "pool_size": 2}],
    }  # fmt: skip
    proc = pooler(
        pools={"second_db": second},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
    )
    console = admin(proc)
    try:
        assert [r["database"] for r in show_table(console, "POOL_COORDINATOR")] == ["second_db"]
        del proc.config["pools"]["second_db"]
        proc.reload_and_wait(proc.config)
        assert all(r["database"] != "second_db" for r in show_table(console, "POOLS"))
        rows = show_table(console, "POOL_COORDINATOR")
        assert rows == [], rows
        samples = scrape(web_port)["pg_doorman_pool_coordinator"]
        assert not [s for s in samples if s.labels.get("database") == "second_db"], samples
    finally:
        console.close()


def test_a_pool_a_reload_replaces_during_pause_stays_paused(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PAUSE example_db (the database is being restarted), then a RELOAD that changes a
    user's pool_mode: the replacement pool must stay paused until RESUME, not open
    servers to the database meanwhile."""
    proc = pooler()
    user = pg.md5_user.name
    console = admin(proc)
    try:
        got = console.simple_query(f"PAUSE {EXAMPLE_DB}")
        assert w.first_error(got) is None
        assert pool_row(console, user)["paused"] == "1"
        _md5_user(proc, pg)["pool_mode"] = "session"
        proc.write_config()
        got = console.simple_query("RELOAD")
        assert w.first_error(got) is None
        row = pool_row(console, user)
        assert row["pool_mode"] == "session"
        assert row["paused"] == "1", row
        # A new client's login waits for RESUME instead of opening a server.
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proc.dsn(user, "test"), connect_timeout=1).close()
        assert w.first_error(console.simple_query("RESUME")) is None
        with psycopg.connect(proc.dsn(user, "test")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        console.close()
