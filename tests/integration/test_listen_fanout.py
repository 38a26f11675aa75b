"""listen_fanout: one server connection per pool LISTENs for all of its clients.

A transaction-mode client's plain LISTEN between transactions is run on the pool's
listening server (outside the pool), and notifications on its channels are passed on
to it: at once between transactions, after the transaction when it is in one.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import asyncpg
import pg8000.native
import psycopg
import psycopg2
import psycopg2.extensions

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, admin_rows
from helpers.listen import fanout_pool
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port
from pg_doorman.protocol.listen import RESERVED

HUB_LOG = "listens for the pool's clients (listen_fanout)"
WARNED = "LISTEN has no effect after this transaction in transaction pooling mode"


def logged_in(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    return w.PgWire.connect(
        proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, pg.md5_user.password
    )


def listens(conn: w.PgWire, channel: str = "jobs") -> None:
    """`conn` LISTENs on `channel`, answered as by PostgreSQL."""
    reply = conn.simple_query(f"LISTEN {channel}")
    assert w.msg_types(reply) == "CZ"
    assert w.command_tag(reply[0][1]) == "LISTEN"


def notification(payload: bytes) -> tuple[int, str, str]:
    """A NotificationResponse's sender pid, channel and payload."""
    pid = int.from_bytes(payload[:4], "big", signed=True)
    channel, message, _ = payload[4:].split(b"\x00")
    return pid, channel.decode(), message.decode()


def heard(conn: w.PgWire, wait: float = 0.3) -> list[tuple[int, str, str]]:
    """The notifications that came to an idle client (and nothing else did)."""
    messages = conn.read_available(wait=wait)
    assert all(type_ == b"A" for type_, _ in messages), messages
    return [notification(payload) for _, payload in messages]


def backends(pg: ExamplePostgres) -> list[tuple[int, str]]:
    """The md5 user's backends: pid and last query."""
    out = pg.psql(
        "select pid, query from pg_stat_activity"
        f" where usename = '{pg.md5_user.name}' and backend_type = 'client backend'"
        " order by pid",
        database=EXAMPLE_DB,
    )
    rows = [line.split("|", 1) for line in out.splitlines() if line.strip()]
    return [(int(pid), query) for pid, query in rows]


def listening_backends(pg: ExamplePostgres) -> list[int]:
    return [pid for pid, query in backends(pg) if "LISTEN" in query]


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def extended(conn: w.PgWire, sql: str) -> list[w.Message]:
    """`sql` as an unnamed Parse, Bind, Execute and Sync; read to ReadyForQuery."""
    conn.send_raw(w.parse("", sql) + w.bind("", "") + w.execute() + w.sync())
    return conn.read_until_ready()


def backend_pid(conn: w.PgWire) -> int:
    [(pid,)] = w.rows(conn.simple_query("select pg_backend_pid()"))
    assert pid is not None
    return int(pid)


