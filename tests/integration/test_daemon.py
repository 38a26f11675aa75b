"""Daemon mode (`-d`, general.daemon_pid_file) and logging to syslog
(general.syslog_prog_name), with the real command and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.pooler import SRC_DIR, PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import process_alive

LAUNCH_TIMEOUT = 60.0
SYSLOG_ENV = "PG_DOORMAN_SYSLOG_SOCKET"


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


class Daemons:
    """Launches `pg_doorman -d`; every daemon it saw is stopped at teardown."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.pid_files: set[Path] = set()

    def launch(
        self, proc: PoolerProcess, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.pid_files.add(pid_file_of(proc))
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC_DIR), full_env.get("PYTHONPATH", "")) if p
        )
        try:
            return subprocess.run(
                [*proc.command(), "-d", *extra],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=proc.workdir,
                env=full_env,
                timeout=LAUNCH_TIMEOUT,
            )
        finally:
            self.note(proc)

    def note(self, proc: PoolerProcess) -> int | None:
        """The PID the daemon's file names now (remembered for the teardown)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file_of(proc).read_text())
            self.pids.add(pid)
            return pid
        return None

    def stop_all(self) -> None:
        for path in self.pid_files:
            with contextlib.suppress(OSError, ValueError):
                self.pids.add(int(path.read_text()))
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for pid in self.pids:
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    launched = Daemons()
    try:
        yield launched
    finally:
        launched.stop_all()


@pytest.fixture
def syslog_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for /dev/log (in a short directory: a Unix socket
    path has a length limit)."""
    directory = tempfile.mkdtemp(prefix="pgd-log-")
    path = os.path.join(directory, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def pid_file_of(proc: PoolerProcess) -> Path:
    return Path(proc.config["general"]["daemon_pid_file"])


def daemon_config(pooler: PoolerFactory, tmp_path: Path, **general: object) -> PoolerProcess:
    return pooler(
        start=False, general={"daemon_pid_file": str(tmp_path / "pg_doorman.pid"), **general}
    )


def query_through(proc: PoolerProcess, pg: ExamplePostgres) -> int:
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), autocommit=True, connect_timeout=10
    ) as conn:
        row = conn.execute("select count(*) from items").fetchone()
    assert row is not None
    return int(row[0])


def receive_until(sock: socket.socket, text: str) -> list[str]:
    """Datagrams up to and including the first that contains `text`."""
    lines: list[str] = []
    while True:
        line = sock.recv(65536).decode()
        lines.append(line)
        if text in line:
            return lines


def test_a_daemon_detaches_serves_and_removes_its_pid_file_on_sigterm(
    pg: ExamplePostgres, pooler: PoolerFactory, daemons: Daemons, tmp_path: Path
) -> None:
    proc = daemon_config(pooler, tmp_path)
    # A PID file left by a daemon that was killed: replaced.
    stale = subprocess.Popen(["true"])
    stale.wait()
    pid_file_of(proc).write_text(f"{stale.pid}\n")

    launched = daemons.launch(proc)
    assert launched.returncode == 0, launched.stderr
    # Before it detached, the command said that the log goes nowhere without syslog.
    assert "syslog_prog_name" in launched.stderr
    pid = int(pid_file_of(proc).read_text())
    assert pid != stale.pid and process_alive(pid)
    # Detached: its own session, no longer a child of anything the command left.
    assert os.getsid(pid) != os.getsid(0)
    assert oct(os.stat(pid_file_of(proc)).st_mode & 0o777) == oct(0o640)  # umask 027
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"-d" in f.read().split(b"\0")
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.devnull

    assert query_through(proc, pg) == 100

    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    assert not pid_file_of(proc).exists()


def test_startup_errors_of_a_daemon_reach_the_terminal(
    pooler: PoolerFactory, daemons: Daemons, tmp_path: Path
) -> None:
    proc = daemon_config(pooler, tmp_path)
    proc.config["general"]["max_connections"] = 0
    proc.write_config()
    launched = daemons.launch(proc)
    assert launched.returncode == 2
    assert "invalid configuration: general.max_connections" in launched.stderr
    assert not pid_file_of(proc).exists()

    # Past the config: the port is taken. The daemon has forked by then; the command
    # still reports its error and exit code, and no PID file stays behind.
    proc.config["general"]["max_connections"] = 100
    proc.write_config()
    with socket.socket() as taken:
        taken.bind((proc.host, proc.port))
        taken.listen()
        launched = daemons.launch(proc)
    assert launched.returncode == 1
    assert f"cannot listen on {proc.host}:{proc.port}" in launched.stderr
    assert not pid_file_of(proc).exists()


