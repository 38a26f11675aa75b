"""max_db_connections under load: a user whose clients wait longest gets the next
server of the database, and a lowered limit is reached while clients keep queueing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from test_db_connections import backends, connect

from helpers import ExamplePostgres
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess, deep_merge


def waiting(proc: PoolerProcess, user: str) -> int:
    row = next(r for r in admin_rows(proc, "POOLS") if r["user"] == user)
    return int(row["cl_waiting"] or 0)


def wait_until_waiting(proc: PoolerProcess, user: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while waiting(proc, user) != count:
        assert time.monotonic() < deadline, f"{user}: never {count} waiting"
        time.sleep(0.02)


def run_in_thread(
    conn: psycopg.Connection[Any], sql: str, finished: list[str], name: str
) -> threading.Thread:
    def run() -> None:
        try:
            conn.execute(sql).fetchone()
            finished.append(name)
        except Exception as exc:  # the test inspects it
            finished.append(f"{name}: {exc!r}")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@contextlib.contextmanager
def busy_md5_clients(
    proc: PoolerProcess, pg: ExamplePostgres, count: int, sql: str
) -> Iterator[list[BaseException]]:
    """`count` md5 clients running `sql` in a loop until the block ends; yields the
    list their errors go to."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            with connect(proc, pg, "md5") as conn:
                while not stop.is_set():
                    conn.execute(sql)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=busy) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield errors
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_the_user_waiting_longest_gets_the_next_server_of_the_database(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """One server for the database, held by the md5 user; a SCRAM client queues, then
    another md5 client. The server released next goes to the SCRAM client, which
    started waiting first, not to the md5 user's own queue."""
    proc = pooler(
        general={"query_wait_timeout": 20_000},
        pools={
            "example_db": {
                "users": [
                    {"username": pg.md5_user.name, "pool_size": 5},
                    {"username": pg.scram_user.name, "pool_size": 5},
                ],
                "max_db_connections": 1,
                "min_connection_lifetime": 0,
            }
        },
    )
    holder, later_md5, scram = (connect(proc, pg, w) for w in ("md5", "md5", "scram"))
    finished: list[str] = []
    try:
        holder.execute("begin")
        holder.execute("select 1")
        scram_thread = run_in_thread(scram, "select 1", finished, "scram")
        wait_until_waiting(proc, pg.scram_user.name, 1)
        md5_thread = run_in_thread(later_md5, "select pg_sleep(1)", finished, "md5")
        wait_until_waiting(proc, pg.md5_user.name, 1)
        holder.execute("commit")
        scram_thread.join(15)
        md5_thread.join(15)
        assert finished == ["scram", "md5"]
        assert len(backends(pg, pg.md5_user.name, pg.scram_user.name)) <= 1
    finally:
        for conn in (holder, later_md5, scram):
            conn.close()


def test_a_busy_user_does_not_starve_another_at_the_limit(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Eight md5 clients keep the md5 user's queue full on the database's two servers;
    a SCRAM client's queries are still served, and PostgreSQL never sees more than two
    backends of the two users."""
    proc = pooler(
        general={"query_wait_timeout": 3_000},
        pools={
            "example_db": {
                "users": [
                    {"username": pg.md5_user.name, "pool_size": 8},
                    {"username": pg.scram_user.name, "pool_size": 8},
                ],
                "max_db_connections": 2,
                "min_connection_lifetime": 0,
            }
        },
    )
    names = (pg.md5_user.name, pg.scram_user.name)
    scram = connect(proc, pg, "scram")
    scram.execute("select 1")  # logged in (its login borrows a server)
    most = 0
    try:
        with busy_md5_clients(proc, pg, 8, "select pg_sleep(0.02)") as errors:
            wait_until_waiting(proc, pg.md5_user.name, 6)
            for _ in range(5):
                assert scram.execute("select 1").fetchone() == (1,)
                most = max(most, len(backends(pg, *names)))
    finally:
        scram.close()
    assert errors == []
    assert most <= 2


def test_a_lowered_limit_is_reached_while_clients_keep_queueing(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """max_db_connections lowered from 4 to 2 while six clients keep the queue full:
    servers over the new limit close as they are released instead of going on to the
    queued clients, and no client sees an error."""
    proc = pooler(
        general={"query_wait_timeout": 10_000, "scaling_warm_pool_ratio": 100},
        pools={
            "example_db": {
                "users": [{"username": pg.md5_user.name, "pool_size": 4}],
                "max_db_connections": 4,
                "min_connection_lifetime": 0,
            }
        },
    )
    user = pg.md5_user.name
    with busy_md5_clients(proc, pg, 6, "select pg_sleep(0.2)") as errors:
        deadline = time.monotonic() + 10
        while len(backends(pg, user)) < 4:
            assert time.monotonic() < deadline, backends(pg, user)
            time.sleep(0.02)
        proc.reload_and_wait(
            deep_merge(proc.config, {"pools": {"example_db": {"max_db_connections": 2}}})
        )
        deadline = time.monotonic() + 5
        while len(backends(pg, user)) > 2:
            assert time.monotonic() < deadline, backends(pg, user)
            time.sleep(0.05)
        (row,) = admin_rows(proc, "POOL_COORDINATOR")
        assert row["current"] == "2"
    assert errors == []
