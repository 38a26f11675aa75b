"""Transaction and session pooling through real drivers against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import asyncpg
import psycopg
import psycopg2
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, pool_row
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess, pooler_hba


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


@pytest.mark.parametrize(
    "statements",
    [
        # One simple Query, one implicit transaction.
        ["set statement_timeout = '7s'; reset work_mem"],
        # A transaction block: RESET of one parameter leaves the others SET.
        ["begin", "set statement_timeout = '7s'", "reset work_mem", "commit"],
    ],
)
def test_reset_of_one_parameter_does_not_hide_other_sets(
    pg: ExamplePostgres, pooler: PoolerFactory, statements: list[str]
) -> None:
    """RESET x and RESET ALL have the same command tag: the check-in cleanup must not
    take one for the other and hand the next client a server with SETs left on it."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a:
        for statement in statements:
            a.execute(statement)
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b:
        assert b.execute("show statement_timeout").fetchone() == ("0",)


def test_session_authorization_is_reset_between_clients(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """RESET ALL leaves SET SESSION AUTHORIZATION (and SET ROLE) in place: without its
    own reset, the next client of a superuser's pool would run as the other user."""
    users = [{"username": "postgres", "password": "", "pool_size": 1}]
    proc = pooler(
        general={"pg_hba": pooler_hba(["postgres"])}, pools={"example_db": {"users": users}}
    )
    other = pg.md5_user.name
    # In transaction mode a SET lasts for its transaction: look within it.
    with psycopg.connect(proc.dsn("postgres", ""), autocommit=True) as a, a.transaction():
        a.execute(f"set session authorization {other}")
        assert a.execute("select session_user, current_user").fetchone() == (other, other)
    with psycopg.connect(proc.dsn("postgres", ""), autocommit=True) as b:
        with b.transaction():
            assert b.execute("select session_user, current_user").fetchone() == (
                "postgres",
                "postgres",
            )
            b.execute(f"set role {other}")
            assert b.execute("select current_user").fetchone() == (other,)
        assert b.execute("select current_user").fetchone() == ("postgres",)


@pytest.mark.parametrize(
    "statement",
    [
        "select set_config('statement_timeout', '7s', false)",
        "SELECT pg_catalog.SET_CONFIG('statement_timeout', '7s', FALSE), 1",
        # A parameter the pooler cannot read: taken as session-level.
        "select set_config('statement_timeout', '7s', %s)",
        # An application's own setting.
        "select set_config('doorman.user', 'alice', false)",
        # Its SET is tagged DO: every DO block counts as one that may set.
        "do $$ begin set statement_timeout = '7s'; end $$",
        # After another statement in the same Query (sent as a simple Query only).
        "select 1; do $$ begin set statement_timeout = '7s'; end $$",
    ],
)
@pytest.mark.parametrize("prepare", [False, True])
def test_set_config_for_the_session_is_reset_between_clients(
    pg: ExamplePostgres, pooler: PoolerFactory, statement: str, prepare: bool
) -> None:
    """set_config(..., false) sets a parameter for the session with the tag SELECT 1
    (read from the text), a DO block's SET with the tag DO: they get the same RESET ALL
    at check-in as a SET. A setting local to the transaction needs none, and is gone
    anyway."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    custom = "select current_setting('doorman.user', true)"
    with psycopg.connect(dsn, autocommit=True) as a:
        params = (False,) if "%s" in statement else None
        several = statement.startswith("select 1;")  # no Parse takes two statements
        with a.transaction():
            a.execute(statement, params, prepare=prepare and not several)
            # It took effect, and nothing else in the transaction asks for a reset.
            if "doorman.user" in statement:
                assert a.execute(custom).fetchone() == ("alice",)
            else:
                assert a.execute("show statement_timeout").fetchone() == ("7s",)
            a_pid = a.execute("select pg_backend_pid()").fetchone()
        with psycopg.connect(dsn, autocommit=True) as b:
            assert b.execute("select pg_backend_pid()").fetchone() == a_pid  # same server
            assert b.execute("show statement_timeout").fetchone() == ("0",)
            assert b.execute(custom).fetchone() in ((None,), ("",))
            with b.transaction():
                b.execute("select set_config('statement_timeout', '9s', true)", prepare=prepare)
                assert b.execute("show statement_timeout").fetchone() == ("9s",)
            assert b.execute("show statement_timeout").fetchone() == ("0",)


def test_texts_are_read_without_prepared_statements(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """With general.prepared_statements off, Parse texts pass through unrenamed and are
    read as they go (psycopg sends its queries with an unnamed Parse; a named one is
    read after its name, tests/unit/test_text_effects.py)."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(general={"prepared_statements": False}, pools={"example_db": {"users": users}})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    exists = "select to_regclass('pg_temp.doorman_tmp') is not null"
    with psycopg.connect(dsn, autocommit=True) as a:
        with a.transaction():
            a.execute("create temp table doorman_tmp as select %s::text as v", ["secret"])
        a.execute("select set_config('statement_timeout', %s, false)", ["7s"])
        a.execute("do $$ begin set work_mem = '7MB'; end $$")
        with psycopg.connect(dsn, autocommit=True) as b:
            assert b.execute(exists).fetchone() == (False,)
            assert b.execute("show statement_timeout").fetchone() == ("0",)
            assert b.execute("show work_mem").fetchone() != ("7MB",)


def test_set_config_through_asyncpg(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """asyncpg prepares every statement, its arguments bound as parameters."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user

    async def main() -> None:
        dsn = proc.dsn(user.name, user.password)
        a = await asyncpg.connect(dsn)
        b = await asyncpg.connect(dsn)
        try:
            await a.fetchval("select set_config($1, $2, $3)", "work_mem", "7MB", False)
            assert await b.fetchval("show work_mem") != "7MB"
            await a.fetchval("select set_config('work_mem', $1, false)", "8MB")
            assert await b.fetchval("show work_mem") != "8MB"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "create",
    [
        "create temp table doorman_tmp (v text)",
        "create temp view doorman_tmp as select 'secret'::text as v",
        "create temp sequence doorman_tmp",
        # Tagged SELECT n: read from the text.
        "create temp table doorman_tmp as select 'secret' as v where false",
        "select 'secret' as v into temporary doorman_tmp",
        "create table pg_temp.doorman_tmp as select 'secret' as v",
        # Tagged DO.
        "do $$ begin execute 'create temp table doorman_tmp (v text)'; end $$",
    ],
)
@pytest.mark.parametrize("prepare", [False, True])
def test_temporary_objects_do_not_reach_the_next_client(
    pg: ExamplePostgres, pooler: PoolerFactory, create: str, prepare: bool
) -> None:
    """A temporary table that outlives its transaction would hand its rows to the next
    client of that server. After a CREATE TABLE/VIEW/SEQUENCE, or a statement whose
    text names temporary objects, the server keeps its temporary objects for the client
    that made them, and another client's checkout drops them first (DISCARD TEMP).
    With `prepare` the statement goes as a prepared statement, through the pool's
    registry (a DO block cannot be prepared: sent as it is)."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user
    exists = "select to_regclass('pg_temp.doorman_tmp') is not null"
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn, autocommit=True) as a:
        with a.transaction():
            a.execute(create, prepare=prepare and not create.startswith("do "))
        # Its own later transactions on the same server still have it, as before.
        assert a.execute(exists).fetchone() == (True,)
        a_pid = a.execute("select pg_backend_pid()").fetchone()
        with psycopg.connect(dsn, autocommit=True) as b:
            assert b.execute("select pg_backend_pid()").fetchone() == a_pid  # same server
            assert b.execute(exists).fetchone() == (False,)
        # The other client's checkout dropped them for good.
        assert a.execute(exists).fetchone() == (False,)


def test_temporary_objects_are_dropped_ahead_of_a_parameter_sync(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The next client needs its own TimeZone set on the server as well: both
    statements go ahead of its transaction and both replies are kept from it."""
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn, autocommit=True) as a:
        with a.transaction():
            # The SET makes this check-in run RESET ALL; the table outlasts it.
            a.execute("set time zone 'UTC'")
            a.execute("create temp table doorman_tmp (v text)")
            a.execute("insert into doorman_tmp values ('secret')")
        assert a.execute("select v from doorman_tmp").fetchall() == [("secret",)]
        tokyo = dsn + "&options=-c%20TimeZone%3DAsia/Tokyo"
        with psycopg.connect(tokyo, autocommit=True) as b:
            cur = b.execute(
                "select current_setting('TimeZone'), to_regclass('pg_temp.doorman_tmp') is null"
            )
            assert cur.fetchall() == [("Asia/Tokyo", True)]
            assert b.execute("select 1").fetchone() == (1,)


def test_a_plain_create_table_survives_the_temp_cleanup(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    users = [{"username": pg.md5_user.name, "pool_size": 1}]
    proc = pooler(pools={"example_db": {"users": users}})
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as a:
        a.execute("drop table if exists doorman_kept")
        a.execute("create table doorman_kept (v int)")
        a.execute("insert into doorman_kept values (1)")
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as b:
        assert b.execute("select v from doorman_kept").fetchall() == [(1,)]
        b.execute("drop table doorman_kept")


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


def _one_server_pooler(
    pg: ExamplePostgres, pooler: PoolerFactory, query_wait_timeout: int
) -> PoolerProcess:
    """A pooler whose pool for the md5 user has a single server."""
    return pooler(
        general={"query_wait_timeout": query_wait_timeout},
        pools={EXAMPLE_DB: {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}},
    )


def _raw_client(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)


def test_query_wait_timeout(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = _one_server_pooler(pg, pooler, 500)
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as holder:
        holder.execute("select 1")  # inside a transaction: holds the only backend
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as waiter:
            with pytest.raises(psycopg.OperationalError) as info:
                waiter.execute("select 1")
            assert "query_wait_timeout" in str(info.value)
            waiter.close()  # not the exit's COMMIT on a connection the pooler closed
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


def _wait_for_waiting(console: w.PgWire, user: str, count: int) -> dict[str, str | None]:
    deadline = time.monotonic() + 10
    while True:
        row = pool_row(console, user)
        if row["cl_waiting"] == str(count) or time.monotonic() > deadline:
            assert row["cl_waiting"] == str(count), row
            return row
        time.sleep(0.005)


def test_a_long_queue_is_served_in_arrival_order_around_departures(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """150 clients queue for one server, 60 of them leave while queued; the rest are
    served one by one in the order they arrived, and SHOW POOLS reports the wait."""
    user = pg.md5_user
    proc = _one_server_pooler(pg, pooler, 60_000)
    console = admin_console(proc)
    holder = _raw_client(proc, pg)
    queued = [_raw_client(proc, pg) for _ in range(150)]
    try:
        holder.simple_query("begin; select 1")  # holds the only server
        for i, conn in enumerate(queued):
            conn.send_raw(
                w.query(f"select {i}, (extract(epoch from clock_timestamp()) * 1e6)::bigint")
            )
            _wait_for_waiting(console, user.name, i + 1)  # queued in this order
        time.sleep(0.3)
        row = pool_row(console, user.name)
        waited = int(row["maxwait"] or 0) + int(row["maxwait_us"] or 0) / 1e6
        assert 0.3 <= waited < 60, row
        leaving = set(range(0, 120, 2))
        for i in sorted(leaving):
            queued[i].close_socket()
        _wait_for_waiting(console, user.name, 150 - len(leaving))
        holder.simple_query("commit")
        served = []
        for i, conn in enumerate(queued):
            if i in leaving:
                continue
            number, at = w.rows(conn.read_until_ready())[0]
            assert number == str(i)
            served.append((int(at or 0), i))
        assert [i for _, i in sorted(served)] == [i for i in range(150) if i not in leaving]
        assert pool_row(console, user.name)["cl_waiting"] == "0"
        assert queued[1].execute_query("select 7") == [("7",)]
    finally:
        for conn in [console, holder, *queued]:
            conn.close_socket()


def test_a_reloaded_query_wait_timeout_applies_to_clients_already_waiting(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = _one_server_pooler(pg, pooler, 120_000)
    console = admin_console(proc)
    holder, waiter = _raw_client(proc, pg), _raw_client(proc, pg)
    try:
        holder.simple_query("begin; select 1")  # holds the only server
        waiter.send_raw(w.query("select 1"))
        _wait_for_waiting(console, user.name, 1)
        reloaded = proc.log_text().count("configuration reloaded")
        proc.config["general"]["query_wait_timeout"] = 300
        proc.reload(proc.config)
        started = time.monotonic()
        error = w.first_error(waiter.wait_closed(timeout=20))  # FATAL: the session ends
        assert error is not None and error.sqlstate == "53300", error
        assert "query_wait_timeout" in error.message
        assert time.monotonic() - started < 15  # not the 120 s it queued with
        assert proc.log_text().count("configuration reloaded") > reloaded
        assert holder.execute_query("commit; select 2") == [("2",)]
    finally:
        for conn in (console, holder, waiter):
            conn.close_socket()


def test_a_first_login_that_cannot_get_a_server_fails_at_query_wait_timeout(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The first login of a pool waits in the pool's queue for a server to learn the
    server's parameters; a server that never answers fails it at query_wait_timeout."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        user = pg.md5_user
        proc = pooler(
            general={"query_wait_timeout": 400, "connect_timeout": 30_000},
            pools={EXAMPLE_DB: {"server_port": silent.getsockname()[1]}},
        )
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(proc.dsn(user.name, user.password), connect_timeout=20)
        assert "query_wait_timeout" in str(info.value)
        assert time.monotonic() - started < 15
        assert proc.running
    finally:
        silent.close()


def test_pooler_check_query_is_cached(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        for _ in range(3):
            cur = conn.execute(";")
            assert cur.pgresult is not None
            assert cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_cancel_while_the_check_query_runs_keeps_the_replies_in_order(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The first pooler_check_query of a pool runs on a server (its reply is cached
    after). A cancel in that time must not answer the query queued behind it first:
    the client would take that answer for the check query's, and every later one for
    the query before it."""
    check = "select pg_sleep(0.5)"
    proc = pooler(general={"pooler_check_query": check})
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
    try:
        assert conn.backend_pid is not None
        conn.send_raw(w.query(check) + w.query("select 2"))
        time.sleep(0.2)  # the check query is running on a server
        w.cancel(proc.host, proc.port, conn.backend_pid, conn.secret_key)
        first = conn.read_until_ready()
        second = conn.read_until_ready()
        assert w.first_error(first) is None, first
        assert w.rows(first) == [("",)]  # pg_sleep's void
        assert w.rows(second) == [("2",)], second
    finally:
        conn.close()


def test_max_connections(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general={"max_connections": 2})
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        assert a.execute("select 1").fetchone() == b.execute("select 1").fetchone()
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn)
        assert "too many clients" in str(info.value)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_large_objects_through_libpq_function_calls(
    pg: ExamplePostgres, pooler: PoolerFactory, mode: str
) -> None:
    """psycopg2's large objects go through libpq's lo_* functions, which send
    FunctionCall messages (the `F` message no other driver here uses)."""
    proc = pooler(pools=md5_user_pool(pg, 2, pool_mode=mode))
    user = pg.md5_user
    data = bytes(range(256)) * 4000
    conn = psycopg2.connect(proc.dsn(user.name, user.password))
    try:
        written = conn.lobject(0, "wb")
        written.write(data)
        oid = written.oid
        written.close()
        conn.commit()
        read = conn.lobject(oid, "rb")
        assert read.read() == data
        read.seek(1000)
        assert read.read(10) == data[1000:1010]
        read.close()
        conn.rollback()
        conn.lobject(oid).unlink()
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("select count(*) from pg_largeobject_metadata where oid = %s", (oid,))
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
