"""Client authentication (md5, SCRAM, trust, pg_hba) and backend passthrough."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, show_table
from helpers.pooler import PoolerFactory


@pytest.mark.parametrize("kind", ["md5", "scram", "trust"])
def test_login_methods(pg: ExamplePostgres, pooler: PoolerFactory, kind: str) -> None:
    proc = pooler()
    user = {"md5": pg.md5_user, "scram": pg.scram_user, "trust": pg.trust_user}[kind]
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user.name,)


def test_scram_requested_for_scram_user(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.scram_user
    conn = w.PgWire(proc.host, proc.port)
    try:
        received = conn.startup(user.name, "example_db", user.password)
        codes = [int.from_bytes(p[:4], "big") for t, p in received if t == b"R"]
        assert codes[:3] == [w.AUTH_SASL, w.AUTH_SASL_CONTINUE, w.AUTH_SASL_FINAL]
        assert codes[-1] == w.AUTH_OK
        kinds = w.msg_types(received)
        assert kinds.endswith("KZ")
        assert {"server_version", "client_encoding", "TimeZone"} <= set(conn.parameters)
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_wrong_password(pg: ExamplePostgres, pooler: PoolerFactory, kind: str) -> None:
    proc = pooler()
    user = pg.md5_user if kind == "md5" else pg.scram_user
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user.name, "example_db", "wrong")
    assert info.value.sqlstate == "28P01"
    assert info.value.severity == "FATAL"

    # asyncpg sees the same
    async def main() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(proc.dsn(user.name, "wrong"))

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["md5", "scram", "trust"])
def test_login_trickled_one_byte_at_a_time(
    pg: ExamplePostgres, pooler: PoolerFactory, kind: str
) -> None:
    """The startup packet and every password or SASL message arrive one byte per read."""
    proc = pooler()
    user = {"md5": pg.md5_user, "scram": pg.scram_user, "trust": pg.trust_user}[kind]
    conn = w.TricklingWire.connect(
        proc.host,
        proc.port,
        user.name,
        "example_db",
        user.password,
        params={"application_name": "trickle", "statement_timeout": "1234"},
    )
    try:
        assert conn.parameters["application_name"] == "trickle"
        assert conn.execute_query("show statement_timeout") == [("1234ms",)]
    finally:
        conn.close()


def test_unknown_user_and_database(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, "nobody", "example_db", "test")
    assert info.value.sqlstate == "28P01"
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, "nodb", "test")
    assert info.value.sqlstate in ("28P01", "3D000")


def test_hba_reject_and_first_match(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    md5, scram = pg.md5_user, pg.scram_user
    hba = (
        f"host all {md5.name} 127.0.0.1/32 reject\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
        f"host all {md5.name} 127.0.0.1/32 md5\n"
    )
    proc = pooler(general={"pg_hba": hba})
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, md5.name, "example_db", md5.password)
    assert info.value.sqlstate == "28000"
    assert "pg_hba" in info.value.message
    conn = w.PgWire.connect(proc.host, proc.port, scram.name, "example_db", scram.password)
    conn.close()


def test_hba_scram_rule_refuses_md5_stored_user(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    md5 = pg.md5_user
    proc = pooler(general={"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"})
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, md5.name, "example_db", md5.password)
    assert info.value.sqlstate in ("28000", "28P01")


def test_no_matching_hba_rule(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    scram = pg.scram_user
    proc = pooler(general={"pg_hba": "host all all 10.0.0.0/8 trust\n"})
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, scram.name, "example_db", scram.password)
    assert info.value.sqlstate == "28000"


def test_explicit_server_credentials(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """A client-facing user mapped onto another PostgreSQL role with a plaintext password."""
    scram = pg.scram_user
    proc = pooler(
        pools={
            "example_db": {
                "users": [
                    {
                        "username": "app",
                        "password": w.md5_password_hash("apppass", "app"),
                        "server_username": scram.name,
                        "server_password": scram.password,
                        "pool_size": 2,
                    }
                ]
            }
        }
    )
    with psycopg.connect(proc.dsn("app", "apppass"), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (scram.name,)


def test_backend_rejects_server_password(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    scram = pg.scram_user
    proc = pooler(
        pools={
            "example_db": {
                "users": [
                    {
                        "username": "app",
                        "password": w.md5_password_hash("apppass", "app"),
                        "server_username": scram.name,
                        "server_password": "not-the-password",
                    }
                ]
            }
        }
    )
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proc.dsn("app", "apppass"))
    assert "password authentication failed" in str(info.value)


def test_scram_passthrough_survives_reconnects(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Backends opened later reuse the key captured at the first SCRAM login."""
    scram = pg.scram_user
    proc = pooler(
        general={"server_lifetime": 1},
        pools={"example_db": {"users": [{"username": scram.name, "pool_size": 2}]}},
    )
    with psycopg.connect(proc.dsn(scram.name, scram.password), autocommit=True) as conn:
        pids = set()
        for _ in range(5):
            pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])
            conn.execute("select pg_sleep(0.05)")
        assert len(pids) >= 2  # lifetime 1 ms: every transaction gets a fresh backend


