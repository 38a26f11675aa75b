"""COPY FROM STDIN through the extended protocol with the client's data, and more
batches, sent before the server said the copy began: PostgreSQL ignores the Syncs
between a copy's Execute and its end, and the pooler must know which of the Syncs it
forwarded those are, copy by copy, or it pairs later replies with the wrong requests
(it passed its own hidden replies on to the client). Each exchange runs straight
against PostgreSQL and through the pooler, and must get the same messages."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect
from helpers.pooler import ACCOUNTING_SETUPS, PoolerFactory, PoolShape

COPY = "copy cc from stdin"


def batch(sql: str = COPY) -> bytes:
    return w.parse("", sql) + w.bind("", "") + w.execute() + w.sync()


def exchange(data: bytes, readies: int) -> Callable[[w.PgWire], list[object]]:
    """Send `data` in one write; the replies up to the `readies`-th ReadyForQuery."""

    def run(conn: w.PgWire) -> list[object]:
        conn.execute_query("create temp table cc(id int)")
        conn.send_raw(data)
        got = []
        for _ in range(readies):
            got += conn.read_until_ready(timeout=10)
        # Nothing more comes, and the session goes on.
        after = conn.read_available(wait=0.3)
        return [w.comparable(got), w.comparable(after), conn.execute_query("select 'on'")]

    return run


COUNT = w.query("select count(*), coalesce(sum(id), 0) from cc")
SCENARIOS = {
    # libpq's own sequence (a Sync behind the Execute, CopyDone and Sync after the
    # data), twice, then a query: three ReadyForQuery.
    "two-copies-as-libpq-sends-them": (
        batch() + w.copy_data("1\n2\n") + w.copy_done() + w.sync()
        + batch() + w.copy_data("3\n") + w.copy_done() + w.sync() + COUNT,
        3,
    ),
    # No Sync after the data: the next batch runs in the same implicit transaction,
    # and only the query's ReadyForQuery comes.
    "copies-without-a-sync-after-the-data": (
        batch() + w.copy_data("1\n") + w.copy_done()
        + batch() + w.copy_data("2\n") + w.copy_done() + COUNT,
        1,
    ),
    # A bad row fails the first copy: PostgreSQL skips to the Sync behind its end.
    "a-failed-copy-then-another": (
        batch() + w.copy_data("x\n") + w.copy_done() + w.sync()
        + batch() + w.copy_data("4\n") + w.copy_done() + w.sync() + COUNT,
        3,
    ),
    "copy-fail-then-another-copy": (
        batch() + w.copy_data("1\n") + w.copy_fail("changed my mind") + w.sync()
        + batch() + w.copy_data("5\n") + w.copy_done() + w.sync() + COUNT,
        3,
    ),
    # A Flush behind the Execute instead of a Sync, as drivers that wait for the
    # CopyInResponse send it, then the data and the Sync at once, and a query.
    "a-flush-behind-the-execute": (
        w.parse("", COPY) + w.bind("", "") + w.execute() + w.flush() + w.copy_data("7\n")
        + w.copy_done() + w.sync() + COUNT,
        2,
    ),
    # Not a COPY: the stray CopyDone is ignored, and both Syncs are answered.
    "a-copy-done-after-a-query-that-is-no-copy": (
        batch("select 1") + w.copy_done() + w.sync() + batch() + w.copy_data("6\n")
        + w.copy_done() + w.sync() + COUNT,
        4,
    ),
}  # fmt: skip


# Without prepared statements the client gets the same replies, but may keep its
# server (docs/configuration.md).
SETUPS = ACCOUNTING_SETUPS


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pipelined_copies_get_postgresqls_replies(
    pg: ExamplePostgres, pooler: PoolerFactory, scenario: str, setup: str
) -> None:
    """The same replies, and in transaction pooling the pool's one server goes back to
    the pool once they are all in and the client is between transactions (it stayed
    with a client still owed a reply that never comes)."""
    data, readies = SCENARIOS[scenario]
    general = {"query_wait_timeout": 3000, **SETUPS[setup]}
    proc = pooler(general=general, pools=PoolShape(1).config(pg)["pools"])
    run = exchange(data, readies)
    conn = connect(pg, pg)
    try:
        direct = run(conn)
    finally:
        conn.close()
    conn = connect(proc, pg)
    try:
        assert run(conn) == direct
        if setup == "prepared-statements" and conn.status == "I":
            other = connect(proc, pg)
            try:
                assert other.execute_query("select 'other'") == [("other",)]
            finally:
                other.close()
    finally:
        conn.close()
