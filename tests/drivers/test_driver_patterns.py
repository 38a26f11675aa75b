"""pgjdbc, pgx v4 and node-postgres through the pooler in transaction mode: the
patterns applications use beyond the basic workloads (batches, savepoints, statements
a schema change reshaped, DEALLOCATE / DISCARD ALL, binary transfer, fetch sizes,
rewritten batch inserts, COPY, pgx's describe mode and batches, pg-cursor portals).

Several driver connections share a pool of one or two servers that keep two
statements each, so that statements are evicted and parsed again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_node_pg import NODE_DIR, node_with_pg
from test_pgjdbc import JAR, compiled
from test_pgx import built

from helpers import ExamplePostgres
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

DRIVERS = Path(__file__).resolve().parent
PATTERNS_JAVA = DRIVERS / "java" / "Patterns.java"
PATTERNS_GO = DRIVERS / "go" / "patterns.go"


def shared_pool(pooler: PoolerFactory, pg: ExamplePostgres, pool_size: int) -> PoolerProcess:
    """The md5 user's pool of `pool_size` servers that keep two statements each."""
    pg.psql(f"grant create on schema public to {pg.md5_user.name}", database="example_db")
    return pooler(
        general={"server_prepared_statements_cache_size": 2},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": pool_size}]}},
    )


def assert_nothing_held(proc: PoolerProcess, user: str) -> None:
    """The driver connections gone: none of the user's clients left, and every server
    of the pool back idle (none kept by a transaction or a lost reply)."""
    assert not [c for c in admin_rows(proc, "clients") if c["user"] == user]
    servers = [s for s in admin_rows(proc, "servers") if s["user"] == user]
    assert servers and all(s["state"] == "idle" for s in servers), servers


def run_patterns(command: list[str], env: dict[str, str] | None = None) -> str:
    """Run a driver program; its last line of output."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=DRIVERS
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    last: str = result.stdout.strip().splitlines()[-1]
    return last


def jdbc_url(proc: PoolerProcess, pg: ExamplePostgres) -> str:
    user = pg.md5_user
    return (
        f"jdbc:postgresql://{proc.host}:{proc.port}/example_db?user={user.name}"
        f"&password={user.password}&sslmode=disable"
    )


# Each mode's count of checked results (tests/drivers/java/Patterns.java).
PGJDBC_MODES = {
    "batch": 64,  # executeBatch of a prepared INSERT, autocommit and in transactions
    "samename": 480,  # S_1, S_2 ... of different texts on each connection
    "autosave": 120,  # autosave=always: errors rolled back to the savepoint
    "cache": 240,  # preparedStatementCacheQueries=3: pgjdbc closes its statements
    "deallocate": 256,  # DEALLOCATE ALL / DISCARD ALL by the application
    "binary": 240,  # binaryTransfer with prepareThreshold=-1 (described first)
    "fetch": 40,  # setFetchSize in transactions: Execute with a row limit, two cursors
    "rewrite": 32,  # reWriteBatchedInserts=true
    "copy": 80,  # CopyManager copyIn / copyOut, and a COPY that fails
}


@pytest.mark.parametrize("pool_size", [1, 2])
def test_pgjdbc_patterns(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, pool_size: int
) -> None:
    java = compiled(PATTERNS_JAVA, tmp_path)
    proc = shared_pool(pooler, pg, pool_size)
    out = run_patterns(
        [java, "-cp", f"{tmp_path}:{JAR}", "Patterns", ",".join(PGJDBC_MODES), jdbc_url(proc, pg)]
    )
    assert out == f"ok {sum(PGJDBC_MODES.values())}"
    assert_nothing_held(proc, pg.md5_user.name)


def test_pgjdbc_recovers_from_a_statement_a_schema_change_reshaped(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """A table gains a column under statements a connection prepared, and the server
    parses them again after letting them go. With binary transfer pgjdbc binds one
    result format per column it was told of: PostgreSQL refuses that with 0A000
    "cached plan must not change result type", which pgjdbc recovers from by preparing
    again (autosave=conservative inside a transaction). The pooler used to pass on
    the server's "bind message has 2 result formats but query has 3 columns", which
    pgjdbc does not recover from: every later use failed."""
    java = compiled(PATTERNS_JAVA, tmp_path)
    proc = shared_pool(pooler, pg, 1)
    url = jdbc_url(proc, pg)
    out = run_patterns([java, "-cp", f"{tmp_path}:{JAR}", "Patterns", "reshape", url])
    assert out == "ok 8"
    assert_nothing_held(proc, pg.md5_user.name)


# Each mode's count of checked results (tests/drivers/go/patterns.go).
PGX_MODES = {"describe": 240, "batch": 108, "copy": 24, "ddl": 52}


@pytest.mark.parametrize("mode", list(PGX_MODES))
def test_pgx_v4_patterns(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, mode: str
) -> None:
    """describe: the statement cache in describe mode (unnamed statements); batch:
    SendBatch, and one failing in the middle, whose earlier INSERT is rolled back;
    copy: CopyFrom; ddl: a column added under statements cached by every
    connection, which pgx prepares again after PostgreSQL's 0A000, also where the
    server had let the statement go and parsed it again."""
    binary = built(PATTERNS_GO, tmp_path)
    proc = shared_pool(pooler, pg, 1 if mode == "ddl" else 2)
    user = pg.md5_user
    out = run_patterns([str(binary), mode, proc.dsn(user.name, user.password)])
    assert out == f"ok {PGX_MODES[mode]}"
    assert_nothing_held(proc, user.name)


@pytest.mark.parametrize(("mode", "checked"), [("samename", 240), ("cursor", 32)])
def test_node_pg_patterns(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str, checked: int
) -> None:
    """samename: connections give one query name to different texts and each gets its
    own statement's rows; cursor: pg-cursor pages through a portal in a transaction."""
    node = node_with_pg()
    if not (NODE_DIR / "node_modules" / "pg-cursor").is_dir():
        pytest.skip("pg-cursor not installed: run `npm ci` in tests/drivers/node")
    proc = shared_pool(pooler, pg, 2)
    user = pg.md5_user
    env = {**os.environ, "DATABASE_URL": proc.dsn(user.name, user.password)}
    out = run_patterns([node, str(NODE_DIR / "patterns.js"), mode], env)
    assert json.loads(out) == {"ok": True, "checked": checked}
    assert_nothing_held(proc, user.name)
