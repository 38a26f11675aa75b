"""LISTEN through the pooler.

In transaction mode a client's server goes back to the pool when its transaction
ends, so a LISTEN cannot last: the pooler undoes it (UNLISTEN * at check-in) and tells
the client with a WARNING after the transaction's ReadyForQuery, instead of leaving it
to wait for notifications that never come; with pin_on_listen the client keeps its
server instead, and hears them. In session mode LISTEN works as in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import time

import asyncpg
import pg8000.native
import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess

LOGGED = "ran LISTEN in transaction pooling mode"
# Backends whose last statement was a LISTEN (pinned servers' or listening servers').
LISTENING_BACKENDS = (
    "select count(*) from pg_stat_activity"
    " where backend_type = 'client backend' and query ilike 'LISTEN%'"
)


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
    proc = pooler(pools=md5_user_pool(pg))
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
    proc = pooler(pools=md5_user_pool(pg))
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
    proc = pooler(pools=md5_user_pool(pg))
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
    proc = pooler(pools=md5_user_pool(pg))
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
    proc = pooler(pools=md5_user_pool(pg, cleanup_server_connections=False))
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
    proc = pooler(pools=md5_user_pool(pg, pool_mode="session"))
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


# ---- pin_on_listen: a transaction-mode client that LISTENs keeps its server ----------

PINNED = "(pin_on_listen)"


def notification(payload: bytes) -> tuple[int, str, str]:
    """A NotificationResponse's sender pid, channel and payload."""
    pid = int.from_bytes(payload[:4], "big", signed=True)
    channel, message, _ = payload[4:].split(b"\x00")
    return pid, channel.decode(), message.decode()


def backend_pid(conn: w.PgWire) -> str:
    [(pid,)] = w.rows(conn.simple_query("select pg_backend_pid()"))
    assert pid is not None
    return pid


def test_pin_on_listen_keeps_the_server_and_delivers_notifications(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, 2, pin_on_listen=True))
    listener = logged_in(proc, pg)
    others = [logged_in(proc, pg) for _ in range(2)]
    try:
        reply = listener.simple_query("LISTEN doorman_listen")
        assert w.msg_types(reply) == "CZ"
        assert listener.read_available(wait=0.3) == []  # no warning: it works
        pinned_pid = backend_pid(listener)

        # Other clients share the remaining server, and notify through the pooler.
        for conn in others:
            assert backend_pid(conn) != pinned_pid
        sender_pid = backend_pid(others[0])
        assert w.msg_types(others[0].simple_query("NOTIFY doorman_listen, 'one'")) == "CZ"
        # It arrives while the listener is idle, as from PostgreSQL directly.
        type_, payload = listener.read_message(timeout=10)
        assert type_ == b"A"
        assert notification(payload) == (int(sender_pid), "doorman_listen", "one")

        # Transactions of the listener keep running on the same server.
        for _ in range(3):
            assert backend_pid(listener) == pinned_pid
        assert w.msg_types(listener.simple_query("BEGIN")) == "CZ"
        assert w.msg_types(listener.simple_query("COMMIT")) == "CZ"
        reply = listener.simple_query(
            "select count(*), pg_backend_pid() from pg_listening_channels()"
        )
        assert w.rows(reply) == [("1", pinned_pid)]
        # A notification that arrives during one of its transactions comes with it.
        pg.psql("NOTIFY doorman_listen, 'two'", database=EXAMPLE_DB)
        time.sleep(0.2)
        types = w.msg_types(listener.simple_query("select 1"))
        assert "A" in types and types.endswith("Z"), types
    finally:
        listener.close()
        for conn in others:
            conn.close()
    assert proc.log_text().count(PINNED) == 1
    assert LOGGED not in proc.log_text()

    # Once it has left, its server is back in the pool, cleaned up: two transactions
    # held at once use both servers, and neither listens.
    first, second = logged_in(proc, pg), logged_in(proc, pg)
    try:
        seen = []
        for conn in (first, second):
            assert w.msg_types(conn.simple_query("BEGIN")) == "CZ"
            reply = conn.simple_query(
                "select pg_backend_pid(), count(*) from pg_listening_channels()"
            )
            seen.append(w.rows(reply)[0])
        assert sorted(pid for pid, _ in seen) == sorted([pinned_pid, sender_pid])
        assert [count for _, count in seen] == ["0", "0"]
    finally:
        first.close()
        second.close()


