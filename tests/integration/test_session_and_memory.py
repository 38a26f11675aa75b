"""Session pooling (what a session leaves, clients that vanish, shutdown), memory bounds
(max_memory_usage, a huge error message) and backpressure (clients that do not read,
servers that do not read, replies the pooler makes itself)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import asyncpg
import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, pool_row, show_table
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess

READY_IDLE = b"Z\x00\x00\x00\x05I"


def session_pool(pg: ExamplePostgres, pool_size: int = 1) -> dict[str, object]:
    return md5_user_pool(pg, pool_size=pool_size, pool_mode="session")


def login(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)


def one(conn: w.PgWire, sql: str) -> str | None:
    got = conn.simple_query(sql)
    error = w.first_error(got)
    assert error is None, error
    return w.rows(got)[0][0]


def wait_pool(proc: PoolerProcess, user: str, **expected: str) -> dict[str, str | None]:
    deadline = time.monotonic() + 10
    while True:
        console = admin_console(proc)
        try:
            row = pool_row(console, user)
        finally:
            console.close()
        if all(row[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def send_until_stopped(
    sock: socket.socket, block: bytes, seconds: float, most: int
) -> tuple[int, memoryview]:
    """Send `block` over and over without blocking, for `seconds` or until `most` bytes
    have gone, however slowly the pooler takes them: the bytes sent, and what is left of
    the block under way (the whole block when none is)."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    pending = memoryview(block)
    while time.monotonic() < deadline and sent < most:
        try:
            n = sock.send(pending)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        pending = pending[n:] if n < len(pending) else memoryview(block)
    return sent, pending


# ---- session mode: the server is cleaned before the next client -------------------


def test_session_end_leaves_nothing_for_the_next_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=session_pool(pg))
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a:
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        a.execute("create temp table sess_tmp(x int)")
        a.execute("set work_mem = '7MB'")
        a.execute("prepare sql_level as select 1")
        # protocol-level prepared statement
        a.execute("select %s::int + 1", (1,), prepare=True)
        a.execute("select pg_advisory_lock(7001)")
        a.execute("listen sess_chan")
        a.execute("begin")
        a.execute("declare held cursor with hold for select 1")
        a.execute("commit")
        assert a.execute("select count(*) from pg_prepared_statements").fetchone()[0] >= 2
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b:
        assert b.execute("select pg_backend_pid()").fetchone()[0] == pid
        assert b.execute("show work_mem").fetchone()[0] != "7MB"
        assert b.execute("select count(*) from pg_prepared_statements").fetchone()[0] == 0
        assert b.execute("select count(*) from pg_cursors").fetchone()[0] == 0
        assert b.execute("select count(*) from pg_listening_channels()").fetchone()[0] == 0
        assert (
            b.execute(
                "select count(*) from pg_locks where locktype = 'advisory' and pid = %s", (pid,)
            ).fetchone()[0]
            == 0
        )
        assert b.execute("select to_regclass('pg_temp.sess_tmp')").fetchone()[0] is None
        b.execute("create temp table sess_tmp(x int)")  # the name is free


@pytest.mark.parametrize("state", ["open", "failed"])
def test_session_client_vanishing_in_a_transaction_is_rolled_back(
    pg: ExamplePostgres, pooler: PoolerFactory, state: str
) -> None:
    pg.psql(
        "create table if not exists sess_vanish(x int); grant all on sess_vanish to public",
        database=EXAMPLE_DB,
    )
    pg.psql("truncate sess_vanish", database=EXAMPLE_DB)
    proc = pooler(pools=session_pool(pg))
    conn = login(proc, pg)
    pid = one(conn, "select pg_backend_pid()")
    conn.simple_query("begin")
    conn.simple_query("insert into sess_vanish values (1)")
    conn.simple_query("select pg_advisory_xact_lock(7002)")
    if state == "failed":
        conn.simple_query("select 1/0")
    conn.close_socket()  # no Terminate
    other = login(proc, pg)
    try:
        assert one(other, "select pg_backend_pid()") == pid
        assert one(other, "select count(*) from sess_vanish") == "0"
        assert one(other, "select count(*) from pg_locks where locktype = 'advisory'") == "0"
    finally:
        other.close()
    row = wait_pool(proc, user := pg.md5_user.name, cl_active="0", sv_active="0", sv_idle="1")
    assert (row["cl_active"], row["sv_active"], row["sv_idle"]) == ("0", "0", "1"), (user, row)


