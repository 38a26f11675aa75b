"""Which LISTEN and UNLISTEN statements the pooler reads itself (listen_fanout)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pg_doorman.protocol import listen
from pg_doorman.protocol.listen import LISTEN, UNLISTEN, UNLISTEN_ALL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"LISTEN jobs", (LISTEN, "jobs")),
        (b"listen Jobs", (LISTEN, "jobs")),  # unquoted names fold to lower case
        (b"  LiStEn\tjobs_2$ ;  \n", (LISTEN, "jobs_2$")),
        (b'LISTEN "Jobs Queue"', (LISTEN, "Jobs Queue")),
        (b'LISTEN "say ""hi"""', (LISTEN, 'say "hi"')),
        ('LISTEN "zählen"'.encode(), (LISTEN, "zählen")),
        (b"LISTEN name", (LISTEN, "name")),  # an unreserved keyword names a channel
        (b'LISTEN "select"', (LISTEN, "select")),
        (b"UNLISTEN jobs;", (UNLISTEN, "jobs")),
        (b"unlisten *", (UNLISTEN_ALL, "")),
        (b"UNLISTEN  * ;", (UNLISTEN_ALL, "")),
        (b"LISTEN " + b"a" * 63, (LISTEN, "a" * 63)),
    ],
)
def test_plain_statements_are_read(text: bytes, expected: tuple[int, str]) -> None:
    assert listen.parse_statement(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        b"LISTEN",
        b"LISTEN ;",
        b"LISTEN jobs; LISTEN other",  # two statements
        b"LISTEN jobs -- comment",
        b"LISTEN /* c */ jobs",
        b"LISTEN select",  # a reserved word: PostgreSQL's syntax error
        b"LISTEN user",
        b"LISTEN 1jobs",
        b"LISTEN $jobs",
        b"LISTEN *",
        b'LISTEN ""',  # a zero-length name: PostgreSQL's error
        b'LISTEN "open',
        b'LISTEN"jobs"',  # valid, but left to the server
        b"UNLISTEN*",
        b"LISTEN jobs.more",
        b"LISTEN jobs, more",
        b"LISTEN " + b"a" * 64,  # PostgreSQL truncates it, with a NOTICE
        b'LISTEN "' + b"a" * 64 + b'"',
        "LISTEN zählen".encode(),  # beyond ASCII unquoted: PostgreSQL's rules
        b'LISTEN "\xff"',  # not UTF-8
        b"LISTENjobs",
        b"LISTENING jobs",
        b"NOTIFY jobs",
        b"select 1",
        b"",
        b"LISTEN jobs\x0b",  # \v is whitespace only from PostgreSQL 16 on
    ],
)
def test_anything_else_goes_to_the_server(text: bytes) -> None:
    assert listen.parse_statement(text) is None


def test_every_parsed_statement_starts_with_a_byte_of_the_table() -> None:
    for text in (b"LISTEN a", b"listen a", b"UNLISTEN a", b"unlisten *", b" LISTEN a"):
        assert listen.parse_statement(text) is not None
        assert listen.MAY_START[text[0]]
    assert not listen.MAY_START[ord("s")]


@pytest.mark.parametrize(
    ("op", "channel", "sql"),
    [
        (LISTEN, "jobs", 'LISTEN "jobs"'),
        (UNLISTEN, 'say "hi"', 'UNLISTEN "say ""hi"""'),
        (UNLISTEN_ALL, "", "UNLISTEN *"),
    ],
)
def test_the_hub_quotes_what_it_sends(op: int, channel: str, sql: str) -> None:
    assert listen.statement_for(op, channel) == sql
    # And reading it back gives the same channel.
    parsed = listen.parse_statement(sql.encode())
    assert parsed == (op, channel)


def test_channel_of_a_notification() -> None:
    body = (1234).to_bytes(4, "big") + b"jobs\x00payload\x00"
    assert listen.channel_of(body) == "jobs"
    assert listen.channel_of((1).to_bytes(4, "big") + b"no terminator") is None


# ---- the extended protocol -----------------------------------------------------------


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + (len(body) + 4).to_bytes(4, "big") + body


def parse(text: bytes, name: bytes = b"", types: bytes = b"\x00\x00") -> bytes:
    return msg(b"P", name + b"\x00" + text + b"\x00" + types)