def test_a_server_login_waiting_for_the_scram_key_is_not_tried_again_over_tls(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Until a client logs in with SCRAM, passthrough has no ClientKey, so the pool's
    min_pool_size login fails in the pooler itself, with SQLSTATE 28000. That is no
    pg_hba refusal: server_tls_mode = allow (the default) must not retry it over TLS.
    The retry's late failure reached clients who had logged in and queued meanwhile,
    and they were closed with "cannot log in ... yet" although they had brought the
    key."""
    scram = pg.scram_user
    proc = pooler(
        general={"server_tls_mode": "allow"},
        pools={"example_db": {"users": [{"username": scram.name, "min_pool_size": 1}]}},
    )
    proc.wait_for_log(f"cannot log in to the server as {scram.name!r} with SCRAM yet")
    with psycopg.connect(proc.dsn(scram.name, scram.password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (scram.name,)
    log = proc.log_text()
    assert "login refused without TLS" not in log, proc.log_tail()


def test_login_decisions_follow_a_reload(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Login decisions are kept between logins; a reload of pg_hba or of a stored
    password must apply to the very next login all the same."""
    md5, scram = pg.md5_user, pg.scram_user
    proc = pooler(general={"pg_hba": f"host all {md5.name} 127.0.0.1/32 reject\n"})

    def login(password: str) -> str | None:
        try:
            w.PgWire.connect(proc.host, proc.port, md5.name, "example_db", password).close()
        except w.ServerError as exc:
            return exc.sqlstate
        return None

    assert [login(md5.password), login(md5.password)] == ["28000", "28000"]
    proc.config["general"]["pg_hba"] = "host all all 127.0.0.1/32 md5\n"
    proc.reload_and_wait(proc.config)
    assert [login(md5.password), login(md5.password)] == [None, None]
    # The user's stored password becomes a SCRAM verifier: the next login is SCRAM.
    users = proc.config["pools"]["example_db"]["users"]
    verifier = next(u for u in users if u["username"] == scram.name)["password"]
    next(u for u in users if u["username"] == md5.name)["password"] = verifier
    proc.reload_and_wait(proc.config)
    conn = w.PgWire(proc.host, proc.port)
    try:
        received = conn.startup(md5.name, "example_db", scram.password)
        codes = [int.from_bytes(p[:4], "big") for t, p in received if t == b"R"]
        assert codes[0] == w.AUTH_SASL
        assert codes[-1] == w.AUTH_OK
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_login_that_stalls_is_cut_at_client_login_timeout(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """A client that sends no startup packet, or stops in the middle of SCRAM, holds a
    client slot only until client_login_timeout; one that logged in stays. With
    workers, each worker enforces it on the connections it was handed. (The timeout
    leaves a real login, the pool's first, time to finish on a loaded machine.)"""
    proc = pooler(general={"client_login_timeout": "1s", "workers": workers})
    user = pg.scram_user
    silent = w.PgWire(proc.host, proc.port)
    stalled = w.PgWire(proc.host, proc.port)
    started = time.monotonic()
    try:
        logged_in = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
        stalled.send_raw(w.startup_message({"user": user.name, "database": "example_db"}))
        kind, payload = stalled.read_message()
        assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL)
        # ... and never answers. The silent one never even sends its startup packet.
        kind, payload = stalled.read_message(timeout=5)
        assert kind == b"E"
        error = w.ServerError(w.error_fields(payload))
        assert (error.severity, error.sqlstate) == ("FATAL", "57014")
        assert error.message == "canceling authentication due to timeout"
        with pytest.raises(w.ConnectionClosed):
            stalled.read_message(timeout=5)
        with pytest.raises(w.ConnectionClosed):
            silent.read_message(timeout=5)
        assert silent.raw_received == b""
        assert time.monotonic() - started < 4
        # The timer of a completed login is gone: past the timeout, it still works.
        time.sleep(1.2)
        logged_in.send(b"Q", w.cstr("select 1"))
        assert w.rows(logged_in.read_until_ready()) == [("1",)]
        logged_in.close()
    finally:
        silent.close_socket()
        stalled.close_socket()


def test_clients_that_vanish_mid_login_leave_nothing_behind(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Clients that hang up while the pooler waits for their next SCRAM message (after
    the startup packet, after the first SASL message) or just after sending one are
    forgotten at once: no client slot left behind, and logins go on working."""
    proc = pooler()
    user = pg.scram_user
    startup = w.startup_message({"user": user.name, "database": "example_db"})
    first = w.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefghijklmnop")
    for _ in range(5):
        after_startup = w.PgWire(proc.host, proc.port)
        after_startup.send_raw(startup)
        assert after_startup.read_message()[0] == b"R"
        after_startup.close_socket()
        after_first = w.PgWire(proc.host, proc.port)
        after_first.send_raw(startup)
        assert after_first.read_message()[0] == b"R"
        after_first.send_raw(first)
        kind, payload = after_first.read_message()
        assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL_CONTINUE)
        after_first.close_socket()
        sent_and_gone = w.PgWire(proc.host, proc.port)
        sent_and_gone.send_raw(startup + first)
        sent_and_gone.close_socket()
    console = admin_console(proc)
    try:
        deadline = time.monotonic() + 5
        while True:
            left = [c for c in show_table(console, "CLIENTS") if c["user"] == user.name]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert left == []
    finally:
        console.close()
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    conn.send(b"Q", w.cstr("select 1"))
    assert w.rows(conn.read_until_ready()) == [("1",)]
    conn.close()
