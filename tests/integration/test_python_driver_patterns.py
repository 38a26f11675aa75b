"""Python driver patterns in transaction mode with protocol-level prepared statements,
each run straight against PostgreSQL and then through the pooler: the same rows, the
same errors (SQLSTATEs) and the same state afterwards.

The pool has fewer servers than the drivers have connections, and each server keeps
three statements, so that statements move between servers and are parsed again.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pg8000.dbapi
import pg8000.native
import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

T = TypeVar("T")


@pytest.fixture
def shared(pg: ExamplePostgres, pooler: PoolerFactory) -> Iterator[PoolerProcess]:
    """The md5 user's pool of three servers keeping three statements each."""
    pg.psql(f"grant create on schema public to {pg.md5_user.name}", database=EXAMPLE_DB)
    yield pooler(
        general={"server_prepared_statements_cache_size": 3},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 3}]}},
    )


def direct_and_pooled(
    pg: ExamplePostgres, proc: PoolerProcess, run: Callable[[str], T]
) -> tuple[T, T]:
    """`run(dsn)` against PostgreSQL, then through the pooler: (direct, pooled)."""
    user = pg.md5_user
    return run(pg.user_dsn(user)), run(proc.dsn(user.name, user.password))


def asyncpg_dsn(dsn: str) -> str:
    # asyncpg takes no libpq sslmode in the URL's query.
    return dsn.split("?", 1)[0]


def assert_servers_idle(proc: PoolerProcess, user: str) -> None:
    """Nothing the drivers did keeps a server: every one is back idle."""
    servers = [s for s in admin_rows(proc, "servers") if s["user"] == user]
    assert servers and all(s["state"] == "idle" for s in servers), servers


# ---- psycopg 3 -----------------------------------------------------------------


def psycopg_pipelines(dsn: str) -> list[Any]:
    """Auto-prepared statements (prepare_threshold=0) with text and binary results in
    pipelines: a long one, then one in a transaction that fails in the middle (the
    rest is skipped and the transaction rolled back), then the texts the failed
    pipeline never ran, which psycopg may take for prepared."""
    out: list[Any] = []
    with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as conn:
        conn.execute("drop table if exists pyd_pipe")
        conn.execute("create table pyd_pipe (id int primary key, v text)")
        cursors = []
        with conn.pipeline():
            for i in range(600):
                cur = conn.cursor(binary=i % 2 == 0)
                cur.execute(
                    f"insert into pyd_pipe values (%s, %s) returning id + {i % 7}",
                    (i, "x" * (i % 50)),
                )
                cursors.append(cur)
        out.append([row for cur in cursors for row in cur.fetchall()])
        try:
            with conn.transaction(), conn.pipeline():
                for i in range(40):
                    if i == 20:
                        conn.execute("insert into pyd_pipe values (%s, 'taken')", (1,))
                    else:
                        conn.execute(f"insert into pyd_pipe values (%s, 'new{i}')", (1000 + i,))
        except psycopg.Error as error:
            out.append(error.sqlstate)
        out.append(conn.info.transaction_status.name)
        for i in range(15, 40):
            try:
                conn.execute(f"insert into pyd_pipe values (%s, 'new{i}')", (2000 + i,))
            except psycopg.Error as error:
                out.append(("error", i, error.sqlstate))
        with conn.pipeline():
            nested_ok = conn.execute("select %s::int", (7,))
            with conn.transaction():
                conn.execute("insert into pyd_pipe values (%s, 'kept')", (3000,))
                try:
                    with conn.transaction():
                        conn.execute("insert into pyd_pipe values (%s, 'gone')", (3001,))
                        conn.execute("insert into pyd_pipe values (%s, 'taken')", (3000,))
                except psycopg.errors.UniqueViolation:
                    out.append("savepoint rolled back")
        out.append(nested_ok.fetchone())
        out.append(
            conn.execute(
                "select count(*), sum(id), string_agg(v, ',' order by id) from pyd_pipe"
            ).fetchall()
        )
    return out


