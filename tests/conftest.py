"""Fixtures shared by every test directory: the example PostgreSQL cluster (`pg`)."""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# `helpers` is imported as a top-level package whatever pytest's rootdir/import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers import ExamplePostgres, start_example_postgres  # noqa: E402
from helpers.pooler import PoolerFactory  # noqa: E402
from helpers.raw_clients import RawClients  # noqa: E402

# The session cluster once created; the revive fixture below restarts it if a test
# stopped or killed it and failed before starting it again.
_session_pg: ExamplePostgres | None = None


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI timeout, kill) would skip every finalizer and leave PostgreSQL and
    # poolers running; as KeyboardInterrupt, pytest tears fixtures down first.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


@pytest.fixture(scope="session")
def pg() -> Iterator[ExamplePostgres]:
    """A real PostgreSQL on a free port, with `example_db`, the `items` table (100 rows)
    and the users example_user_md5 / _scram / _trust (password "test")."""
    global _session_pg
    root = Path(tempfile.mkdtemp(prefix="pg_doorman-test-"))
    try:
        server = start_example_postgres(root)
        _session_pg = server
        try:
            yield server
        finally:
            _session_pg = None
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _revive_pg() -> Iterator[None]:
    yield
    server = _session_pg
    if server is not None and not server.running:
        server.start()


@pytest.fixture
def pooler(pg: ExamplePostgres, tmp_path: Path) -> Iterator[PoolerFactory]:
    """Call it to start a pooler: ``proc = pooler()``, ``pooler(general={...})``.

    Every pooler is stopped at teardown; the test fails if one crashed, hung on SIGTERM
    or logged a Python traceback (``proc.allow_tracebacks = True`` opts out).
    """
    factory = PoolerFactory(pg, tmp_path)
    yield factory
    problems = factory.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def raw() -> Iterator[RawClients]:
    """Raw clients that read slowly or not at all (helpers.raw_clients)."""
    clients = RawClients()
    yield clients
    clients.close()


@pytest.fixture
def refused_port() -> Iterator[Callable[[], int]]:
    """Call it for a port on 127.0.0.1 that refuses connections until the test ends.

    A port that `free_port()` found free may be given to anything a moment later (the
    pooler under test has drawn the very port a test took for a server that is down);
    each of these stays bound by a socket that never listens, so connecting to it is
    refused and nothing else can bind it.
    """
    held: list[socket.socket] = []

    def take() -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.append(sock)
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

    yield take
    for sock in held:
        sock.close()


def pytest_report_header(config: pytest.Config) -> str:
    from pg_doorman import implementation

    return f"pg_doorman hot path: {implementation.describe()}"
