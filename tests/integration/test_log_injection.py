"""What a client sends lands in the pooler's log as part of one line: a user name with a
line break, a carriage return, a terminal escape or a Unicode line separator cannot
forge a log line, and a long one is cut short."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess

FAKE = "2026-01-01 00:00:00,000 FATAL   pg_doorman: fake"
# Each way a reader might start a new line (or a terminal be driven) before the fake.
FORGED_USERS = (
    "nobody\n" + FAKE,
    "nobody\r" + FAKE,
    "nobody\r\n" + FAKE,
    "nobody\x1b[2K\x1b[1G" + FAKE,
    "nobody\u2028" + FAKE,
    "nobody\x85" + FAKE,
)


def refused_login(proc: PoolerProcess, user: str) -> None:
    """A login as `user`, refused for its password (no such user)."""
    with pytest.raises(w.ServerError) as refused:
        w.PgWire.connect(proc.host, proc.port, user, EXAMPLE_DB, "wrong")
    assert refused.value.sqlstate == "28P01"


def log_lines(proc: PoolerProcess, count: int) -> list[str]:
    """The log's lines once the `count`th refusal is there, split as any reader would."""
    deadline = time.monotonic() + 10
    text = proc.log_path.read_bytes().decode()
    while text.count("password authentication failed") < count and time.monotonic() < deadline:
        time.sleep(0.05)
        text = proc.log_path.read_bytes().decode()
    assert text.count("password authentication failed") == count, text
    return text.splitlines()


def test_a_user_name_cannot_forge_a_line_of_the_text_log(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    # Through a real driver first: libpq sends the name as it is.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proc.dsn(FORGED_USERS[0], "wrong")).close()
    for user in FORGED_USERS[1:]:
        refused_login(proc, user)
    lines = log_lines(proc, len(FORGED_USERS))
    assert not [line for line in lines if line.startswith(FAKE)], lines
    refusals = [line for line in lines if "password authentication failed" in line]
    assert len(refusals) == len(FORGED_USERS)
    assert all(line.startswith("20") and FAKE in line for line in refusals), refusals
    assert 'for user "nobody\\n2026-01-01' in refusals[0]
    assert 'for user "nobody\\x1b[2K\\x1b[1G2026-01-01' in refusals[3]


def test_a_user_name_cannot_forge_a_line_of_the_json_log(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(args=("-l", "debug", "-F", "structured"))
    for user in FORGED_USERS:
        refused_login(proc, user)
    entries = [json.loads(line) for line in log_lines(proc, len(FORGED_USERS))]
    refusals = [e["message"] for e in entries if "authentication failed" in e["message"]]
    assert len(refusals) == len(FORGED_USERS)
    # What `jq -r .message` prints is one line each, with no terminal escape either.
    for message in refusals:
        assert message.isprintable(), message
        assert FAKE in message


def test_a_long_user_name_is_cut_short_in_the_log(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = "u" * 9000  # near the startup packet's 10000 bytes
    refused_login(proc, user)
    (line,) = (x for x in log_lines(proc, 1) if "password authentication failed" in x)
    assert user not in line
    assert len(line) < 4500
    assert line.endswith(" more characters)")
