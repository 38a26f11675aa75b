"""A prepared statement whose result columns changed since it was prepared, used
again on a server that parses its text anew: the client gets PostgreSQL's 0A000
"cached plan must not change result type", never rows of the new type decoded as the
old one's."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import TypeVar

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres, UserSpec
from helpers import pgwire as w
from helpers.both import connect
from helpers.column_change import AS_INT, AS_REAL, SELECT_V, new_table, to_real
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

T = TypeVar("T")


def pool_of(user: str, size: int) -> dict[str, object]:
    return {"example_db": {"users": [{"username": user, "pool_size": size}]}}


def _direct_then_pooled(
    pg: ExamplePostgres, proc: PoolerProcess, user: UserSpec, run: Callable[[str], T]
) -> tuple[T, T]:
    """`run(dsn)` straight against PostgreSQL, then through the pooler, each time on
    the table made afresh."""
    outcomes = []
    for dsn in (pg.user_dsn(user), proc.dsn(user.name, user.password)):
        new_table(pg)
        outcomes.append(run(dsn))
    return outcomes[0], outcomes[1]


def _pooler(pooler: PoolerFactory, user: str, servers: int, cache: int) -> PoolerProcess:
    return pooler(
        general={"server_prepared_statements_cache_size": cache},
        pools=pool_of(user, servers),
    )


# ---- asyncpg: the reported case -----------------------------------------------------


async def _asyncpg_outside_a_transaction(dsn: str, pg: ExamplePostgres) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        before = await conn.fetchval(SELECT_V, 1)
        to_real(pg)
        for k in range(8):  # the server's statements go: the next Bind parses it again
            assert await conn.fetchval(f"select $1::int + {k}", 1) == 1 + k
        return [before, await conn.fetchval(SELECT_V, 1)]
    finally:
        await conn.close()


def test_asyncpg_reprepares_after_a_column_type_change(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Before: the pooler parsed the text again where the statement was gone, and
    asyncpg read the float's four bytes as an int (1317048864), without an error."""
    user = pg.scram_user
    proc = _pooler(pooler, user.name, 3, 3)
    direct, pooled = _direct_then_pooled(
        pg, proc, user, lambda dsn: asyncio.run(_asyncpg_outside_a_transaction(dsn, pg))
    )
    assert direct == [AS_INT, AS_REAL]
    assert pooled == direct


async def _asyncpg_in_a_transaction(dsn: str, pg: ExamplePostgres) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        out: list[object] = [await conn.fetchval(SELECT_V, 1)]
        to_real(pg)
        for k in range(8):
            await conn.fetchval(f"select $1::int * {k + 2}", 1)
        tx = conn.transaction()
        await tx.start()
        try:
            out.append(await conn.fetchval(SELECT_V, 1))
        except asyncpg.InvalidCachedStatementError:
            out.append("InvalidCachedStatementError")
        try:
            out.append(await conn.fetchval("select 1"))
        except asyncpg.InFailedSQLTransactionError:
            out.append("transaction failed")
        await tx.rollback()
        out.append(await conn.fetchval(SELECT_V, 1))
        return out
    finally:
        await conn.close()


