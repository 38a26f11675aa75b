"""Identical bytes to PostgreSQL and through the pooler give identical replies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.both import on_both
from helpers.pooler import PoolerFactory, PoolerProcess

# RowDescription carries table and column OIDs; both sides see the same database, so
# they match, but pg_backend_pid() and the like differ: scenarios avoid such values.
Scenario = Callable[[w.PgWire], None]


def simple(conn: w.PgWire) -> None:
    conn.send_raw(w.query("select 1 as a, 'x'::text as b; select null::int"))


def simple_error(conn: w.PgWire) -> None:
    conn.send_raw(w.query("select 1/0"))


def empty_query(conn: w.PgWire) -> None:
    conn.send_raw(w.query(""))


def transaction_with_error(conn: w.PgWire) -> None:
    conn.send_raw(w.query("begin"))
    conn.read_until_ready()
    conn.send_raw(w.query("select nope"))
    conn.read_until_ready()
    conn.send_raw(w.query("select 1"))
    conn.read_until_ready()
    conn.send_raw(w.query("rollback"))


def extended_unnamed(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("", "select $1::int + 1 as v", [23])
        + w.bind("", "", [b"41"])
        + w.describe("P")
        + w.execute()
        + w.sync()
    )


def extended_named_and_close(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("st", "select id from items where id < $1 order by id", [23])
        + w.describe("S", "st")
        + w.bind("", "st", [b"4"])
        + w.execute()
        + w.close("S", "st")
        + w.sync()
    )


def extended_error_skips_to_sync(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("", "select 1/0")
        + w.bind("", "")
        + w.execute()
        + w.parse("", "select 2")
        + w.bind("", "")
        + w.execute()
        + w.sync()
        + w.parse("", "select 3")
        + w.bind("", "")
        + w.execute()
        + w.sync()
    )


def pipeline_200(conn: w.PgWire) -> None:
    batch = b"".join(
        w.parse("", f"select {i}") + w.bind("", "") + w.describe("P") + w.execute()
        for i in range(200)
    )
    conn.send_raw(batch + w.sync())


def portal_suspended(conn: w.PgWire) -> None:
    conn.send_raw(w.query("begin"))
    conn.read_until_ready()
    conn.send_raw(
        w.parse("", "select id from items order by id")
        + w.bind("p1", "")
        + w.execute("p1", 3)
        + w.execute("p1", 2)
        + w.sync()
    )
    conn.read_until_ready()
    conn.send_raw(w.query("commit"))


def copy_in_simple(conn: w.PgWire) -> None:
    conn.send_raw(w.query("create temp table pc(x int)"))
    conn.read_until_ready()
    conn.send_raw(w.query("copy pc from stdin"))
    conn.read_until(b"G")
    conn.send_raw(w.copy_data("1\n2\n") + w.copy_data("3\n") + w.copy_done())
    conn.read_until_ready()
    conn.send_raw(w.query("select sum(x) from pc"))


def copy_in_extended_with_early_sync(conn: w.PgWire) -> None:
    """libpq-style extended COPY: Sync right after Execute is ignored by the server."""
    conn.send_raw(w.query("create temp table pe(x int)"))
    conn.read_until_ready()
    conn.send_raw(w.parse("", "copy pe from stdin") + w.bind("", "") + w.execute() + w.sync())
    conn.read_until(b"G")
    conn.send_raw(w.copy_data("7\n") + w.copy_done() + w.sync())
    conn.read_until_ready()
    conn.send_raw(w.query("select sum(x) from pe"))


def copy_fail(conn: w.PgWire) -> None:
    conn.send_raw(w.query("create temp table pf(x int)"))
    conn.read_until_ready()
    conn.send_raw(w.query("copy pf from stdin"))
    conn.read_until(b"G")
    conn.send_raw(w.copy_data("1\n") + w.copy_fail("changed my mind"))


def copy_out(conn: w.PgWire) -> None:
    conn.send_raw(w.query("copy (select id from items where id <= 5 order by id) to stdout"))


def flush_without_sync(conn: w.PgWire) -> None:
    conn.send_raw(w.parse("", "select 5") + w.bind("", "") + w.execute() + w.flush())
    conn.read_until(b"C")
    conn.send_raw(w.sync())


SCENARIOS: dict[str, Scenario] = {
    f.__name__: f
    for f in (
        simple,
        simple_error,
        empty_query,
        transaction_with_error,
        extended_unnamed,
        extended_named_and_close,
        extended_error_skips_to_sync,
        pipeline_200,
        portal_suspended,
        copy_in_simple,
        copy_in_extended_with_early_sync,
        copy_fail,
        copy_out,
        flush_without_sync,
    )
}


def run(conn: w.PgWire, scenario: Scenario) -> list[w.Message]:
    """What `scenario` gets back, up to its last ReadyForQuery."""
    start = len(conn.received)
    scenario(conn)
    conn.read_until_ready()
    return conn.received[start:]


@pytest.fixture(scope="module")
def parity_pooler(
    pg: ExamplePostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolerProcess]:
    factory = PoolerFactory(pg, tmp_path_factory.mktemp("parity"))
    users = [{"username": pg.md5_user.name, "pool_size": 2}]
    proc = factory(pools={"example_db": {"users": users}})
    yield proc
    problems = factory.close()
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_parity(pg: ExamplePostgres, parity_pooler: PoolerProcess, name: str) -> None:
    scenario = SCENARIOS[name]
    direct, pooled = on_both(pg, parity_pooler, lambda conn: run(conn, scenario))
    assert w.msg_types(pooled) == w.msg_types(direct)
    assert pooled == direct
