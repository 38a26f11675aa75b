"""Memory limit, pool minimum, idle checks, lifetimes and the Unix-socket listener."""

from __future__ import annotations

import tempfile
import time

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory


def backends(pg: ExamplePostgres, user: str) -> list[int]:
    out = pg.psql(
        f"select pid from pg_stat_activity where usename = '{user}' "
        "and backend_type = 'client backend' order by pid"
    )
    return [int(line) for line in out.split()]


def test_max_memory_usage_refuses_oversized_message(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(general={"max_memory_usage": "1MB"})
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    # A Parse must be seen whole before it can be rewritten: 2 MB exceeds the budget.
    conn.send_raw(w.parse("big", "select '" + "x" * 2_000_000 + "'") + w.sync())
    error = w.first_error(conn.wait_closed())
    assert error is not None and error.sqlstate == "53200" and error.severity == "FATAL"
    # Others are unaffected, and the budget is free again.
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as other:
        assert other.execute("select length(%s)", ("y" * 500_000,)).fetchone() == (500_000,)


def test_min_pool_size_prewarms(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    user = pg.md5_user
    pooler(pools={"example_db": {"users": [{"username": user.name, "min_pool_size": 3}]}})
    deadline = time.monotonic() + 10
    while len(backends(pg, user.name)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(backends(pg, user.name)) == 3


def test_idle_check_probe_and_reuse(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    user = pg.md5_user
    proc = pooler(
        general={"server_idle_check_timeout": 100},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 1}]}},
    )
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        time.sleep(0.3)  # idle longer than the check timeout: probed before reuse
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == pid
        # A server that died while idle fails its probe and is replaced transparently.
        pg.psql(f"select pg_terminate_backend({pid})")
        time.sleep(0.3)
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid


def test_server_lifetime_recycles_idle_servers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    user = pg.md5_user
    proc = pooler(
        general={"server_lifetime": 200, "retain_connections_time": 100},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 1}]}},
    )
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()[0]
        # The retain loop closes it while idle (after 0.2-0.3 s); PostgreSQL then no
        # longer has it either. Polled: a loaded machine may take longer than that.
        deadline = time.monotonic() + 5
        while first in backends(pg, user.name):
            assert time.monotonic() < deadline, "the idle server outlived server_lifetime"
            time.sleep(0.05)
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != first


def test_unix_socket_listener(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    user = pg.md5_user
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as sockdir:
        proc = pooler(
            general={
                "unix_socket_dir": sockdir,
                "pg_hba": "local all all md5\nhost all all 127.0.0.1/32 md5\n",
            }
        )
        dsn = f"host={sockdir} port={proc.port} dbname=example_db user={user.name}"
        with psycopg.connect(dsn, password=user.password, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_dir_missing_stops_the_pooler_naming_the_path(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as parent:
        sockdir = f"{parent}/missing"
        proc = pooler(general={"unix_socket_dir": sockdir, "workers": workers}, start=False)
        proc.spawn()
        assert proc.wait_exit(20) == 1
    path = f"{sockdir}/.s.PGSQL.{proc.port}"
    assert f"cannot listen on {path}: No such file or directory" in proc.log_text()
