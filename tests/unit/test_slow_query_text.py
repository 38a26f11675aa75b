"""The statement a slow request's log line shows (net/slow_queries.py), read from the
bytes that began the request."""

from __future__ import annotations

import pytest

from helpers import pgwire as w
from pg_doorman.net.slow_queries import TEXT_LIMIT, describe_request
from pg_doorman.prepared.registry import PoolStatements
from pg_doorman.prepared.rewriter import BatchRewriter

NOT_FOUND = "(statement not in the request's first bytes)"


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (w.query("select pg_sleep(1)"), "select pg_sleep(1)"),
        (w.query("select 1;\n\n  select\t2"), "select 1; select 2"),
        # The rest of a long text came in later reads.
        (w.query("select 'abc'")[:12], "select ..."),
        (w.query("select 'x" + "y" * 2000 + "'"), "select 'x" + "y" * (TEXT_LIMIT - 9) + " ..."),
        (w.query("select 'x" + "y" * 100_000 + "'"), "select 'x" + "y" * (TEXT_LIMIT - 9) + " ..."),
        (
            w.parse("s" * 3000, "select 1") + w.sync(),
            "(statement not in the request's first bytes)",
        ),
        (
            w.parse("", "select $1::int") + w.bind("", "", [b"1"]) + w.execute() + w.sync(),
            "select $1::int",
        ),
        (w.parse("s1", "update t set a = $1") + w.sync(), "update t set a = $1"),
        # What may precede the statement in a batch.
        (w.describe("S", "s0") + w.parse("", "select 2") + w.sync(), "select 2"),
        (w.bind("", "s7", []) + w.execute() + w.sync(), '(prepared statement "s7")'),
        (w.bind("", "", []) + w.execute() + w.sync(), "(the unnamed prepared statement)"),
        (b"F\x00\x00\x00\x0e\x00\x00\x03\xe8\x00\x00\x00\x00\x00\x00", "(function call, oid 1000)"),
        (w.execute() + w.sync(), NOT_FOUND),
        (w.sync() + w.query("select 'the next request'"), NOT_FOUND),
        (b"Q\xff\xff\xff\xffselect", NOT_FOUND),
        (b"", NOT_FOUND),
        (None, "(statement not kept: sent while an earlier request was unanswered)"),
        (w.query("select 'été'"), "select 'été'"),
        (b"Q\x00\x00\x00\x0dselect \xff\x00", "select \ufffd"),
    ],
)
def test_what_a_log_line_shows(data: bytes | None, shown: str) -> None:
    assert describe_request(data, None) == shown


def test_a_bind_shows_the_statement_the_client_prepared() -> None:
    registry = PoolStatements(100)
    rewriter = BatchRewriter(registry, b"")
    body = b"q1\x00select * from t where id = $1\x00\x00\x00"
    rewriter.named[b"q1"] = registry.lookup(body, 3, b"")  # as its Parse would
    batch = w.bind("", "q1", [b"7"]) + w.execute() + w.sync()
    assert describe_request(batch, rewriter) == "select * from t where id = $1"
    assert describe_request(w.bind("", "q2", []), rewriter) == '(prepared statement "q2")'
