"""pgx v4 (pgxpool, statement cache) through the pooler (transaction mode).

Built offline in GOPATH mode against Debian's golang-github-jackc-pgx-v4-dev, since
the Go module proxy is not reachable here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory

SOURCE = Path(__file__).resolve().parent / "go" / "main.go"
GOPATH = Path("/usr/share/gocode")  # where Debian's Go library packages install


def test_pgx_v4_statement_cache(pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go not found; install golang-go")
    if not (GOPATH / "src/github.com/jackc/pgx/v4").is_dir():
        pytest.skip("pgx v4 not found; install golang-github-jackc-pgx-v4-dev")
    env = {
        **os.environ,
        "GOPATH": str(GOPATH),
        "GO111MODULE": "off",
        "GOCACHE": str(tmp_path / "cache"),
        "GOFLAGS": "",
    }
    binary = tmp_path / "workload"
    build = subprocess.run(
        [go, "build", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    user = pg.md5_user
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    result = subprocess.run(
        [str(binary), proc.dsn(user.name, user.password)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"ok {20 * (60 + 6)}"
