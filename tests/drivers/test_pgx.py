"""pgx v4 through the pooler (transaction mode): pgxpool and its statement cache, LISTEN.

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
from helpers.listen import fanout_pool
from helpers.pooler import PoolerFactory

SOURCE = Path(__file__).resolve().parent / "go" / "main.go"
LISTEN_SOURCE = SOURCE.with_name("listen.go")
GOPATH = Path("/usr/share/gocode")  # where Debian's Go library packages install


def built(source: Path, tmp_path: Path) -> Path:
    """`source` built against Debian's pgx v4 (the test skips without Go or pgx)."""
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
    binary = tmp_path / source.stem
    build = subprocess.run(
        [go, "build", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    return binary


def run_binary(binary: Path, dsn: str) -> str:
    result = subprocess.run([str(binary), dsn], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    last: str = result.stdout.strip().splitlines()[-1]
    return last


def test_pgx_v4_statement_cache(pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path) -> None:
    binary = built(SOURCE, tmp_path)
    user = pg.md5_user
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    assert run_binary(binary, proc.dsn(user.name, user.password)) == f"ok {20 * (60 + 6)}"


def test_pgx_v4_listens_through_the_pool(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """With listen_fanout: the listener hears notifications sent through the pooler
    while the sender has the pool's one server."""
    binary = built(LISTEN_SOURCE, tmp_path)
    user = pg.md5_user
    proc = pooler(pools=fanout_pool(pg))
    assert run_binary(binary, proc.dsn(user.name, user.password)) == "ok 20"
    assert "LISTEN has no effect" not in proc.log_text()