def test_one_server_listens_for_every_client(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=fanout_pool(pg))
    first, second, third, sender = (logged_in(proc, pg) for _ in range(4))
    try:
        for conn, statement in (
            (first, "LISTEN jobs"),
            (second, "listen JOBS;"),  # the same channel: unquoted names fold
            (third, 'LISTEN "Other Channel"'),
        ):
            reply = conn.simple_query(statement)
            assert w.msg_types(reply) == "CZ"
            assert w.command_tag(reply[0][1]) == "LISTEN"
        # Their pool's one server is free for everyone, and does not listen itself.
        sender_pid = backend_pid(sender)
        assert backend_pid(first) == sender_pid
        reply = first.simple_query("select count(*) from pg_listening_channels()")
        assert w.rows(reply) == [("0",)]
        # One more server listens, for all three.
        [hub_pid] = listening_backends(pg)
        assert hub_pid != sender_pid
        assert len(backends(pg)) == 2

        assert w.msg_types(sender.simple_query("NOTIFY jobs, 'one'")) == "CZ"
        assert heard(first, wait=1) == [(sender_pid, "jobs", "one")]
        assert heard(second, wait=1) == [(sender_pid, "jobs", "one")]
        assert heard(third) == []
        pg.psql("""NOTIFY "Other Channel", 'two'""", database=EXAMPLE_DB)
        [(_, channel, payload)] = heard(third, wait=1)
        assert (channel, payload) == ("Other Channel", "two")
        assert heard(first) == [] and heard(second) == []

        # LISTEN again is answered at once; UNLISTEN of a channel never listened on
        # too, as PostgreSQL does.
        listens(first)
        reply = first.simple_query("UNLISTEN nothing_here")
        assert w.command_tag(reply[0][1]) == "UNLISTEN"
        # After UNLISTEN a client hears no more of that channel; the others still do.
        reply = first.simple_query("UNLISTEN jobs")
        assert w.msg_types(reply) == "CZ" and w.command_tag(reply[0][1]) == "UNLISTEN"
        assert w.msg_types(sender.simple_query("NOTIFY jobs, 'three'")) == "CZ"
        assert heard(second, wait=1) == [(sender_pid, "jobs", "three")]
        assert heard(first) == []

        # A notification during a transaction comes after its ReadyForQuery.
        assert w.msg_types(second.simple_query("BEGIN")) == "CZ"
        pg.psql("NOTIFY jobs, 'four'", database=EXAMPLE_DB)
        time.sleep(0.3)
        assert second.read_available(wait=0.2) == []
        reply = second.simple_query("COMMIT")
        assert w.msg_types(reply[:2]) == "CZ"
        rest = reply[2:] or second.read_available(wait=1)
        assert [type_ for type_, _ in rest] == [b"A"]
        assert notification(rest[0][1])[1:] == ("jobs", "four")
    finally:
        for conn in (first, second, third, sender):
            conn.close()
    assert WARNED not in proc.log_text()
    assert proc.log_text().count(HUB_LOG) == 1
    # With its last listener gone the listening server closes.
    wait_for(lambda: listening_backends(pg) == [])
    assert len(backends(pg)) == 1