def test_session_client_vanishing_mid_copy(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=session_pool(pg))
    conn = login(proc, pg)
    conn.simple_query("create temp table sess_copy(x text)")
    conn.send_raw(w.query("copy sess_copy from stdin"))
    got = conn.read_message()
    assert got[0] == b"G"
    conn.send_raw(w.copy_data("half a row"))
    conn.close_socket()
    other = login(proc, pg)
    try:
        assert one(other, "select 1") == "1"
        assert one(other, "select to_regclass('pg_temp.sess_copy')") is None
    finally:
        other.close()
    row = wait_pool(proc, pg.md5_user.name, cl_active="0", sv_active="0")
    assert (row["cl_active"], row["sv_active"]) == ("0", "0"), row
    servers = show_table(admin_console(proc), "SERVERS")
    assert len(servers) <= 1, servers


def test_session_client_vanishing_mid_pipeline(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=session_pool(pg))
    conn = login(proc, pg)
    conn.simple_query("create temp table sess_pipe(x int)")
    batch = b""
    for i in range(50):
        batch += w.parse("", f"insert into sess_pipe values ({i})") + w.bind("", "")
        batch += w.execute()
        batch += w.sync()
    batch += w.parse("", "select pg_sleep(0.3)") + w.bind("", "") + w.execute()  # no Sync
    conn.send_raw(batch)
    time.sleep(0.05)
    conn.close_socket()
    other = login(proc, pg)
    try:
        assert one(other, "select 1") == "1"
        assert one(other, "select to_regclass('pg_temp.sess_pipe')") is None
        assert one(other, "select count(*) from pg_prepared_statements") == "0"
    finally:
        other.close()
    row = wait_pool(proc, pg.md5_user.name, cl_active="0", sv_active="0")
    assert (row["cl_active"], row["sv_active"]) == ("0", "0"), row


def test_session_protocol_prepared_statements_across_reconnects(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=session_pool(pg, pool_size=2))
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)

    async def main() -> None:
        for round_ in range(3):
            conn = await asyncpg.connect(dsn, statement_cache_size=50)
            try:
                for i in range(120):
                    value = await conn.fetchval(f"select $1::int + {i % 70}", i)
                    assert value == i + i % 70
                stmt = await conn.prepare("select $1::text || 'x'")
                assert await stmt.fetchval(str(round_)) == f"{round_}x"
            finally:
                await conn.close()

    asyncio.run(main())
    for _ in range(3):
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            for i in range(60):
                assert conn.execute(f"select %s::int * {i % 7}", (i,)).fetchone() == (i * (i % 7),)
    row = wait_pool(proc, user.name, cl_active="0", sv_active="0")
    assert (row["cl_active"], row["sv_active"]) == ("0", "0"), row


# ---- slow readers: backpressure ---------------------------------------------------


