"""A log line costs less and reads the same: the text, JSON and syslog lines are, byte
for byte, what Python's Formatter and json.dumps made of the same records (times
across second boundaries and a daylight-saving change, milliseconds, control
characters, long messages, %-arguments, tracebacks, the worker); and the steps that
made a line expensive are gone: the date formatted per line, a JSON encoder built per
line, the handler's and formatter's interpreted calls."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_log_record_fields import _restore_logging  # noqa: F401 (an autouse fixture)

from pg_doorman.app import logsetup
from pg_doorman.app.logsetup import (
    MESSAGE_LIMIT,
    SYSLOG_SOCKET_ENV,
    StructuredFormatter,
    TextFormatter,
    one_line,
    setup_logging,
    skip_unused_record_fields,
)

NOON = 1_780_000_000  # a whole second: 2026-05-28 20:26:40 UTC


# --- what the lines were: Python's own Formatter and json.dumps ------------------------


class PythonsTextFormatter(logging.Formatter):
    """The text line as Python's Formatter makes it from the format string, with the
    message made one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def pythons_text(worker: int | None, *, timestamp: bool = True) -> PythonsTextFormatter:
    tag = "" if worker is None else f"[w{worker}] "
    if timestamp:
        return PythonsTextFormatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
    return PythonsTextFormatter(f"%(levelname)s {tag}%(name)s: %(message)s")


def pythons_json(record: logging.LogRecord, worker: int | None) -> str:
    entry: dict[str, object] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname,
        "logger": record.name,
        "message": one_line(record.getMessage()),
        "pid": record.process,
    }
    if worker is not None:
        entry["worker"] = worker
    if record.exc_info:
        entry["exception"] = logging.Formatter().formatException(record.exc_info)
    return json.dumps(entry, ensure_ascii=False)


# --- the records -------------------------------------------------------------------------


def _exc_info() -> Any:
    try:
        raise RuntimeError("boom\nwith a second line")
    except RuntimeError:
        return sys.exc_info()


# When, as a record's `created`, each a float as time.time() gives: within one second,
# across a second, back (a clock set back), a day later, and milliseconds at both ends.
TIMES = (
    NOON + 0.0,
    NOON + 0.0004,
    NOON + 0.005,
    NOON + 0.5,
    NOON + 0.9994,
    NOON + 0.9999999,
    NOON + 1.0,
    NOON + 1.001,
    NOON + 0.25,
    NOON + 86_400.75,
    NOON + 59.999,
    NOON + 60.0,
)
MESSAGES: tuple[tuple[int, str, tuple[object, ...]], ...] = (
    (logging.INFO, "client %s connected (%s@%s) from %s", ("#c7", "app", "db", "127.0.0.1")),
    (logging.INFO, "client %s disconnected (%s@%s) after %.1fs", ("#c7", "app", "db", 12.345)),
    (logging.WARNING, 'login failed for user "%s"', ("nobody\n2026-01-01 00:00:00,000 FATAL x",)),
    (logging.ERROR, "%s", ("tab\tcr\rnul\x00esc\x1b[2Kdel\x7fc1\x85ls\u2028ps\u2029",)),
    (logging.DEBUG, "plain, ünïcode, 名前, nbsp\xa0, 100%% sure", ()),
    (logging.CRITICAL, "%(user)s@%(db)s", ({"user": "app", "db": "db"},)),
    (logging.INFO, "%d clients, %r", (3, "quoted 'x'")),
    (logging.INFO, "x" * (MESSAGE_LIMIT + 37), ()),
    (logging.INFO, "%s", ("\n" * (MESSAGE_LIMIT + 2),)),
    (25, "a level without a name, %s", ('\\ backslash " quote',)),
)


