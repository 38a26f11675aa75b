"""The three things pgbench talks to: PostgreSQL, pg_doorman and PgBouncer.

Each is started with equivalent settings (transaction pooling, 20 server connections per
pool, the same client authentication) and stopped by `stop()`, which is safe to call
twice and on a target that never started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from pg_doorman.app import embedded_pg
from pg_doorman.app.cluster import share
from pg_doorman.app.embedded_pg import LocalPostgres, free_port

HOST = "127.0.0.1"
DATABASE = "bench"
USER = "bench"
PASSWORD = "bench"
POOL_SIZE = 20
MAX_CLIENTS = 20000
# Enough backends for 1000 direct pgbench clients plus the poolers' pools and psql.
PG_MAX_CONNECTIONS = 1100
BOUNCER_ENV = "BOUNCER_EXE"
READY_TIMEOUT = 20.0

# Every process we start; killed at interpreter exit if a run was aborted.
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(5)


class TargetUnavailable(RuntimeError):
    """A target could not be started; the message says what ran and what it logged."""


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _is_root() -> bool:
    return os.geteuid() == 0


def _wait_port(proc: subprocess.Popen[bytes], port: int, logs: list[Path], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            raise TargetUnavailable(f"{what} exited with code {code}; log tail:\n{_tails(logs)}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TargetUnavailable(f"{what} did not listen on {HOST}:{port}:\n{_tails(logs)}")
        time.sleep(0.05)


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, what: str) -> None:
    deadline = time.monotonic() + 30
    while text not in _read(log):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TargetUnavailable(f"{what}: never logged {text!r}\nlog tail:\n{tail(log)}")
        time.sleep(0.05)


def _read(log: Path) -> str:
    """The log so far; empty while the process has not created it yet."""
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tails(logs: list[Path]) -> str:
    return "\n".join(tail(log) for log in logs if log.exists() and log.stat().st_size)


def _spawn(argv: list[str], log: Path, cwd: Path, **options: Any) -> subprocess.Popen[bytes]:
    """Start a target in its own session, its output in `log`; killed at exit if left."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            **options,
        )
    _live.add(proc)
    return proc


def _running_pid(proc: subprocess.Popen[bytes] | None) -> int | None:
    return proc.pid if proc is not None and proc.poll() is None else None


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    _live.discard(proc)


# --- PostgreSQL ------------------------------------------------------------------------


class Postgres:
    """A throw-away cluster with role `bench` (password `bench`) owning database `bench`."""

    name = "direct"

    def __init__(self, workdir: Path, auth: str) -> None:
        self.auth = auth
        self.bin_dir = embedded_pg.find_pg_bin()
        if auth == "trust":
            hba = ["local all all trust", f"host all all {HOST}/32 trust"]
        else:
            hba = [
                "local all all trust",
                f"host all postgres {HOST}/32 trust",
                f"host all all {HOST}/32 scram-sha-256",
            ]
        settings = {
            "max_connections": str(PG_MAX_CONNECTIONS),
            "shared_buffers": "256MB",
            # Nothing in the log per connection: the --connect rows would pay for it.
            "log_connections": "off",
            "log_disconnections": "off",
        }
        self.server = LocalPostgres(
            workdir / "pgdata", port=free_port(HOST), hba_lines=hba, settings=settings
        )
        self.verifier = ""

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self, scale: int) -> None:
        self.server.init()
        self.server.start()
        self.server.create_role(USER, password=PASSWORD)
        self.server.create_database(DATABASE, owner=USER)
        sql = f"select rolpassword from pg_authid where rolname = '{USER}'"
        self.verifier = self.server.psql(sql).strip()
        env = pg_client_env()
        argv = [str(self.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale)]
        argv += ["-h", HOST, "-p", str(self.port), "-U", USER, DATABASE]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed ({result.returncode}):\n{result.stderr}")
        self.server.psql("vacuum analyze", database=DATABASE)

    def version(self) -> str:
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True
        )
        return out.stdout.strip().removeprefix("postgres (PostgreSQL) ")

    def stop(self) -> None:
        self.server.cleanup()


