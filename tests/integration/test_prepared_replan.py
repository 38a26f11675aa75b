"""Prepared statements in transaction mode: what the other tests leave out (the same
text with other parameter types, named statements across the batches of one write,
a small pool registry, a server lost between Parse and Bind) and statements that a
schema change spoiled on the servers."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

# One step: (client, bytes sent in one write, ReadyForQuery messages to read).
Step = tuple[int, bytes, int]


def one_user_pool(user: str, size: int) -> dict[str, object]:
    return {"example_db": {"users": [{"username": user, "pool_size": size}]}}


def play(
    target: PoolerProcess | ExamplePostgres, pg: ExamplePostgres, steps: list[Step]
) -> list[list[w.Reply]]:
    conns = [connect(target, pg) for _ in range(max(c for c, _, _ in steps) + 1)]
    replies: list[list[w.Reply]] = []
    try:
        for client, data, readies in steps:
            conns[client].send_raw(data)
            got: list[w.Message] = []
            for _ in range(readies):
                got += conns[client].read_until_ready()
            replies.append(w.comparable(got))
    finally:
        for conn in conns:
            conn.close()
    return replies


P, B, E, S = w.parse, w.bind, w.execute, w.sync

# Two clients on one server: what one prepares, the other finds there.
SCENARIOS: dict[str, list[Step]] = {
    # The pool's statement is keyed by the parameter types too: each client gets its
    # own types (ParameterDescription, and how its value is read).
    "same-text-other-parameter-types": [
        (0, P("a", "select $1", [23]) + w.describe("S", "a") + B("", "a", ["7"]) + E() + S(), 1),
        (1, P("b", "select $1", [25]) + w.describe("S", "b") + B("", "b", ["x"]) + E() + S(), 1),
        (1, P("c", "select $1", []) + w.describe("S", "c") + B("", "c", ["x"]) + E() + S(), 1),
        (0, P("c", "select $1", [0]) + w.describe("S", "c") + B("", "c", ["x"]) + E() + S(), 1),
        (0, P("d", "select $1", [23]) + B("", "d", ["x"]) + E() + S(), 1),
    ],
    # Named Parses the server already has, in batches behind one that fails the
    # transaction, all in one write: PostgreSQL refuses them (25P02), and the names
    # stay unset after the ROLLBACK.
    "known-parses-behind-a-failed-batch": [
        (0, P("a", "select 1") + P("c", "select 2") + S(), 1),
        (1, w.query("begin"), 1),
        (
            1,
            P("", "select 1/0") + B("", "") + E() + S()
            + P("b", "select 1") + B("", "b") + E() + S()
            + P("c", "select 2") + B("", "c") + E() + S(),
            3,
        ),
        (1, w.query("rollback"), 1),
        (1, B("", "b") + E() + S(), 1),
        (1, B("", "c") + E() + S(), 1),
        (1, P("b", "select 1") + P("c", "select 2") + B("", "b") + E() + B("", "c") + E() + S(), 1),
    ],
    # A name closed, and parsed again with another text in the next batch of the write.
    "name-parsed-again-after-close-in-one-write": [
        (0, P("n", "select 1") + B("", "n") + E() + w.close("S", "n") + P("n", "select 2")
            + B("", "n") + E() + S(), 1),
        (1, P("n", "select 3") + S(), 1),
        (0, P("n", "select 3") + S(), 1),
        (0, w.close("S", "n") + S() + P("n", "select 3") + B("", "n") + E() + S(), 2),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_replies_are_postgresqls(pg: ExamplePostgres, pooler: PoolerFactory, name: str) -> None:
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    steps = SCENARIOS[name]
    direct = play(pg, pg, steps)
    for _ in range(2):  # cold, then with the statements already on the server
        pooled = play(proc, pg, steps)
        for i, (mine, theirs) in enumerate(zip(pooled, direct, strict=True)):
            assert mine == theirs, f"step {i}"


def test_asyncpg_more_statements_than_the_registry_holds(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """50 distinct statements through a registry of 8 (and servers that keep 8), from
    20 clients on 2 servers: every result right, no statement missing or doubled."""
    user = pg.scram_user
    proc = pooler(
        general={"prepared_statements_cache_size": 8, "server_prepared_statements_cache_size": 8},
        pools=one_user_pool(user.name, 2),
    )

    async def client(n: int) -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            for i in range(100):
                k = (n * 7 + i) % 50
                if i % 10 == 3:
                    async with conn.transaction():
                        number = await conn.fetchval(f"select $1::int + {k}", i)
                        text = await conn.fetchval(f"select $1::text || '{k}'", str(i))
                    assert (number, text) == (i + k, f"{i}{k}")
                else:
                    assert await conn.fetchval(f"select $1::int + {k}", i) == i + k
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(20)))

    asyncio.run(main())


def test_statement_parsed_again_on_a_new_server(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """The server a statement was prepared on is gone by the next transaction: the
    Bind runs on a new one, which gets the Parse first."""
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    conn = connect(proc, pg)
    try:
        conn.send_raw(P("s", "select $1::int * 3", [23]) + S())
        assert w.msg_types(conn.read_until_ready()) == "1Z"
        pid = conn.execute_query("select pg_backend_pid()")[0][0]
        # Waits for the backend to be gone, then for the pooler to have read its
        # goodbye: a Bind sent before that reaches the dying server, which is another
        # test's subject (test_idle_server_goodbye.py).
        assert any(row["server_process_id"] == pid for row in admin_rows(proc, "SERVERS"))
        pg.psql(f"select pg_terminate_backend({pid}, 10000)")
        deadline = time.monotonic() + 10
        while any(row["server_process_id"] == pid for row in admin_rows(proc, "SERVERS")):
            assert time.monotonic() < deadline, "the pooler never noticed the server go"
            time.sleep(0.02)
        conn.send_raw(B("", "s", ["5"]) + E() + S())
        got = conn.read_until_ready()
        assert w.rows(got) == [("15",)], got
        assert conn.execute_query("select pg_backend_pid()")[0][0] != pid
    finally:
        conn.close()


# ---- statements whose meaning changed on the server ------------------------------


def _new_table(pg: ExamplePostgres, name: str) -> None:
    pg.psql(
        f"SET ROLE example_owner; DROP TABLE IF EXISTS {name};"
        f" CREATE TABLE {name} (a int); INSERT INTO {name} VALUES (1);"
        f" GRANT ALL ON {name} TO PUBLIC;",
        database=pg.database,
    )


def _add_column(pg: ExamplePostgres, table: str) -> None:
    pg.psql(
        f"SET ROLE example_owner; ALTER TABLE {table} ADD COLUMN b int DEFAULT 2;",
        database=pg.database,
    )


def test_unnamed_statements_after_a_table_gains_a_column(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """psycopg's default: an unnamed statement parsed before every execution, which
    PostgreSQL plans afresh each time. Both servers hold the pool's statement for the
    text when a column is added: PostgreSQL refuses to run a statement parsed before
    (0A000 "cached plan must not change result type"), and it must not be reused for
    every later execution, nor its refusal reach a client that parsed the text."""
    user = pg.md5_user
    proc = pooler(pools=one_user_pool(user.name, 2))
    _new_table(pg, "zz_gains_unnamed")
    query = "select * from zz_gains_unnamed where a = %s"
    first, second = (
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) for _ in range(2)
    )
    try:
        with first.transaction():  # keeps one server, so the other client gets the other
            assert first.execute(query, (1,)).fetchall() == [(1,)]
            assert second.execute(query, (1,)).fetchall() == [(1,)]
        _add_column(pg, "zz_gains_unnamed")
        # The first use is refused by the server that parsed the text before; the
        # pooler runs it again parsed anew (one transaction of its own), so that, as
        # with PostgreSQL alone, no execution fails.
        for i in range(6):
            conn = (first, second)[i % 2]
            assert conn.execute(query, (1,)).fetchall() == [(1, 2)]
        assert proc.log_text().count("ran again with the text parsed anew") == 1
    finally:
        first.close()
        second.close()


def test_asyncpg_after_a_table_gains_a_column(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """asyncpg answers 0A000 by preparing the text again, once: that Parse must reach
    a fresh statement on whichever server the retry lands, not the one refused."""
    user = pg.scram_user
    proc = pooler(pools=one_user_pool(user.name, 2))
    _new_table(pg, "zz_gains_asyncpg")
    query = "select * from zz_gains_asyncpg where a = $1"

    async def main() -> None:
        first = await asyncpg.connect(proc.dsn(user.name, user.password))
        second = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            async with first.transaction():
                assert [tuple(r) for r in await first.fetch(query, 1)] == [(1,)]
                assert [tuple(r) for r in await second.fetch(query, 1)] == [(1,)]
            _add_column(pg, "zz_gains_asyncpg")
            for conn in (first, second, first, second):
                assert [tuple(r) for r in await conn.fetch(query, 1)] == [(1, 2)]
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())
