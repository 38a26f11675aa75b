"""A client message that is no message (an unknown type byte, an impossible length)
behind valid requests. PostgreSQL runs and answers the requests, then reads the bad
message and ends the session with FATAL 08P01; the pooler used to refuse the whole
read at once, so the requests before the bad message never ran and their replies
never came. Each exchange runs straight against PostgreSQL and through the pooler,
and must get the same replies and leave the same rows."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.both import Endpoint, connect
from helpers.fake_backend import ONE_ROW, QueryBackend, stand_in_pool
from helpers.pgwire import ConnectionClosed
from helpers.pooler import ACCOUNTING_SETUPS, PoolerFactory, PoolerProcess, PoolShape
from helpers.random_pipeline import cut, random_batch
from helpers.seeds import seeds

TABLE = "refused_replies"

# No frontend message starts with 'e', and a Sync may not say it is longer than
# 10,000 bytes (PostgreSQL's limit for the messages that are always small).
UNKNOWN_TYPE = b"e\x00\x00\x00\x04"
HUGE_SYNC = b"S" + struct.pack("!I", 20_000)
ROW_DESCRIPTION = w.message(b"T", struct.pack("!h", 1) + w.cstr("x") + bytes(18))


def insert(n: int) -> str:
    return f"insert into {TABLE} values ({n})"


def extended(sql: str) -> bytes:
    return w.parse("", sql) + w.bind("", "") + w.execute() + w.sync()


SCENARIOS: dict[str, bytes] = {
    "queries-then-an-unknown-type": (
        w.query(insert(1)) + w.query("select 'second'") + UNKNOWN_TYPE
    ),
    "extended-batches-then-a-bad-length": (
        extended(insert(2)) + extended("select 'second'") + HUGE_SYNC
    ),
    "a-transaction-left-open": (
        w.query("begin") + w.query(insert(3)) + UNKNOWN_TYPE
    ),
    "a-named-statement-then-an-unknown-type": (
        w.parse("ins", f"insert into {TABLE} values ($1)", [23])
        + w.bind("", "ins", [b"4"]) + w.execute() + w.sync() + UNKNOWN_TYPE
    ),
    # PostgreSQL reads it as the copy's: ERROR 08P01, then the FATAL (the pooler
    # sends the FATAL alone: docs/configuration.md).
    "a-copy-then-an-unknown-type": (
        w.query(f"copy {TABLE} from stdin") + UNKNOWN_TYPE
    ),
    # The copy's data and end came before the bad message: it runs to its end.
    "a-copy-with-its-data-then-an-unknown-type": (
        w.query(f"copy {TABLE} from stdin") + w.copy_data("7\n") + w.copy_done()
        + UNKNOWN_TYPE
    ),
    "an-extended-copy-with-its-data-then-a-bad-length": (
        extended(f"copy {TABLE} from stdin") + w.copy_data("8\n") + w.copy_done()
        + w.sync() + HUGE_SYNC
    ),
    "an-unknown-type-alone": UNKNOWN_TYPE,
}  # fmt: skip


def rows_now(pg: ExamplePostgres) -> list[int]:
    with psycopg.connect(pg.dsn("postgres", database=EXAMPLE_DB), autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"select id from {TABLE} order by id")]


def fresh_table(pg: ExamplePostgres) -> None:
    with psycopg.connect(pg.dsn("postgres", database=EXAMPLE_DB), autocommit=True) as conn:
        conn.execute(f"drop table if exists {TABLE}")
        conn.execute(f"create table {TABLE}(id int)")
        conn.execute(f"grant all on {TABLE} to public")


@dataclass
class Outcome:
    replies: list[w.Reply]  # all but the error
    error: tuple[str, str] | None  # the last error's severity and SQLSTATE
    rows: list[int]  # committed, seen from another session afterwards


def outcome(target: Endpoint, pg: ExamplePostgres, data: bytes, split: bool = False) -> Outcome:
    """Send `data` on a fresh table (its last message in a write of its own, a while
    later, when `split`) and read every reply until the connection closes."""
    fresh_table(pg)
    conn = connect(target, pg)
    try:
        if split:
            conn.send_raw(data[: -len(UNKNOWN_TYPE)])
            time.sleep(0.1)  # the first request is still running on the server
            conn.send_raw(data[-len(UNKNOWN_TYPE) :])
        else:
            conn.send_raw(data)
        replies = conn.wait_closed(timeout=10)
    finally:
        conn.close()
    errors = [w.ServerError(w.error_fields(m[1])) for m in replies if m[0] == b"E"]
    return Outcome(
        w.comparable(m for m in replies if m[0] != b"E"),
        (errors[-1].severity, errors[-1].sqlstate) if errors else None,
        rows_now(pg),
    )


def same_outcome(direct: Outcome, pooled: Outcome) -> None:
    """The same replies and rows, and the pooler's FATAL 08P01 (PostgreSQL ends the
    session after an impossible length without a word: its error goes to its log)."""
    assert (pooled.replies, pooled.rows) == (direct.replies, direct.rows)
    assert direct.error in (None, ("FATAL", "08P01"))
    assert pooled.error == ("FATAL", "08P01")


def next_client_is_served(proc: PoolerProcess, pg: ExamplePostgres) -> None:
    other = connect(proc, pg)
    try:
        assert other.execute_query("select 'next'") == [("next",)]
    finally:
        other.close()


SETUPS = ACCOUNTING_SETUPS


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_requests_before_a_refused_message_are_run_and_answered(
    pg: ExamplePostgres, pooler: PoolerFactory, scenario: str, setup: str
) -> None:
    """The same replies before the same FATAL, the same rows committed, and the pool's
    one server serves the next client."""
    data = SCENARIOS[scenario]
    proc = pooler(
        general={"query_wait_timeout": 3000, **SETUPS[setup]},
        pools=PoolShape(1).config(pg)["pools"],
    )
    same_outcome(outcome(pg, pg, data), outcome(proc, pg, data))
    next_client_is_served(proc, pg)


def test_a_refused_message_waits_for_a_reply_owed_from_an_earlier_read(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The bad message comes while the request before it, sent in an earlier write,
    is still running: its reply comes first, then the FATAL."""
    data = w.query(f"select pg_sleep(0.5), 'slow'; {insert(5)}") + UNKNOWN_TYPE
    proc = pooler(pools=PoolShape(1).config(pg)["pools"])
    direct = outcome(pg, pg, data, split=True)
    same_outcome(direct, outcome(proc, pg, data, split=True))
    assert direct.rows == [5]


