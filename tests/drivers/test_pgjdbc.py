"""pgjdbc with prepareThreshold=1 through the pooler (transaction mode)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory

SOURCE = Path(__file__).resolve().parent / "java" / "Workload.java"
JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java


def test_pgjdbc_prepare_threshold_1(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.skip("no JDK found; install default-jdk-headless")
    if not JAR.exists():
        pytest.skip(f"{JAR} not found; install libpostgresql-jdbc-java")
    user = pg.md5_user
    pg.psql(f"grant create on schema public to {user.name}", database="example_db")
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    subprocess.run(
        [javac, "-cp", str(JAR), "-d", str(tmp_path), str(SOURCE)], check=True, timeout=120
    )
    url = (
        f"jdbc:postgresql://{proc.host}:{proc.port}/example_db?user={user.name}"
        f"&password={user.password}&prepareThreshold=1&sslmode=disable"
    )
    result = subprocess.run(
        [java, "-cp", f"{tmp_path}:{JAR}", "Workload", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"ok {8 * 61}"