def test_pin_on_listen_with_drivers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """psycopg in the extended protocol and asyncpg's add_listener hear notifications
    sent through the pooler by another client."""
    proc = pooler(pools=md5_user_pool(pg, 3, pin_on_listen=True))
    dsn = proc.dsn(pg.md5_user.name, pg.md5_user.password)

    notices: list[str | None] = []
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn) as sender:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.cursor(binary=True).execute("LISTEN doorman_listen")  # extended protocol
        with sender.transaction():
            sender.execute("select pg_notify('doorman_listen', %s)", ["from psycopg"])
        heard = list(conn.notifies(timeout=10, stop_after=1))
        assert [(n.channel, n.payload) for n in heard] == [("doorman_listen", "from psycopg")]
        assert conn.execute("select 1").fetchone() == (1,)
    assert notices == []

    async def main() -> list[tuple[str, str]]:
        heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        listener = await asyncpg.connect(dsn, statement_cache_size=0)
        sender = await asyncpg.connect(dsn)
        try:
            await listener.add_listener(
                "doorman_listen",
                lambda _c, _pid, channel, payload: heard.put_nowait((channel, payload)),
            )
            for text in ("a", "b"):
                await sender.execute(f"NOTIFY doorman_listen, '{text}'")
            got = [await asyncio.wait_for(heard.get(), 10) for _ in range(2)]
            assert await listener.fetchval("select $1::int", 3) == 3
            return got
        finally:
            await listener.close()
            await sender.close()

    assert asyncio.run(main()) == [("doorman_listen", "a"), ("doorman_listen", "b")]


