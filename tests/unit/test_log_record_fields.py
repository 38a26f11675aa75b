"""The pooler's process builds only the LogRecord fields its formats print: no walk up
the stack for the caller, no thread name, per record (a client's connection and
disconnection lines are a record each). The lines themselves, text and structured,
are what they were, the process id included."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg_doorman.app import cli
from pg_doorman.app.logsetup import skip_unused_record_fields

_SWITCHES = ("_srcfile", "logThreads", "logMultiprocessing", "logProcesses", "logAsyncioTasks")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = {name: getattr(logging, name) for name in _SWITCHES if hasattr(logging, name)}
    factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for name, value in saved.items():
        setattr(logging, name, value)
    logging.setLogRecordFactory(factory)
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _log_one(monkeypatch: pytest.MonkeyPatch) -> tuple[logging.LogRecord, int]:
    """A connection line as the client logs it, and how often the caller was looked up."""
    looked_up = []
    find_caller = logging.Logger.findCaller

    def counting(self: logging.Logger, *args: object, **kwargs: object) -> object:
        looked_up.append(1)
        return find_caller(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logging.Logger, "findCaller", counting)
    logger = logging.getLogger("pg_doorman.client.line_fields")
    keep = _Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        logger.info("client %s connected (%s@%s) from %s", "#c7", "bench", "bench", "127.0.0.1")
    finally:
        logger.removeHandler(keep)
    return keep.records[0], len(looked_up)


def test_a_record_is_made_without_looking_up_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unused_record_fields()
    record, looked_up = _log_one(monkeypatch)
    assert looked_up == 0
    assert record.threadName is None
    assert record.process == os.getpid()  # the structured and syslog formats print it
    assert record.getMessage() == "client #c7 connected (bench@bench) from 127.0.0.1"


def test_the_lines_read_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from pg_doorman.app.logsetup import StructuredFormatter, TextFormatter

    text = TextFormatter()
    structured = StructuredFormatter(worker=3)
    before, _ = _log_one(monkeypatch)
    skip_unused_record_fields()
    after, _ = _log_one(monkeypatch)
    after.created, after.msecs = before.created, before.msecs
    assert text.format(after) == text.format(before)
    assert text.format(after).endswith(
        "INFO    pg_doorman.client.line_fields: client #c7 connected (bench@bench) from 127.0.0.1"
    )
    assert json.loads(structured.format(after)) == json.loads(structured.format(before))
    assert json.loads(structured.format(after))["pid"] == os.getpid()


def test_the_pooler_process_switches_them_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `-t` checks the configuration after logging is set up, then returns.
    config = tmp_path / "pg_doorman.toml"
    config.write_text(
        '[general]\nhost = "127.0.0.1"\nport = 6432\n'
        'admin_username = "admin"\nadmin_password = "admin"\n'
        '[pools.app]\nserver_host = "127.0.0.1"\nserver_port = 5432\n'
        '[[pools.app.users]]\nusername = "app"\npassword = "secret"\npool_size = 2\n'
    )
    logging._srcfile = __file__
    logging.logThreads = True
    assert cli.main(["-t", str(config)]) == 0
    assert "is valid" in capsys.readouterr().out
    assert logging._srcfile is None
    assert logging.logThreads is False
    assert logging.logMultiprocessing is False
    assert logging.logProcesses is True
    if sys.version_info >= (3, 12):
        assert logging.logAsyncioTasks is False
