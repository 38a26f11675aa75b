"""The fixtures themselves, checked against PostgreSQL directly (no pooler involved)."""

from __future__ import annotations

import socket
import struct
import time
import tomllib
from pathlib import Path

import psycopg
import pytest

from helpers import EXAMPLE_DB, ITEMS_ROWS, MD5_USER, SCRAM_USER, TRUST_USER, ExamplePostgres
from helpers import pgwire as pw
from helpers.pgwire import PgWire, ServerError
from helpers.pooler import PoolerFactory
from pg_doorman.app.embedded_pg import PostgresNotAvailable, find_pg_bin, process_alive

ALL_USERS = [MD5_USER, SCRAM_USER, TRUST_USER]
PASSWORD_USERS = [MD5_USER, SCRAM_USER]


def _wire(pg: ExamplePostgres, user: str = TRUST_USER) -> PgWire:
    return PgWire.connect(pg.host, pg.port, user, EXAMPLE_DB, pg.users[user].password)


@pytest.mark.parametrize("user", ALL_USERS)
def test_psycopg_login(pg: ExamplePostgres, user: str) -> None:
    with psycopg.connect(pg.user_dsn(user)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
        assert conn.execute("select count(*) from items").fetchone() == (ITEMS_ROWS,)
        conn.execute("create temp table scratch (x int)")  # the user can work in example_db


@pytest.mark.parametrize("user", PASSWORD_USERS)
def test_psycopg_wrong_password(pg: ExamplePostgres, user: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.user_dsn(user, password="wrong"))


@pytest.mark.parametrize(
    ("user", "auth_code"),
    [(MD5_USER, pw.AUTH_MD5), (SCRAM_USER, pw.AUTH_SASL), (TRUST_USER, pw.AUTH_OK)],
)
def test_pgwire_login(pg: ExamplePostgres, user: str, auth_code: int) -> None:
    with _wire(pg, user) as conn:
        auth_requests = [p for t, p in conn.received if t == b"R"]
        assert struct.unpack_from("!i", auth_requests[0])[0] == auth_code
        assert conn.status == "I"
        assert conn.backend_pid and conn.secret_key
        assert conn.parameters["server_encoding"] == "UTF8"
        assert conn.execute_query("select count(*), current_user from items") == [
            (str(ITEMS_ROWS), user)
        ]


@pytest.mark.parametrize("user", PASSWORD_USERS)
def test_pgwire_wrong_password(pg: ExamplePostgres, user: str) -> None:
    with pytest.raises(ServerError) as info:
        PgWire.connect(pg.host, pg.port, user, EXAMPLE_DB, "wrong")
    assert info.value.sqlstate == "28P01"
    assert info.value.severity == "FATAL"


def test_user_specs_match_pg_authid(pg: ExamplePostgres) -> None:
    out = pg.psql(f"select rolpassword from pg_authid where rolname = '{SCRAM_USER}'")
    assert out.strip() == pg.scram_user.stored
    assert pg.scram_user.pooler_password.startswith("SCRAM-SHA-256$4096:")
    assert pg.md5_user.pooler_password == pw.md5_password_hash("test", MD5_USER)
    assert pg.trust_user.pooler_password == ""


def test_pgwire_extended_protocol(pg: ExamplePostgres) -> None:
    with _wire(pg) as conn:
        conn.send_raw(
            pw.parse("s1", "select id, name from items where id = $1", [23])
            + pw.bind("", "s1", ["7"])
            + pw.describe("P")
            + pw.execute()
            + pw.sync()
        )
        replies = conn.read_until_ready()
        assert pw.msg_types(replies) == "12TDCZ"
        assert pw.rows(replies) == [("7", "item 7")]
        assert pw.row_description(replies[2][1]) == ["id", "name"]
        assert pw.command_tag(replies[4][1]) == "SELECT 1"

        conn.send_raw(pw.parse("", "selec 1") + pw.sync())
        replies = conn.read_until_ready()
        assert pw.msg_types(replies) == "EZ"
        error = pw.first_error(replies)
        assert error is not None and error.sqlstate == "42601"

        # Flush makes the server answer without a Sync.
        conn.send_raw(pw.parse("s2", "select 1") + pw.flush())
        assert conn.read_message() == (b"1", b"")
        conn.send_raw(pw.close("S", "s2") + pw.sync())
        assert pw.msg_types(conn.read_until_ready()) == "3Z"


def test_pgwire_copy(pg: ExamplePostgres) -> None:
    with _wire(pg) as conn:
        replies = conn.simple_query("copy (select id from items where id <= 3) to stdout")
        assert pw.msg_types(replies) == "HdddcCZ"
        assert [p for t, p in replies if t == b"d"] == [b"1\n", b"2\n", b"3\n"]

        assert conn.execute_query("create temp table t (x int)") == []
        conn.send_raw(pw.query("copy t from stdin"))
        assert conn.read_message()[0] == b"G"
        conn.send_raw(pw.copy_data("1\n2\n") + pw.copy_data("3\n") + pw.copy_done())
        assert pw.msg_types(conn.read_until_ready()) == "CZ"
        assert conn.execute_query("select sum(x) from t") == [("6",)]

        conn.send_raw(pw.query("copy t from stdin"))
        assert conn.read_message()[0] == b"G"
        conn.send_raw(pw.copy_data("4\n") + pw.copy_fail("client gave up"))
        replies = conn.read_until_ready()
        assert pw.msg_types(replies) == "EZ"
        error = pw.first_error(replies)
        assert error is not None and error.sqlstate == "57014"


def test_pgwire_keeps_every_byte(pg: ExamplePostgres) -> None:
    # An SSLRequest gets one unframed byte (this build has no TLS), then the startup.
    raw = PgWire(pg.host, pg.port)
    try:
        assert raw.request_ssl() == b"N"
        raw.startup(TRUST_USER, EXAMPLE_DB)
        framed = b"N" + b"".join(pw.message(t, p) for t, p in raw.received)
        assert bytes(raw.raw_received) == framed
    finally:
        raw.close()


def test_cancel(pg: ExamplePostgres) -> None:
    with _wire(pg) as conn:
        conn.send_raw(pw.query("select pg_sleep(30)"))
        deadline = time.monotonic() + 10
        # A cancel that lands before the query starts is ignored: wait until it runs.
        while (
            pg.psql(f"select state from pg_stat_activity where pid = {conn.backend_pid}").strip()
            != "active"
        ):
            assert time.monotonic() < deadline, "query never became active"
            time.sleep(0.02)
        assert conn.secret_key is not None and conn.backend_pid is not None
        pw.cancel(pg.host, pg.port, conn.backend_pid, conn.secret_key)
        replies = conn.read_until_ready(timeout=10)
        error = pw.first_error(replies)
        assert error is not None and error.sqlstate == "57014"
        assert conn.status == "I"


def test_restart_keeps_port(pg: ExamplePostgres) -> None:
    port, old_pid = pg.port, pg.pid
    conn = _wire(pg)
    try:
        pg.restart()
        # Fast shutdown tells connected clients why before closing them.
        replies = conn.wait_closed()
        error = pw.first_error(replies)
        assert error is not None and error.sqlstate == "57P01"
    finally:
        conn.close()
    assert pg.port == port and pg.pid not in (None, old_pid)
    with psycopg.connect(pg.user_dsn(SCRAM_USER)) as c:
        assert c.execute("select count(*) from items").fetchone() == (ITEMS_ROWS,)


def test_kill_then_start_recovers(pg: ExamplePostgres) -> None:
    conn = _wire(pg)
    try:
        postmaster = pg.pid
        children = pg.child_pids()
        assert postmaster is not None and conn.backend_pid in children
        pg.kill()
        assert not pg.running
        assert not [pid for pid in [postmaster, *children] if process_alive(pid)]
        # Killed: no goodbye, unless the backend saw the postmaster die a moment first.
        goodbye = conn.wait_closed()
        assert goodbye == [] or [t for t, _ in goodbye] == [b"E"]
    finally:
        conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((pg.host, pg.port), timeout=2).close()
    pg.start()
    with psycopg.connect(pg.user_dsn(MD5_USER)) as c:
        assert c.execute("select count(*) from items").fetchone() == (ITEMS_ROWS,)


def test_reload_applies_hba(pg: ExamplePostgres) -> None:
    original = list(pg.hba_lines)
    try:
        pg.write_hba([f"host all {TRUST_USER} 127.0.0.1/32 reject", *original])
        pg.reload()
        with pytest.raises(ServerError) as info:
            _wire(pg)
        assert info.value.sqlstate == "28000"
    finally:
        pg.write_hba(original)
        pg.reload()
    _wire(pg).close()


def test_missing_binaries_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_DOORMAN_TEST_PG_BIN", str(tmp_path))
    with pytest.raises(PostgresNotAvailable, match="PG_DOORMAN_TEST_PG_BIN"):
        find_pg_bin()


def test_pooler_config_matches_pg(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(
        general={"admin_password": "secret"},
        pools={EXAMPLE_DB: {"users": [{"username": MD5_USER, "pool_size": 1}]}},
        start=False,
    )
    assert not proc.running
    written = tomllib.loads(proc.config_path.read_text())
    assert written == proc.config
    assert written["general"]["admin_password"] == "secret"
    assert written["pools"][EXAMPLE_DB]["server_port"] == pg.port
    users = {u["username"]: u for u in written["pools"][EXAMPLE_DB]["users"]}
    assert users[MD5_USER] == {"username": MD5_USER, "password": pg.md5_user.stored, "pool_size": 1}
    assert users[SCRAM_USER]["password"] == pg.scram_user.stored
    assert users[TRUST_USER]["password"] == ""
    assert proc.dsn(MD5_USER, "test") == (
        f"postgresql://{MD5_USER}:test@127.0.0.1:{proc.port}/{EXAMPLE_DB}?sslmode=disable"
    )
