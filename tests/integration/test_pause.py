"""PAUSE and KILL hold pools that appear later: pools a reload adds, pools of users
found by auth_query, the pools of a worker restarted after a crash; RESUME of one
database while the whole pooler is paused; KILL reaches a session a reload left on
its old pool."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import pool_row, show_table
from helpers.pooler import PoolerFactory, PoolerProcess, Replace

LOOKUP = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
# Long enough for a query to be answered if nothing holds it back.
HELD = 1.0


class Pending:
    """`work` running in a thread: its result, once it has one."""

    def __init__(self, work: Callable[[], object]) -> None:
        self.results: list[object] = []
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                self.results.append(work())
            except BaseException as exc:
                self.errors.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def answered(self) -> bool:
        return bool(self.results or self.errors)

    def outcome(self, timeout: float = 20.0) -> object:
        self._thread.join(timeout)
        assert not self.errors, self.errors
        assert self.results, "no answer"
        return self.results[0]


def select_through(dsn: str, value: int) -> Callable[[], object]:
    def work() -> object:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            row = conn.execute("select %s::int", (value,)).fetchone()
            assert row is not None
            return row[0]

    return work


def tags(messages: list[tuple[bytes, bytes]]) -> list[str]:
    return [w.command_tag(payload) for kind, payload in messages if kind == b"C"]


def error_of(console: w.PgWire, statement: str) -> w.ServerError | None:
    return w.first_error(console.simple_query(statement))


def test_a_database_a_reload_adds_during_pause_waits_for_resume(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PAUSE (all databases), then a RELOAD adds database second_db: its clients wait
    for RESUME, as those of the databases paused before, and no server is opened."""
    proc = pooler()
    console = admin(proc)
    user = pg.md5_user
    pending: Pending | None = None
    try:
        assert tags(console.simple_query("PAUSE")) == ["PAUSE"]
        proc.config["pools"]["second_db"] = {
            "server_host": pg.host,
            "server_port": pg.port,
            "server_database": EXAMPLE_DB,
            "users": [{"username": user.name, "password": user.pooler_password}],
        }
        proc.write_config()
        assert error_of(console, "RELOAD") is None
        pending = Pending(select_through(proc.dsn(user.name, user.password, "second_db"), 7))
        time.sleep(HELD)
        assert not pending.answered(), "a client of the added database was served while paused"
        (row,) = [r for r in show_table(console, "POOLS") if r["database"] == "second_db"]
        assert (row["paused"], row["sv_idle"], row["sv_active"], row["sv_login"]) == (
            "1", "0", "0", "0",
        ), row  # fmt: skip
        assert error_of(console, "RESUME") is None
        assert pending.outcome() == 7
    finally:
        console.simple_query("RESUME")
        console.close()


