"""LISTEN through the pooler.

In transaction mode a client's server goes back to the pool when its transaction
ends, so a LISTEN cannot last: the pooler undoes it (UNLISTEN * at check-in) and tells
the client with a WARNING after the transaction's ReadyForQuery, instead of leaving it
to wait for notifications that never come. In session mode LISTEN works as in
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pg8000.native
import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess

LOGGED = "ran LISTEN in transaction pooling mode"


def one_server_pool(pg: ExamplePostgres, **settings: object) -> dict[str, object]:
    user = {"username": pg.md5_user.name, "pool_size": 1}
    return {EXAMPLE_DB: {"users": [user], **settings}}


def logged_in(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    return w.PgWire.connect(
        proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, pg.md5_user.password
    )


def assert_listen_warning(conn: w.PgWire) -> None:
    """The next message is the warning, and nothing follows it."""
    type_, payload = conn.read_message(timeout=10)
    assert type_ == b"N"
    assert conn.read_available(wait=0.2) == []
    fields = w.error_fields(payload)
    assert fields["S"] == "WARNING"
    assert fields["C"] == "01000"
    assert fields["M"] == (
        "LISTEN has no effect after this transaction in transaction pooling mode"
    )
    assert 'pool_mode = "session"' in fields["H"]


def test_listen_in_transaction_mode_is_undone_and_the_client_told(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_server_pool(pg))
    conn = logged_in(proc, pg)
    try:
        reply = conn.simple_query("LISTEN doorman_listen")
        # The reply is PostgreSQL's, untouched; the warning follows its ReadyForQuery.
        assert w.msg_types(reply) == "CZ"
        assert w.command_tag(reply[0][1]) == "LISTEN"
        assert_listen_warning(conn)

        # The same (only) server again: no longer listening, and no more warnings.
        reply = conn.simple_query("select count(*) from pg_listening_channels()")
        assert w.rows(reply) == [("0",)]
        assert conn.read_available(wait=0.3) == []

        # Inside a transaction block the warning comes once the transaction ends.
        assert w.msg_types(conn.simple_query("BEGIN")) == "CZ"
        assert w.msg_types(conn.simple_query("LISTEN doorman_listen")) == "CZ"
        assert conn.read_available(wait=0.3) == []
        assert w.msg_types(conn.simple_query("COMMIT")) == "CZ"
        assert_listen_warning(conn)
        reply = conn.simple_query("select count(*) from pg_listening_channels()")
        assert w.rows(reply) == [("0",)]
    finally:
        conn.close()
    # The log says it once per pool, not once per LISTEN.
    assert proc.log_text().count(LOGGED) == 1


def test_psycopg_hears_the_warning(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=one_server_pool(pg))
    user = pg.md5_user
    notices: list[tuple[str | None, str | None, str | None]] = []
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        # A notice's fields can be read only while its handler runs.
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary))
        )
        # A binary cursor sends even a statement without parameters in the extended
        # protocol (Parse, Bind, Describe, Execute, Sync).
        conn.cursor(binary=True).execute("LISTEN doorman_listen")
        assert conn.execute("select 42").fetchone() == (42,)
        assert [notice[:2] for notice in notices] == [("WARNING", "01000")]
        assert "transaction pooling mode" in (notices[0][2] or "")


def test_asyncpg_listener_hears_the_warning_and_goes_on(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_server_pool(pg))
    user = pg.md5_user

    async def main() -> list[tuple[str, str]]:
        heard: list[tuple[str, str]] = []
        conn = await asyncpg.connect(proc.dsn(user.name, user.password), statement_cache_size=0)
        try:
            conn.add_log_listener(lambda _conn, msg: heard.append((msg.severity, msg.sqlstate)))
            await conn.add_listener("doorman_listen", lambda *args: None)
            assert await conn.fetchval("select $1::int", 7) == 7
            await asyncio.sleep(0.1)  # log listeners are called from the loop
        finally:
            await conn.close()
        return heard

    assert asyncio.run(main()) == [("WARNING", "01000")]


def test_pg8000_keeps_the_warning_among_its_notices(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_server_pool(pg))
    user = pg.md5_user
    conn = pg8000.native.Connection(
        user.name, host=proc.host, port=proc.port, database=EXAMPLE_DB, password=user.password
    )
    try:
        conn.run("LISTEN doorman_listen")
        assert conn.run("select 5") == [[5]]
        assert [(n[b"S"], n[b"C"]) for n in conn.notices] == [(b"WARNING", b"01000")]
    finally:
        conn.close()


def test_without_cleanup_the_listen_stays_and_only_its_transaction_is_warned(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_server_pool(pg, cleanup_server_connections=False))
    conn = logged_in(proc, pg)
    try:
        assert w.msg_types(conn.simple_query("LISTEN doorman_listen")) == "CZ"
        assert_listen_warning(conn)
        # Nothing undid it on the server, and the next transaction is not warned.
        reply = conn.simple_query("select count(*), pg_backend_pid() from pg_listening_channels()")
        [(count, listening_pid)] = w.rows(reply)
        assert count == "1"
        assert conn.read_available(wait=0.3) == []

        # A notification reaching that server while it is idle in the pool is
        # unexpected there: the pooler closes it. (Nothing is sent through the pooler
        # meanwhile: a transaction holding the server would get the notification.)
        pg.psql("NOTIFY doorman_listen", database=EXAMPLE_DB)
        still_there = f"select count(*) from pg_stat_activity where pid = {listening_pid}"
        deadline = time.monotonic() + 20
        while pg.psql(still_there).strip() != "0":
            assert time.monotonic() < deadline, "the listening server was not closed"
            time.sleep(0.1)
        # The next transaction gets a new server, which does not listen.
        reply = conn.simple_query("select count(*), pg_backend_pid() from pg_listening_channels()")
        assert w.rows(reply)[0][0] == "0"
        assert w.rows(reply)[0][1] != listening_pid
    finally:
        conn.close()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_listen_in_session_mode_gets_notifications_and_no_warning(
    pg: ExamplePostgres, pooler: PoolerFactory, protocol: str
) -> None:
    proc = pooler(pools=one_server_pool(pg, pool_mode="session"))
    user = pg.md5_user
    notices: list[str | None] = []
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        # Without parameters psycopg sends a simple Query, unless the cursor is binary.
        conn.cursor(binary=protocol == "extended").execute("LISTEN doorman_listen")
        pg.psql("NOTIFY doorman_listen, 'hello'", database=EXAMPLE_DB)
        heard = list(conn.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in heard] == [("doorman_listen", "hello")]
        assert conn.execute("select 1").fetchone() == (1,)
    assert notices == []
    assert LOGGED not in proc.log_text()