def test_psycopg_pipelines_fail_and_recover_as_postgresql_does(
    pg: ExamplePostgres, shared: PoolerProcess
) -> None:
    direct, pooled = direct_and_pooled(pg, shared, psycopg_pipelines)
    assert "23505" in direct and "savepoint rolled back" in direct
    assert pooled == direct
    assert_servers_idle(shared, pg.md5_user.name)


def psycopg_named_cursors(dsn: str) -> list[Any]:
    """Server-side cursors inside transactions: paged, scrollable, two interleaved."""
    out: list[Any] = []
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        conn.execute("drop table if exists pyd_cur")
        conn.execute(
            "create table pyd_cur as select g as id, 'v' || g as v from generate_series(1, 500) g"
        )
        conn.commit()
        with conn.cursor("paged") as cur:
            cur.itersize = 37
            cur.execute("select id, v from pyd_cur where id > %s order by id", (10,))
            rows = list(cur)
            out.append((len(rows), rows[0], rows[-1]))
        with conn.cursor("scroll", scrollable=True) as cur:
            cur.execute("select id from pyd_cur order by id")
            out.append(cur.fetchmany(3))
            cur.scroll(100, "absolute")
            out.append(cur.fetchone())
        with conn.cursor("up", binary=True) as up, conn.cursor("down") as down:
            up.execute("select id from pyd_cur order by id")
            down.execute("select v from pyd_cur order by id desc")
            out.append((up.fetchmany(2), down.fetchmany(2), up.fetchmany(2)))
        conn.commit()
    return out


