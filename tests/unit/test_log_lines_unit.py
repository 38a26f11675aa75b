"""A log message is one line of printable text in every format, syslog included, and a
long one is cut short; tracebacks keep their lines."""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg_doorman.app.logsetup import (
    MESSAGE_LIMIT,
    SYSLOG_SOCKET_ENV,
    StructuredFormatter,
    one_line,
    setup_logging,
)

FAKE = "2026-01-01 00:00:00,000 FATAL   pg_doorman: fake"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pg_doorman.client", logging.INFO, __file__, 1, message, args, None)


def test_control_characters_become_escapes() -> None:
    assert one_line("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert (
        one_line("x\x00\x1b[31m\x7f\x85\u2028\u2029y") == "x\\x00\\x1b[31m\\x7f\\x85\\u2028\\u2029y"
    )
    assert one_line("plain text, ünïcode, 名前") == "plain text, ünïcode, 名前"


def test_a_long_message_is_cut_and_says_how_much_was_left_out() -> None:
    assert one_line("a" * MESSAGE_LIMIT) == "a" * MESSAGE_LIMIT
    assert one_line("a" * (MESSAGE_LIMIT + 10)) == "a" * MESSAGE_LIMIT + "... (10 more characters)"


def test_text_log_keeps_a_forged_user_on_its_line() -> None:
    setup_logging("info", "text")
    record = _record('login failed for user "%s"', "nobody\n" + FAKE)
    formatted = logging.getLogger().handlers[0].format(record)
    assert formatted.splitlines() == [formatted]
    assert formatted.endswith('login failed for user "nobody\\n' + FAKE + '"')


def test_text_log_keeps_the_lines_of_a_traceback() -> None:
    setup_logging("info", "text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "pg_doorman.client", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), None
        )
        record.exc_info = sys.exc_info()
    lines = logging.getLogger().handlers[0].format(record).splitlines()
    assert lines[0].endswith("failed: a\\nb")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_json_message_decodes_to_one_printable_line() -> None:
    line = StructuredFormatter().format(_record("user %s", "nobody\u2028\x1b[2K" + FAKE))
    assert line.splitlines() == [line]
    message = json.loads(line)["message"]
    assert message == "user nobody\\u2028\\x1b[2K" + FAKE


@pytest.mark.parametrize("fmt", ["text", "structured"])
def test_syslog_record_is_one_line(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        monkeypatch.setenv(SYSLOG_SOCKET_ENV, str(path))
        assert setup_logging("info", fmt, worker=0, syslog_ident="pg_doorman")
        logging.getLogger("pg_doorman.client").info("user %s", "nobody\n\x00" + FAKE)
        syslog.settimeout(5)
        datagram = syslog.recv(65536).decode()
    assert "\n" not in datagram and "\x00" not in datagram
    assert "nobody\\n\\x00" + FAKE in datagram.replace("\\\\", "\\")
