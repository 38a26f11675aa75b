"""Stopping the pooler with signals: graceful, immediate, and signals during a stop."""

from __future__ import annotations

import os
import signal
import socket
import time

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import process_alive

WORKERS = 2
# PostgreSQL's log lines for a client that went away without a Terminate message.
UNCLEAN_CLOSE = ("unexpected EOF on client connection", "could not receive data from client")


def start(pooler: PoolerFactory, *, workers: int = 1, shutdown_timeout: int) -> PoolerProcess:
    general: dict[str, object] = {"shutdown_timeout": shutdown_timeout}
    if workers > 1:
        general["workers"] = workers
    proc = pooler(general=general)
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    return proc


def login(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)


def in_transaction(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    """A client inside a transaction that wrote (it holds an xid on its server)."""
    client = login(proc, pg)
    assert w.msg_types(client.simple_query("BEGIN")) == "CZ"
    assert client.execute_query("select txid_current() > 0") == [("t",)]
    return client


def errors_of(messages: list[w.Message]) -> list[tuple[str, str]]:
    return [(w.error_fields(p)["C"], w.error_fields(p)["M"]) for t, p in messages if t == b"E"]


def pg_log_size(pg: ExamplePostgres) -> int:
    return pg.log_path.stat().st_size


def pg_log_since(pg: ExamplePostgres, offset: int) -> str:
    with open(pg.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def assert_servers_closed_cleanly(pg: ExamplePostgres, log_offset: int) -> None:
    """No backend of the pooler's user is left, and none saw its client vanish."""
    user = pg.md5_user.name
    sql = f"select count(*) from pg_stat_activity where usename = '{user}'"
    deadline = time.monotonic() + 10
    while pg.psql(sql).strip() != "0":
        assert time.monotonic() < deadline, "servers left open"
        time.sleep(0.05)
    logged = pg_log_since(pg, log_offset)
    assert not any(text in logged for text in UNCLEAN_CLOSE), logged


def refused(proc: PoolerProcess) -> bool:
    try:
        socket.create_connection((proc.host, proc.port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def worker_pids(proc: PoolerProcess) -> list[int]:
    assert proc.pid is not None
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("workers", [1, WORKERS])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_lets_transactions_finish_then_exits(
    pg: ExamplePostgres, pooler: PoolerFactory, signum: int, workers: int
) -> None:
    """SIGTERM and SIGINT both stop gracefully: idle clients are told at once, new
    connections are refused (the listener is closed), a running transaction goes on
    until it ends and its client is then told 57P01; servers get a Terminate."""
    proc = start(pooler, workers=workers, shutdown_timeout=60_000)
    offset = pg_log_size(pg)
    busy = in_transaction(proc, pg)
    idle = login(proc, pg)
    assert idle.execute_query("select 1") == [("1",)]
    proc.send_signal(signum)
    # Every process that holds one of the two clients drains (with workers, the two
    # clients are on different workers: each new one goes to the least loaded).
    deadline = time.monotonic() + 10
    while proc.log_text().count("waiting up to") < workers:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    assert errors_of(idle.wait_closed()) == [("57P01", "pooler is shutting down")]
    assert refused(proc)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proc.dsn(pg.md5_user.name, pg.md5_user.password), connect_timeout=5)
    assert busy.execute_query("select 2") == [("2",)]
    reply = busy.simple_query("COMMIT")
    assert w.msg_types(reply[:2]) == "CZ"
    assert errors_of(reply[2:] + busy.wait_closed()) == [("57P01", "pooler is shut down now")]
    assert proc.wait_exit(30) == 0
    assert_servers_closed_cleanly(pg, offset)


@pytest.mark.parametrize("workers", [1, WORKERS])
@pytest.mark.parametrize(
    "first, second",
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGQUIT),
    ],
)
def test_a_second_signal_stops_at_once_and_cleanly(
    pg: ExamplePostgres, pooler: PoolerFactory, first: int, second: int, workers: int
) -> None:
    """A second SIGTERM/SIGINT during a graceful stop, or SIGQUIT, stops at once
    (PgBouncer's rule): the transaction still running is rolled back, its client is
    told 57P01, and the servers are closed with a Terminate; exit code 1."""
    proc = start(pooler, workers=workers, shutdown_timeout=60_000)
    offset = pg_log_size(pg)
    busy = in_transaction(proc, pg)
    proc.send_signal(first)
    proc.wait_for_log("waiting up to")  # the transaction holds the stop
    proc.send_signal(second)
    closed = busy.wait_closed(timeout=20)
    assert errors_of(closed) == [("57P01", "pooler is shutting down")]
    assert proc.wait_exit(20) == 1
    assert_servers_closed_cleanly(pg, offset)


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_sigquit_stops_at_once(pg: ExamplePostgres, pooler: PoolerFactory, workers: int) -> None:
    proc = start(pooler, workers=workers, shutdown_timeout=60_000)
    offset = pg_log_size(pg)
    busy = in_transaction(proc, pg)
    proc.send_signal(signal.SIGQUIT)
    assert errors_of(busy.wait_closed(timeout=20)) == [("57P01", "pooler is shutting down")]
    assert proc.wait_exit(20) == 1
    assert_servers_closed_cleanly(pg, offset)


@pytest.mark.parametrize("workers", [1, WORKERS])
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2])
def test_reload_and_upgrade_signals_during_a_stop_change_nothing(
    pg: ExamplePostgres, pooler: PoolerFactory, signum: int, workers: int
) -> None:
    """During a graceful stop, SIGHUP does not reload (a pool it would retire must not
    change what the running transaction's client is told) and SIGUSR2 does not start
    a new process: the stop goes on and nothing listens afterwards."""
    proc = start(pooler, workers=workers, shutdown_timeout=60_000)
    busy = in_transaction(proc, pg)
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_log("waiting up to")
    config = proc.config
    config["pools"][EXAMPLE_DB]["pool_mode"] = "session"  # a reload would retire the pool
    proc.write_config(config)
    proc.send_signal(signum)
    proc.wait_for_log("SIGHUP ignored: " if signum == signal.SIGHUP else "no upgrade")
    reply = busy.simple_query("COMMIT")
    assert w.msg_types(reply[:2]) == "CZ"
    assert errors_of(reply[2:] + busy.wait_closed()) == [("57P01", "pooler is shut down now")]
    assert proc.wait_exit(30) == 0
    assert "configuration reloaded" not in proc.log_text().split("waiting up to", 1)[1]
    assert refused(proc)


def test_a_worker_killed_during_a_stop_is_not_restarted(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pooler, workers=WORKERS, shutdown_timeout=60_000)
    busy = in_transaction(proc, pg)
    pids = worker_pids(proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_log("waiting up to")  # the busy client's worker drains
    for pid in pids:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    busy.wait_closed(timeout=20)
    assert proc.wait_exit(20) == 0
    assert "starting a new one" not in proc.log_text()


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_a_transaction_still_open_at_shutdown_timeout_is_cut_cleanly(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """The stop waits for transactions up to shutdown_timeout, not longer: then the
    client is told 57P01, its server gets a Terminate (PostgreSQL rolls back, and
    sees no vanished client), and the pooler exits 0."""
    proc = start(pooler, workers=workers, shutdown_timeout=2000)
    offset = pg_log_size(pg)
    busy = in_transaction(proc, pg)
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_log("waiting up to")
    assert busy.execute_query("select 2") == [("2",)]  # it goes on meanwhile
    assert errors_of(busy.wait_closed(timeout=20)) == [("57P01", "pooler is shutting down")]
    assert proc.wait_exit(20) == 0
    assert_servers_closed_cleanly(pg, offset)
