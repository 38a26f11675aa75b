"""pgjdbc through the pooler (transaction mode): prepareThreshold=1, LISTEN."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.listen import fanout_pool
from helpers.pooler import PoolerFactory

SOURCE = Path(__file__).resolve().parent / "java" / "Workload.java"
LISTEN_SOURCE = SOURCE.with_name("Listen.java")
JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java


def compiled(source: Path, tmp_path: Path) -> str:
    """`source` compiled into tmp_path against pgjdbc (the test skips without a JDK or
    the driver); the java binary to run it with."""
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.skip("no JDK found; install default-jdk-headless")
    if not JAR.exists():
        pytest.skip(f"{JAR} not found; install libpostgresql-jdbc-java")
    subprocess.run(
        [javac, "-cp", str(JAR), "-d", str(tmp_path), str(source)], check=True, timeout=120
    )
    return java


def run_class(java: str, tmp_path: Path, name: str, url: str) -> str:
    """Run a compiled class with the JDBC url; its last line of output."""
    result = subprocess.run(
        [java, "-cp", f"{tmp_path}:{JAR}", name, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last: str = result.stdout.strip().splitlines()[-1]
    return last


def test_pgjdbc_prepare_threshold_1(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    java = compiled(SOURCE, tmp_path)
    user = pg.md5_user
    pg.psql(f"grant create on schema public to {user.name}", database="example_db")
    proc = pooler(
        general={"server_prepared_statements_cache_size": 5},
        pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}},
    )
    url = (
        f"jdbc:postgresql://{proc.host}:{proc.port}/example_db?user={user.name}"
        f"&password={user.password}&prepareThreshold=1&sslmode=disable"
    )
    assert run_class(java, tmp_path, "Workload", url) == f"ok {8 * 61}"


def test_pgjdbc_listens_through_the_pool(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """With listen_fanout: pgjdbc sends LISTEN in the extended protocol (Parse, Bind,
    Describe, Execute, Sync); the listener hears notifications sent through the
    pooler while the sender has the pool's one server."""
    java = compiled(LISTEN_SOURCE, tmp_path)
    user = pg.md5_user
    proc = pooler(pools=fanout_pool(pg))
    url = (
        f"jdbc:postgresql://{proc.host}:{proc.port}/example_db?user={user.name}"
        f"&password={user.password}&sslmode=disable"
    )
    assert run_class(java, tmp_path, "Listen", url) == "ok 20"
    assert "LISTEN has no effect" not in proc.log_text()


def test_pgjdbc_after_a_table_gains_a_column(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """Both servers hold the pool's statement for the query when a column is added.
    A connection that has not prepared the query parses it; the pooler does not send
    that Parse, the server refuses the statement it parsed before (0A000), and the
    pooler runs the batch again with the text parsed anew: every connection gets the
    new column and no error, as from PostgreSQL."""
    java = compiled(SOURCE.with_name("SchemaChange.java"), tmp_path)
    user = pg.md5_user
    pg.psql(
        "DROP TABLE IF EXISTS jdbc_schema_change; CREATE TABLE jdbc_schema_change (id int);"
        " INSERT INTO jdbc_schema_change VALUES (1);"
        f" ALTER TABLE jdbc_schema_change OWNER TO {user.name};",
        database="example_db",
    )
    proc = pooler(pools={"example_db": {"users": [{"username": user.name, "pool_size": 2}]}})
    url = (
        f"jdbc:postgresql://{proc.host}:{proc.port}/example_db?user={user.name}"
        f"&password={user.password}&sslmode=disable"
    )
    assert run_class(java, tmp_path, "SchemaChange", url) == "ok 2 4"
    assert "ran again with the text parsed anew" in proc.log_text()
