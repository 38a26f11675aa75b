"""asyncpg's own test suite through the pooler.

The suite ships in asyncpg's source distribution (fetched from the package index with
pip, for the asyncpg installed here). It runs twice against a PostgreSQL of its own:
directly, then through the pooler in session mode, where a client keeps one server
for its whole session and a pooler should be invisible. Every test that passes
directly must pass through the pooler, but for the differences named below.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from helpers.pooler import PoolerProcess, general_section
from pg_doorman.app.embedded_pg import LocalPostgres, free_port

# Passing directly, they may fail through the pooler, for these reasons.
DIFFERENCES = {
    "tests/test_pool.py::TestPool::test_pool_min_size_restored_after_idle_connection_loss": (
        "it runs pg_terminate_backend() on the pid of the connection's BackendKeyData,"
        " which the pooler gives out (PostgreSQL's pid is not the client's to cancel by)"
    ),
    "tests/test_listeners.py::TestListeners::test_listen_02": (
        "a notification another client sent names that client's server by its"
        " PostgreSQL pid, not by the pid the pooler gave the client"
    ),
    "tests/test_listeners.py::TestListeners::test_listen_notletters": (
        "as test_listen_02: another client's notification"
    ),
    "tests/test_cache_invalidation.py::TestCacheInvalidation"
    "::test_type_cache_invalidation_in_pool": (
        "it drops the database it made when done, which fails while the pooler keeps"
        " the database's servers open for the next client (55006), as with any pooler"
    ),
    "tests/test_introspection.py::TestIntrospection::test_introspection_sticks_for_ps": (
        "the last test of its class, whose clean-up drops the database the class made:"
        " as test_type_cache_invalidation_in_pool"
    ),
    "tests/test_execute.py::TestExecuteMany::test_executemany_server_failure_during_writes": (
        "timing: with the pooler's buffers between them, asyncpg may write all of its"
        " rows before the server's error reaches it (it asserts it stopped early; on a"
        " busy machine it fails against PostgreSQL alone too)"
    ),
}
# Not run: they start clusters of their own (initdb, TLS certificates) or check
# asyncpg's own source code.
IGNORED = ("tests/test_connect.py", "tests/test__sourcecode.py")
# Databases the suite connects to (it creates all but `postgres`).
DATABASES = ("postgres", "testdb", "asyncpg_intro_test")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tests` directory of the installed asyncpg's source distribution, in a
    directory of its own (the test skips when it cannot be downloaded)."""
    version = importlib.metadata.version("asyncpg")
    where = tmp_path_factory.mktemp("asyncpg-suite")
    fetched = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--no-binary", ":all:", "--no-build-isolation", f"asyncpg=={version}"),
            *("--dest", str(where)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    archives = list(where.glob("asyncpg-*.tar.gz"))
    if fetched.returncode != 0 or not archives:
        pytest.skip(f"asyncpg {version}'s source distribution: {fetched.stderr[-500:]}")
    prefix = f"asyncpg-{version}/tests/"
    with tarfile.open(archives[0]) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        archive.extractall(where, members=members, filter="data")
    root = where / f"asyncpg-{version}"
    # Its own (empty) configuration: not this project's, found further up otherwise.
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


@pytest.fixture(scope="module")
def suite_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL for the suite alone: it creates databases, roles and types."""
    root = Path(tempfile.mkdtemp(prefix="pg_doorman-asyncpg-suite-"))
    server = LocalPostgres(root / "data", port=free_port(), settings={"max_connections": "300"})
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


def run_suite(
    root: Path, port: int, report: Path, tests: Sequence[str] = ("tests",)
) -> dict[str, str]:
    """Run the suite (or `tests` of it) against 127.0.0.1:`port` as `postgres`: each
    test's outcome (passed, failed or skipped) by its pytest id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="postgres", PGDATABASE="postgres")
    ignored = [f"--ignore={path}" for path in IGNORED]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120"),
            *(f"--junitxml={report}", *ignored, *tests),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        test_id = f"{module.replace('.', '/')}.py::{cls}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = "passed"
        if tags & {"failure", "error"}:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        outcomes[test_id] = outcome
    return outcomes


def failures(report: Path, tests: Sequence[str]) -> str:
    """The messages of `tests`' failures in `report`."""
    lines = []
    for case in ET.parse(report).iter("testcase"):
        if any(test.endswith(f"::{case.get('name')}") for test in tests):
            lines += [f"{case.get('name')}: {child.get('message')}" for child in case]
    return "\n".join(lines)


def session_pooler_config(server: LocalPostgres, port: int) -> dict[str, Any]:
    pools = {
        database: {
            "server_host": server.host,
            "server_port": server.port,
            "pool_mode": "session",
            "users": [{"username": "postgres", "password": "", "pool_size": 100}],
        }
        for database in DATABASES
    }
    return {
        "general": general_section(port, "host all postgres 127.0.0.1/32 trust\n"),
        "pools": pools,
    }


def test_asyncpg_s_suite_passes_through_the_pooler_as_directly(
    suite: Path, suite_pg: LocalPostgres, tmp_path: Path
) -> None:
    direct = run_suite(suite, suite_pg.port, tmp_path / "direct.xml")
    passed = sorted(test for test, outcome in direct.items() if outcome == "passed")
    assert len(passed) > 200, direct  # the suite ran, against a working server

    proc = PoolerProcess(session_pooler_config(suite_pg, free_port()), tmp_path, args=())
    proc.start()
    try:
        pooled = run_suite(suite, proc.port, tmp_path / "pooled.xml")
        assert set(pooled) == set(direct)
        failed = [t for t in passed if pooled[t] != "passed" and t not in DIFFERENCES]
        # Some of the suite's tests fail now and then against PostgreSQL alone
        # (test_pool_config_persistence, 3 runs in 15 here): one that fails through
        # the pooler is run twice more there, and fails the comparison if it fails
        # every time.
        for attempt in range(2):
            if not failed:
                break
            again = run_suite(suite, proc.port, tmp_path / f"again{attempt}.xml", failed)
            failed = [test for test in failed if again.get(test) != "passed"]
    finally:
        proc.stop()
    assert failed == [], failures(tmp_path / "pooled.xml", failed)
    assert proc.problems() == []