def test_resume_of_one_database_is_refused_while_the_whole_pooler_is_paused(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """As in PgBouncer, a PAUSE of the whole pooler ends with RESUME of the whole
    pooler: RESUME <db> is refused and its clients keep waiting."""
    proc = pooler()
    console = admin(proc)
    user = pg.md5_user
    try:
        assert tags(console.simple_query("PAUSE")) == ["PAUSE"]
        error = error_of(console, f"RESUME {EXAMPLE_DB}")
        assert error is not None and error.sqlstate == "55000", error
        assert "RESUME without a database" in error.message
        assert pool_row(console, user.name)["paused"] == "1"
        pending = Pending(select_through(proc.dsn(user.name, user.password), 5))
        time.sleep(HELD)
        assert not pending.answered(), "served after a refused RESUME"
        assert tags(console.simple_query("RESUME")) == ["RESUME"]
        assert pending.outcome() == 5
    finally:
        console.simple_query("RESUME")
        console.close()


def auth_query_pooler(
    pooler: PoolerFactory, pg: ExamplePostgres, *, configured: bool
) -> PoolerProcess:
    """The md5 and SCRAM users are looked up; the trust user is configured, or not."""
    settings: dict[str, Any] = {"query": LOOKUP, "user": pg.superuser, "min_interval": "0"}
    users = [{"username": pg.trust_user.name, "password": "", "pool_size": 2}]
    pool = {"users": Replace(users if configured else []), "auth_query": settings}
    return pooler(pools={EXAMPLE_DB: pool})


def lookup_backends(pg: ExamplePostgres) -> int:
    out = pg.psql("select count(*) from pg_stat_activity where application_name like '%auth_query'")
    return int(out.split()[0])


@pytest.mark.parametrize("configured", [True, False], ids=["configured-user", "looked-up-only"])
@pytest.mark.parametrize("pause", ["PAUSE", f"PAUSE {EXAMPLE_DB}"])
def test_a_user_first_looked_up_during_pause_waits_for_resume(
    pg: ExamplePostgres, pooler: PoolerFactory, pause: str, configured: bool
) -> None:
    """auth_query: PAUSE closes the lookup connection with the other servers, and a
    user first seen during the pause is looked up, and served, after RESUME; meanwhile
    neither the lookup nor the user's new pool connects to the database (whether or
    not the database has a configured user whose pool was paused)."""
    proc = auth_query_pooler(pooler, pg, configured=configured)
    md5, scram = pg.md5_user, pg.scram_user
    assert select_through(proc.dsn(md5.name, md5.password), 1)() == 1
    assert lookup_backends(pg) == 1
    console = admin(proc)
    pending: Pending | None = None
    try:
        assert tags(console.simple_query(pause)) == ["PAUSE"]
        assert lookup_backends(pg) == 0
        pending = Pending(select_through(proc.dsn(scram.name, scram.password), 2))
        time.sleep(HELD)
        assert not pending.answered(), "a user first seen during PAUSE was served"
        assert lookup_backends(pg) == 0
        assert error_of(console, "RESUME") is None
        assert pending.outcome() == 2
    finally:
        console.simple_query("RESUME")
        console.close()


def _worker_pids(proc: PoolerProcess) -> list[int]:
    assert proc.pid is not None
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _worker_index(pid: int) -> int:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\x00")
    return int(args[args.index(b"--worker") + 1].split(b"/")[0])


def _worker_of(client_id: str | None) -> int:
    assert client_id is not None
    return int(client_id.removeprefix("#c")) >> 24


def test_a_worker_restarted_during_pause_starts_paused(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """general.workers = 2: PAUSE, then worker 1 crashes and is restarted. Its pools
    start paused as worker 0's are: no client is served on either until RESUME."""
    proc = pooler(general={"workers": 2})
    proc.wait_for_log("all 2 workers ready", timeout=30)
    user = pg.md5_user
    first = admin(proc)
    assert tags(first.simple_query("PAUSE")) == ["PAUSE"]
    first.close()
    (victim,) = [pid for pid in _worker_pids(proc) if _worker_index(pid) == 1]
    os.kill(victim, signal.SIGKILL)
    proc.wait_for_log("worker 1 exited", timeout=10)
    # Worker 1 takes connections again once it is back: the supervisor hands a new
    # one to the worker with the fewest, and it has none.
    deadline = time.monotonic() + 30
    while True:
        console = admin(proc)
        ids = [r["client_id"] for r in show_table(console, "CLIENTS")]
        if 1 in {_worker_of(i) for i in ids}:
            break
        console.close()
        assert time.monotonic() < deadline, "worker 1 never came back"
        time.sleep(0.2)
    pendings: list[Pending] = []
    try:
        dsn = proc.dsn(user.name, user.password)
        pendings = [Pending(select_through(dsn, i)) for i in range(4)]
        time.sleep(HELD)
        served = [p for p in pendings if p.answered()]
        assert not served, "clients served during PAUSE (by the restarted worker)"
        clients = [r for r in show_table(console, "CLIENTS") if r["user"] == user.name]
        assert {_worker_of(r["client_id"]) for r in clients} == {0, 1}, clients
        assert error_of(console, "RESUME") is None
        assert sorted(int(str(p.outcome())) for p in pendings) == [0, 1, 2, 3]
    finally:
        console.simple_query("RESUME")
        console.close()


def test_kill_disconnects_a_session_a_reload_left_on_its_old_pool(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A session-mode client keeps its pool when a reload changes the pool_mode
    (docs/admin.md); KILL of its database must disconnect it all the same."""
    proc = pooler(pools={EXAMPLE_DB: {"pool_mode": "session"}})
    user = pg.md5_user
    console = admin(proc)
    try:
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as session:
            assert session.execute("select 1").fetchone() == (1,)
            proc.config["pools"][EXAMPLE_DB]["pool_mode"] = "transaction"
            proc.write_config()
            assert error_of(console, "RELOAD") is None
            assert session.execute("select 2").fetchone() == (2,)  # still its old pool
            assert tags(console.simple_query(f"KILL {EXAMPLE_DB}")) == ["KILL"]
            with pytest.raises(psycopg.OperationalError):
                session.execute("select 3")
            session.close()  # not the exit's COMMIT on a connection the pooler closed
    finally:
        console.simple_query("RESUME")
        console.close()