def bind(statement: bytes = b"", portal: bytes = b"", params: bytes = b"\x00\x00") -> bytes:
    # No parameter formats, `params` (their count and values), one result format.
    return msg(b"B", portal + b"\x00" + statement + b"\x00" + b"\x00\x00" + params + b"\x00\x00")


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return msg(b"D", kind + name + b"\x00")


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\x00" + b"\x00\x00\x00\x00")


SYNC = msg(b"S")
FLUSH = msg(b"H")
PARSE_COMPLETE, BIND_COMPLETE, NO_DATA = msg(b"1"), msg(b"2"), msg(b"n")
NO_PARAMETERS = msg(b"t", b"\x00\x00")


def known(statements: dict[bytes, bytes]) -> Callable[[bytes], bytes | None]:
    return statements.get


def test_a_one_shot_batch_is_read_with_postgresqls_answers() -> None:
    """psycopg's binary cursor: Parse, Bind, Describe portal, Execute, Sync."""
    batch = parse(b"LISTEN jobs") + bind() + describe(b"P") + execute() + SYNC
    got = listen.read_extended(batch + b"Qnext", known({}))
    assert isinstance(got, listen.ExtendedStatement)
    assert (got.op, got.channel, got.runs, got.end) == (LISTEN, "jobs", True, len(batch))
    assert got.before == PARSE_COMPLETE + BIND_COMPLETE + NO_DATA
    assert got.after == b"Z\x00\x00\x00\x05I"
    assert got.parse == b"\x00LISTEN jobs\x00\x00\x00"


def test_preparing_only_ends_at_a_flush() -> None:
    """asyncpg prepares first (Parse, Describe statement, Flush), then binds."""
    batch = parse(b'LISTEN "A b"', b"stmt_1") + describe(b"S", b"stmt_1") + FLUSH
    got = listen.read_extended(batch, known({}))
    assert isinstance(got, listen.ExtendedStatement)
    assert (got.op, got.channel, got.runs) == (LISTEN, "A b", False)
    assert got.before == PARSE_COMPLETE + NO_PARAMETERS + NO_DATA
    assert got.after == b""
    bound = bind(b"stmt_1") + execute() + SYNC
    got = listen.read_extended(bound, known({b"stmt_1": b'LISTEN "A b"'}))
    assert isinstance(got, listen.ExtendedStatement)
    assert (got.op, got.channel, got.runs, got.parse) == (LISTEN, "A b", True, b"")
    assert got.before == BIND_COMPLETE


def test_a_bind_of_an_unlisten_statement() -> None:
    got = listen.read_extended(bind() + execute() + SYNC, known({b"": b"UNLISTEN *"}))
    assert isinstance(got, listen.ExtendedStatement)
    assert (got.op, got.channel) == (UNLISTEN_ALL, "")


def test_a_batch_cut_short_needs_more_bytes() -> None:
    batch = parse(b"LISTEN jobs") + bind() + execute() + SYNC
    for cut in (3, 10, len(batch) - 1):
        assert listen.read_extended(batch[:cut], known({})) == listen.INCOMPLETE


@pytest.mark.parametrize(
    "batch",
    [
        parse(b"select 1") + bind() + execute() + SYNC,
        parse(b"LISTEN jobs", types=b"\x00\x01\x00\x00\x00\x19") + bind() + execute() + SYNC,
        parse(b"LISTEN jobs") + bind(params=b"\x00\x01\x00\x00\x00\x01x") + execute() + SYNC,
        parse(b"LISTEN jobs") + bind(b"other") + execute() + SYNC,
        parse(b"LISTEN jobs") + bind() + describe(b"P", b"other") + execute() + SYNC,
        parse(b"LISTEN jobs") + bind() + execute(b"other") + SYNC,
        parse(b"LISTEN jobs") + bind() + execute() + FLUSH,
        parse(b"LISTEN jobs") + bind() + SYNC,  # bound, never executed
        parse(b"LISTEN jobs") + bind() + execute() + execute() + SYNC,
        parse(b"LISTEN jobs") + bind() + execute() + msg(b"C", b"S\x00") + SYNC,
        parse(b"LISTEN jobs") + parse(b"LISTEN more") + SYNC,
        bind(b"unknown") + execute() + SYNC,
        bind(b"s") + execute() + SYNC,  # a statement known, but not a LISTEN
        parse(b"LISTEN " + b"j" * 2000) + bind() + execute() + SYNC,  # too long to hold
        msg(b"B", b"\x00") + execute() + SYNC,  # malformed
    ],
)
def test_any_other_batch_goes_to_the_server(batch: bytes) -> None:
    assert listen.read_extended(batch, known({b"s": b"select 1"})) is None
