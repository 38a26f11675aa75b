"""Servers that PostgreSQL closes while they wait idle in the pool.

PostgreSQL says goodbye to an idle server (a fast shutdown, pg_terminate_backend, its
idle_session_timeout) and closes it. When the pooler is busy, that goodbye may still
be unread when a client's request arrives: the server must not be handed out then,
or a request that never reached PostgreSQL fails with "server connection lost".
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory, PoolerProcess

CLIENTS = 4


def backend_pids(pg: ExamplePostgres, user: str) -> list[int]:
    out = pg.psql(f"select pid from pg_stat_activity where usename = '{user}'")
    return [int(line) for line in out.split()]


def wait_until_gone(pg: ExamplePostgres, user: str) -> None:
    deadline = time.monotonic() + 20
    while backend_pids(pg, user):
        assert time.monotonic() < deadline, "PostgreSQL kept the servers open"
        time.sleep(0.05)


def terminate(pg: ExamplePostgres, user: str) -> None:
    pg.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{user}'")


def time_out(pg: ExamplePostgres, user: str) -> None:
    pass  # the servers' idle_session_timeout closes them


@pytest.mark.parametrize(
    ("idle_session_timeout", "close_servers"),
    [("", terminate), ("1s", time_out)],
    ids=["pg_terminate_backend", "idle_session_timeout"],
)
def test_a_server_closed_while_the_pooler_was_busy_is_not_handed_out(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    idle_session_timeout: str,
    close_servers: Callable[[ExamplePostgres, str], None],
) -> None:
    user = pg.md5_user
    if idle_session_timeout:
        pg.psql(f"alter role {user.name} set idle_session_timeout = '{idle_session_timeout}'")
    try:
        proc = pooler(
            pools={"example_db": {"users": [{"username": user.name, "pool_size": CLIENTS}]}}
        )
        run_while_frozen(pg, proc, close_servers)
    finally:
        if idle_session_timeout:
            pg.psql(f"alter role {user.name} reset idle_session_timeout")


def run_while_frozen(
    pg: ExamplePostgres,
    proc: PoolerProcess,
    close_servers: Callable[[ExamplePostgres, str], None],
) -> None:
    user = pg.md5_user
    conns = [
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) for _ in range(CLIENTS)
    ]
    try:
        # Every server of the pool opened, used and idle: the clients hold none.
        barrier = threading.Barrier(CLIENTS)

        def use_one(conn: psycopg.Connection) -> None:
            conn.execute("select pg_sleep(0.2)")
            barrier.wait(10)
            conn.execute("select 1")

        warmers = [threading.Thread(target=use_one, args=(c,)) for c in conns]
        for thread in warmers:
            thread.start()
        for thread in warmers:
            thread.join(30)
        assert len(backend_pids(pg, user.name)) == CLIENTS

        results: list[object] = []

        def query(conn: psycopg.Connection, n: int) -> None:
            try:
                results.append(conn.execute("select %s::int", (n,)).fetchone())
            except psycopg.Error as exc:
                results.append(f"{exc.sqlstate}: {exc}")

        # The pooler is frozen: the clients' requests reach it first, then PostgreSQL
        # closes every idle server; it reads both when it wakes up.
        proc.send_signal(signal.SIGSTOP)
        try:
            queries = [threading.Thread(target=query, args=(c, n)) for n, c in enumerate(conns)]
            for thread in queries:
                thread.start()
            time.sleep(0.2)  # the requests are in the pooler's socket buffers
            close_servers(pg, user.name)
            wait_until_gone(pg, user.name)
        finally:
            proc.send_signal(signal.SIGCONT)
        for thread in queries:
            thread.join(30)
        # Each request ran on a new server, none on a closed one.
        assert sorted(results, key=str) == [(n,) for n in range(CLIENTS)], proc.log_text()[-3000:]
    finally:
        for conn in conns:
            conn.close()
