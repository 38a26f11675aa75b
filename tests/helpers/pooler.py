"""The pooler as a real subprocess (`python -m pg_doorman CONFIG`), and its test config.

Contract with the CLI: exit code 2 on a config error; otherwise listen on
general.host:general.port. Everything it prints goes to a log file next to its config.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import psycopg
import tomli_w

from pg_doorman.app.embedded_pg import free_port, make_dsn
from pg_doorman.auth.mock_auth import MOCK_AUTH_SECRET_ENV

from . import EXAMPLE_DB, ExamplePostgres

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"
DEFAULT_POOL_SIZE = 4
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Fatal Python error")

# Poolers still alive when the interpreter exits are killed: no strays after an abort.
_live: set[PoolerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


class Replace:
    """Marks an override value that replaces the default outright (e.g. a users list)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _is_user_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(u, Mapping) and "username" in u for u in value
    )


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`: tables merge recursively, `users` lists merge by
    username (unknown names are appended), anything else is replaced; wrap a value in
    Replace(...) to replace a table or a users list as a whole."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        current = out.get(key)
        if isinstance(value, Replace):
            out[key] = copy.deepcopy(value.value)
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = deep_merge(current, value)
        elif key == "users" and _is_user_list(value) and _is_user_list(current):
            merged = {u["username"]: dict(u) for u in current}
            for user in value:
                name = user["username"]
                merged[name] = deep_merge(merged.get(name, {}), user)
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def pooler_hba(trust_users: Sequence[str] = ()) -> str:
    """Pooler-side pg_hba: trust for `trust_users`, md5 and SCRAM for everyone else."""
    lines = []
    for cidr in ("127.0.0.1/32", "::1/128"):
        lines += [f"host all {user} {cidr} trust" for user in trust_users]
        lines += [f"host all all {cidr} md5", f"host all all {cidr} scram-sha-256"]
    return "\n".join(lines) + "\n"


def general_section(port: int, pg_hba: str) -> dict[str, Any]:
    """A pooler's `[general]` on 127.0.0.1:`port`, with the tests' admin user."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "admin_username": ADMIN_USER,
        "admin_password": ADMIN_PASSWORD,
        "pg_hba": pg_hba,
    }


def default_pooler_config(pg: ExamplePostgres, port: int) -> dict[str, Any]:
    """Pool `example_db` in front of `pg` with the three example users."""
    users = list(pg.users.values())
    return {
        "general": general_section(
            port, pooler_hba([u.name for u in users if u.method == "trust"])
        ),
        "pools": {
            EXAMPLE_DB: {
                "server_host": pg.host,
                "server_port": pg.port,
                "pool_mode": "transaction",
                "users": [
                    {
                        "username": u.name,
                        "password": u.pooler_password,
                        "pool_size": DEFAULT_POOL_SIZE,
                    }
                    for u in users
                ],
            }
        },
    }


class PoolerProcess:
    """One pooler subprocess with its own config file and log."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        args: Sequence[str] = ("-l", "debug"),
        env: Mapping[str, str] | None = None,
        config_name: str = "pg_doorman.toml",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = copy.deepcopy(dict(config))
        self.config_path = self.workdir / config_name
        self.log_path = self.workdir / "pooler.log"
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        # Set to True in a test that provokes tracebacks on purpose.
        self.allow_tracebacks = False
        self._problems: list[str] = []
        self._exit_seen = False
        # Log text before this offset was already shown in a failure message.
        self._log_shown = 0
        self.write_config()

    # -- config and identity

    @property
    def host(self) -> str:
        """The address to reach the pooler at (an IPv6 one without its brackets)."""
        return str(self.config["general"].get("host", "127.0.0.1")).strip("[]")

    @property
    def port(self) -> int:
        return int(self.config["general"]["port"])

    def write_config(self, config: Mapping[str, Any] | None = None) -> Path:
        """(Re)write the TOML file; a new `config` replaces the current one."""
        if config is not None:
            self.config = copy.deepcopy(dict(config))
        # Whole or not at all, as configuration tools write: a process reading it
        # during a rewrite (a worker slow to act on a reload) never sees half a file.
        partial = self.config_path.with_name(self.config_path.name + ".new")
        partial.write_text(tomli_w.dumps(self.config), encoding="utf-8")
        os.replace(partial, self.config_path)
        return self.config_path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pg_doorman", str(self.config_path), *self.args]

    def dsn(self, user: str, password: str | None = None, database: str = EXAMPLE_DB) -> str:
        return make_dsn(self.host, self.port, user, password, database)

    # -- process state

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size of the pooler process, from /proc."""
        assert self.proc is not None, "pooler not started"
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS missing from /proc status")

    # -- lifecycle

    def spawn(self) -> None:
        """Start the process without waiting for it to listen."""
        if self.running:
            raise RuntimeError("pooler already running")
        self._note_unexpected_exit()
        env = dict(os.environ)
        # Each pooler makes its own, as when started by hand (this process may hold
        # one made by a login run in it).
        env.pop(MOCK_AUTH_SECRET_ENV, None)
        env.update(self.extra_env)
        # Run this checkout's code even when the package is not installed.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC_DIR), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONFAULTHANDLER", "1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                # Own session: a Ctrl-C on the test run must not reach it behind our back.
                start_new_session=True,
            )
        self._exit_seen = False
        _live.add(self)

    def start(self, timeout: float = READY_TIMEOUT) -> PoolerProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the listen port accepts TCP; fail with the log tail otherwise."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._exit_seen = True
                _live.discard(self)
                raise RuntimeError(
                    f"pooler exited with code {code} before listening on "
                    f"{self.host}:{self.port}; log tail:\n{self._shown_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"pooler did not listen on {self.host}:{self.port} within {timeout}s; "
                    f"log tail:\n{self._shown_tail()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for an exit the test expects (config error, SHUTDOWN, ...); its code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._exit_seen = True
        _live.discard(self)
        return code

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self, config: Mapping[str, Any] | None = None) -> None:
        """Optionally rewrite the config, then SIGHUP."""
        if config is not None:
            self.write_config(config)
        self.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (recorded as a problem)."""
        if self.proc is None:
            return None
        self._note_unexpected_exit()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._problems.append(
                    f"pooler pid {self.proc.pid} ignored SIGTERM for {timeout}s and was killed"
                )
                self.kill()
        self._exit_seen = True
        _live.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._exit_seen = True
        _live.discard(self)

    def _note_unexpected_exit(self) -> None:
        """Record an exit nobody asked for (a crash) before the state is reset."""
        if self.proc is None or self._exit_seen:
            return
        code = self.proc.poll()
        if code is not None:
            self._exit_seen = True
            _live.discard(self)
            if code != 0:
                self._problems.append(f"pooler pid {self.proc.pid} exited on its own with {code}")

    # -- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _shown_tail(self) -> str:
        """The log tail for a failure message; teardown won't report it a second time."""
        self._log_shown = len(self.log_text())
        return self.log_tail()

    def reload_and_wait(self, config: Mapping[str, Any] | None = None) -> None:
        """reload(), then wait until the pooler logged that it applied the file."""
        done = self.log_text().count("configuration reloaded")
        self.reload(config)
        deadline = time.monotonic() + 10
        while self.log_text().count("configuration reloaded") == done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reload in 10s; tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged in {timeout}s; tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """What a test's teardown should fail on: crashes, hangs, tracebacks."""
        self._note_unexpected_exit()
        found = list(self._problems)
        if not self.allow_tracebacks:
            text = self.log_text()[self._log_shown :]
            for marker in TRACEBACK_MARKERS:
                if marker in text:
                    start = text.index(marker)
                    found.append(f"pooler log has {marker!r}:\n{text[start : start + 3000]}")
                    break
        return found


class PoolerFactory:
    """What the `pooler` fixture hands out: call it to start a pooler in front of `pg`.

    pooler()                                   default config, started
    pooler({"general": {...}})                 deep-merged overrides (see deep_merge)
    pooler(general={...}, pools={...})         the same, by section
    pooler(pools={"example_db": {"users": [{"username": "example_user_md5", "pool_size": 1}]}})
                                               changes one user, keeps the others
    pooler(pools={"example_db": {"users": Replace([...])}})   exactly these users
    pooler(start=False)                        written but not spawned
    """

    def __init__(self, pg: ExamplePostgres, tmp_dir: Path) -> None:
        self.pg = pg
        self.tmp_dir = Path(tmp_dir)
        self.processes: list[PoolerProcess] = []

    def config(
        self, overrides: Mapping[str, Any] | None = None, /, **sections: Any
    ) -> dict[str, Any]:
        config = default_pooler_config(self.pg, free_port())
        for extra in (overrides or {}, sections):
            config = deep_merge(config, extra)
        return config

    def __call__(
        self,
        overrides: Mapping[str, Any] | None = None,
        /,
        *,
        start: bool = True,
        args: Sequence[str] = ("-l", "debug"),
        env: Mapping[str, str] | None = None,
        **sections: Any,
    ) -> PoolerProcess:
        workdir = self.tmp_dir / f"pooler{len(self.processes)}"
        proc = PoolerProcess(self.config(overrides, **sections), workdir, args=args, env=env)
        self.processes.append(proc)
        if start:
            proc.start()
        return proc

    def close(self) -> list[str]:
        """Stop every pooler; return the problems found (empty when all is well)."""
        problems = []
        for proc in self.processes:
            proc.stop()
            problems += [f"[{proc.workdir.name}] {p}" for p in proc.problems()]
        return problems


class PoolShape(NamedTuple):
    """A pool for module-scoped poolers (see pool_of)."""

    servers: int  # pool_size: split evenly between the workers
    server_cache: int = 0  # prepared statements kept per server; 0: the default
    session: bool = False  # session pooling instead of transaction pooling
    workers: int = 1
    # The pooler's rarer paths, all at once: servers reached over PostgreSQL's Unix
    # socket, taken oldest first, with the clients' parameters set on every checkout.
    unix_round_robin_sync: bool = False

    @property
    def servers_per_worker(self) -> int:
        """What a random program may count on: it cannot tell which worker holds which
        client, so no more servers than one worker has."""
        return self.servers // self.workers

    def config(self, pg: ExamplePostgres) -> dict[str, dict[str, object]]:
        """The `general` and `pools` overrides that give the md5 user this pool."""
        user: dict[str, object] = {"username": pg.md5_user.name, "pool_size": self.servers}
        if self.session:
            user["pool_mode"] = "session"
        general: dict[str, object] = {"workers": self.workers}
        pool: dict[str, object] = {"users": [user]}
        if self.server_cache:
            general["server_prepared_statements_cache_size"] = self.server_cache
        if self.unix_round_robin_sync:
            general["server_round_robin"] = True
            general["sync_server_parameters"] = True
            pool["server_host"] = str(pg.socket_dir)
        return {"general": general, "pools": {EXAMPLE_DB: pool}}

    def __str__(self) -> str:
        return (
            f"{self.servers}-servers"
            + (f"-cache-{self.server_cache}" if self.server_cache else "")
            + ("-session" if self.session else "")
            + (f"-{self.workers}-workers" if self.workers > 1 else "")
            + ("-unix-round-robin-sync" if self.unix_round_robin_sync else "")
        )


@contextlib.contextmanager
def pool_of(pg: ExamplePostgres, tmp_dir: Path, shape: PoolShape) -> Iterator[PoolerProcess]:
    """A pooler whose pool for the md5 user has the given shape, for module-scoped
    fixtures (the `pooler` fixture is per test); it must stop cleanly."""
    factory = PoolerFactory(pg, tmp_dir)
    yield factory(**shape.config(pg))
    problems = factory.close()
    assert not problems, problems


# The pools random programs run against. Two servers and one, so that a client's
# statements keep landing on servers that lack them; servers that keep one prepared
# statement each, so that nearly every batch evicts one; session pooling, where
# everything passes through and each program's sessions must start as new ones; and
# two workers whose servers keep one statement, with the rarer paths of pool_of.
RANDOM_POOLS: Final = (
    PoolShape(2),
    PoolShape(1),
    PoolShape(2, server_cache=1),
    PoolShape(3, session=True),
    PoolShape(4, server_cache=1, workers=2, unix_round_robin_sync=True),
)


# The three ways the pooler keeps count of the replies a client is owed, for tests
# that run an exchange under each: with prepared statements kept (the rewriter pairs
# replies with requests), without (the client's scanner alone counts the
# ReadyForQuery owed), and in session pooling.
ACCOUNTING_SETUPS: Final[dict[str, dict[str, object]]] = {
    "prepared-statements": {},
    "no-prepared-statements": {"prepared_statements": False},
    "session-pooling": {"pool_mode": "session"},
}


def serve_a_client(proc: PoolerProcess, pg: ExamplePostgres) -> float:
    """Connect a new client (the md5 user) and run a query: the seconds it took."""
    user = pg.md5_user
    started = time.monotonic()
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    return time.monotonic() - started
