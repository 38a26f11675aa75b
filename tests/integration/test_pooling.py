"""Transaction and session pooling through real drivers against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory


def backend_count(pg: ExamplePostgres, user: str) -> int:
    out = pg.psql(
        f"select count(*) from pg_stat_activity where usename = '{user}' "
        "and backend_type = 'client backend'"
    )
    return int(out.strip())


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_psycopg_simple_and_extended(pg: ExamplePostgres, pooler: PoolerFactory, kind: str) -> None:
    proc = pooler()
    user = pg.md5_user if kind == "md5" else pg.scram_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        # simple protocol
        assert conn.execute("select 1 as x", prepare=False).fetchone() == (1,)
        # extended protocol with parameters, binary and text
        row = conn.execute("select %s::int + 1, %s::text", (41, "é")).fetchone()
        assert row == (42, "é")
        rows = conn.execute("select id, name from items order by id limit 3").fetchall()
        assert rows == [(1, "item 1"), (2, "item 2"), (3, "item 3")]
        assert conn.execute("select count(*) from items").fetchone() == (100,)


def test_asyncpg_queries(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.scram_user

    async def main() -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password), statement_cache_size=0)
        try:
            assert await conn.fetchval("select $1::int * 2", 21) == 42
            rows = await conn.fetch("select id from items where id <= $1 order by id", 5)
            assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
            async with conn.transaction():
                await conn.execute("create temp table t_async(x int) on commit drop")
                await conn.executemany("insert into t_async values ($1)", [(i,) for i in range(10)])
                assert await conn.fetchval("select sum(x) from t_async") == 45
        finally:
            await conn.close()

    asyncio.run(main())


def test_200_clients_over_pool_of_4(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, backend_count(pg, user.name))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def client(n: int) -> list[int]:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password), statement_cache_size=0)
        results = []
        try:
            for i in range(10):
                value = await conn.fetchval(f"select {n} * 1000 + {i}")
                results.append(value)
                async with conn.transaction():
                    a = await conn.fetchval("select txid_current()")
                    b = await conn.fetchval("select txid_current()")
                    assert a == b  # one transaction stays on one backend
        finally:
            await conn.close()
        return results

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(client(n) for n in range(200)))

    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    for n, got in enumerate(results):
        assert got == [n * 1000 + i for i in range(10)]
    assert 1 <= peak <= 4


def test_transaction_block_keeps_one_backend(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as conn:
        with conn.transaction():
            pids = {conn.execute("select pg_backend_pid()").fetchone()[0] for _ in range(5)}
        assert len(pids) == 1


def test_session_mode_pins_backend(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"pool_mode": "session"}})
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a:
        pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
        a.execute("set application_name = 'kept'")
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b:
            pid_b = b.execute("select pg_backend_pid()").fetchone()[0]
            assert pid_a != pid_b
        for _ in range(5):
            assert a.execute("select pg_backend_pid()").fetchone()[0] == pid_a
        assert a.execute("show application_name").fetchone()[0] == "kept"
    # After the session the backend was reset before reuse.
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as c:
        assert c.execute("show application_name").fetchone()[0] == "pg_doorman"


def test_transaction_mode_shares_backends(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name}]}})
    user = pg.md5_user
    with (
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a,
        psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b,
    ):
        pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
        pid_b = b.execute("select pg_backend_pid()").fetchone()[0]
        # Sequential transactions reuse the most recently returned backend.
        assert pid_a == pid_b


def test_errors_and_rollback(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.scram_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)
        conn.execute("create temp table t_rb(x int)")
        conn.execute("insert into t_rb values (1)")
        conn.rollback()
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("select nope from items")
        assert conn.execute("select 3").fetchone() == (3,)


def test_client_vanishing_inside_transaction_rolls_back(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name}]}})
    user = pg.md5_user
    pg.psql(
        "create table if not exists vanish(x int); grant all on vanish to public",
        database="example_db",
    )
    conn = psycopg.connect(proc.dsn(user.name, user.password))
    conn.execute("insert into vanish values (1)")
    conn.pgconn.finish()  # gone without COMMIT or Terminate
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as other:
        assert other.execute("select count(*) from vanish").fetchone() == (0,)
        status = other.execute(
            "select count(*) from pg_stat_activity where state like 'idle in transaction%'"
        ).fetchone()
        assert status == (0,)
    pg.psql("drop table vanish", database="example_db")


def test_set_is_reset_between_clients(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name}]}})
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a:
        a.execute("set statement_timeout = '7s'")
        a.execute("set role none")
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b:
        assert b.execute("show statement_timeout").fetchone() == ("0",)


def test_client_timezone_follows_client(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Startup parameters that change results are applied on whichever backend serves."""
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name}]}})
    user = pg.md5_user

    async def main() -> None:
        dsn = proc.dsn(user.name, user.password)
        utc = await asyncpg.connect(dsn, statement_cache_size=0)
        tokyo = await asyncpg.connect(
            dsn, statement_cache_size=0, server_settings={"timezone": "Asia/Tokyo"}
        )
        try:
            for _ in range(3):
                assert await tokyo.fetchval("show timezone") == "Asia/Tokyo"
                assert await utc.fetchval("show timezone") != "Asia/Tokyo"
                # The reply rendering depends on it too.
                text = await tokyo.fetchval("select '2020-01-01 00:00:00+00'::timestamptz::text")
                assert text == "2020-01-01 09:00:00+09"
        finally:
            await utc.close()
            await tokyo.close()

    asyncio.run(main())


def test_libpq_options_apply(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name}]}})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with (
        psycopg.connect(dsn, autocommit=True, options="-c statement_timeout=4321") as a,
        psycopg.connect(dsn, autocommit=True) as b,
    ):
        for _ in range(3):
            assert a.execute("show statement_timeout").fetchone() == ("4321ms",)
            assert b.execute("show statement_timeout").fetchone() == ("0",)


def test_asyncpg_server_settings_apply(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.scram_user.name}]}})
    user = pg.scram_user

    async def main() -> None:
        dsn = proc.dsn(user.name, user.password)
        a = await asyncpg.connect(
            dsn, statement_cache_size=0, server_settings={"search_path": "pg_catalog,public"}
        )
        b = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            for _ in range(3):
                assert await a.fetchval("show search_path") == "pg_catalog,public"
                assert await b.fetchval("show search_path") == '"$user", public'
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_query_wait_timeout(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(
        general={"query_wait_timeout": 500},
        pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}},
    )
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as holder:
        holder.execute("select 1")  # inside a transaction: holds the only backend
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as waiter:
            with pytest.raises(psycopg.OperationalError) as info:
                waiter.execute("select 1")
            assert "query_wait_timeout" in str(info.value)
        holder.rollback()


def test_waiters_are_served_in_order(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})
    user = pg.md5_user

    async def main() -> None:
        dsn = proc.dsn(user.name, user.password)
        conns = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(5)]
        try:
            results = await asyncio.gather(
                *(c.fetchval("select $1::int from pg_sleep(0.05)", i) for i, c in enumerate(conns))
            )
            assert results == list(range(5))
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_pooler_check_query_is_cached(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        for _ in range(3):
            cur = conn.execute(";")
            assert cur.pgresult is not None
            assert cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY
        assert conn.execute("select 1").fetchone() == (1,)


def test_max_connections(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general={"max_connections": 2})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        assert a.execute("select 1").fetchone() == b.execute("select 1").fetchone()
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn)
        assert "too many clients" in str(info.value)
