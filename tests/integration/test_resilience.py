"""COPY, large results, cancel, dead backends and PostgreSQL restarts."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.cancel import cancel_midway
from helpers.pooler import PoolerFactory, PoolerProcess


def connect(pg: ExamplePostgres, proc: PoolerProcess, **kwargs: object) -> psycopg.Connection:
    user = pg.md5_user
    return psycopg.connect(proc.dsn(user.name, user.password), **kwargs)  # type: ignore[arg-type]


def test_copy_in_and_out(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with connect(pg, proc) as conn:
        conn.execute("create temp table c(id int, t text)")
        with conn.cursor().copy("copy c from stdin") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i}"))
        totals = conn.execute("select count(*), sum(id) from c").fetchone()
        assert totals == (5000, sum(range(5000)))
        out = io.BytesIO()
        with conn.cursor().copy("copy (select * from c order by id) to stdout") as copy:
            for chunk in copy:
                out.write(chunk)
        lines = out.getvalue().decode().splitlines()
        assert len(lines) == 5000 and lines[42] == "42\trow 42"
        conn.commit()
        # An error inside COPY IN leaves the session usable.
        with (
            pytest.raises(psycopg.errors.InvalidTextRepresentation),
            conn.cursor().copy("copy c from stdin") as copy,
        ):
            copy.write(b"not-a-number\tx\n")
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)


def test_asyncpg_copy(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.scram_user

    async def main() -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password), statement_cache_size=0)
        try:
            await conn.execute("create temp table ac(x int)")
            await conn.copy_records_to_table("ac", records=[(i,) for i in range(1000)])
            assert await conn.fetchval("select sum(x) from ac") == sum(range(1000))
            buf = io.BytesIO()
            await conn.copy_from_query("select x from ac order by x", output=buf)
            assert buf.getvalue().decode().splitlines()[:3] == ["0", "1", "2"]
        finally:
            await conn.close()

    asyncio.run(main())


@pytest.mark.slow
def test_large_result_slow_reader_keeps_rss_bounded(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """100 MB through a client that reads slowly: backpressure, no buffering of the result."""
    proc = pooler()
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    baseline = proc.rss_bytes()
    conn.send_raw(w.query("select repeat('x', 1000000) from generate_series(1, 100)"))
    received = 0
    peak = baseline
    deadline = time.monotonic() + 120
    done = False
    while not done and time.monotonic() < deadline:
        chunk = conn.sock.recv(256 * 1024)
        if not chunk:
            break
        received += len(chunk)
        if chunk.endswith(b"Z\x00\x00\x00\x05I"):
            done = True
        peak = max(peak, proc.rss_bytes())
        time.sleep(0.002)  # a slow reader
    conn.close()
    assert done and received > 100_000_000
    # The pooler holds at most a few socket buffers' worth, not the 100 MB result.
    assert peak - baseline < 30 * 1024 * 1024, (baseline, peak)


def test_large_single_row_streams(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with connect(pg, proc, autocommit=True) as conn:
        value = conn.execute("select repeat('ab', 3000000)").fetchone()[0]
        assert len(value) == 6_000_000
        big = "y" * 5_000_000
        assert conn.execute("select length(%s)", (big,)).fetchone() == (5_000_000,)


def test_cancel_pg_sleep(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with connect(pg, proc, autocommit=True) as conn:
        assert cancel_midway(conn) < 10
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_of_idle_client_does_nothing(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})
    user = pg.md5_user
    idle = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    assert idle.backend_pid is not None and idle.secret_key is not None
    with connect(pg, proc, autocommit=True) as busy:
        # The idle client holds no server: its cancel must not reach busy's query.
        args = (proc.host, proc.port, idle.backend_pid, idle.secret_key)
        timer = threading.Timer(0.3, w.cancel, args)
        timer.start()
        assert busy.execute("select 5 from pg_sleep(1)").fetchone() == (5,)
        timer.join()
    # Wrong secret for a busy client: ignored as well.
    idle.close()


def test_cancel_of_a_queued_query_answers_it_and_keeps_the_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client waiting for a server gets 57014 for its queued request, as if PostgreSQL
    had canceled it, and stays usable; the server holder is not touched."""
    proc = pooler(
        general={"query_wait_timeout": 30_000},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}},
    )
    user = pg.md5_user
    with connect(pg, proc) as holder:
        holder.execute("select 1")  # holds the only server in its transaction
        queued = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
        assert queued.backend_pid is not None and queued.secret_key is not None
        # Simple protocol, then an extended batch, each canceled while queued.
        for request in (
            w.query("select 7"),
            w.parse("", "select $1::int", [23]) + w.bind("", "", ["8"]) + w.execute() + w.sync(),
        ):
            queued.send_raw(request)
            assert queued.read_available(0.3) == []
            w.cancel(proc.host, proc.port, queued.backend_pid, queued.secret_key)
            got = queued.read_until_ready()
            error = w.first_error(got)
            assert error is not None and error.sqlstate == "57014"
            assert [t for t, _ in got] == [b"E", b"Z"] and queued.status == "I"
        # Still queued behind the holder, then served once it commits.
        queued.send_raw(w.query("select 9"))
        assert queued.read_available(0.3) == []
        holder.commit()
        assert w.rows(queued.read_until_ready()) == [("9",)]
        assert holder.execute("select 2").fetchone() == (2,)
        queued.close()


