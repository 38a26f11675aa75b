"""Log formats, the worker tag, and runtime log filters."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from pg_doorman.app.logsetup import StructuredFormatter, apply_log_filter, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pg_doorman.pool").setLevel(logging.NOTSET)


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("pg_doorman.pool", logging.WARNING, __file__, 1, message, (), None)


def test_structured_lines_name_the_worker() -> None:
    line = json.loads(StructuredFormatter(worker=3).format(_record("hello")))
    assert line["worker"] == 3 and line["message"] == "hello" and line["level"] == "WARNING"
    assert "worker" not in json.loads(StructuredFormatter().format(_record("x")))


def test_text_lines_carry_the_worker_tag() -> None:
    setup_logging("info", "text", worker=1)
    formatted = logging.getLogger().handlers[0].format(_record("hello"))
    assert "[w1] pg_doorman.pool: hello" in formatted


def test_runtime_filter_levels_and_overrides() -> None:
    setup_logging("warn")
    apply_log_filter("info,pg_doorman.pool=debug")
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("pg_doorman.pool").level == logging.DEBUG
    apply_log_filter("default")  # back to the startup level, overrides dropped
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("pg_doorman.pool").level == logging.NOTSET
    for bad in ("loud", "", "other.module=debug", "pg_doorman.pool=loud"):
        with pytest.raises(ValueError):
            apply_log_filter(bad)
    assert logging.getLogger().level == logging.WARNING  # nothing changed
