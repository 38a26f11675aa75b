"""Binary upgrade: SIGUSR2 (or UPGRADE) starts a new process on the same listening
sockets; the old one stops accepting and drains."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console
from helpers.pooler import PoolerFactory, PoolerProcess

SUCCESSOR = re.compile(r"upgrade: new process (\d+) serves")


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
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
    return True


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
        stop, errors = threading.Event(), []
        hammer = threading.Thread(target=keep_connecting, args=(proc, dsn, stop, errors))
        hammer.start()
        try:
            new_pid = upgrade(proc, successors)
            assert new_pid != proc.pid
            # The old process drains: the idle session is cut at once...
            deadline = time.monotonic() + 10
            with pytest.raises(psycopg.OperationalError):
                while time.monotonic() < deadline:
                    idle.execute("select 1")
                    time.sleep(0.05)
            # ...the transaction finishes, then its session is cut.
            busy.execute("select 2")
            busy.commit()
            assert proc.wait_exit() == 0
        finally:
            stop.set()
            hammer.join()
            busy.close()
            idle.close()
        assert errors == []
        # The new process serves TCP and the Unix socket.
        assert server_pid(proc, dsn) > 0
        assert server_pid(proc, unix_dsn) > 0
        assert _alive(new_pid)


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
    assert _alive(new_pid)
    # The new process can be upgraded in turn.
    os.kill(new_pid, signal.SIGUSR2)
    deadline = time.monotonic() + 40
    while _alive(new_pid):
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    third = [int(p) for p in SUCCESSOR.findall(proc.log_text())][-1]
    successors.append(third)
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