def test_drivers_listen_through_the_pool(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """asyncpg's add_listener, psycopg's notifies(), pg8000's notifications and
    psycopg2's poll() hear notifications sent through the pooler."""
    proc = pooler(pools=fanout_pool(pg, 2))
    dsn = proc.dsn(pg.md5_user.name, pg.md5_user.password)

    async def with_asyncpg() -> list[tuple[str, str]]:
        heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        listener = await asyncpg.connect(dsn, statement_cache_size=0)
        sender = await asyncpg.connect(dsn)

        def on_notify(_c: object, _pid: int, channel: str, payload: str) -> None:
            heard.put_nowait((channel, payload))

        try:
            await listener.add_listener("Doorman Jobs", on_notify)
            for text in ("a", "b"):
                await sender.execute("select pg_notify('Doorman Jobs', $1)", text)
            got = [await asyncio.wait_for(heard.get(), 10) for _ in range(2)]
            assert await listener.fetchval("select $1::int", 3) == 3
            await listener.remove_listener("Doorman Jobs", on_notify)
            await sender.execute("NOTIFY \"Doorman Jobs\", 'c'")
            await asyncio.sleep(0.3)
            assert heard.empty()
            return got
        finally:
            await listener.close()
            await sender.close()

    assert asyncio.run(with_asyncpg()) == [("Doorman Jobs", "a"), ("Doorman Jobs", "b")]

    async def with_asyncpg_statement_cache() -> list[str]:
        """With its statement cache asyncpg prepares LISTEN as a named statement
        (Parse, Describe, Flush), then binds it (Bind, Execute, Sync)."""
        heard: asyncio.Queue[str] = asyncio.Queue()
        listener = await asyncpg.connect(dsn)

        def on_notify(_c: object, _pid: int, _channel: str, payload: str) -> None:
            heard.put_nowait(payload)

        try:
            await listener.add_listener("cached", on_notify)
            # Again after remove_listener: the statement comes from the cache, bound only.
            await listener.remove_listener("cached", on_notify)
            await listener.add_listener("cached", on_notify)
            pg.psql("NOTIFY cached, 'x'", database=EXAMPLE_DB)
            got = [await asyncio.wait_for(heard.get(), 10)]
            assert await listener.fetchval("select 4") == 4
            return got
        finally:
            await listener.close()

    assert asyncio.run(with_asyncpg_statement_cache()) == ["x"]

    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn) as sender:
        conn.execute("LISTEN doorman_jobs")
        # A binary cursor sends even a statement without parameters in the extended
        # protocol (Parse, Bind, Describe, Execute, Sync).
        conn.cursor(binary=True).execute("LISTEN doorman_other")
        with sender.transaction():
            sender.execute("select pg_notify('doorman_jobs', %s)", ["from psycopg"])
            sender.execute("select pg_notify('doorman_other', %s)", ["binary"])
        got = list(conn.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [
            ("doorman_jobs", "from psycopg"),
            ("doorman_other", "binary"),
        ]
        assert conn.execute("select 1").fetchone() == (1,)

    # pg8000 reads notifications with the replies to its next statement.
    listener8 = pg8000.native.Connection(
        pg.md5_user.name, host=proc.host, port=proc.port, database=EXAMPLE_DB,
        password=pg.md5_user.password,
    )  # fmt: skip
    try:
        listener8.run("LISTEN doorman_jobs")
        pg.psql("NOTIFY doorman_jobs, 'for pg8000'", database=EXAMPLE_DB)
        time.sleep(0.3)
        assert listener8.run("select 1") == [[1]]
        assert [(n[1], n[2]) for n in listener8.notifications] == [("doorman_jobs", "for pg8000")]
    finally:
        listener8.close()

    conn2 = psycopg2.connect(dsn)
    conn2.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        conn2.cursor().execute("LISTEN doorman_jobs")
        pg.psql("NOTIFY doorman_jobs, 'from psql'", database=EXAMPLE_DB)
        deadline = time.monotonic() + 10
        while not conn2.notifies and time.monotonic() < deadline:
            time.sleep(0.05)
            conn2.poll()
        assert [(n.channel, n.payload) for n in conn2.notifies] == [("doorman_jobs", "from psql")]
    finally:
        conn2.close()
    assert WARNED not in proc.log_text()


def test_what_the_hub_does_not_read_goes_to_the_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A LISTEN inside a transaction, among other statements, or in the extended
    protocol runs on the client's server as without listen_fanout (and is warned
    about); a LISTEN PostgreSQL refuses gets PostgreSQL's error."""
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        for statements in (
            ["BEGIN", "LISTEN jobs", "COMMIT"],
            ["LISTEN a; LISTEN b"],
            ["LISTEN jobs -- a comment"],
        ):
            for statement in statements:
                expected = "C" * (statement.count(";") + 1) + "Z"
                assert w.msg_types(conn.simple_query(statement)) == expected
            [(type_, payload)] = conn.read_available(wait=1)
            assert type_ == b"N" and w.error_fields(payload)["M"] == WARNED
        reply = conn.simple_query("LISTEN select")
        assert w.msg_types(reply) == "EZ"
        assert w.error_fields(reply[0][1])["C"] == "42601"
    finally:
        conn.close()
    assert HUB_LOG not in proc.log_text()
    with psycopg.connect(proc.dsn(pg.md5_user.name, pg.md5_user.password)) as psy:
        notices: list[str | None] = []
        psy.add_notice_handler(lambda d: notices.append(d.message_primary))
        psy.execute("LISTEN jobs")  # in the transaction psycopg began
        psy.commit()
        # The warning follows COMMIT's ReadyForQuery: read with the next reply.
        assert psy.execute("select 1").fetchone() == (1,)
        assert notices == [WARNED]


