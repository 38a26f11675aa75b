"""Binary upgrade: SIGUSR2 (or UPGRADE) starts a new process on the same listening
sockets; the old one stops accepting, hands its clients over and drains."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pg8000.dbapi
import psutil
import psycopg
import pytest
import trustme

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.cancel import cancel_midway
from helpers.column_change import AS_INT, AS_REAL, SELECT_V, new_table, to_real
from helpers.console import admin_console
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import process_alive

SUCCESSOR = re.compile(r"upgrade: new process (\d+) serves")
MOVED = re.compile(r"upgrade: (\d+) clients moved to the new process")


@pytest.fixture
def successors() -> Iterator[list[int]]:
    """PIDs of the processes upgrades started: stopped at teardown (the test's pooler
    fixture only knows the process it started)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for pid in pids:
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def upgrade(proc: PoolerProcess, successors: list[int], *, by_console: bool = False) -> int:
    """Trigger an upgrade and return the new process's PID once it serves."""
    before = len(SUCCESSOR.findall(proc.log_text()))
    if by_console:
        console = admin_console(proc)
        try:
            rows = w.rows(console.simple_query("UPGRADE"))
            assert rows == [("t",)]
        finally:
            console.close()
    else:
        proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 40
    while len(found := SUCCESSOR.findall(proc.log_text())) == before:
        assert time.monotonic() < deadline, f"no new process; log:\n{proc.log_tail()}"
        assert proc.running, f"the old process died; log:\n{proc.log_tail()}"
        time.sleep(0.05)
    pid = int(found[-1])
    successors.append(pid)
    return pid


def upgrade_successor(proc: PoolerProcess, pid: int, successors: list[int]) -> int:
    """Upgrade `pid`, a process an earlier upgrade started (`proc` is the first one,
    whose log they all share): once `pid` has exited, the PID of the one after it."""
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 40
    while process_alive(pid):
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    newest = int(SUCCESSOR.findall(proc.log_text())[-1])
    successors.append(newest)
    return newest


def server_pid(proc: PoolerProcess, dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])


def keep_connecting(
    proc: PoolerProcess, dsn: str, stop: threading.Event, errors: list[str]
) -> None:
    """Connect and query in a loop: a refused or failed connection is an error; a
    session the old process's drain cuts is not."""
    while not stop.is_set():
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            # A login the drain cuts is told why (57P01); a refusal is an error.
            if "shut" not in str(exc):
                errors.append(str(exc))
            continue
        try:
            conn.execute("select 1")
        except psycopg.OperationalError:
            # Cut by the drain. Its 57P01 is usually read, but a query sent just as the
            # old process closes the session is answered by a TCP reset, and the client
            # then sees only "server closed the connection unexpectedly".
            pass
        except psycopg.Error as exc:
            errors.append(str(exc))
        finally:
            conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_hands_over_without_refusing_anyone(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], workers: int
) -> None:
    user = pg.md5_user
    with tempfile.TemporaryDirectory(prefix="pgd-up-") as sockdir:
        proc = pooler(
            general={
                "workers": workers,
                "unix_socket_dir": sockdir,
                "pg_hba": "local all all md5\nhost all all 127.0.0.1/32 md5\n",
            }
        )
        dsn = proc.dsn(user.name, user.password)
        unix_dsn = (
            f"host={sockdir} port={proc.port} dbname=example_db "
            f"user={user.name} password={user.password}"
        )
        busy = psycopg.connect(dsn)  # in a transaction across the upgrade
        busy.execute("select 1")
        idle = psycopg.connect(dsn, autocommit=True)
        idle.execute("select 1")
        on_unix = psycopg.connect(unix_dsn, autocommit=True)
        on_unix.execute("select 1")
        stop, errors = threading.Event(), []
        hammer = threading.Thread(target=keep_connecting, args=(proc, dsn, stop, errors))
        hammer.start()
        try:
            new_pid = upgrade(proc, successors)
            assert new_pid != proc.pid
            # Both sessions move to the new process: the idle one at once, the other
            # once its transaction has finished on the old process.
            busy.execute("select 2")
            busy.commit()
            assert proc.wait_exit() == 0
            assert idle.execute("select 1").fetchone() == (1,)
            assert on_unix.execute("select 4").fetchone() == (4,)
            assert busy.execute("select 3").fetchone() == (3,)
            busy.commit()
        finally:
            stop.set()
            hammer.join()
            busy.close()
            idle.close()
            on_unix.close()
        assert errors == []
        # The new process serves TCP and the Unix socket.
        assert server_pid(proc, dsn) > 0
        assert server_pid(proc, unix_dsn) > 0
        assert process_alive(new_pid)