def test_a_pinned_client_is_let_go_at_shutdown_without_waiting(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Between transactions a pinned client is closed at once (57P01), as an idle one
    is; in a transaction, when it ends. Neither holds up the shutdown."""
    proc = pooler(
        general={"shutdown_timeout": 60_000}, pools=md5_user_pool(pg, 2, pin_on_listen=True)
    )
    idle, busy = logged_in(proc, pg), logged_in(proc, pg)
    try:
        for conn in (idle, busy):
            assert w.msg_types(conn.simple_query("LISTEN doorman_listen")) == "CZ"
        assert w.msg_types(busy.simple_query("BEGIN")) == "CZ"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        type_, payload = idle.read_message(timeout=10)
        assert type_ == b"E"
        assert w.error_fields(payload)["C"] == "57P01"
        # The transaction in progress finishes; then the client is told.
        reply = busy.simple_query("select 1")
        assert w.rows(reply) == [("1",)]
        reply = busy.simple_query("COMMIT")
        assert w.msg_types(reply[:2]) == "CZ"
        rest = reply[2:] or [busy.read_message(timeout=10)]
        assert rest[0][0] == b"E" and w.error_fields(rest[0][1])["C"] == "57P01"
        assert proc.wait_exit(timeout=20) == 0
        assert time.monotonic() - started < 20
    finally:
        idle.close()
        busy.close()


@pytest.mark.parametrize("setting", ["pin_on_listen", "listen_fanout"])
def test_a_listener_between_transactions_goes_when_its_pool_is_retired(
    pg: ExamplePostgres, pooler: PoolerFactory, setting: str
) -> None:
    """Its LISTEN lives on a server of the old pool (the one it is pinned to, or the
    pool's listening server): it is told to reconnect, and that server is closed."""
    proc = pooler(pools=md5_user_pool(pg, 1, **{setting: True}))
    conn = logged_in(proc, pg)
    try:
        assert w.msg_types(conn.simple_query("LISTEN doorman_listen")) == "CZ"
        config = copy.deepcopy(proc.config)
        config["pools"][EXAMPLE_DB]["pool_mode"] = "session"  # retires the pool
        proc.reload_and_wait(config)
        type_, payload = conn.read_message(timeout=10)
        assert type_ == b"E"
        assert w.error_fields(payload)["C"] == "57P01"
    finally:
        conn.close()
    # The server that listened was cleaned up or closed with the old pool; the new
    # pool serves the next client, and no backend listens any more.
    with psycopg.connect(proc.dsn(pg.md5_user.name, pg.md5_user.password)) as other:
        assert other.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
    deadline = time.monotonic() + 10
    while pg.psql(LISTENING_BACKENDS, database=EXAMPLE_DB).strip() != "0":
        assert time.monotonic() < deadline, "a backend still listens"
        time.sleep(0.05)


# ---- the sender's pid in a notification ------------------------------------------


def own_and_other_notification(
    pg: ExamplePostgres, listener: w.PgWire
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """`listener` LISTENs, notifies itself, then hears a notification sent by psql: the
    two notifications as (pid, channel, payload), the second's pid checked against the
    pid psql's backend had."""
    assert w.msg_types(listener.simple_query("LISTEN doorman_pid")) == "CZ"
    reply = listener.simple_query("NOTIFY doorman_pid, 'mine'")
    own = [notification(p) for t, p in reply if t == b"A"]
    out = pg.psql("select pg_backend_pid(); NOTIFY doorman_pid, 'theirs'", database=EXAMPLE_DB)
    type_, payload = listener.read_message(timeout=10)
    assert type_ == b"A"
    other = notification(payload)
    assert other[0] == int(out.split()[0])
    assert len(own) == 1, reply
    return own[0], other


@pytest.mark.parametrize("setting", ["session", "pin_on_listen"])
def test_a_client_s_own_notification_names_it_by_its_pid(
    pg: ExamplePostgres, pooler: PoolerFactory, setting: str
) -> None:
    """A notification's sender pid is what drivers compare with the pid of the
    connection's BackendKeyData to tell its own notifications from others' (asyncpg's
    get_server_pid, psycopg's info.backend_pid, pgjdbc's getBackendPID). The pooler
    gives clients a pid of its own there, so a notification the client's session sent
    names the client by that pid, as PostgreSQL names it by the backend's; one another
    session sent keeps that session's PostgreSQL pid."""
    user = pg.md5_user
    direct = w.PgWire.connect(pg.host, pg.port, user.name, EXAMPLE_DB, user.password)
    try:
        own, other = own_and_other_notification(pg, direct)
        assert own == (direct.backend_pid, "doorman_pid", "mine")
        assert other[1:] == ("doorman_pid", "theirs") and other[0] != direct.backend_pid
    finally:
        direct.close()

    settings: dict[str, object] = (
        {"pool_mode": "session"} if setting == "session" else {"pin_on_listen": True}
    )
    proc = pooler(pools=md5_user_pool(pg, 2, **settings))
    listener = logged_in(proc, pg)
    try:
        server_pid = int(backend_pid(listener))
        assert listener.backend_pid != server_pid  # the pooler's, not PostgreSQL's
        own, other = own_and_other_notification(pg, listener)
        assert own == (listener.backend_pid, "doorman_pid", "mine")
        assert other[1:] == ("doorman_pid", "theirs")
        assert other[0] not in (listener.backend_pid, server_pid)
        # Split across reads, the pid is rewritten all the same: a payload of 8000
        # bytes, which the server sends in more than one write.
        long = "x" * 7990
        reply = listener.simple_query(f"NOTIFY doorman_pid, '{long}'")
        assert [notification(p) for t, p in reply if t == b"A"] == [
            (listener.backend_pid, "doorman_pid", long)
        ]
    finally:
        listener.close()