def test_psycopg_named_cursors_in_transactions(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct, pooled = direct_and_pooled(pg, shared, psycopg_named_cursors)
    assert pooled == direct


def test_a_with_hold_cursor_ends_with_its_transaction(
    pg: ExamplePostgres, shared: PoolerProcess
) -> None:
    """In transaction mode the server goes back to the pool when the transaction ends,
    and the check-in's CLOSE ALL closes a WITH HOLD cursor (docs: Check-in cleanup):
    its FETCH after the COMMIT fails with 34000 (PostgreSQL alone would go on with
    row 3), the connection stays usable, and the servers are back idle."""
    user = pg.md5_user
    with psycopg.connect(shared.dsn(user.name, user.password)) as conn:
        cur = conn.cursor("held", withhold=True)
        cur.execute("select g from generate_series(1, 10) g")
        assert cur.fetchmany(2) == [(1,), (2,)]
        conn.commit()
        with pytest.raises(psycopg.errors.InvalidCursorName):
            cur.fetchmany(2)
        conn.rollback()
        assert conn.execute("select count(*) from pg_cursors where name = 'held'").fetchone() == (
            0,
        )
        conn.commit()
    assert_servers_idle(shared, user.name)


def psycopg_copy_and_executemany(dsn: str) -> list[Any]:
    """COPY in (text and binary) and out of 120k rows, a COPY failing in the middle,
    and executemany with a duplicate in the middle, in a transaction and in
    autocommit (where the rows before it stay)."""
    out: list[Any] = []
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        conn.execute("drop table if exists pyd_copy")
        conn.execute("create table pyd_copy (id int primary key, v text)")
        with conn.cursor() as cur:
            with cur.copy("copy pyd_copy (id, v) from stdin") as copy:
                for i in range(80_000):
                    copy.write_row((i, "x" * (i % 40)))
            with cur.copy("copy pyd_copy (id, v) from stdin (format binary)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(80_000, 120_000):
                    copy.write_row((i, "y" * (i % 60)))
        conn.commit()
        copied = io.BytesIO()
        with conn.cursor().copy("copy (select id, v from pyd_copy order by id) to stdout") as copy:
            for chunk in copy:
                copied.write(chunk)
        out.append((len(copied.getvalue()), hash(copied.getvalue())))
        with conn.cursor().copy(
            "copy (select * from pyd_copy order by id) to stdout (format binary)"
        ) as copy:
            copy.set_types(["int4", "text"])
            rows = list(copy.rows())
        out.append((len(rows), rows[0], rows[-1]))
        try:
            with conn.cursor().copy("copy pyd_copy (id, v) from stdin") as copy:
                for i in range(500):
                    copy.write_row((1_000_000 + i, "z"))
                copy.write_row((5, "taken"))
        except psycopg.Error as error:
            out.append(error.sqlstate)
        conn.rollback()
        with conn.cursor() as cur:
            try:
                cur.executemany(
                    "insert into pyd_copy values (%s, %s)",
                    [(i, "m") for i in range(200_000, 200_050)] + [(3, "taken")],
                )
            except psycopg.Error as error:
                out.append(error.sqlstate)
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.executemany(
                "insert into pyd_copy values (%s, %s) returning id * 2",
                [(i, "r") for i in range(300_000, 300_010)],
                returning=True,
            )
            returned = []
            while True:
                returned.extend(cur.fetchall())
                if not cur.nextset():
                    break
            out.append(returned)
            try:
                cur.executemany(
                    "insert into pyd_copy values (%s, %s)",
                    [(i, "a") for i in range(400_000, 400_010)] + [(400_000, "taken")],
                )
            except psycopg.Error as error:
                out.append(error.sqlstate)
        out.append(conn.execute("select count(*), sum(id) from pyd_copy").fetchone())
    return out


def test_psycopg_copy_and_executemany(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct, pooled = direct_and_pooled(pg, shared, psycopg_copy_and_executemany)
    assert direct.count("23505") == 3
    assert pooled == direct
    assert_servers_idle(shared, pg.md5_user.name)


# ---- asyncpg -------------------------------------------------------------------


async def asyncpg_batches_and_copies(dsn: str) -> list[Any]:
    """executemany failing mid-batch commits nothing of it, in autocommit and in a
    transaction; copy_records_to_table / copy_from_query / a failing copy."""
    out: list[Any] = []
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        await conn.execute("drop table if exists pyd_apg")
        await conn.execute("create table pyd_apg (id int primary key, v text, b bytea)")
        batch = [(i, "v", b"") for i in range(3000)] + [(5, "taken", b"")]
        try:
            await conn.executemany("insert into pyd_apg values ($1, $2, $3)", batch)
        except asyncpg.UniqueViolationError as error:
            out.append(error.sqlstate)
        out.append(await conn.fetchval("select count(*) from pyd_apg"))
        try:
            async with conn.transaction():
                await conn.executemany(
                    "insert into pyd_apg values ($1, $2, $3)", [(i, "t", b"") for i in range(100)]
                )
                await conn.executemany("insert into pyd_apg values ($1, $2, $3)", batch)
        except asyncpg.UniqueViolationError as error:
            out.append(error.sqlstate)
        out.append(await conn.fetchval("select count(*) from pyd_apg"))
        records = [(i, "t" * (i % 30), bytes([i % 256]) * (i % 20)) for i in range(40_000)]
        out.append(await conn.copy_records_to_table("pyd_apg", records=records))
        copied = io.BytesIO()
        out.append(
            await conn.copy_from_query(
                "select * from pyd_apg where id % $1 = 0 order by id", 3, output=copied
            )
        )
        out.append(hash(copied.getvalue()))
        try:
            await conn.copy_records_to_table("pyd_apg", records=[(10**6, "a", b""), (1, "b", b"")])
        except asyncpg.UniqueViolationError as error:
            out.append(error.sqlstate)
        out.append(await conn.fetchval("select count(*) from pyd_apg"))
        async with conn.transaction():
            cursor = await conn.cursor("select id from pyd_apg order by id")
            out.append(await cursor.fetch(3))
            await cursor.forward(1000)
            out.append(await cursor.fetchrow())
    finally:
        await conn.close()
    return out


def test_asyncpg_batches_and_copies(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct, pooled = direct_and_pooled(
        pg, shared, lambda dsn: asyncio.run(asyncpg_batches_and_copies(dsn))
    )
    assert direct[:4] == ["23505", 0, "23505", 0]
    assert pooled == direct


async def asyncpg_pool_sharing_texts(dsn: str) -> list[Any]:
    """20 asyncpg connections (each with its statement cache) give the same texts to
    three servers: every answer is the statement's own, in and out of transactions,
    with prepared statements and cursors, and batches failing in transactions."""
    pool = await asyncpg.create_pool(asyncpg_dsn(dsn), min_size=20, max_size=20)
    try:
        async with pool.acquire() as conn:
            await conn.execute("drop table if exists pyd_share")
            await conn.execute("create table pyd_share (id int primary key)")

        async def worker(n: int) -> tuple[int, int, int]:
            total = failures = listed = 0
            for i in range(12):
                k = (n + i) % 9
                async with pool.acquire() as conn:
                    total += await conn.fetchval(f"select $1::int * {k + 1}", n)
                    statement = await conn.prepare(f"select $1::text || '{k}'")
                    assert await statement.fetchval("s") == f"s{k}"
                    try:
                        async with conn.transaction():
                            rows = [(n * 100 + i,)] + ([(n * 100,)] if i % 4 == 3 else [])
                            await conn.executemany("insert into pyd_share values ($1)", rows)
                    except asyncpg.UniqueViolationError:
                        failures += 1
                    async with conn.transaction():
                        cursor = conn.cursor(
                            "select id from pyd_share where id / 100 = $1 order by id",
                            n,
                            prefetch=4,
                        )
                        listed = len([row async for row in cursor])
            return total, failures, listed

        results: list[Any] = list(await asyncio.gather(*(worker(n) for n in range(30))))
        async with pool.acquire() as conn:
            results.append(await conn.fetchval("select count(*) from pyd_share"))
        return results
    finally:
        await pool.close()


def test_asyncpg_pool_of_twenty_over_three_servers(
    pg: ExamplePostgres, shared: PoolerProcess
) -> None:
    direct, pooled = direct_and_pooled(
        pg, shared, lambda dsn: asyncio.run(asyncpg_pool_sharing_texts(dsn))
    )
    assert direct[-1] == 30 * 9  # three of each worker's twelve batches failed
    assert pooled == direct
    assert_servers_idle(shared, pg.md5_user.name)


# ---- psycopg2 and pg8000 -------------------------------------------------------


def psycopg2_patterns(dsn: str) -> list[Any]:
    """execute_values / execute_batch, a named cursor, a batch failing in autocommit
    (its earlier pages stay) and in a transaction (nothing stays)."""
    out: list[Any] = []
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("drop table if exists pyd_pg2")
        cur.execute("create table pyd_pg2 (id int primary key, v text)")
        psycopg2.extras.execute_values(
            cur, "insert into pyd_pg2 values %s", [(i, f"v{i}") for i in range(2000)], page_size=300
        )
        psycopg2.extras.execute_batch(
            cur,
            "update pyd_pg2 set v = %s where id = %s",
            [(f"u{i}", i) for i in range(0, 2000, 7)],
            page_size=50,
        )
        conn.commit()
        named = conn.cursor("pyd_named")
        named.itersize = 111
        named.execute("select id, v from pyd_pg2 order by id")
        rows = list(named)
        out.append((len(rows), rows[7], rows[-1]))
        named.close()
        conn.commit()
        conn.autocommit = True
        try:
            psycopg2.extras.execute_values(
                cur,
                "insert into pyd_pg2 values %s",
                [(5000 + i, "a") for i in range(150)] + [(1, "x")],
            )
        except psycopg2.errors.UniqueViolation as error:
            out.append(error.pgcode)
        conn.autocommit = False
        try:
            psycopg2.extras.execute_batch(
                cur,
                "insert into pyd_pg2 values (%s, %s)",
                [(6000 + i, "b") for i in range(30)] + [(1, "x")],
            )
        except psycopg2.errors.UniqueViolation as error:
            out.append(error.pgcode)
        conn.rollback()
        cur.execute("select count(*), sum(id) from pyd_pg2")
        out.append(cur.fetchone())
        conn.commit()
    finally:
        conn.close()
    return out


def test_psycopg2_batches_and_named_cursors(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct, pooled = direct_and_pooled(pg, shared, psycopg2_patterns)
    assert direct[1:3] == ["23505", "23505"]
    assert pooled == direct


def pg8000_patterns(dsn: str, host: str, port: int) -> list[Any]:
    """pg8000 names its statements with a per-connection counter, so connections give
    one name to different texts: prepared statements, errors, every paramstyle."""
    del dsn
    user = "example_user_md5"
    out: list[Any] = []
    first = pg8000.native.Connection(
        user, host=host, port=port, database=EXAMPLE_DB, password="test"
    )
    second = pg8000.native.Connection(
        user, host=host, port=port, database=EXAMPLE_DB, password="test"
    )
    try:
        first.run("drop table if exists pyd_pg8")
        first.run("create table pyd_pg8 (id int primary key, v text)")
        insert = first.prepare("insert into pyd_pg8 values (:id, :v)")
        select = second.prepare("select v from pyd_pg8 where id = :id")
        for i in range(60):
            insert.run(id=i, v=str(i))
        try:
            insert.run(id=1, v="taken")
        except pg8000.native.DatabaseError as error:
            out.append(error.args[0]["C"])
        insert.run(id=100, v="after")
        out.append([select.run(id=i) for i in (1, 59, 100)])
        insert.close()
        select.close()
        second.run("begin")
        try:
            second.run("select 1 / 0")
        except pg8000.native.DatabaseError as error:
            out.append(error.args[0]["C"])
        try:
            second.run("select 1")
        except pg8000.native.DatabaseError as error:
            out.append(error.args[0]["C"])
        second.run("rollback")
    finally:
        first.close()
        second.close()
    queries: dict[str, tuple[str, Any]] = {
        "format": ("select %s::int + 1", (1,)),
        "pyformat": ("select %(a)s::int + 1", {"a": 1}),
        "named": ("select :a::int + 1", {"a": 1}),
        "numeric": ("select :1::int + 1", (1,)),
        "qmark": ("select ?::int + 1", (1,)),
    }
    try:
        for style, (query, args) in queries.items():
            pg8000.dbapi.paramstyle = style
            conn = pg8000.dbapi.connect(
                user, host=host, port=port, database=EXAMPLE_DB, password="test"
            )
            try:
                cursor = conn.cursor()
                cursor.execute(query, args)
                out.append(cursor.fetchall())
                try:
                    cursor.execute("select * from pyd_no_such_table")
                except pg8000.dbapi.DatabaseError as error:
                    out.append(error.args[0]["C"])
                conn.rollback()
            finally:
                conn.close()
    finally:
        pg8000.dbapi.paramstyle = "format"
    return out


def test_pg8000_native_and_dbapi(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct = pg8000_patterns("", pg.host, pg.port)
    pooled = pg8000_patterns("", shared.host, shared.port)
    assert direct[:1] == ["23505"]
    assert pooled == direct


# ---- SQLAlchemy ----------------------------------------------------------------


def terminate_servers(pg: ExamplePostgres, user: str) -> None:
    pg.psql(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        f"where usename = '{user}' and pid <> pg_backend_pid()"
    )


def sqlalchemy_sync(dsn: str, pg: ExamplePostgres) -> list[Any]:
    """begin_nested() savepoints rolled back, one to recover from an error; then
    pool_pre_ping after every server connection of the user was terminated."""
    out: list[Any] = []
    engine = create_engine(
        dsn.replace("postgresql://", "postgresql+psycopg://"),
        pool_pre_ping=True,
        pool_size=3,
        connect_args={"prepare_threshold": 0},
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("drop table if exists pyd_sa"))
            conn.execute(text("create table pyd_sa (id int primary key)"))
        insert = text("insert into pyd_sa values (:id)")
        for r in range(4):
            with engine.begin() as conn:
                conn.execute(insert, [{"id": r * 100 + i} for i in range(5)])
                savepoint = conn.begin_nested()
                conn.execute(insert, {"id": r * 100 + 50})
                savepoint.rollback()
                savepoint = conn.begin_nested()
                try:
                    conn.execute(insert, {"id": r * 100})
                except Exception as error:
                    out.append(type(error).__name__)
                    savepoint.rollback()
                conn.execute(insert, {"id": r * 100 + 60})
        connections = [engine.connect() for _ in range(3)]
        for conn in connections:
            out.append(conn.execute(text("select count(*) from pyd_sa")).scalar())
            conn.commit()
        for conn in connections:
            conn.close()
        terminate_servers(pg, pg.md5_user.name)
        for _ in range(3):
            with engine.connect() as conn:
                out.append(conn.execute(text("select sum(id) from pyd_sa")).scalar())
    finally:
        engine.dispose()
    return out


def test_sqlalchemy_savepoints_and_pre_ping(pg: ExamplePostgres, shared: PoolerProcess) -> None:
    direct, pooled = direct_and_pooled(pg, shared, lambda dsn: sqlalchemy_sync(dsn, pg))
    assert direct[:4] == ["IntegrityError"] * 4
    assert pooled == direct


async def sqlalchemy_async(dsn: str) -> list[Any]:
    """Four asyncpg engines, each with its prepared statement cache, whose connections
    give the same statement names to the same and different texts; savepoints."""
    url = asyncpg_dsn(dsn).replace("postgresql://", "postgresql+asyncpg://")
    engines = [
        create_async_engine(
            url, pool_pre_ping=True, pool_size=4, connect_args={"prepared_statement_cache_size": 8}
        )
        for _ in range(4)
    ]
    try:
        async with engines[0].begin() as conn:
            await conn.execute(text("drop table if exists pyd_sa_async"))
            await conn.execute(text("create table pyd_sa_async (id int primary key, v text)"))
            await conn.execute(
                text("insert into pyd_sa_async values (:id, :v)"),
                [{"id": i, "v": str(i)} for i in range(50)],
            )

        async def worker(n: int) -> list[Any]:
            seen: list[Any] = []
            engine = engines[n % len(engines)]
            for i in range(10):
                async with engine.connect() as conn, conn.begin():
                    query = text(f"select v from pyd_sa_async where id = :id and {i % 6} >= 0")
                    seen.append((await conn.execute(query, {"id": (n + i) % 50})).scalar())
                    nested = await conn.begin_nested()
                    await conn.execute(
                        text("update pyd_sa_async set v = 'changed' where id = :id"), {"id": n}
                    )
                    await nested.rollback()
                    seen.append(
                        (
                            await conn.execute(
                                text("select v from pyd_sa_async where id = :id"), {"id": n}
                            )
                        ).scalar()
                    )
            return seen

        return list(await asyncio.gather(*(worker(n) for n in range(12))))
    finally:
        for engine in engines:
            await engine.dispose()


def test_sqlalchemy_asyncpg_engines_share_statement_names(
    pg: ExamplePostgres, shared: PoolerProcess
) -> None:
    direct, pooled = direct_and_pooled(pg, shared, lambda dsn: asyncio.run(sqlalchemy_async(dsn)))
    assert "changed" not in str(direct)
    assert pooled == direct
    assert_servers_idle(shared, pg.md5_user.name)