def test_an_invalid_config_cancels_the_upgrade(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    proc = pooler()
    good = proc.config_path.read_text()
    proc.config_path.write_text(good + "\n[general.oops\n")
    proc.send_signal(signal.SIGUSR2)
    proc.wait_for_log("upgrade cancelled, this process serves on", timeout=30)
    assert "invalid configuration" in proc.log_text()
    assert proc.running
    user = pg.md5_user
    assert server_pid(proc, proc.dsn(user.name, user.password)) > 0
    # Fixed, the next upgrade goes through.
    proc.config_path.write_text(good)
    upgrade(proc, successors)
    assert proc.wait_exit() == 0


def test_upgrade_from_the_admin_console(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    proc = pooler()
    new_pid = upgrade(proc, successors, by_console=True)
    assert proc.wait_exit() == 0
    user = pg.md5_user
    assert server_pid(proc, proc.dsn(user.name, user.password)) > 0
    assert process_alive(new_pid)
    # The new process can be upgraded in turn.
    third = upgrade_successor(proc, new_pid, successors)
    assert third != new_pid
    assert server_pid(proc, proc.dsn(user.name, user.password)) > 0


def test_systemd_is_told_about_readiness_and_the_new_main_process(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(30)
    try:
        proc = pooler(env={"NOTIFY_SOCKET": path})
        assert notify.recv(4096) == b"READY=1"
        new_pid = upgrade(proc, successors)
        got = {notify.recv(4096), notify.recv(4096)}
        assert got == {b"READY=1", f"MAINPID={new_pid}".encode()}
        assert proc.wait_exit() == 0
    finally:
        notify.close()


def test_a_worker_ignores_sigusr2(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Only the supervisor upgrades; a worker sent SIGUSR2 says so and serves on (the
    default action would have killed it)."""
    proc = pooler(general={"workers": 2})
    proc.wait_for_log("all 2 workers ready")
    assert proc.pid is not None
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGUSR2)
    proc.wait_for_log("SIGUSR2: only the process started from the command line upgrades")
    assert all(worker.is_running() and worker.status() != "zombie" for worker in workers)
    user = pg.md5_user
    for _ in range(4):
        assert server_pid(proc, proc.dsn(user.name, user.password)) > 0
    assert SUCCESSOR.search(proc.log_text()) is None


def show(proc: PoolerProcess, what: str) -> list[dict[str, str | None]]:
    """Rows of an admin SHOW command, by column name."""
    console = admin_console(proc)
    try:
        reply = console.simple_query(f"SHOW {what}")
    finally:
        console.close()
    names = next(w.row_description(payload) for type_, payload in reply if type_ == b"T")
    return [dict(zip(names, row, strict=True)) for row in w.rows(reply)]


def moved_count(proc: PoolerProcess) -> int:
    """Clients the old process (each of its workers) handed over, from its log."""
    return sum(int(n) for n in MOVED.findall(proc.log_text()))


@pytest.mark.parametrize(
    ("workers_before", "workers_after"),
    [(1, 1), (2, 2), (1, 2), (2, 1)],
    ids=["one-process", "two-workers", "to-workers", "from-workers"],
)
def test_clients_move_to_the_new_process_with_their_sessions(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    successors: list[int],
    workers_before: int,
    workers_after: int,
) -> None:
    """The same connections go on in the new process: cancel key, startup parameters,
    prepared statements, and the SCRAM passthrough login its servers need; with one
    process or several workers on either side."""
    proc = pooler(general={"workers": workers_before})
    if workers_after != workers_before:
        config = proc.config
        config["general"]["workers"] = workers_after
        proc.write_config(config)
    user = pg.scram_user  # passthrough: the pool logs in with the client's ClientKey
    dsn = proc.dsn(user.name, user.password)
    options = "-c statement_timeout=4321"
    idle = psycopg.connect(dsn, autocommit=True, application_name="mover", options=options)
    busy = psycopg.connect(dsn, application_name="busy")
    try:
        assert idle.execute("select %s::int + 1", [1], prepare=True).fetchone() == (2,)
        # A reported setting it changed follows it (PostgreSQL 18 reports search_path).
        follows = idle.info.parameter_status("search_path") is not None
        idle.execute("set search_path to pg_catalog, public")
        key = idle.pgconn.backend_pid
        busy.execute("select 1")  # a transaction open across the upgrade
        old_pid = proc.pid
        new_pid = upgrade(proc, successors)
        busy.execute("select 2")
        busy.commit()
        assert proc.wait_exit() == 0
        assert moved_count(proc) == 2
        # The new process writes this once it reads the end of the hand-over channel,
        # which the old one closes on its way out: maybe after the old one has exited.
        proc.wait_for_log("upgrade: 2 clients came from the previous process")
        # The prepared statement is known by its name: psycopg sends only Bind now.
        assert idle.execute("select %s::int + 1", [41], prepare=True).fetchone() == (42,)
        assert idle.execute("show statement_timeout").fetchone() == ("4321ms",)
        if follows:
            assert idle.execute("show search_path").fetchone() == ("pg_catalog, public",)
        assert busy.execute("select 3").fetchone() == (3,)
        busy.commit()
        clients = {row["application_name"]: row for row in show(proc, "CLIENTS")}
        assert clients["mover"]["client_id"] is not None
        assert {"mover", "busy"} <= set(clients)
        # A cancel request with the key the client got from the old process.
        assert idle.pgconn.backend_pid == key
        assert cancel_midway(idle) < 15
        assert idle.execute("select 7").fetchone() == (7,)
        # With workers the two sessions went to different ones, whatever worker their
        # ids name: each cancel request still finds its session.
        cancel_midway(busy)
        busy.rollback()
        assert not process_alive(old_pid or 0) and process_alive(new_pid)
    finally:
        idle.close()
        busy.close()


def test_a_client_the_new_process_cannot_place_is_told_to_reconnect(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    proc = pooler()
    gone, stays = pg.scram_user, pg.md5_user
    leaving = psycopg.connect(proc.dsn(gone.name, gone.password), autocommit=True)
    staying = psycopg.connect(proc.dsn(stays.name, stays.password), autocommit=True)
    try:
        leaving.execute("select 1")
        staying.execute("select 1")
        # The new process's config has no pool for the first user.
        config = proc.config
        pool = config["pools"]["example_db"]
        pool["users"] = [u for u in pool["users"] if u["username"] != gone.name]
        proc.write_config(config)
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        with pytest.raises(psycopg.OperationalError, match="the pooler was upgraded; reconnect"):
            leaving.execute("select 1")
        assert staying.execute("select 2").fetchone() == (2,)
        assert f'no pool for database "example_db" and user "{gone.name}"' in proc.log_text()
    finally:
        leaving.close()
        staying.close()


def test_tls_and_session_pooled_clients_stay_and_are_told_to_reconnect(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], tmp_path: Path
) -> None:
    """A TLS session's encryption state lives in the old process, and a session-pooled
    client holds its server there: both are disconnected as before; a plain
    transaction-pooled client beside them moves."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    tls_user, session_user, plain_user = pg.scram_user, pg.md5_user, pg.trust_user
    proc = pooler(
        general={
            "tls_certificate": str(cert_path),
            "tls_private_key": str(key_path),
            "shutdown_timeout": 1000,
        },
        pools={"example_db": {"users": [{"username": session_user.name, "pool_mode": "session"}]}},
    )
    tls_dsn = (
        f"host={proc.host} port={proc.port} dbname=example_db user={tls_user.name} "
        f"password={tls_user.password} sslmode=require"
    )
    over_tls = psycopg.connect(tls_dsn, autocommit=True)
    session = psycopg.connect(proc.dsn(session_user.name, session_user.password), autocommit=True)
    plain = psycopg.connect(proc.dsn(plain_user.name), autocommit=True)
    try:
        for conn in (over_tls, session, plain):
            conn.execute("select 1")
        assert over_tls.pgconn.ssl_in_use
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        for conn in (over_tls, session):
            with pytest.raises(psycopg.OperationalError, match="pooler is shut"):
                conn.execute("select 1")
        assert plain.execute("select 2").fetchone() == (2,)
        assert moved_count(proc) == 1
    finally:
        for conn in (over_tls, session, plain):
            conn.close()


@pytest.mark.parametrize(
    ("setting", "statement"),
    [
        ("pin_on_listen", "LISTEN doorman_upgrade"),
        ("listen_fanout", "LISTEN doorman_upgrade"),
        ("pin_on_advisory_lock", "select pg_advisory_lock(77)"),
    ],
)
def test_a_client_that_listens_stays_and_is_told_to_reconnect(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    successors: list[int],
    setting: str,
    statement: str,
) -> None:
    """A client that ran LISTEN with pin_on_listen (its LISTENs live on the server it
    holds) or listen_fanout (on the pool's listening server), or holds an advisory lock
    (on the server it holds), is disconnected at once (it is between transactions), not
    moved without them; a client beside it that did neither moves."""
    listener_user, plain_user = pg.md5_user, pg.trust_user
    proc = pooler(general={"shutdown_timeout": 60_000}, pools={"example_db": {setting: True}})
    listener = psycopg.connect(
        proc.dsn(listener_user.name, listener_user.password), autocommit=True
    )
    plain = psycopg.connect(proc.dsn(plain_user.name), autocommit=True)
    try:
        listener.execute(statement)
        assert listener.execute("select 1").fetchone() == (1,)  # after the lock check
        plain.execute("select 1")
        started = time.monotonic()
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        assert time.monotonic() - started < 30  # not the 60 s shutdown_timeout
        with pytest.raises(psycopg.OperationalError, match="pooler is shut"):
            listener.execute("select 1")
        assert plain.execute("select 2").fetchone() == (2,)
        assert moved_count(proc) == 1
    finally:
        listener.close()
        plain.close()


def test_a_session_too_large_to_move_is_told_to_reconnect(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """Prepared statements beyond what one hand-over message holds: that client is
    disconnected as before, a small session beside it moves."""
    proc = pooler()
    user = pg.md5_user
    heavy = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    light = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    try:
        padding = "x" * 2000
        for n in range(120):  # about 240 kB of statement text
            row = heavy.execute(f"select {n} as n, '{padding}' as pad", prepare=True).fetchone()
            assert row is not None and row[0] == n
        light.execute("select 1", prepare=True)
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        with pytest.raises(psycopg.OperationalError, match="pooler is shut"):
            heavy.execute("select 1")
        assert light.execute("select 1", prepare=True).fetchone() == (1,)
        assert "is too large to move" in proc.log_text()
    finally:
        heavy.close()
        light.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_query_running_on_the_old_process_can_be_canceled(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], workers: int
) -> None:
    """The new process owns the port, so the cancel request reaches it; it passes the
    request back to the old process, where the query runs. The client then moves."""
    proc = pooler(general={"workers": workers})
    user = pg.md5_user
    conn = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(30)")
        except BaseException as exc:
            errors.append(exc)

    try:
        conn.execute("select 1")
        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        time.sleep(0.3)
        upgrade(proc, successors)
        started = time.monotonic()
        conn.cancel()
        sleeper.join(20)
        assert not sleeper.is_alive()
        assert time.monotonic() - started < 15
        assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.QueryCanceled)
        assert proc.wait_exit() == 0
        assert conn.execute("select 2").fetchone() == (2,)
        assert moved_count(proc) == 1
        assert "to the previous process" in proc.log_text()
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_cancel_passed_to_the_old_process_keeps_its_connection_until_delivered(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], workers: int
) -> None:
    """PostgreSQL closes a cancel connection only after it signalled the backend, and
    drivers send their next query once it closes. So the new process holds the cancel
    connection open until the old process has delivered the request: while the old
    process is stopped (SIGSTOP) nothing comes back on it, and once it runs again the
    connection closes and the query is canceled."""
    proc = pooler(general={"workers": workers})
    user = pg.md5_user
    client = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    old = psutil.Process(proc.pid)
    stopped: list[psutil.Process] = []
    try:
        assert client.backend_pid is not None and client.secret_key is not None
        client.send_raw(w.query("select pg_sleep(30)"))
        time.sleep(0.3)
        new_pid = upgrade(proc, successors)
        # The old process and its workers; the new process is its child too.
        for process in [old, *(child for child in old.children() if child.pid != new_pid)]:
            try:
                process.suspend()
            except psutil.NoSuchProcess:
                continue  # an old worker without clients drained and exited meanwhile
            stopped.append(process)
        assert stopped and stopped[0] is old
        cancel = socket.create_connection((proc.host, proc.port), timeout=10)
        try:
            cancel.sendall(w.cancel_request(client.backend_pid, client.secret_key))
            cancel.settimeout(1.0)
            with pytest.raises(TimeoutError):
                cancel.recv(1)  # still open: the old process has not acted
            # Children first: an old worker that had drained and exited is a zombie
            # until its parent runs again and reaps it.
            for process in reversed(stopped):
                process.resume()
            stopped = []
            cancel.settimeout(10)
            assert cancel.recv(1) == b""  # closed once the old process delivered it
        finally:
            cancel.close()
        reply = client.read_until_ready(timeout=10)
        error = w.first_error(reply)
        assert error is not None and error.sqlstate == "57014", w.msg_types(reply)
        assert proc.wait_exit() == 0
        client.send_raw(w.query("select 2"))
        assert w.rows(client.read_until_ready()) == [("2",)]
    finally:
        for process in reversed(stopped):
            with contextlib.suppress(psutil.Error):
                process.resume()
        client.close_socket()


def test_hundreds_of_idle_clients_move_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """More sessions than the hand-over channel holds at a time: those that find it
    full go a moment later, and every one of them goes on in the new process."""
    proc = pooler(general={"max_connections": 1000})
    user = pg.trust_user
    conns = [psycopg.connect(proc.dsn(user.name), autocommit=True) for _ in range(300)]
    try:
        for n, conn in enumerate(conns):
            assert conn.execute("select %s::int", [n], prepare=True).fetchone() == (n,)
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        assert moved_count(proc) == 300
        for n, conn in enumerate(conns):
            assert conn.execute("select %s::int", [n], prepare=True).fetchone() == (n,)
    finally:
        for conn in conns:
            conn.close()


def test_a_client_queued_for_a_server_moves_with_its_query(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """Its query has reached no server yet: it goes with the session and runs in the
    new process, while the transaction that held the only server ends on the old one."""
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})
    user = pg.md5_user
    holder = psycopg.connect(proc.dsn(user.name, user.password))
    queued = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    answers: list[object] = []

    def wait_in_queue() -> None:
        try:
            answers.append(queued.execute("select 'queued'").fetchone())
        except BaseException as exc:
            answers.append(exc)

    try:
        holder.execute("select 1")  # holds the pool's one server
        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        deadline = time.monotonic() + 10
        while not any(r["state"] == "waiting" for r in show(proc, "CLIENTS")):
            assert time.monotonic() < deadline, "the second client never queued"
            time.sleep(0.05)
        upgrade(proc, successors)
        waiter.join(20)
        assert answers == [("queued",)]
        holder.commit()
        assert proc.wait_exit() == 0
        assert moved_count(proc) == 2
        assert holder.execute("select 2").fetchone() == (2,)
        holder.commit()
    finally:
        holder.close()
        queued.close()


def test_a_session_moves_again_at_the_next_upgrade(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """A process that took clients over hands them on in turn, with what it was given."""
    proc = pooler()
    user = pg.scram_user
    conn = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    try:
        assert conn.execute("select %s::int * 2", [2], prepare=True).fetchone() == (4,)
        second = upgrade(proc, successors)
        assert proc.wait_exit() == 0
        assert conn.execute("select %s::int * 2", [3], prepare=True).fetchone() == (6,)
        upgrade_successor(proc, second, successors)
        assert len(SUCCESSOR.findall(proc.log_text())) == 2
        assert conn.execute("select %s::int * 2", [4], prepare=True).fetchone() == (8,)
        assert moved_count(proc) == 2
    finally:
        conn.close()


def test_asyncpg_and_pg8000_sessions_move_with_their_statements(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """asyncpg binds its cached statements (__asyncpg_stmt_N__) and a prepared-statement
    object by name after the move; pg8000 (the unnamed statement) goes on as well."""
    proc = pooler()
    user = pg.scram_user

    async def main() -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        conn8 = pg8000.dbapi.connect(
            user=user.name,
            password=user.password,
            host=proc.host,
            port=proc.port,
            database="example_db",
        )
        try:
            query = "select count(*) from items where id > $1"
            assert await conn.fetchval(query, 90) == 10
            statement = await conn.prepare("select max(id) from items where id < $1")
            assert await statement.fetchval(50) == 49
            cur8 = conn8.cursor()
            cur8.execute("select count(*) from items where id <= %s", (5,))
            assert cur8.fetchone() == [5]
            conn8.commit()
            await asyncio.to_thread(upgrade, proc, successors)
            assert await asyncio.to_thread(proc.wait_exit) == 0
            assert moved_count(proc) == 2
            assert await conn.fetchval(query, 95) == 5
            assert await statement.fetchval(10) == 9
            cur8.execute("select count(*) from items where id <= %s", (7,))
            assert cur8.fetchone() == [7]
            conn8.commit()
        finally:
            await conn.close()
            conn8.close()

    asyncio.run(main())


@pytest.mark.parametrize("parsed_here_first", [False, True], ids=["alone", "parsed-here-first"])
def test_a_statement_whose_columns_changed_before_the_upgrade_is_refused_after_it(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], parsed_here_first: bool
) -> None:
    """The new process knows the result columns the client prepared its statement
    with: a column type changed before the upgrade gets PostgreSQL's 0A000 after it,
    as directly, whether the new process first parses the text for this client or
    already has it from another. Before, the new process took the columns the text
    gave when it parsed it, and asyncpg read the float's bytes as an int."""
    user = pg.scram_user
    proc = pooler()

    async def directly() -> type[BaseException]:
        conn = await asyncpg.connect(pg.user_dsn(user))
        try:
            statement = await conn.prepare(SELECT_V)
            assert await statement.fetchval(1) == AS_INT
            to_real(pg)
            with pytest.raises(asyncpg.PostgresError) as refused:
                await statement.fetchval(1)
            return type(refused.value)
        finally:
            await conn.close()

    async def pooled() -> type[BaseException]:
        dsn = proc.dsn(user.name, user.password)
        conn = await asyncpg.connect(dsn)
        try:
            statement = await conn.prepare(SELECT_V)
            assert await statement.fetchval(1) == AS_INT
            to_real(pg)
            await asyncio.to_thread(upgrade, proc, successors)
            assert await asyncio.to_thread(proc.wait_exit) == 0
            assert moved_count(proc) == 1
            if parsed_here_first:
                other = await asyncpg.connect(dsn)
                try:
                    assert await other.fetchval(SELECT_V, 1) == AS_REAL
                finally:
                    await other.close()
            with pytest.raises(asyncpg.PostgresError) as refused:
                await statement.fetchval(1)
            assert refused.value.sqlstate == "0A000"
            # Prepared again, it reads the new column.
            assert await (await conn.prepare(SELECT_V)).fetchval(1) == AS_REAL
            assert await conn.fetchval(SELECT_V, 1) == AS_REAL
            return type(refused.value)
        finally:
            await conn.close()

    new_table(pg)
    expected = asyncio.run(directly())
    assert expected is asyncpg.exceptions.InvalidCachedStatementError
    new_table(pg)
    assert asyncio.run(pooled()) is expected


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_lock_taken_in_the_transaction_that_spans_the_upgrade_is_not_lost_silently(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """pin_on_advisory_lock (the default): a client holding a session-level advisory
    lock must not move without it (docs/admin.md: such clients are disconnected). Here
    the lock is taken in the transaction that is running when the upgrade starts: when
    that transaction ends, the client either keeps its lock or is told 57P01 -- never
    moved to the new process with the lock silently released."""
    proc = pooler(general={"shutdown_timeout": 20_000})
    user = pg.md5_user
    locker = psycopg.connect(proc.dsn(user.name, user.password))  # not autocommit
    direct = psycopg.connect(pg.user_dsn(user), autocommit=True)
    try:
        assert locker.execute("select pg_advisory_lock(4242)").fetchone() == ("",)
        upgrade(proc, successors)
        locker.commit()  # the transaction ends on the old process
        assert proc.wait_exit() == 0
        try:
            locker.execute("select 1")
        except psycopg.OperationalError as exc:
            # The 57P01 is read, or (tcp_so_linger = 0) lost to the reset that follows.
            assert "shut" in str(exc) or "closed the connection" in str(exc), exc
            assert "stays (advisory locks)" in proc.log_text()
            return  # told to reconnect: correct
        # It moved: then its lock must still be held.
        taken = direct.execute("select pg_try_advisory_lock(4242)").fetchone()
        assert taken == (False,), (
            "the client moved to the new process, but its session-level advisory lock"
            " was released; it was not told"
        )
    finally:
        locker.close()
        direct.close()


def _big_session(conn: psycopg.Connection[tuple[object, ...]], statements: int) -> None:
    padding = "y" * 3000
    for n in range(statements):
        row = conn.execute(f"select {n} as n, '{padding}' as pad", prepare=True).fetchone()
        assert row is not None and row[0] == n


@pytest.mark.parametrize("busy", [True, False], ids=["workers-busy", "burst"])
def test_sessions_moving_into_busy_workers_are_not_dropped(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int], busy: bool
) -> None:
    """Upgrade to two workers. The clients' transactions end while the new workers are
    busy (stopped for a moment here): the new supervisor must hold the arriving sessions
    until a worker takes them, not disconnect them because the workers' channels are
    full (`burst`: idle sessions that all move at once, workers not stopped). Each
    session carries ~150 kB of prepared statements (below the 192 KiB that
    one hand-over message holds)."""
    proc = pooler(
        general={"workers": 1, "shutdown_timeout": 30_000},
        pools={"example_db": {"users": [{"username": pg.trust_user.name, "pool_size": 20}]}},
    )
    config = proc.config
    config["general"]["workers"] = 2
    proc.write_config(config)
    user = pg.trust_user
    conns = [psycopg.connect(proc.dsn(user.name)) for _ in range(8)]
    stopped: list[psutil.Process] = []
    try:
        for conn in conns:
            _big_session(conn, 35)
            conn.commit()
            if busy:
                conn.execute("select 1")  # a transaction open across the upgrade
        new_pid = upgrade(proc, successors)
        if not busy:
            assert proc.wait_exit() == 0
            conns_ok = _still_there(conns)
            assert conns_ok == [], f"{len(conns_ok)} of {len(conns)} dropped: {conns_ok[0]}"
            return
        stopped = [psutil.Process(pid) for pid in children_of(new_pid)]
        assert len(stopped) == 2
        for process in stopped:
            process.suspend()
        for conn in conns:
            conn.commit()  # each session now moves
        time.sleep(1.0)
        for process in stopped:
            process.resume()
        stopped = []
        assert proc.wait_exit() == 0
        lost = _still_there(conns)
        assert lost == [], f"{len(lost)} of {len(conns)} sessions dropped: {lost[0]}"
    finally:
        for process in stopped:
            with contextlib.suppress(psutil.Error):
                process.resume()
        for conn in conns:
            conn.close()


def _still_there(conns: list[psycopg.Connection[tuple[object, ...]]]) -> list[str]:
    """The errors of the sessions that did not go on."""
    lost = []
    for n, conn in enumerate(conns):
        try:
            assert conn.execute("select %s::int", [n]).fetchone() == (n,)
            conn.commit()
        except psycopg.OperationalError as exc:
            lost.append(str(exc).strip())
    return lost


def test_a_client_in_copy_and_one_in_a_pipeline_move_after_they_finish(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """A COPY FROM STDIN in progress and an extended-protocol pipeline whose Sync has
    not been sent yet when the upgrade starts: both finish on the old process with
    every reply, once, and go on in the new one."""
    proc = pooler()
    user = pg.md5_user
    copier = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    piper = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    try:
        copier.send_raw(w.query("begin; create temp table c (x int); copy c from stdin"))
        got = copier.read_until(b"G")
        assert w.first_error(got) is None, got
        copier.send_raw(w.copy_data("1\n2\n"))
        piper.send_raw(
            w.parse("s1", "select $1::int + 1") + w.bind("", "s1", ["1"]) + w.execute()
            + w.flush()
        )  # fmt: skip
        early = piper.read_until(b"D")
        assert w.msg_types(early) == "12D"
        upgrade(proc, successors)
        copier.send_raw(w.copy_data("3\n") + w.copy_done())
        assert w.msg_types(copier.read_until(b"Z")) == "CZ"
        piper.send_raw(w.bind("", "s1", ["41"]) + w.execute() + w.sync())
        rest = piper.read_until_ready()
        assert w.msg_types(rest) == "C2DCZ", w.msg_types(rest)
        assert w.rows(rest) == [("42",)]
        assert w.rows(copier.simple_query("select count(*) from c")) == [("3",)]
        assert w.msg_types(copier.simple_query("commit")) == "CZ"
        assert proc.wait_exit() == 0
        assert sum(int(n) for n in MOVED.findall(proc.log_text())) == 2
        piper.send_raw(w.bind("", "s1", ["9"]) + w.execute() + w.sync())
        assert w.rows(piper.read_until_ready()) == [("10",)]
        assert w.rows(copier.simple_query("select 5")) == [("5",)]
    finally:
        copier.close_socket()
        piper.close_socket()


def test_a_new_process_that_fails_to_start_leaves_the_old_one_serving(
    pg: ExamplePostgres, pooler: PoolerFactory, successors: list[int]
) -> None:
    """The config passes `-t`, but the new process cannot start (its metrics port is
    taken by someone else): the old process says why and serves on; fixed, the next
    upgrade goes through."""
    proc = pooler()
    user = pg.md5_user
    idle = psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)
    blocker = socket.socket()
    try:
        idle.execute("select 1")
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        good = copy.deepcopy(proc.config)
        broken = copy.deepcopy(proc.config)
        broken["web"] = {"enabled": True, "host": "127.0.0.1", "port": blocker.getsockname()[1]}
        proc.write_config(broken)
        proc.send_signal(signal.SIGUSR2)
        proc.wait_for_log("this process serves on", timeout=40)
        assert "exited with 1" in proc.log_text(), proc.log_tail()
        assert proc.running
        assert idle.execute("select 2").fetchone() == (2,)
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as fresh:
            assert fresh.execute("select 3").fetchone() == (3,)
        proc.write_config(good)
        upgrade(proc, successors)
        assert proc.wait_exit() == 0
        assert idle.execute("select 4").fetchone() == (4,)
    finally:
        blocker.close()
        idle.close()
