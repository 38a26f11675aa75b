"""node-postgres through the pooler (transaction mode): named prepared queries, LISTEN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.listen import fanout_pool
from helpers.pooler import PoolerFactory

NODE_DIR = Path(__file__).resolve().parent / "node"


def node_with_pg() -> str:
    """The node binary, once node-postgres is installed (else the test skips)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found; install Node.js (scripts/install-driver-toolchains.sh)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.skip("node-postgres not installed: run `npm ci` in tests/drivers/node")
    return node


def run_script(node: str, script: str, dsn: str) -> dict[str, object]:
    """Run a script of tests/drivers/node; its JSON summary."""
    result = subprocess.run(
        [node, str(NODE_DIR / script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DATABASE_URL": dsn},
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def test_node_pg_named_queries(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    node = node_with_pg()
    user = pg.md5_user
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    summary = run_script(node, "workload.js", proc.dsn(user.name, user.password))
    assert summary == {"ok": True, "checked": 20 * (60 + 6)}


def test_node_pg_listens_through_the_pool(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """With listen_fanout: two listeners and a sender share one pooled server, and both
    hear every notification (node-postgres sends LISTEN as a simple query)."""
    node = node_with_pg()
    user = pg.md5_user
    proc = pooler(pools=fanout_pool(pg))
    summary = run_script(node, "listen.js", proc.dsn(user.name, user.password))
    assert summary == {"ok": True, "heard": 41}
    assert "LISTEN has no effect" not in proc.log_text()