def test_losing_the_listening_server_disconnects_its_clients(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Notifications may have been lost with it: listeners between transactions are
    disconnected at once, one in a transaction when it ends; the next LISTEN opens a
    new listening server."""
    proc = pooler(pools=fanout_pool(pg, 2))
    idle, busy, bystander = (logged_in(proc, pg) for _ in range(3))
    try:
        for conn in (idle, busy):
            listens(conn)
        assert w.msg_types(busy.simple_query("BEGIN")) == "CZ"
        [hub_pid] = listening_backends(pg)
        pg.psql(f"select pg_terminate_backend({hub_pid})", database=EXAMPLE_DB)
        type_, payload = idle.read_message(timeout=10)
        assert type_ == b"E"
        fields = w.error_fields(payload)
        assert fields["S"] == "FATAL" and fields["C"] == "08006"
        assert "LISTEN again" in fields["M"]
        # The transaction goes on to its end; then the client is told.
        assert w.rows(busy.simple_query("select 1")) == [("1",)]
        reply = busy.simple_query("COMMIT")
        assert w.msg_types(reply[:2]) == "CZ"
        rest = reply[2:] or [busy.read_message(timeout=10)]
        assert rest[0][0] == b"E" and "LISTEN again" in w.error_fields(rest[0][1])["M"]
        # A client that never listened is not affected.
        assert w.rows(bystander.simple_query("select 2")) == [("2",)]
    finally:
        for conn in (idle, busy, bystander):
            conn.close()
    again = logged_in(proc, pg)
    try:
        listens(again)
        [new_hub] = listening_backends(pg)
        assert new_hub != hub_pid
        pg.psql("NOTIFY jobs, 'after'", database=EXAMPLE_DB)
        assert [n[1:] for n in heard(again, wait=1)] == [("jobs", "after")]
    finally:
        again.close()
    assert "listening server" in proc.log_text()


def test_a_slow_listen_holds_what_the_client_sent_after_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A LISTEN and a query sent together: the query's reply comes after LISTEN's,
    once the listening server (opened for it) has run the LISTEN."""
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        conn.send_raw(w.query("LISTEN jobs") + w.query("select 5"))
        replies = [conn.read_message(timeout=10) for _ in range(5)]
        assert [type_ for type_, _ in replies] == [b"C", b"Z", b"T", b"D", b"C"]
        assert w.command_tag(replies[0][1]) == "LISTEN"
        assert conn.read_message(timeout=10)[0] == b"Z"
    finally:
        conn.close()


def test_the_reserved_words_are_postgresqls(pg: ExamplePostgres) -> None:
    """The words that cannot name a channel unquoted: those PostgreSQL reserves, and
    those that may only name a function or a type."""
    out = pg.psql("select word from pg_get_keywords() where catcode in ('R', 'T')")
    assert set(out.split()) == RESERVED


def test_show_servers_lists_the_listening_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        listens(conn)
        [hub_pid] = listening_backends(pg)
        rows = [r for r in admin_rows(proc, "SERVERS") if r["user"] == pg.md5_user.name]
        listening = [r for r in rows if r["state"] == "listen"]
        assert len(listening) == 1
        assert listening[0]["server_process_id"] == str(hub_pid)
        assert listening[0]["database_name"] == EXAMPLE_DB
        assert int(listening[0]["query_count"] or 0) >= 1
    finally:
        conn.close()


def test_a_listener_is_let_go_at_shutdown_without_waiting(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Between transactions a listening client is closed at once (57P01), as an idle
    one is, and the listening server is closed."""
    proc = pooler(general={"shutdown_timeout": 60_000}, pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        listens(conn)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        type_, payload = conn.read_message(timeout=10)
        assert type_ == b"E"
        assert w.error_fields(payload)["C"] == "57P01"
        assert proc.wait_exit(timeout=20) == 0
        assert time.monotonic() - started < 20
    finally:
        conn.close()
    wait_for(lambda: listening_backends(pg) == [])


def test_a_listening_server_that_cannot_open_fails_only_the_listen(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The role may hold one connection, which the pool's server has: the listening
    server is refused, the LISTEN fails with PostgreSQL's error, and the client goes
    on (the next LISTEN tries again)."""
    role = pg.md5_user.name
    proc = pooler(pools=fanout_pool(pg, min_pool_size=1))
    conn = logged_in(proc, pg)
    try:
        assert w.rows(conn.simple_query("select 1")) == [("1",)]
        pg.psql(f"ALTER ROLE {role} CONNECTION LIMIT 1")
        reply = conn.simple_query("LISTEN jobs")
        assert w.msg_types(reply) == "EZ"
        fields = w.error_fields(reply[0][1])
        assert fields["S"] == "ERROR" and fields["C"] == "53300"
        assert w.rows(conn.simple_query("select 2")) == [("2",)]
        pg.psql(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        listens(conn)
        pg.psql("NOTIFY jobs, 'now'", database=EXAMPLE_DB)
        assert [n[1:] for n in heard(conn, wait=1)] == [("jobs", "now")]
    finally:
        pg.psql(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        conn.close()


def test_while_paused_the_listening_server_opens_only_after_resume(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    console = admin_console(proc)
    try:
        assert w.rows(conn.simple_query("select 1")) == [("1",)]
        assert w.first_error(console.simple_query("PAUSE")) is None
        conn.send_raw(w.query("LISTEN jobs"))
        time.sleep(0.5)
        assert conn.read_available(wait=0.2) == []
        assert listening_backends(pg) == []
        assert w.first_error(console.simple_query("RESUME")) is None
        type_, payload = conn.read_message(timeout=10)
        assert type_ == b"C" and w.command_tag(payload) == "LISTEN"
        assert conn.read_message(timeout=10)[0] == b"Z"
        assert len(listening_backends(pg)) == 1
    finally:
        console.close()
        conn.close()


def test_discard_all_unlistens_the_fanned_out_channels_too(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        listens(conn)
        assert len(listening_backends(pg)) == 1
        assert w.msg_types(conn.simple_query("DISCARD ALL")) == "CZ"
        pg.psql("NOTIFY jobs, 'gone'", database=EXAMPLE_DB)
        assert heard(conn, wait=0.5) == []
        wait_for(lambda: listening_backends(pg) == [])
    finally:
        conn.close()


def test_an_unlisten_in_a_transaction_stops_delivery_when_it_commits(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """An UNLISTEN inside a transaction block runs on the client's server, which
    listens on nothing: the hub stops delivering that channel to the client when the
    transaction commits, as PostgreSQL would, and what it held for the channel during
    the transaction is dropped. A rollback leaves the channel listened on."""
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        listens(conn, "jobs")
        listens(conn, "other")
        # Rolled back (explicitly, and a COMMIT of a failed transaction): still heard.
        for statements in (
            ["BEGIN", "UNLISTEN jobs", "ROLLBACK"],
            ["BEGIN", "UNLISTEN *", "select 1/0", "COMMIT"],
        ):
            for statement in statements:
                conn.simple_query(statement)
            pg.psql("NOTIFY jobs, 'kept'", database=EXAMPLE_DB)
            assert [n[1:] for n in heard(conn, wait=1)] == [("jobs", "kept")]
        # Committed, in the simple and the extended protocol: no more of that channel,
        # not even what came during the transaction; the other channel still comes.
        for unlisten in (
            lambda: conn.simple_query("UNLISTEN jobs"),
            lambda: extended(conn, "UNLISTEN jobs"),
        ):
            listens(conn, "jobs")
            assert w.msg_types(conn.simple_query("BEGIN")) == "CZ"
            reply = unlisten()
            [tag] = [payload for type_, payload in reply if type_ == b"C"]
            assert w.command_tag(tag) == "UNLISTEN"
            pg.psql("NOTIFY jobs, 'during'; NOTIFY other, 'during'", database=EXAMPLE_DB)
            reply = conn.simple_query("COMMIT")
            assert w.msg_types(reply[:2]) == "CZ"
            rest = reply[2:] or conn.read_available(wait=1)
            assert [notification(payload)[1:] for _, payload in rest] == [("other", "during")]
            pg.psql("NOTIFY jobs, 'after'; NOTIFY other, 'after'", database=EXAMPLE_DB)
            assert [n[1:] for n in heard(conn, wait=1)] == [("other", "after")]
        # UNLISTEN * in a transaction: nothing more, and the listening server closes.
        assert w.msg_types(conn.simple_query("BEGIN")) == "CZ"
        assert w.msg_types(conn.simple_query("UNLISTEN *")) == "CZ"
        assert w.msg_types(conn.simple_query("COMMIT")) == "CZ"
        pg.psql("NOTIFY other, 'gone'", database=EXAMPLE_DB)
        assert heard(conn, wait=0.5) == []
        wait_for(lambda: listening_backends(pg) == [])
    finally:
        conn.close()


def test_with_pin_on_listen_a_channel_listened_both_ways_is_heard_once(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """With pin_on_listen as well, a LISTEN in a transaction pins the client to its
    server, which then delivers that channel: the hub no longer does, though the client
    LISTENed it there before, so each notification comes once. So for a plain LISTEN
    sent to the pinned server later; channels only the hub listens on still come."""
    proc = pooler(pools=fanout_pool(pg, pool_size=2, pin_on_listen=True))
    conn = logged_in(proc, pg)
    try:
        for channel in ("jobs", "later", "hub_only"):
            listens(conn, channel)  # through the hub
        for statement in ("BEGIN", "LISTEN jobs", "COMMIT"):
            assert w.msg_types(conn.simple_query(statement)) == "CZ"
        assert "until it disconnects (pin_on_listen)" in proc.log_text()
        listens(conn, "later")  # now on its server, which it keeps
        for channel in ("jobs", "later", "hub_only"):
            pg.psql(f"NOTIFY {channel}, 'once'", database=EXAMPLE_DB)
        time.sleep(0.5)
        got = sorted(n[1:] for n in heard(conn, wait=1))
        assert got == [("hub_only", "once"), ("jobs", "once"), ("later", "once")]
    finally:
        conn.close()


def test_a_client_holding_too_many_notifications_is_disconnected(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Notifications held through a long transaction are bounded (16 MiB); the
    client is told why, and the other listener keeps hearing them."""
    proc = pooler(pools=fanout_pool(pg))
    busy, other = logged_in(proc, pg), logged_in(proc, pg)
    try:
        for conn in (busy, other):
            listens(conn)
        assert w.msg_types(busy.simple_query("BEGIN")) == "CZ"
        # 2,200 distinct notifications of 8,000 bytes: more than 16 MiB.
        pg.psql(
            "select count(pg_notify('jobs', i || repeat('x', 7990)))"
            " from generate_series(1, 2200) as i",
            database=EXAMPLE_DB,
        )
        type_, payload = busy.read_message(timeout=20)
        assert type_ == b"E"
        fields = w.error_fields(payload)
        assert fields["S"] == "FATAL" and fields["C"] == "54000"
        got = 0
        while got < 2200:
            type_, payload = other.read_message(timeout=20)
            assert type_ == b"A"
            got += 1
        assert notification(payload)[2].startswith("2200x")
    finally:
        busy.close()
        other.close()


def test_reconnect_replaces_the_listening_server_too(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """RECONNECT (say, after a failover) replaces the pool's servers: the listening
    one is closed and its clients are told to reconnect and LISTEN again."""
    proc = pooler(pools=fanout_pool(pg))
    conn, bystander = logged_in(proc, pg), logged_in(proc, pg)
    console = admin_console(proc)
    try:
        listens(conn)
        [old] = listening_backends(pg)
        assert w.first_error(console.simple_query("RECONNECT")) is None
        type_, payload = conn.read_message(timeout=10)
        assert type_ == b"E" and "LISTEN again" in w.error_fields(payload)["M"]
        wait_for(lambda: old not in listening_backends(pg))
        assert w.rows(bystander.simple_query("select 1")) == [("1",)]
    finally:
        console.close()
        conn.close()
        bystander.close()


def test_metrics_count_listeners_channels_and_notifications(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    proc = pooler(web={"enabled": True, "host": "127.0.0.1", "port": port}, pools=fanout_pool(pg))
    mine = {"user": pg.md5_user.name, "database": EXAMPLE_DB}
    first, second = logged_in(proc, pg), logged_in(proc, pg)
    try:
        listens(first)
        listens(second)
        listens(second, "other")
        pg.psql("NOTIFY jobs, 'a'", database=EXAMPLE_DB)
        pg.psql("NOTIFY other, 'b'", database=EXAMPLE_DB)
        assert len(heard(first, wait=1)) == 1
        assert len(heard(second, wait=1)) == 2
        families = scrape(port)
        assert (
            value(
                families["pg_doorman_pools_listen_clients"],
                "pg_doorman_pools_listen_clients",
                **mine,
            )
            == 2
        )
        assert (
            value(
                families["pg_doorman_pools_listen_channels"],
                "pg_doorman_pools_listen_channels",
                **mine,
            )
            == 2
        )
        assert (
            value(
                families["pg_doorman_pools_notifications"],
                "pg_doorman_pools_notifications_total",
                **mine,
            )
            == 3
        )
    finally:
        first.close()
        second.close()
    wait_for(lambda: listening_backends(pg) == [])
    families = scrape(port)
    assert (
        value(
            families["pg_doorman_pools_listen_clients"], "pg_doorman_pools_listen_clients", **mine
        )
        == 0
    )
    # A counter: it keeps its count when the listening server closes.
    assert (
        value(
            families["pg_doorman_pools_notifications"],
            "pg_doorman_pools_notifications_total",
            **mine,
        )
        == 3
    )


def test_with_workers_each_has_its_listening_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Clients spread over two worker processes all hear a notification: each worker
    listens for its own clients."""
    proc = pooler(general={"workers": 2}, pools=fanout_pool(pg))
    clients = [logged_in(proc, pg) for _ in range(6)]
    try:
        for conn in clients:
            listens(conn)
        # The supervisor hands each new connection to the worker with fewer.
        assert len(listening_backends(pg)) == 2
        pg.psql("NOTIFY jobs, 'all'", database=EXAMPLE_DB)
        for conn in clients:
            assert [n[1:] for n in heard(conn, wait=1)] == [("jobs", "all")]
    finally:
        for conn in clients:
            conn.close()
    wait_for(lambda: listening_backends(pg) == [])