def test_a_second_daemon_with_the_same_pid_file_is_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, daemons: Daemons, tmp_path: Path
) -> None:
    first = daemon_config(pooler, tmp_path)
    assert daemons.launch(first).returncode == 0
    pid = int(pid_file_of(first).read_text())

    # Another port, so that only the PID file stands in the way.
    second = pooler(start=False, general={"daemon_pid_file": str(pid_file_of(first))})
    launched = daemons.launch(second)
    assert launched.returncode == 1
    assert f"already running with PID {pid}" in launched.stderr
    assert int(pid_file_of(first).read_text()) == pid
    with pytest.raises(psycopg.OperationalError):
        query_through(second, pg)
    assert query_through(first, pg) == 100


def test_logs_go_to_syslog_with_the_program_name(
    pg: ExamplePostgres, pooler: PoolerFactory, syslog_socket: tuple[str, socket.socket]
) -> None:
    path, sock = syslog_socket
    proc = pooler(general={"syslog_prog_name": "pgd-test"}, env={SYSLOG_ENV: path})
    lines = receive_until(sock, "listening on")
    assert lines[-1].startswith(f"<30>pgd-test[{proc.pid}]: INFO pg_doorman: ")  # daemon.info
    assert query_through(proc, pg) == 100
    connected = receive_until(sock, "connected (")[-1]
    assert re.match(rf"<30>pgd-test\[{proc.pid}\]: INFO pg_doorman\.\S+: client ", connected)
    # Once it serves, stderr no longer gets the log (syslog has it); before, it did.
    assert "listening on" in proc.log_text()
    assert "connected (" not in proc.log_text()


def test_a_missing_syslog_socket_is_reported_and_stderr_keeps_the_log(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-syslog-here")
    proc = pooler(general={"syslog_prog_name": "pgd-test"}, env={SYSLOG_ENV: missing})
    assert query_through(proc, pg) == 100
    proc.wait_for_log("connected (")
    assert f"cannot log to syslog at {missing}" in proc.log_text()


def test_a_daemon_with_workers_logs_every_process_to_syslog(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    daemons: Daemons,
    tmp_path: Path,
    syslog_socket: tuple[str, socket.socket],
) -> None:
    path, sock = syslog_socket
    proc = daemon_config(pooler, tmp_path, workers=2, syslog_prog_name="pgd-test")
    launched = daemons.launch(proc, "-F", "structured", env={SYSLOG_ENV: path})
    assert launched.returncode == 0, launched.stderr
    assert "syslog_prog_name" not in launched.stderr  # no warning: the log is kept
    supervisor = int(pid_file_of(proc).read_text())
    lines = receive_until(sock, "all 2 workers ready")
    entries: dict[int, dict[str, object]] = {}
    for line in lines:
        found = re.match(r"<\d+>pgd-test\[(\d+)\]: (\{.*\})$", line)
        assert found, line
        entry = json.loads(found[2])
        assert entry["pid"] == int(found[1])
        entries[int(found[1])] = entry
    assert supervisor in entries
    assert sorted(e.get("worker") for pid, e in entries.items() if pid != supervisor) == [0, 1]
    assert query_through(proc, pg) == 100
    os.kill(supervisor, signal.SIGTERM)
    _wait_gone(supervisor)
    assert not pid_file_of(proc).exists()


def test_an_upgrade_of_a_daemon_hands_the_pid_file_to_the_new_process(
    pg: ExamplePostgres, pooler: PoolerFactory, daemons: Daemons, tmp_path: Path
) -> None:
    proc = daemon_config(pooler, tmp_path)
    assert daemons.launch(proc).returncode == 0
    old = int(pid_file_of(proc).read_text())
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as client:
        os.kill(old, signal.SIGUSR2)
        # The old daemon exits once its client has moved: it does not wait for the new
        # one, which names itself in the file.
        _wait_gone(old)
        new = daemons.note(proc)
        assert new is not None and new != old and process_alive(new)
        assert client.execute("select 1").fetchone() == (1,)  # moved, still served
    assert query_through(proc, pg) == 100
    os.kill(new, signal.SIGTERM)
    _wait_gone(new)
    assert not pid_file_of(proc).exists()


def test_systemd_hears_the_daemon_pid_with_its_readiness(
    pooler: PoolerFactory, daemons: Daemons, tmp_path: Path
) -> None:
    """Type=notify with -d: the command systemd started exits, so the daemon names
    itself the main process as it reports ready."""
    directory = tempfile.mkdtemp(prefix="pgd-notify-")
    path = os.path.join(directory, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(30)
    try:
        proc = daemon_config(pooler, tmp_path)
        assert daemons.launch(proc, env={"NOTIFY_SOCKET": path}).returncode == 0
        pid = int(pid_file_of(proc).read_text())
        assert notify.recv(4096) == f"MAINPID={pid}\nREADY=1".encode()
    finally:
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)
