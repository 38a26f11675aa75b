"""proxy_copy_data_timeout: a client that stops reading inside a large message its
server is relaying is cut off, and the server (stuck inside that message) is closed;
what is timed is the stall, not the transfer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import psycopg

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_rows
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.raw_clients import READY_IDLE, RawClients, read_to_the_end

CUT = "(proxy_copy_data_timeout); closing the client and the server"
# One DataRow of 8 MB: far more than the kernel's socket buffers hold between the pooler
# and a raw client with a small receive buffer that reads nothing, so the pooler is left
# holding the rest of it.
BIG_ROW = "select repeat('x', 8*1024*1024)"
BIG_ROW_BYTES = 8 * 1024 * 1024
# 48 rows of 512 kB each: as much data, in messages below message_size_to_be_stream.
SMALL_ROWS = "select repeat('y', 512*1024) from generate_series(1, 48)"


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def backend_running(pg: ExamplePostgres, sql: str) -> int | None:
    """The pid of the backend running `sql` for the md5 user, None when there is none."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as direct:
        row = direct.execute(
            "select pid from pg_stat_activity where usename = %s and query = %s",
            (pg.md5_user.name, sql),
        ).fetchone()
    return None if row is None else int(row[0])


def pooler_server_pids(proc: PoolerProcess) -> set[int]:
    return {int(str(row["server_process_id"])) for row in admin_rows(proc, "SERVERS")}


def serves(proc: PoolerProcess, pg: ExamplePostgres) -> bool:
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        return conn.execute("select 41 + 1").fetchone() == (42,)


def test_a_client_stalled_inside_a_large_row_is_cut_off_and_its_server_closed(
    pg: ExamplePostgres, pooler: PoolerFactory, raw: RawClients
) -> None:
    proc = pooler(general={"proxy_copy_data_timeout": "2s"}, pools=md5_user_pool(pg, pool_size=2))
    stalled = raw.send_and_stop_reading(proc, pg, BIG_ROW)
    assert wait_for(lambda: backend_running(pg, BIG_ROW) is not None)
    pid = backend_running(pg, BIG_ROW)
    assert pid in pooler_server_pids(proc)
    assert serves(proc, pg)  # the pool's other server
    proc.wait_for_log(CUT)
    assert "a 8388619-byte message" in proc.log_text()  # the DataRow, header included
    # Its connection is dropped inside the row: never the whole of it, nor a reply after.
    got = read_to_the_end(stalled.sock)
    assert len(got) < BIG_ROW_BYTES and not got.endswith(READY_IDLE)
    # The server went with it: out of the pool and gone from PostgreSQL.
    assert wait_for(lambda: pid not in pooler_server_pids(proc))
    assert wait_for(lambda: backend_running(pg, BIG_ROW) is None)
    assert serves(proc, pg)


def test_the_stall_is_timed_not_the_transfer_nor_small_messages(
    pg: ExamplePostgres, pooler: PoolerFactory, raw: RawClients
) -> None:
    """Of three clients that read slowly or not at all, only the one that stops inside
    a message of at least message_size_to_be_stream is cut off: a reader that keeps
    taking bytes gets its whole row, however long the row takes, and one that stops
    inside a smaller message keeps its connection."""
    proc = pooler(
        general={"proxy_copy_data_timeout": "2s", "message_size_to_be_stream": "4MB"},
        pools=md5_user_pool(pg, pool_size=3),
    )
    small = raw.send_and_stop_reading(proc, pg, SMALL_ROWS)
    stalled = raw.send_and_stop_reading(proc, pg, BIG_ROW)
    slow = raw.login(proc, pg, 128 * 1024)
    slow.send_raw(w.query(BIG_ROW))
    # Reads of 128 kB with pauses shorter than the timeout: several times the timeout
    # in all.
    got = read_to_the_end(slow.sock, pause=0.15, size=128 * 1024)
    assert got.endswith(READY_IDLE) and b"SELECT 1\x00" in got
    assert len(got) > BIG_ROW_BYTES
    proc.wait_for_log(CUT)
    assert proc.log_text().count(CUT) == 1
    assert not read_to_the_end(stalled.sock).endswith(READY_IDLE)
    # The client inside smaller rows has read nothing all this time either, and keeps
    # its connection: it reads all its rows now.
    got = read_to_the_end(small.sock)
    assert got.endswith(READY_IDLE) and b"SELECT 48\x00" in got
    assert len(got) > 48 * 512 * 1024
    assert w.rows(small.simple_query("select 7")) == [("7",)]


def test_zero_disables_it_and_a_reload_applies_to_later_stalls(
    pg: ExamplePostgres, pooler: PoolerFactory, raw: RawClients
) -> None:
    config = pooler.config(
        general={"proxy_copy_data_timeout": 0}, pools=md5_user_pool(pg, pool_size=3)
    )
    proc = pooler(config)
    untimed = raw.send_and_stop_reading(proc, pg, BIG_ROW)
    assert wait_for(lambda: backend_running(pg, BIG_ROW) is not None)
    # Its server stays held; the pool's other servers keep serving.
    assert serves(proc, pg)
    config["general"]["proxy_copy_data_timeout"] = "1s"
    proc.reload_and_wait(config)
    timed = raw.send_and_stop_reading(proc, pg, BIG_ROW)
    proc.wait_for_log(CUT)
    assert not read_to_the_end(timed.sock).endswith(READY_IDLE)
    assert serves(proc, pg)
    # The first client stalled longer, from before the reload: it still gets its row.
    got = read_to_the_end(untimed.sock)
    assert got.endswith(READY_IDLE) and len(got) > BIG_ROW_BYTES
    assert proc.log_text().count(CUT) == 1


def test_an_asyncpg_client_whose_event_loop_is_blocked_is_cut_off(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A driver stops reading when its program does: here an asyncio program that
    blocks its event loop while the row arrives. Once it runs again, it finds the
    connection gone rather than waiting on a server that never finishes. (The row is
    larger than the 8 MB elsewhere: the kernel grows an unread socket's receive buffer
    to several MB on its own.)"""
    proc = pooler(general={"proxy_copy_data_timeout": "1s"}, pools=md5_user_pool(pg, pool_size=2))
    user = pg.md5_user

    async def main() -> Exception | None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            fetch = asyncio.ensure_future(conn.fetchval("select repeat('x', 64*1024*1024)"))
            await asyncio.sleep(0.1)  # the query has gone out
            proc.wait_for_log(CUT)  # blocks the event loop: the row is not read
            try:
                await fetch
            except Exception as exc:
                return exc
            return None
        finally:
            conn.terminate()

    failure = asyncio.run(main())
    assert isinstance(failure, asyncpg.exceptions.ConnectionDoesNotExistError), failure
    assert serves(proc, pg)
