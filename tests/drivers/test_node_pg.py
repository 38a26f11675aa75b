"""node-postgres named prepared queries through the pooler (transaction mode)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory

NODE_DIR = Path(__file__).resolve().parent / "node"


def test_node_pg_named_queries(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found; install Node.js (scripts/install-driver-toolchains.sh)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.skip("node-postgres not installed: run `npm ci` in tests/drivers/node")
    user = pg.md5_user
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    result = subprocess.run(
        [node, str(NODE_DIR / "workload.js")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DATABASE_URL": proc.dsn(user.name, user.password)},
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"ok": True, "checked": 20 * (60 + 6)}
