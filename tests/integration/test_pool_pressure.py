"""Pool pressure: how many servers a pool opens at once (scaling_max_parallel_creates),
and how a queued client above the warm threshold first waits for a server to come back
(scaling_warm_pool_ratio). Servers are counted where PostgreSQL sees them."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from helpers import ExamplePostgres
from helpers.console import admin_rows
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.sockets import pump
from pg_doorman.app.embedded_pg import free_port


class SlowConnects:
    """A TCP forwarder to PostgreSQL that waits `delay` before connecting each accepted
    connection upstream, and records how many were waiting at once: the server
    connections the pooler was opening at the same time."""

    def __init__(self, port: int, delay: float) -> None:
        self.upstream = port
        self.delay = delay
        self.lock = threading.Lock()
        self.opening = 0
        self.most_opening = 0
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            self.accepted += 1
            self.opening += 1
            self.most_opening = max(self.most_opening, self.opening)
        time.sleep(self.delay)
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        finally:
            with self.lock:
                self.opening -= 1
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def connect(proc: PoolerProcess, pg: ExamplePostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(proc.dsn(pg.md5_user.name, pg.md5_user.password), autocommit=True)


def pid_of(conn: psycopg.Connection[Any], sql: str = "select pg_backend_pid()") -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def scaling_row(proc: PoolerProcess, pg: ExamplePostgres) -> dict[str, str | None]:
    (row,) = [r for r in admin_rows(proc, "POOL_SCALING") if r["user"] == pg.md5_user.name]
    return row


def test_at_most_scaling_max_parallel_creates_servers_open_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    slow = SlowConnects(pg.port, delay=0.3)
    web = free_port()
    try:
        proc = pooler(
            general={"scaling_max_parallel_creates": 2, "scaling_warm_pool_ratio": 100},
            web={"enabled": True, "host": "127.0.0.1", "port": web},
            pools={
                "example_db": {
                    "server_port": slow.port,
                    "users": [{"username": pg.md5_user.name, "pool_size": 8}],
                }
            },
        )
        conns = [connect(proc, pg) for _ in range(6)]
        pids: list[int] = []
        try:
            start = threading.Barrier(len(conns))

            def hold(conn: psycopg.Connection[Any]) -> None:
                start.wait()
                conn.execute("begin")
                pids.append(pid_of(conn))

            threads = [threading.Thread(target=hold, args=(c,)) for c in conns]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            # Six transactions at once, each on its own server, opened two at a time.
            assert len(set(pids)) == 6, pids
            assert slow.most_opening == 2
            row = scaling_row(proc, pg)
            assert row["inflight"] == "0"
            assert int(row["creates"] or 0) == slow.accepted == 6
            assert int(row["gate_waits"] or 0) >= 1
            families = scrape(web)
            labels = {"user": pg.md5_user.name, "database": "example_db"}
            total = families["pg_doorman_pool_scaling"]
            name = "pg_doorman_pool_scaling_total"
            assert value(total, name, type="creates_started", **labels) == 6
            assert value(total, name, type="burst_gate_waits", **labels) >= 1
            gauge = "pg_doorman_pool_scaling"
            assert value(total, gauge, type="inflight_creates", **labels) == 0
        finally:
            for conn in conns:
                conn.close()
    finally:
        slow.close()


def pressure_pool(pg: ExamplePostgres, pooler: PoolerFactory) -> PoolerProcess:
    """pool_size 5 and scaling_warm_pool_ratio 20: above one server, a queued client
    first waits for one to come back. Transactions of 0.3 s are timed over one stats
    period, so that the patience (twice the p99, at most 0.5 s) is 0.4 to 0.6 s."""
    proc = pooler(
        general={"scaling_warm_pool_ratio": 20, "query_wait_timeout": 10_000},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 5}]}},
    )
    with connect(proc, pg) as conn:
        for _ in range(3):
            conn.execute("select pg_sleep(0.3)")
    deadline = time.monotonic() + 20
    while not any(
        r["avg_xact_time"] not in (None, "0") and r["user"] == pg.md5_user.name
        for r in admin_rows(proc, "POOLS")
    ):
        assert time.monotonic() < deadline, "no stats period closed"
        time.sleep(0.2)
    return proc


def queued(proc: PoolerProcess, pg: ExamplePostgres) -> bool:
    return any(
        r["cl_waiting"] == "1" for r in admin_rows(proc, "POOLS") if r["user"] == pg.md5_user.name
    )


@contextlib.contextmanager
def one_server_held(
    proc: PoolerProcess, pg: ExamplePostgres
) -> Iterator[tuple[psycopg.Connection[Any], psycopg.Connection[Any], int]]:
    """A client in a transaction on the pool's one server (its backend pid given), and
    another client, both closed afterwards."""
    holder, waiter = connect(proc, pg), connect(proc, pg)
    try:
        holder.execute("begin")
        yield holder, waiter, pid_of(holder)
    finally:
        holder.close()
        waiter.close()


def test_a_queued_client_gets_the_server_that_comes_back_instead_of_a_new_one(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pressure_pool(pg, pooler)
    with one_server_held(proc, pg) as (holder, waiter, held):
        got: list[int] = []
        thread = threading.Thread(target=lambda: got.append(pid_of(waiter)))
        thread.start()
        deadline = time.monotonic() + 5
        while not queued(proc, pg):
            assert time.monotonic() < deadline, "the client did not queue"
            time.sleep(0.01)
        holder.execute("commit")
        thread.join(10)
        assert got == [held]
        row = scaling_row(proc, pg)
        assert row["create_fallback"] == "0"
        assert int(row["antic_notify"] or 0) >= 1
        assert int(row["creates"] or 0) == 1


def test_a_queued_client_gets_a_new_server_when_its_patience_runs_out(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pressure_pool(pg, pooler)
    with one_server_held(proc, pg) as (holder, waiter, held):
        started = time.monotonic()
        other = pid_of(waiter)
        waited = time.monotonic() - started
        assert other != held
        assert waited >= 0.35  # its patience, 0.4 s at the least, less the clock's slack
        row = scaling_row(proc, pg)
        assert row["create_fallback"] == "1"
        assert int(row["antic_timeout"] or 0) >= 1
        assert int(row["creates"] or 0) == 2
        holder.execute("commit")


def test_with_no_server_out_a_queued_client_does_not_wait_for_one_to_come_back(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """pool_size 2 at 20 % is a warm threshold of 0: still, the first server opens at
    once, since nothing could come back."""
    proc = pooler(
        general={"scaling_warm_pool_ratio": 20},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 2}]}},
    )
    with connect(proc, pg) as conn:
        pid_of(conn)
    row = scaling_row(proc, pg)
    assert (row["creates"], row["create_fallback"], row["antic_timeout"]) == ("1", "0", "0")


def test_a_pool_that_starts_under_load_grows_before_its_first_stats_period(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """24 clients on a fresh pool of 20 (warm threshold 4) run 5 ms transactions: each
    waits about 25 ms in the queue, less than the 100 ms patience of a pool that has not
    timed its transactions, more than twice their p99. The pool estimates that p99 from
    its first transactions and opens servers beyond the threshold within seconds, not
    only once its first stats period (15 s) has closed."""
    proc = pooler(
        general={"scaling_warm_pool_ratio": 20},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 20}]}},
    )
    conns = [connect(proc, pg) for _ in range(24)]
    start = threading.Barrier(len(conns))
    done = threading.Event()

    def load(conn: psycopg.Connection[Any]) -> None:
        start.wait()
        while not done.is_set():
            conn.execute("select pg_sleep(0.005)")

    threads = [threading.Thread(target=load, args=(c,)) for c in conns]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 4
        while int(scaling_row(proc, pg)["creates"] or 0) <= 4:
            assert time.monotonic() < deadline, scaling_row(proc, pg)
            time.sleep(0.1)
        row = scaling_row(proc, pg)
        assert int(row["antic_timeout"] or 0) >= 1
        # Still within the first stats period: the estimate, not a closed period, did it.
        assert not any(
            r["avg_xact_time"] not in (None, "0")
            for r in admin_rows(proc, "POOLS")
            if r["user"] == pg.md5_user.name
        )
    finally:
        done.set()
        for thread in threads:
            thread.join(10)
        for conn in conns:
            conn.close()