def test_a_batch_without_its_sync_before_a_refused_message_is_not_committed(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Parse, Bind, Execute of an INSERT and no Sync, then a bad message: PostgreSQL
    runs the INSERT and rolls it back as the session ends. The pooler must not end
    the batch with a Sync of its own (that would commit it): the server's session is
    closed instead, and the FATAL goes at once (the replies to the unfinished batch
    are not passed on: PostgreSQL sends them before its FATAL)."""
    data = w.parse("", insert(6)) + w.bind("", "") + w.execute() + UNKNOWN_TYPE
    proc = pooler(pools=PoolShape(1).config(pg)["pools"])
    for target in (pg, proc):
        refused = outcome(target, pg, data)
        assert (refused.error, refused.rows) == (("FATAL", "08P01"), [])
    next_client_is_served(proc, pg)


def test_a_refused_message_is_answered_when_more_replies_are_counted_than_come(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """With prepared_statements = false the pooler counts more replies owed than come
    after COPYs the client pipelined (docs/configuration.md): the FATAL then follows
    the server's silence, after the reply that did come, rather than never."""
    copy = w.parse("", "copy cc from stdin") + w.bind("", "") + w.execute() + w.sync()
    copies = (copy + w.copy_data("1\n") + w.copy_done() + w.sync()) * 2
    proc = pooler(general={"prepared_statements": False}, pools=PoolShape(1).config(pg)["pools"])
    conn = connect(proc, pg)
    try:
        conn.execute_query("create temp table cc(id int)")
        conn.send_raw(copies)
        for _ in range(2):
            conn.read_until_ready(timeout=10)
        conn.send_raw(w.query("select 'after'") + UNKNOWN_TYPE)
        replies = conn.wait_closed(timeout=10)
    finally:
        conn.close()
    assert w.rows(replies) == [("after",)]
    error = w.first_error(replies)
    assert error is not None and (error.severity, error.sqlstate) == ("FATAL", "08P01")


@pytest.fixture
def pipeline_log(pg: ExamplePostgres) -> Iterator[None]:
    with psycopg.connect(pg.dsn("postgres", database=EXAMPLE_DB), autocommit=True) as conn:
        conn.execute("create table pipeline_log (x int)")
        conn.execute("grant all on pipeline_log to public")
    yield
    with psycopg.connect(pg.dsn("postgres", database=EXAMPLE_DB), autocommit=True) as conn:
        conn.execute("drop table pipeline_log")


def until_closed(target: Endpoint, pg: ExamplePostgres, pieces: list[bytes]) -> list[w.Reply]:
    """Everything that comes back for `pieces`, written one after another, but a last
    FATAL 08P01 (compared on its own)."""
    conn = connect(target, pg)
    try:
        for piece in pieces:
            conn.send_raw(piece)
            time.sleep(0.001)
        replies = conn.wait_closed(timeout=10)
    finally:
        conn.close()
    if replies and replies[-1][0] == b"E":
        fields = w.error_fields(replies[-1][1])
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
        replies = replies[:-1]
    return w.comparable(replies)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("seed", seeds(15))
def test_random_pipelines_cut_short_by_a_refused_message(
    pg: ExamplePostgres, pooler: PoolerFactory, pipeline_log: None, seed: int, setup: str
) -> None:
    """One to four random batches (helpers.random_pipeline), then a bad message, in
    one to three writes: PostgreSQL's replies to the batches, message for message,
    errors included, before the FATAL."""
    rng = random.Random(seed)
    batches = [random_batch(rng) for _ in range(rng.randint(1, 4))]
    bad = rng.choice((UNKNOWN_TYPE, HUGE_SYNC, UNKNOWN_TYPE[:1]))
    pieces = cut(rng, b"".join(data for _, data in batches) + bad)
    proc = pooler(general=SETUPS[setup], pools=PoolShape(1).config(pg)["pools"])
    direct = until_closed(pg, pg, pieces)
    pooled = until_closed(proc, pg, pieces)
    program = " | ".join(text for text, _ in batches) + f" | {bad!r}"
    assert pooled == direct, program
    next_client_is_served(proc, pg)


class StalledRowBackend(QueryBackend):
    """Answers `select stalled` with the first half of a row, then nothing more."""

    HALF_ROW = w.message(b"D", struct.pack("!hi", 1, 1000) + b"x" * 1000)[:500]

    def reply(self, text: bytes) -> bytes | None:
        if text == b"select stalled":
            return ROW_DESCRIPTION + self.HALF_ROW
        return ONE_ROW


def test_a_server_silent_inside_a_row_gets_the_client_closed_without_an_error(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A refused message waits for a reply whose row stops halfway: after the server's
    silence the client sees its connection close, with no error behind the half row
    (it would read the error as the rest of the row), and the pooler serves others."""
    backend = StalledRowBackend()
    try:
        proc = pooler(pools=stand_in_pool(backend, pg))
        conn = connect(proc, pg)
        try:
            conn.send_raw(w.query("select stalled") + UNKNOWN_TYPE)
            start = len(conn.raw_received)
            with pytest.raises(ConnectionClosed):
                while True:
                    conn.read_bytes(1, timeout=10)
            assert bytes(conn.raw_received[start:]) == ROW_DESCRIPTION + backend.HALF_ROW
        finally:
            conn.close_socket()
        other = connect(proc, pg)
        try:
            assert other.execute_query("select 1") == [("1",)]
        finally:
            other.close()
    finally:
        backend.close()


def test_a_client_slow_to_read_the_replies_still_gets_them_all(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The replies owed before a refused message are more than the sockets hold, and
    the client reads nothing for a while: the server waits on the pooler, which is
    not the server's silence. Every row comes, then the FATAL."""
    rows = 20
    data = w.query(f"select repeat('x', 1000000) from generate_series(1, {rows})") + UNKNOWN_TYPE
    proc = pooler(pools=PoolShape(1).config(pg)["pools"])
    conn = connect(proc, pg)
    try:
        conn.send_raw(data)
        time.sleep(2.5)  # the pooler stops reading the server meanwhile
        replies = conn.wait_closed(timeout=20)
    finally:
        conn.close_socket()
    assert w.msg_types(replies) == "T" + "D" * rows + "CZE"
    error = w.first_error(replies)
    assert error is not None and (error.severity, error.sqlstate) == ("FATAL", "08P01")