def test_backend_killed_mid_transaction(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with connect(pg, proc) as victim, connect(pg, proc, autocommit=True) as bystander:
        pid = victim.execute("select pg_backend_pid()").fetchone()[0]
        pg.psql(f"select pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        victim.close()  # not the exit's COMMIT on a connection the pooler closed
        assert bystander.execute("select 1").fetchone() == (1,)
    with connect(pg, proc, autocommit=True) as later:
        assert later.execute("select 2").fetchone() == (2,)


def test_idle_server_killed_is_replaced(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})
    with connect(pg, proc, autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        pg.psql(f"select pg_terminate_backend({pid})")
        time.sleep(0.3)
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid


def test_postgres_restart_recovery(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with connect(pg, proc, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    pg.restart()
    # Idle servers died with PostgreSQL; new transactions get fresh ones.
    for _ in range(3):
        with connect(pg, proc, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_postgres_down_gives_clear_error_then_recovers(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(general={"query_wait_timeout": 1000, "connect_timeout": 500})
    with connect(pg, proc, autocommit=True) as conn:
        conn.execute("select 1")
    pg.kill()
    try:
        with (
            pytest.raises(psycopg.OperationalError) as info,
            connect(pg, proc, autocommit=True) as conn,
        ):
            conn.execute("select 1")
        assert "server" in str(info.value) or "query_wait_timeout" in str(info.value)
    finally:
        pg.start()
    with connect(pg, proc, autocommit=True) as conn:
        assert conn.execute("select 3").fetchone() == (3,)


def test_graceful_shutdown_lets_transaction_finish(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    import signal

    proc = pooler()
    with connect(pg, proc) as conn:
        conn.execute("select 1")  # transaction open
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert conn.execute("select 2").fetchone() == (2,)
        conn.commit()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 3")
        # Closed here, not by the block's exit: a FATAL that arrived as the answer to
        # "select 3" may leave libpq unaware yet that the socket is gone, and the exit's
        # COMMIT would fail on it.
        conn.close()
    assert proc.wait_exit() == 0


def test_backend_dying_while_client_idles_in_transaction(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The slot is freed at once, without waiting for the idle client to speak."""
    user = pg.md5_user
    proc = pooler(
        general={"query_wait_timeout": 3000},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 1}]}},
    )
    idle = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    idle.execute_query("begin")
    pid = int(idle.execute_query("select pg_backend_pid()")[0][0] or 0)
    pg.psql(f"select pg_terminate_backend({pid})")
    # The client learns about it without sending anything ...
    received = idle.wait_closed()
    codes = [w.error_fields(p).get("C") for t, p in received if t == b"E"]
    assert codes == ["57P01"], received
    # ... and the only server slot serves someone else right away.
    started = time.monotonic()
    with connect(pg, proc, autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)
    assert time.monotonic() - started < 2


def test_a_reload_signal_as_soon_as_the_port_accepts_is_handled(pooler: PoolerFactory) -> None:
    """An orchestrator may signal the pooler the moment its port answers a probe: the
    handlers are in place before the pooler listens, so SIGHUP reloads rather than
    killing the process with the signal's default action."""
    import signal
    import socket

    proc = pooler(start=False)
    proc.spawn()
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((proc.host, proc.port), timeout=1).close()
            break
        except OSError:
            assert proc.running, proc.log_tail()
            assert time.monotonic() < deadline, "the pooler never listened"
            time.sleep(0.001)
    proc.send_signal(signal.SIGHUP)
    proc.wait_for_log("configuration reloaded")
    assert proc.running


def test_sighup_with_a_broken_file_keeps_serving(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    import signal

    proc = pooler()
    proc.send_signal(signal.SIGHUP)
    proc.wait_for_log("configuration reloaded")
    proc.config_path.write_text("[general\nport = ", encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    proc.wait_for_log("reload failed, the old configuration stays")
    with connect(pg, proc, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def goodbye_during_a_query(pg: ExamplePostgres, host: str, port: int) -> list[w.Message]:
    """What a client gets whose backend pg_terminate_backend ends inside a query."""
    user = pg.md5_user
    victim = w.PgWire.connect(host, port, user.name, "example_db", user.password)
    pid = int(victim.execute_query("select pg_backend_pid()")[0][0] or 0)
    victim.send_raw(w.query("select pg_sleep(10)"))
    assert victim.read_available(0.2) == []
    pg.psql(f"select pg_terminate_backend({pid})")
    return victim.wait_closed()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_a_terminated_server_s_goodbye_is_all_its_client_gets(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    """PostgreSQL's FATAL says why the session ended, and the client gets it alone, as
    from PostgreSQL: no error of the pooler's behind it, which drivers that keep the
    last error (asyncpg) would report instead. The pooler's 08006 is for a server that
    vanished without a word."""
    direct = goodbye_during_a_query(pg, pg.host, pg.port)
    proc = pooler(pools={"example_db": {"pool_mode": mode}})
    pooled = goodbye_during_a_query(pg, proc.host, proc.port)
    # The query's RowDescription (PostgreSQL sends it as the query starts), the FATAL.
    assert [t for t, _ in direct] == [b"T", b"E"], direct
    assert pooled == direct
    assert w.error_fields(pooled[-1][1])["C"] == "57P01"
    proc.wait_for_log("its server closed the connection after a FATAL error")
    with connect(pg, proc, autocommit=True) as later:
        assert later.execute("select 1").fetchone() == (1,)