def pg_client_env() -> dict[str, str]:
    """Environment for pgbench/psql: our password, no TLS, nothing inherited from PG*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    return env


def psql_select_one(bin_dir: Path, port: int) -> str | None:
    """None when `select 1` through host:port works, else psql's complaint."""
    argv = [str(bin_dir / "psql"), "-XAtq", "-h", HOST, "-p", str(port), "-U", USER]
    argv += ["-d", DATABASE, "-c", "select 1"]
    try:
        result = subprocess.run(
            argv, env=pg_client_env(), capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        return "psql timed out"
    if result.returncode == 0 and result.stdout.strip() == "1":
        return None
    return (result.stderr or result.stdout).strip() or f"psql exit code {result.returncode}"


# --- pg_doorman ------------------------------------------------------------------------


@dataclass
class Pooler:
    """pg_doorman as `python -m pg_doorman config.toml`."""

    workdir: Path
    pg: Postgres
    name: str = "pg_doorman"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    workers: int = 1

    @property
    def log_path(self) -> Path:
        return self.workdir / "pg_doorman.log"

    @property
    def pid(self) -> int | None:
        return _running_pid(self.proc)

    def config(self) -> dict[str, object]:
        method = "trust" if self.pg.auth == "trust" else "scram-sha-256"
        return {
            "general": {
                "host": HOST,
                "port": self.port,
                "admin_username": "admin",
                "admin_password": "admin",
                "max_connections": MAX_CLIENTS,
                "pg_hba": f"host all all {HOST}/32 {method}\n",
                # PgBouncer runs with log_connections=0 too.
                "log_client_connections": False,
                "log_client_disconnections": False,
                "workers": self.workers,
            },
            "pools": {
                DATABASE: {
                    "server_host": HOST,
                    "server_port": self.pg.port,
                    "pool_mode": "transaction",
                    "users": [
                        {"username": USER, "password": self.pg.verifier, "pool_size": POOL_SIZE}
                    ],
                }
            },
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        config_path = self.workdir / "pg_doorman.toml"
        config_path.write_bytes(tomli_w.dumps(self.config()).encode())
        self.argv = [sys.executable, "-m", "pg_doorman", str(config_path)]
        self.proc = _spawn(self.argv, self.log_path, self.workdir)
        what = f"pg_doorman ({' '.join(self.argv)})"
        _wait_port(self.proc, self.port, [self.log_path], what)
        if self.workers > 1:
            _wait_log(self.proc, self.log_path, f"all {self.workers} workers ready", what)
        problem = psql_select_one(self.pg.bin_dir, self.port)
        if problem is not None:
            raise TargetUnavailable(
                f"{what}: `select 1` through it failed: {problem}\nlog tail:\n{tail(self.log_path)}"
            )

    def version(self) -> str:
        from pg_doorman import __version__

        return __version__

    def hot_path(self) -> str:
        """What the running pooler said it runs: compiled or pure-Python hot path."""
        for line in tail(self.log_path, 200).splitlines():
            for name in ("compiled hot path", "pure-Python hot path"):
                if name in line:
                    return name
        return "hot path unknown"

    def stop(self) -> None:
        _terminate(self.proc)


# --- the bare relay --------------------------------------------------------------------


@dataclass
class Relay:
    """bench/relay.py in front of PostgreSQL: one upstream connection per client."""

    workdir: Path
    pg: Postgres
    loop: str = "uvloop"  # or "epoll"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return "relay" if self.loop == "uvloop" else f"relay-{self.loop}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return _running_pid(self.proc)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        argv = [sys.executable, "-m", "bench.relay", str(self.port), str(self.pg.port)]
        argv += ["--loop", self.loop]
        self.proc = _spawn(argv, self.log_path, Path(__file__).resolve().parents[1])
        _wait_port(self.proc, self.port, [self.log_path], f"relay ({' '.join(argv)})")

    def stop(self) -> None:
        _terminate(self.proc)


# --- PgBouncer -------------------------------------------------------------------------


def find_bouncer() -> str | None:
    override = os.environ.get(BOUNCER_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("pgbouncer", path=path)


def bouncer_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out.stdout + out.stderr)
    if match is None:
        return ()
    return tuple(int(part or 0) for part in match.groups())


# Starts one PgBouncer per ini file and stops them all on SIGTERM, so that several
# processes are measured, stopped and checked as one process tree.
_BOUNCER_GROUP = (
    'exe=$1; shift; pids=""; for ini; do "$exe" "$ini" & pids="$pids $!"; done; '
    'trap "kill $pids 2>/dev/null" TERM INT; wait; wait'
)


@dataclass
class Bouncer:
    """PgBouncer in the foreground, as the unprivileged PostgreSQL user when we are root.

    With `processes` > 1, that many PgBouncers share the port with `so_reuseport`
    (PgBouncer's own way to use more cores) and split `pool_size` between them, as
    pg_doorman's workers do.
    """

    workdir: Path
    pg: Postgres
    exe: str
    processes: int = 1
    name: str = "pgbouncer"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    version_tuple: tuple[int, ...] = ()

    @property
    def log_path(self) -> Path:
        return self.process_file(0, "log")

    def process_file(self, index: int, suffix: str) -> Path:
        """Process `index`'s ini or log file (the first one's keep their plain names)."""
        return self.workdir / f"pgbouncer{index or ''}.{suffix}"

    @property
    def pid(self) -> int | None:
        return _running_pid(self.proc)

    @property
    def prepared_support(self) -> bool:
        """Protocol-level prepared statements in transaction mode arrived in 1.21."""
        return self.version_tuple >= (1, 21)

    def ini(self, index: int = 0) -> str:
        auth_type = "trust" if self.pg.auth == "trust" else "scram-sha-256"
        # Process `index`'s part, split as pg_doorman splits pool_size between workers.
        pool_size = share(POOL_SIZE, index, self.processes)
        lines = [
            "[databases]",
            f"{DATABASE} = host={HOST} port={self.pg.port} dbname={DATABASE}",
            "",
            "[pgbouncer]",
            f"listen_addr = {HOST}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_type = {auth_type}",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {pool_size}",
            f"max_client_conn = {MAX_CLIENTS}",
            f"logfile = {self.process_file(index, 'log')}",
            "log_connections = 0",
            "log_disconnections = 0",
        ]
        if self.processes > 1:
            lines.append("so_reuseport = 1")
        if self.prepared_support:
            lines.append("max_prepared_statements = 200")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.version_tuple = bouncer_version(self.exe)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        ini_paths = []
        for index in range(self.processes):
            ini_path = self.process_file(index, "ini")
            ini_path.write_text(self.ini(index))
            ini_paths.append(str(ini_path))
        (self.workdir / "userlist.txt").write_text(f'"{USER}" "{self.pg.verifier}"\n')
        user: int | None = None
        group: int | None = None
        extra_groups: list[int] | None = None
        if _is_root():
            # PgBouncer refuses to run as root; use the user PostgreSQL runs as.
            entry = pwd.getpwnam(embedded_pg.OS_USER)
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            with contextlib.suppress(OSError):
                self.workdir.parent.chmod(0o755)
            user, group, extra_groups = entry.pw_uid, entry.pw_gid, []
        if self.processes == 1:
            self.argv = [self.exe, ini_paths[0]]
        else:
            self.argv = ["sh", "-c", _BOUNCER_GROUP, "sh", self.exe, *ini_paths]
        self.proc = _spawn(
            self.argv,
            self.workdir / "pgbouncer.stderr",
            self.workdir,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        what = f"pgbouncer ({' '.join(self.argv[-self.processes - 1 :])})"
        logs = [self.process_file(i, "log") for i in range(self.processes)]
        _wait_port(self.proc, self.port, [*logs, self.workdir / "pgbouncer.stderr"], what)
        for log in logs:
            # Each process, not just the first to bind: one that failed would leave the
            # others to carry the whole load unnoticed.
            _wait_log(self.proc, log, "process up", what)
        problem = psql_select_one(self.pg.bin_dir, self.port)
        if problem is not None:
            raise TargetUnavailable(
                f"{what}: `select 1` through it failed: {problem}\nlog tail:\n{tail(self.log_path)}"
            )

    def version(self) -> str:
        return ".".join(map(str, self.version_tuple)) or "unknown"

    def stop(self) -> None:
        _terminate(self.proc)