def _drain_until_ready(sock: socket.socket, timeout: float = 60.0) -> tuple[int, bytes]:
    """Read everything up to ReadyForQuery; the byte count and the last 200 bytes."""
    received = 0
    tail = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
        tail = (tail + chunk)[-200:]
        if tail.endswith(READY_IDLE):
            break
    return received, tail


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_clients_that_do_not_read_keep_rss_bounded_and_others_served(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=5, pool_mode=mode))
    stalled = []
    for _ in range(4):
        conn = login(proc, pg)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        stalled.append(conn)
    baseline = proc.rss_bytes()
    for conn in stalled:
        conn.send_raw(w.query("select repeat('x', 1000) from generate_series(1, 200000)"))
    peak = baseline
    # Meanwhile another client is served, repeatedly.
    other = login(proc, pg)
    for _ in range(20):
        assert one(other, "select 42") == "42"
        peak = max(peak, proc.rss_bytes())
        time.sleep(0.1)
    other.close()
    assert peak - baseline < 40 * 1024 * 1024, (baseline, peak)
    # The stalled clients finally read everything, intact.
    for conn in stalled:
        received, tail = _drain_until_ready(conn.sock)
        assert tail.endswith(READY_IDLE)
        assert b"SELECT 200000\x00" in tail
        # 200000 DataRows of 1000 bytes (+ 11 bytes of framing each)
        assert received > 200000 * 1011
        peak = max(peak, proc.rss_bytes())
        conn.close()
    assert peak - baseline < 40 * 1024 * 1024, (baseline, peak)


# ---- max_memory_usage -------------------------------------------------------------


def test_max_memory_usage_stays_enforced_after_refusals(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Each refusal must give back exactly what was counted for the client, no more:
    else the budget drifts and the limit stops holding."""
    proc = pooler(general={"max_memory_usage": "1MB"})
    user = pg.md5_user

    def refused(size: int) -> bool:
        conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
        with contextlib.suppress(OSError):
            conn.send_raw(w.parse("big", "select '" + "x" * size + "'") + w.sync())
        try:
            got = conn.wait_closed(timeout=3)
        except TimeoutError:
            conn.close_socket()
            return False  # accepted: the statement ran
        error = w.first_error(got)
        return error is not None and error.sqlstate == "53200"

    for attempt in range(20):
        assert refused(2_000_000), f"accepted at attempt {attempt}"
    # The limit is still 1 MB: 3 MB held whole is still refused.
    assert refused(3_000_000)


# ---- session clients at shutdown and when their pool is retired -------------------


def test_session_clients_are_let_go_at_shutdown_between_transactions(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """README: "Graceful shutdown on SIGINT/SIGTERM (transactions finish, then clients
    get 57P01)"; docs (advisory locks): a pinned client behaves "as a session-mode
    client does ... on shutdown ... it is disconnected (57P01) between transactions"."""
    import signal

    proc = pooler(general={"shutdown_timeout": 60_000}, pools=session_pool(pg, pool_size=2))
    idle, busy = login(proc, pg), login(proc, pg)
    try:
        assert one(idle, "select 1") == "1"
        assert w.msg_types(busy.simple_query("BEGIN")) == "CZ"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        type_, payload = idle.read_message(timeout=10)
        assert type_ == b"E" and w.error_fields(payload)["C"] == "57P01"
        assert time.monotonic() - started < 5
        reply = busy.simple_query("COMMIT")
        assert w.msg_types(reply[:2]) == "CZ"
        rest = reply[2:] or [busy.read_message(timeout=10)]
        assert rest[0][0] == b"E" and w.error_fields(rest[0][1])["C"] == "57P01"
        assert proc.wait_exit(timeout=20) == 0
        assert time.monotonic() - started < 10
    finally:
        idle.close()
        busy.close()


