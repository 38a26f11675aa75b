"""Integration fixtures: `pooler`, a factory of pooler subprocesses in front of `pg`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory


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