def _records(make: Callable[..., logging.LogRecord]) -> Iterator[logging.LogRecord]:
    """Each message at each time, made by `make` (LogRecord's signature)."""
    for created in TIMES:
        for level, msg, args in MESSAGES:
            record = make("pg_doorman.client", level, __file__, 1, msg, args, None)
            record.created = created
            record.msecs = int((created - int(created)) * 1000) + 0.0
            yield record
    failed = make("pg_doorman.pool", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), None)
    failed.exc_info = _exc_info()
    failed.created, failed.msecs = NOON + 2.5, 500.0
    yield failed
    stacked = make("pg_doorman", logging.WARNING, __file__, 1, "here", (), None)
    stacked.stack_info = "Stack (most recent call last):\n" + "".join(traceback.format_stack())
    stacked.created, stacked.msecs = NOON + 2.75, 750.0
    yield stacked


def _twins() -> Iterator[tuple[logging.LogRecord, logging.LogRecord]]:
    """The same records twice: one for the formatter under test, one for Python's
    (formatting writes to the record)."""
    yield from zip(_records(logging.LogRecord), _records(logging.LogRecord), strict=True)


# --- the lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("worker", [None, 0, 3])
@pytest.mark.parametrize("timestamp", [True, False])
def test_text_lines_are_pythons_formatters(worker: int | None, timestamp: bool) -> None:
    ours, pythons = (
        TextFormatter(worker, timestamp=timestamp),
        pythons_text(worker, timestamp=timestamp),
    )
    compared = 0
    for mine, reference in _twins():
        assert ours.format(mine) == pythons.format(reference)
        assert mine.message == reference.message  # what Formatter leaves on the record
        assert getattr(mine, "asctime", None) == getattr(reference, "asctime", None)
        assert mine.exc_text == reference.exc_text
        compared += 1
    assert compared == len(TIMES) * len(MESSAGES) + 2


def test_text_lines_across_a_daylight_saving_change(monkeypatch: pytest.MonkeyPatch) -> None:
    # Berlin, 2026-03-29: 01:59:59 CET is followed by 03:00:00 CEST at 01:00:00 UTC.
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        change = 1_774_746_000
        ours, pythons = TextFormatter(), pythons_text(None)
        lines = []
        for created in (change - 1.5, change - 0.001, change, change + 0.002, change - 0.5):
            mine = logging.LogRecord("pg_doorman", logging.INFO, __file__, 1, "m", (), None)
            reference = logging.LogRecord("pg_doorman", logging.INFO, __file__, 1, "m", (), None)
            for record in (mine, reference):
                record.created = created
                record.msecs = int((created - int(created)) * 1000) + 0.0
            lines.append(ours.format(mine))
            assert lines[-1] == pythons.format(reference)
        assert [line[:23] for line in lines] == [
            "2026-03-29 01:59:58,500",
            "2026-03-29 01:59:59,999",
            "2026-03-29 03:00:00,000",
            "2026-03-29 03:00:00,002",
            "2026-03-29 01:59:59,500",
        ]
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("worker", [None, 2])
def test_json_lines_are_json_dumps(worker: int | None) -> None:
    ours = StructuredFormatter(worker)
    for mine, reference in _twins():
        line = ours.format(mine)
        assert line == pythons_json(reference, worker)
        assert line.splitlines() == [line]
    no_pid = logging.LogRecord("pg_doorman", logging.INFO, __file__, 1, "m", (), None)
    no_pid.process = None  # logging.logProcesses off
    assert ours.format(no_pid) == pythons_json(no_pid, worker)


@pytest.mark.parametrize("fmt", ["text", "structured"])
@pytest.mark.parametrize("worker", [None, 1])
def test_syslog_datagrams_are_as_before(
    fmt: str, worker: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(5)
        monkeypatch.setenv(SYSLOG_SOCKET_ENV, str(path))
        assert setup_logging("info", fmt, worker=worker, syslog_ident="pg_doorman")
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.handlers.SysLogHandler)
        inner = pythons_text(worker, timestamp=False)
        for mine, reference in _twins():
            if mine.exc_info or mine.stack_info:
                continue  # their text is in the test's own frames; compared above
            handler.handle(mine)
            priority = handler.encodePriority(
                handler.facility, handler.mapPriority(reference.levelname)
            )
            body = (
                pythons_json(reference, worker) if fmt == "structured" else inner.format(reference)
            )
            expected = f"<{priority}>pg_doorman[{os.getpid()}]: {body}"
            assert syslog.recv(65536) == expected.encode()