def test_session_client_keeps_a_retired_pool_until_it_disconnects(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """docs/admin.md: clients of a retired pool go after their current transaction
    ("in session mode: when they disconnect")."""
    import copy

    proc = pooler(pools=session_pool(pg, pool_size=2))
    conn = login(proc, pg)
    try:
        pid = one(conn, "select pg_backend_pid()")
        config = copy.deepcopy(proc.config)
        config["pools"][EXAMPLE_DB]["pool_mode"] = "transaction"  # retires the pool
        proc.reload_and_wait(config)
        assert conn.read_available(wait=0.5) == []
        for _ in range(3):
            assert one(conn, "select pg_backend_pid()") == pid
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_server_that_stops_reading_stops_the_client_too(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    """A COPY into a table another session has locked: PostgreSQL reads nothing until
    it gets the lock. The pooler must stop reading the client (RSS bounded), and once
    the lock goes everything arrives."""
    pg.psql(
        "create table if not exists sess_locked(x text); grant all on sess_locked to public",
        database=EXAMPLE_DB,
    )
    pg.psql("truncate sess_locked", database=EXAMPLE_DB)
    proc = pooler(pools=md5_user_pool(pg, pool_size=2, pool_mode=mode))
    user = pg.md5_user
    locker = psycopg.connect(pg.user_dsn(user.name, user.password, EXAMPLE_DB))
    locker.execute("lock table sess_locked in access exclusive mode")
    conn = login(proc, pg)
    baseline = proc.rss_bytes()
    row = ("y" * 999 + "\n").encode()
    chunk = w.copy_data(row * 64)  # 64 KB
    total_chunks = 3000  # ~190 MB
    conn.send_raw(w.query("copy sess_locked from stdin"))
    sent, pending = send_until_stopped(conn.sock, chunk, 3, total_chunks * len(chunk))
    pushed = sent // len(chunk)
    peak = proc.rss_bytes()
    assert sent < 60 * 1024 * 1024, sent  # stopped well before everything went
    assert peak - baseline < 40 * 1024 * 1024, (baseline, peak)
    locker.rollback()
    locker.close()
    conn.sock.setblocking(True)
    conn.sock.settimeout(60)
    conn.sock.sendall(pending)
    for _ in range(total_chunks - pushed - 1):
        conn.sock.sendall(chunk)
    conn.send_raw(w.copy_done())
    reply = conn.read_until_ready(timeout=60)
    assert w.first_error(reply) is None, reply
    assert any(t == b"C" and w.command_tag(p) == f"COPY {total_chunks * 64}" for t, p in reply)
    conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_huge_error_message_is_not_kept_after_it_was_relayed(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    """PostgreSQL quotes the bad value in the error: a 40 MB ErrorResponse. Once it has
    gone to the client the pooler's memory returns close to where it was."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=2, pool_mode=mode))
    conn = login(proc, pg)
    try:
        assert one(conn, "select 1") == "1"
        baseline = proc.rss_bytes()
        reply = conn.simple_query("select repeat('x', 40*1024*1024)::int")
        error = w.first_error(reply)
        assert error is not None and error.sqlstate == "22P02"
        assert len(error.message) > 40 * 1024 * 1024
        del reply, error
        conn.received.clear()
        conn.raw_received.clear()
        assert one(conn, "select 2") == "2"
        time.sleep(0.3)
        after = proc.rss_bytes()
        assert after - baseline < 20 * 1024 * 1024, (baseline, after)
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["transaction"])
def test_locally_answered_queries_to_a_client_that_does_not_read_stay_bounded(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    """pooler_check_query (";") is answered from the pool's cache without a server:
    a client that sends them and never reads must be stopped, as it is when a server
    answers (backpressure), not have every reply buffered."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=2, pool_mode=mode))
    conn = login(proc, pg)
    try:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        assert w.msg_types(conn.simple_query(";")) == "IZ"  # the pool caches the answer
        baseline = proc.rss_bytes()
        block = w.query(";") * 10_000  # 70 KB
        sent, pending = send_until_stopped(conn.sock, block, 8, 14_000_000)
        time.sleep(0.5)
        peak = proc.rss_bytes()
        assert peak - baseline < 20 * 1024 * 1024, (sent, baseline, peak)
        # Once the client reads, every answer arrives, then the next query's.
        conn.sock.setblocking(True)
        conn.sock.settimeout(30)
        received = bytearray()

        def drain() -> None:
            while not received.endswith(b"SELECT 1\x00" + READY_IDLE):
                chunk = conn.sock.recv(1 << 20)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        if len(pending) < len(block):
            conn.sock.sendall(pending)
            sent += len(pending)
        conn.sock.sendall(w.query("select 4242"))
        reader.join(30)
        assert not reader.is_alive(), len(received)
        expected = sent // 7 * 11
        assert received[:expected] == (b"I\x00\x00\x00\x04" + READY_IDLE) * (sent // 7)
        assert b"4242" in received[expected:]
    finally:
        conn.close_socket()