def test_asyncpg_in_a_transaction_gets_the_error(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.scram_user
    proc = _pooler(pooler, user.name, 3, 3)
    direct, pooled = _direct_then_pooled(
        pg, proc, user, lambda dsn: asyncio.run(_asyncpg_in_a_transaction(dsn, pg))
    )
    assert direct == [AS_INT, "InvalidCachedStatementError", "transaction failed", AS_REAL]
    assert pooled == direct


def test_asyncpg_on_a_server_that_kept_the_statement(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """One server that keeps its statements: PostgreSQL itself refuses the statement,
    as before, and asyncpg prepares it again."""
    user = pg.scram_user
    proc = _pooler(pooler, user.name, 1, 100)
    new_table(pg)

    async def main() -> list[object]:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            before = await conn.fetchval(SELECT_V, 1)
            to_real(pg)
            return [before, await conn.fetchval(SELECT_V, 1), await conn.fetchval(SELECT_V, 1)]
        finally:
            await conn.close()

    assert asyncio.run(main()) == [AS_INT, AS_REAL, AS_REAL]


# ---- psycopg 3, binary results ------------------------------------------------------


def _psycopg_outcomes(dsn: str, pg: ExamplePostgres) -> list[object]:
    query = "select v from tr where id = %s"
    out: list[object] = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        cur = conn.cursor(binary=True)
        out.append(cur.execute(query, (1,)).fetchone())
        to_real(pg)
        for k in range(8):
            cur.execute(f"select %s::int + {k}", (1,))
        for _ in range(2):
            try:
                out.append(cur.execute(query, (1,)).fetchone())
            except psycopg.errors.FeatureNotSupported as exc:
                out.append(exc.sqlstate)
        # psycopg forgets its statements at DEALLOCATE ALL, and prepares them again.
        conn.execute("deallocate all")
        out.append(cur.execute(query, (1,)).fetchone())
    return out


def test_psycopg_binary_gets_the_error_then_the_new_type(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = _pooler(pooler, user.name, 3, 3)
    direct, pooled = _direct_then_pooled(pg, proc, user, lambda dsn: _psycopg_outcomes(dsn, pg))
    assert direct == [(AS_INT,), "0A000", "0A000", (AS_REAL,)]
    assert pooled == direct


# ---- the common case: statements move between servers, nothing changed -------------


def test_statements_parsed_again_with_the_same_columns(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Many clients over three servers that keep two statements each: statements are
    parsed again and again on servers, and checked each time; a column added to the
    table meanwhile changes none of their columns. Every result is right."""
    user = pg.scram_user
    proc = _pooler(pooler, user.name, 3, 2)
    new_table(pg)
    texts = [f"select v + {k}, id from tr where id = $1" for k in range(6)]

    async def client(n: int) -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            for i in range(30):
                k = (n + i) % len(texts)
                row = await conn.fetchrow(texts[k], 1)
                assert row is not None and tuple(row) == (AS_INT + k, 1)
        finally:
            await conn.close()

    async def main() -> None:
        first = asyncio.gather(*(client(n) for n in range(8)))
        await asyncio.sleep(0.2)
        pg.psql("alter table tr add column w int", database=pg.database)
        await first
        await asyncio.gather(*(client(n) for n in range(8)))

    asyncio.run(main())


# ---- the raw protocol: what the pooler holds while it checks ------------------------

P, B, E, S, Q = w.parse, w.bind, w.execute, w.sync, w.query
BIND_BINARY = B("", "s", ["1"], result_formats=[1])

# One step: bytes sent in one write and the ReadyForQuery messages to read, or an action.
Step = tuple[bytes, int] | Callable[[], None]


def _shape_of(payload: bytes) -> list[tuple[str, int]]:
    """A RowDescription's column names and type OIDs (table OIDs differ each run)."""
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    out = []
    for _ in range(count):
        end = payload.index(b"\x00", pos)
        (oid,) = struct.unpack_from("!I", payload, end + 7)
        out.append((payload[pos:end].decode(), oid))
        pos = end + 19
    return out


def _play(conn: w.PgWire, steps: list[Step]) -> list[list[w.Reply]]:
    replies = []
    for step in steps:
        if callable(step):
            step()
            continue
        data, readies = step
        conn.send_raw(data)
        got: list[w.Message] = []
        for _ in range(readies):
            got += conn.read_until_ready()
        replies.append([(t, _shape_of(p)) if t == b"T" else (t, p) for t, p in w.comparable(got)])
    return replies


def _play_direct_then_pooled(
    pg: ExamplePostgres,
    proc: PoolerProcess,
    steps: list[Step],
    before: Callable[[], None] = lambda: None,
) -> tuple[list[list[w.Reply]], list[list[w.Reply]]]:
    """`steps` on a connection straight to PostgreSQL, then on one through the pooler
    (`before` each time): their replies."""
    outcomes = []
    for target in (pg, proc):
        before()
        conn = connect(target, pg)
        try:
            outcomes.append(_play(conn, steps))
        finally:
            conn.close()
    return outcomes[0], outcomes[1]


def _error_codes(replies: list[list[w.Reply]]) -> list[str]:
    return [dict(fields)["C"] for reply in replies for t, fields in reply if t == b"E"]


def test_held_bytes_with_a_sync_and_a_query_behind(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The Bind the check holds comes with an Execute, a Sync and a simple Query in
    one write: the Bind fails as in PostgreSQL, the Query behind it runs."""
    user = pg.md5_user
    proc = _pooler(pooler, user.name, 1, 1)
    steps: list[Step] = [
        (P("s", SELECT_V, [23]) + w.describe("S", "s") + S(), 1),
        (BIND_BINARY + E() + S(), 1),
        lambda: to_real(pg),
        (P("", "select 1") + B("", "") + E() + S(), 1),  # the server lets `s` go
        (BIND_BINARY + E() + S() + Q("select 2"), 2),
        (BIND_BINARY + E() + S(), 1),  # refused again, as PostgreSQL does
        (P("s2", SELECT_V, [23]) + w.describe("S", "s2") + S(), 1),
        (B("", "s2", ["1"], result_formats=[1]) + E() + S(), 1),
    ]
    direct, pooled = _play_direct_then_pooled(pg, proc, steps, before=lambda: new_table(pg))
    assert _error_codes(direct) == ["0A000", "0A000"]
    assert pooled == direct


def test_unnamed_parse_refused_in_a_failed_transaction_drops_the_old_one(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """In a failed transaction a Parse of the unnamed statement fails (but for an empty
    query), and PostgreSQL has dropped the old unnamed statement before it looked at
    the new text: a Bind of it then gets 26000. Here the text was described before and
    the server lacks it, so its Parse is the one the pooler sends to check the
    columns; that one fails the same."""
    user = pg.md5_user
    proc = _pooler(pooler, user.name, 1, 2)
    steps: list[Step] = [
        (P("", "select 1 as one") + B("", "") + E() + S(), 1),  # described
        (P("", "select 3 as three") + B("", "") + E() + S(), 1),
        (P("", "select 2 as two") + B("", "") + E() + S(), 1),  # the server lets `one` go
        (Q("begin"), 1),
        (Q("select 1/0"), 1),
        (P("", "") + S(), 1),  # an empty query is prepared in a failed transaction
        (P("", "select 1 as one") + S(), 1),
        (B("", "", ["1"]) + E() + S(), 1),
        (Q("rollback"), 1),
        (P("", "select 1 as one") + B("", "") + E() + S(), 1),
    ]
    direct, pooled = _play_direct_then_pooled(pg, proc, steps)
    assert _error_codes(direct) == ["22012", "25P02", "26000"]
    assert pooled == direct


def _wait_for(what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_client_gone_while_its_bytes_are_held(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """The check's Parse waits for a lock the client's Bind is held behind; the client
    leaves meanwhile. Nothing of the client's reached the server: the check is ended
    with a Sync, and the server goes back to the pool, which the next client gets.
    Before, the server was closed (a Bind sent, its reply never read)."""
    user = pg.md5_user
    proc = _pooler(pooler, user.name, 1, 1)
    new_table(pg)
    conn = connect(proc, pg)
    conn.send_raw(P("s", SELECT_V, [23]) + w.describe("S", "s") + S())
    conn.read_until_ready()
    conn.send_raw(P("", "select 1") + B("", "") + E() + S())  # the server lets `s` go
    conn.read_until_ready()
    pid = conn.execute_query("select pg_backend_pid()")[0][0]
    locker = psycopg.connect(pg.dsn(database=pg.database))
    watcher = psycopg.connect(pg.dsn(database=pg.database), autocommit=True)
    try:
        locker.execute("lock table tr in access exclusive mode")
        conn.send_raw(BIND_BINARY + E() + S())

        def waits_for_the_lock() -> bool:
            row = watcher.execute(
                "select wait_event_type from pg_stat_activity where pid = %s", (int(pid),)
            ).fetchone()
            return row is not None and row[0] == "Lock"

        _wait_for("the check's Parse never waited for the lock", waits_for_the_lock)
        conn.close()
        _wait_for(
            "the pooler never saw the client go",
            lambda: not [r for r in admin_rows(proc, "CLIENTS") if r["database"] == pg.database],
        )
        locker.rollback()
    finally:
        locker.close()
        watcher.close()
    _wait_for(
        "the server never went back to the pool",
        lambda: any(
            row["server_process_id"] == pid and row["state"] == "idle"
            for row in admin_rows(proc, "SERVERS")
        ),
    )
    again = connect(proc, pg)
    try:
        assert again.execute_query("select pg_backend_pid()")[0][0] == pid
        again.send_raw(P("t", SELECT_V, [23]) + B("", "t", ["1"]) + E() + S())
        assert w.rows(again.read_until_ready()) == [(str(AS_INT),)]
    finally:
        again.close()


@pytest.mark.parametrize("binary", [False, True])
def test_unchanged_statement_on_a_new_server_is_not_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, binary: bool
) -> None:
    """A statement parsed again on a server, its columns as they were: no error."""
    user = pg.md5_user
    proc = _pooler(pooler, user.name, 1, 1)
    new_table(pg)
    conn = connect(proc, pg)
    formats = [1] if binary else []
    try:
        conn.send_raw(P("s", SELECT_V, [23]) + w.describe("S", "s") + S())
        conn.read_until_ready()
        for k in range(3):
            conn.send_raw(P("", f"select {k}") + B("", "") + E() + S())
            conn.read_until_ready()
            conn.send_raw(B("", "s", ["1"], result_formats=formats) + E() + S())
            got = conn.read_until_ready()
            assert w.msg_types(got) == "2DCZ", got
    finally:
        conn.close()