def test_stderr_lines_through_the_logger_are_as_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    skip_unused_record_fields()
    setup_logging("debug", "text", worker=4)
    logger = logging.getLogger("pg_doorman.client")
    for level, msg, args in MESSAGES:
        logger.log(level, msg, *args)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(MESSAGES)
    pythons = pythons_text(4)
    for line, (level, msg, args) in zip(lines, MESSAGES, strict=True):
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
        reference = logging.LogRecord("pg_doorman.client", level, "f", 1, msg, args, None)
        reference.created, reference.msecs = stamp, float(line[20:23])
        assert line == pythons.format(reference)


# --- the records -------------------------------------------------------------------------


def _fixed_clock(monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: ns)
    monkeypatch.setattr(time, "time", lambda: ns / 1e9)


# --- what a line no longer costs ---------------------------------------------------------


def _record_at(created: float) -> logging.LogRecord:
    record = logging.LogRecord("pg_doorman.client", logging.INFO, __file__, 1, "m %s", ("a",), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[object]:
    calls: list[object] = []
    original = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("formatter", [TextFormatter(), StructuredFormatter()])
def test_the_date_is_formatted_once_per_second(
    monkeypatch: pytest.MonkeyPatch, formatter: logging.Formatter
) -> None:
    strftime = _counting(monkeypatch, time, "strftime")
    lines = [formatter.format(_record_at(NOON + fraction)) for fraction in (0.1, 0.2, 0.9)]
    assert len(strftime) == 1
    assert len(set(lines)) == 3  # the milliseconds differ
    formatter.format(_record_at(NOON + 1.0))
    assert len(strftime) == 2


def test_a_json_line_builds_no_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _counting(monkeypatch, json.JSONEncoder, "__init__")
    line = StructuredFormatter(worker=1).format(_record_at(NOON))
    assert built == []
    assert json.loads(line)["message"] == "m a"


def test_a_line_skips_the_interpreted_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python functions a connection line runs through: none of the handler's,
    the formatter's or the record's helpers that the line no longer needs; the line is
    one write followed by a flush."""
    skip_unused_record_fields()

    class Stream:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return len(text)

        def flush(self) -> None:
            self.calls.append("flush")

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("info", "text")
    logger = logging.getLogger("pg_doorman.client")
    logger.info("warm-up %s", "x")
    stream.calls.clear()
    called: set[str] = set()

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call":
            called.add(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        logger.info("client %s connected (%s@%s) from %s", "#c7", "app", "db", "127.0.0.1")
    finally:
        sys.setprofile(None)
    skipped = {
        "Handler.acquire",
        "Handler.release",
        "Handler.format",
        "StreamHandler.emit",
        "StreamHandler.flush",
        "Formatter.format",
        "Formatter.usesTime",
        "PercentStyle.usesTime",
        "Formatter.formatTime",
        "Formatter.formatMessage",
        "PercentStyle.format",
    }
    assert called & skipped == set()
    assert stream.calls[1:] == ["flush"] and stream.calls[0].endswith(
        " INFO    pg_doorman.client: client #c7 connected (app@db) from 127.0.0.1\n"
    )


def test_setup_again_changes_the_format_and_the_worker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a restart with another -F or a worker's own setup does: the next line is in
    the new format, with nothing left over from the formatter before."""
    logger = logging.getLogger("pg_doorman.client")
    setup_logging("info", "text")
    logger.info("one")
    setup_logging("info", "structured", worker=2)
    logger.info("two")
    setup_logging("warn", "text", worker=1)
    logger.info("not shown")
    logger.warning("three")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(" INFO    pg_doorman.client: one")
    entry = json.loads(lines[1])
    assert list(entry) == ["timestamp", "level", "logger", "message", "pid", "worker"]
    assert (entry["message"], entry["worker"], entry["pid"]) == ("two", 2, os.getpid())
    assert lines[2].endswith(" WARNING [w1] pg_doorman.client: three")
    assert logsetup.parse_level("warn") == logging.getLogger().level
