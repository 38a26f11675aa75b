"""Protocol-level prepared statements in transaction mode: drivers and raw-protocol parity."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator

import asyncpg
import pg8000.native
import psycopg
import psycopg2
import pytest
from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect, on_both
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import find_pg_bin

SMALL_CACHE = {"server_prepared_statements_cache_size": 5}


def one_user_pool(pg: ExamplePostgres, size: int, user: str | None = None) -> dict[str, object]:
    return {"example_db": {"users": [{"username": user or pg.md5_user.name, "pool_size": size}]}}


# ---- drivers -------------------------------------------------------------------


def test_asyncpg_many_clients_small_caches(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general=SMALL_CACHE, pools=one_user_pool(pg, 2, pg.scram_user.name))
    user = pg.scram_user

    async def client(n: int) -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            for i in range(30):
                k = (n + i) % 30  # 30 distinct statements, far more than the server cache
                value = await conn.fetchval(f"select $1::int + {k}", i)
                assert value == i + k
                if i % 5 == 0:
                    async with conn.transaction():
                        rows = await conn.fetch(
                            f"select id from items where id <= $1 and {k} >= 0 order by id", 3
                        )
                        assert [r["id"] for r in rows] == [1, 2, 3]
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(40)))
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            async with conn.transaction():
                names = await conn.fetch("select name from pg_prepared_statements")
            # Server-side names are the pool's, and the server's LRU bounds them.
            assert all(r["name"].startswith("DOORMAN_") for r in names)
            assert len(names) <= 5 + 1
        finally:
            await conn.close()

    asyncio.run(main())


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "sa_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("sa_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def test_sqlalchemy_async_selectin(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=one_user_pool(pg, 2, pg.scram_user.name))
    user = pg.scram_user
    url = proc.dsn(user.name, user.password).replace("postgresql://", "postgresql+asyncpg://")
    url = url.replace("?sslmode=disable", "")

    async def main() -> None:
        engine = create_async_engine(url, pool_size=5)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.run_sync(Base.metadata.create_all)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with sessions() as session, session.begin():
                for a in range(10):
                    author = Author(name=f"author {a}")
                    author.books = [Book(title=f"book {a}.{b}") for b in range(a % 4)]
                    session.add(author)

            async def read() -> int:
                async with sessions() as session:
                    result = await session.execute(
                        select(Author).options(selectinload(Author.books)).order_by(Author.id)
                    )
                    authors = result.scalars().all()
                    assert [len(a.books) for a in authors] == [a % 4 for a in range(10)]
                    return len(authors)

            counts = await asyncio.gather(*(read() for _ in range(20)))
            assert counts == [10] * 20
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_psycopg_prepare_threshold_zero(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general=SMALL_CACHE, pools=one_user_pool(pg, 2))
    user = pg.md5_user
    conns = [
        psycopg.connect(proc.dsn(user.name, user.password), prepare_threshold=0, autocommit=True)
        for _ in range(4)
    ]
    try:
        for i in range(40):
            conn = conns[i % 4]
            k = i % 9
            assert conn.execute(f"select %s::int * {k + 1}", (i,)).fetchone() == (i * (k + 1),)
        with conns[0].transaction():
            conns[0].execute("select %s::int", (1,))
            names = [r[0] for r in conns[0].execute("select name from pg_prepared_statements")]
        assert names and all(name.startswith("DOORMAN_") for name in names)
    finally:
        for conn in conns:
            conn.close()


def test_psycopg_pipeline_with_error(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=one_user_pool(pg, 1))
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), prepare_threshold=0, autocommit=True
    ) as conn:
        with conn.pipeline():
            a = conn.execute("select %s::int", (1,))
            b = conn.execute("select %s::int + 1", (1,))
        assert (a.fetchone(), b.fetchone()) == ((1,), (2,))
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute("select %s::int", (1,))
            conn.execute("select 1 / %s::int", (0,))
            conn.execute("select %s::int + 2", (1,))
        with conn.pipeline():
            c = conn.execute("select %s::int + 2", (1,))
            d = conn.execute("select %s::int", (5,))
        assert (c.fetchone(), d.fetchone()) == ((3,), (5,))


def test_pg8000(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general=SMALL_CACHE, pools=one_user_pool(pg, 2))
    user = pg.md5_user
    conns = [
        pg8000.native.Connection(
            user.name, host=proc.host, port=proc.port, database="example_db", password=user.password
        )
        for _ in range(3)
    ]
    try:
        for i in range(30):
            conn = conns[i % 3]
            k = i % 8
            assert conn.run(f"select cast(:v as int) + {k}", v=i) == [[i + k]]
    finally:
        for conn in conns:
            conn.close()


def test_psycopg2(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=one_user_pool(pg, 1))
    user = pg.md5_user
    conn = psycopg2.connect(proc.dsn(user.name, user.password))
    try:
        cur = conn.cursor()
        cur.execute("prepare q(int) as select $1 + 1")
        cur.execute("execute q(41)")
        assert cur.fetchone() == (42,)
        conn.commit()
        cur.execute("select %s::text", ("x",))
        assert cur.fetchone() == ("x",)
        conn.commit()
    finally:
        conn.close()


def test_pgbench_prepared(pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: object) -> None:
    proc = pooler(pools=one_user_pool(pg, 2))
    user = pg.md5_user
    script = "\\set aid random(1, 100)\nselect id, name from items where id = :aid;\n"
    result = subprocess.run(
        [
            str(find_pg_bin() / "pgbench"),
            "-n", "-M", "prepared", "-c", "8", "-j", "2", "-t", "200",
            "-h", proc.host, "-p", str(proc.port), "-U", user.name, "-f", "/dev/stdin",
            "example_db",
        ],
        input=script,
        capture_output=True,
        text=True,
        env={"PGPASSWORD": user.password, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "number of failed transactions: 0" in result.stdout
    assert "number of transactions actually processed: 1600/1600" in result.stdout


def test_session_mode_passes_statements_through(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"pool_mode": "session"}})
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), prepare_threshold=0, autocommit=True
    ) as conn:
        conn.execute("select %s::int", (1,))
        names = [r[0] for r in conn.execute("select name from pg_prepared_statements")]
        assert names and all(name.startswith("_pg3_") for name in names)


# ---- raw protocol --------------------------------------------------------------


@pytest.fixture
def one_server(pg: ExamplePostgres, pooler: PoolerFactory) -> Iterator[PoolerProcess]:
    yield pooler(general={"server_prepared_statements_cache_size": 2}, pools=one_user_pool(pg, 1))


def test_same_text_under_different_search_paths_reads_each_clients_table(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """One statement text means different tables (of different column types) under
    different search_paths: clients sharing one server each get their own table's
    rows, whichever prepared it first; one shared server-side statement would fail
    with "cached plan must not change result type"."""
    pg.psql(
        "SET ROLE example_owner;\n"
        "CREATE SCHEMA IF NOT EXISTS ctx_a; CREATE SCHEMA IF NOT EXISTS ctx_b;\n"
        "CREATE TABLE IF NOT EXISTS ctx_a.t (v text); TRUNCATE ctx_a.t;\n"
        "CREATE TABLE IF NOT EXISTS ctx_b.t (v int); TRUNCATE ctx_b.t;\n"
        "INSERT INTO ctx_a.t VALUES ('a'); INSERT INTO ctx_b.t VALUES (2);\n",
        database=pg.database,
    )
    proc = pooler(pools=one_user_pool(pg, 1))
    user = pg.md5_user
    conns = {
        schema: psycopg.connect(
            proc.dsn(user.name, user.password),
            prepare_threshold=0,
            autocommit=True,
            options=f"-c search_path={schema}",
        )
        for schema in ("ctx_a", "ctx_b")
    }
    a, b = conns["ctx_a"], conns["ctx_b"]
    try:
        for _ in range(3):
            for conn, want in ((a, "a"), (b, 2)):
                assert conn.execute("select v from t where %s::int = 1", (1,)).fetchone() == (want,)
        with a.transaction():
            names = a.execute("select count(*) from pg_prepared_statements").fetchone()
        assert names is not None and names[0] >= 2  # one server statement per context
    finally:
        for conn in conns.values():
            conn.close()


def test_named_statement_used_in_later_transactions(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_user_pool(pg, 2))
    conn = connect(proc, pg)
    other = connect(proc, pg)
    try:
        conn.send_raw(w.parse("s1", "select $1::int * 2", [23]) + w.sync())
        assert w.msg_types(conn.read_until_ready()) == "1Z"
        # Keep one server busy so later transactions land on the other one too.
        other.send_raw(w.query("begin"))
        other.read_until_ready()
        for i in range(4):
            conn.send_raw(w.bind("", "s1", [str(i)]) + w.execute() + w.sync())
            got = conn.read_until_ready()
            assert w.msg_types(got) == "2DCZ"
            assert w.rows(got) == [(str(i * 2),)]
            if i == 1:
                other.send_raw(w.query("commit"))
                other.read_until_ready()
    finally:
        conn.close()
        other.close()


def test_unknown_statement_is_26000_and_session_survives(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    conn = connect(one_server, pg)
    try:
        got = conn.run_prepared("nope")
        assert w.msg_types(got) == "EZ"
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "26000" and error.severity == "ERROR"
        assert error.message == 'prepared statement "nope" does not exist'
        conn.send_raw(w.describe("S", "") + w.sync())
        error = w.first_error(conn.read_until_ready())
        assert error is not None and error.message == "unnamed prepared statement does not exist"
        assert conn.execute_query("select 1") == [("1",)]
    finally:
        conn.close()


def test_deallocate_answered_locally(one_server: PoolerProcess, pg: ExamplePostgres) -> None:
    conn = connect(one_server, pg)
    try:
        conn.send_raw(w.parse("stmt", "select 1") + w.sync())
        conn.read_until_ready()
        got = conn.simple_query('deallocate "stmt"')
        assert got == [(b"C", b"DEALLOCATE\x00"), (b"Z", b"I")]
        assert w.first_error(conn.run_prepared("stmt")) is not None
        conn.send_raw(w.parse("stmt", "select 2") + w.bind("", "stmt") + w.execute() + w.sync())
        assert w.rows(conn.read_until_ready()) == [("2",)]
        got = conn.simple_query("DEALLOCATE ALL;")
        assert got == [(b"C", b"DEALLOCATE ALL\x00"), (b"Z", b"I")]
        # An SQL-level statement the pooler doesn't know goes to PostgreSQL.
        error = w.first_error(conn.simple_query("deallocate unknown_one"))
        assert error is not None and error.sqlstate == "26000"
    finally:
        conn.close()


def test_deallocate_split_after_its_header(one_server: PoolerProcess, pg: ExamplePostgres) -> None:
    """A DEALLOCATE whose Query arrives in two reads, the first holding only the
    message header, is still answered by the pooler: PostgreSQL only knows the
    statement under the pooler's name and would say it does not exist."""
    conn = connect(one_server, pg)
    try:
        conn.send_raw(w.parse("stmt", "select 1") + w.sync())
        conn.read_until_ready()
        deallocate = w.query('deallocate "stmt"')
        conn.send_raw(deallocate[:5])
        time.sleep(0.2)  # the pooler reads the header on its own
        conn.send_raw(deallocate[5:])
        assert conn.read_until_ready() == [(b"C", b"DEALLOCATE\x00"), (b"Z", b"I")]
        error = w.first_error(conn.run_prepared("stmt"))
        assert error is not None and error.sqlstate == "26000"
    finally:
        conn.close()


# Client traffic of every kind the pooler looks into between and inside transactions,
# each with the message types its answer ends at, in order.
_MIXED_TRAFFIC: list[tuple[bytes, bytes]] = [
    (w.query("select 1"), b"Z"),
    (w.query(";"), b"Z"),  # the pooler's check query, answered without a server
    (w.parse("s1", "select $1::int") + w.bind("", "s1", ["7"]) + w.execute() + w.sync(), b"Z"),
    (w.query("deallocate s1"), b"Z"),  # answered by the pooler
    (w.bind("", "s1", ["8"]) + w.execute() + w.sync(), b"Z"),  # gone: 26000
    (w.parse("", "select 'x'") + w.bind("", "") + w.describe("P") + w.execute() + w.sync(), b"Z"),
    (w.query("begin; select 2"), b"Z"),
    (w.query("select 3"), b"Z"),
    (w.query("create temp table t (a int) on commit drop; copy t from stdin"), b"G"),
    (w.copy_data("1\n2\n") + w.copy_data("3\n") + w.copy_done(), b"Z"),
    (w.query("select sum(a) from t"), b"Z"),
    (w.query("commit"), b"Z"),
    (w.query("select nope"), b"Z"),
    # 1/0 fails at Bind: the plan folds the constant.
    (w.parse("s2", "select 1/$1::int") + w.bind("", "s2", ["0"]) + w.execute() + w.sync(), b"Z"),
    (w.bind("", "s2", ["1"]) + w.execute() + w.close("S", "s2") + w.sync(), b"Z"),
    (w.query("select 4; select 5"), b"Z"),
    (w.query("DEALLOCATE ALL") + w.query("select 6"), b"ZZ"),
]


def _answers(conn: w.PgWire) -> list[list[tuple[bytes, bytes]]]:
    answers = []
    for data, stops in _MIXED_TRAFFIC:
        conn.send_raw(data)
        answers.append([m for stop in stops for m in conn.read_until(bytes([stop]))])
    return answers


def test_bytes_trickled_one_at_a_time_get_the_same_answers(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    """Every message boundary of this traffic falls between two reads at every possible
    offset: the answers must be those of the same traffic sent in one write each."""
    whole = connect(one_server, pg)
    try:
        expected = _answers(whole)
    finally:
        whole.close()
    assert [w.msg_types(a) for a in expected] == [
        "TDCZ", "IZ", "12DCZ", "CZ", "EZ", "12TDCZ", "CTDCZ", "TDCZ", "CG", "CZ", "TDCZ",
        "CZ", "EZ", "1EZ", "2DC3Z", "TDCTDCZ", "CZTDCZ",
    ]  # fmt: skip
    assert w.rows(expected[10]) == [("6",)]
    user = pg.md5_user
    trickled = w.TricklingWire.connect(
        one_server.host, one_server.port, user.name, "example_db", user.password
    )
    try:
        assert _answers(trickled) == expected
        assert trickled.execute_query("select 'still here'") == [("still here",)]
    finally:
        trickled.close()


_MALFORMED = {
    "bind-without-nul": w.message(b"B", b"portal"),
    "bind-name-without-nul": w.message(b"B", b"\x00stmt"),
    "describe-without-nul": w.message(b"D", b"Sstmt"),
    "describe-with-extra-bytes": w.message(b"D", b"Sstmt\x00\x00"),
    "close-without-nul": w.message(b"C", b"Sstmt"),
    "close-with-extra-bytes": w.message(b"C", b"Sstmt\x00x"),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_statement_messages_are_answered_as_postgresql_does(
    one_server: PoolerProcess, pg: ExamplePostgres, case: str
) -> None:
    """Answered by the pooler, as PostgreSQL would: 08P01, then skip to Sync; the
    session and its statements go on."""

    def exchange(conn: w.PgWire) -> tuple[str, str, str]:
        conn.send_raw(w.parse("stmt", "select 1") + w.sync())
        conn.read_until_ready()
        conn.send_raw(_MALFORMED[case] + w.execute() + w.sync())
        got = conn.read_until_ready()
        assert w.rows(conn.run_prepared("stmt")) == [("1",)]
        error = w.first_error(got)
        assert error is not None and w.msg_types(got) == "EZ", got
        return error.sqlstate, error.severity, error.message

    direct, pooled = on_both(pg, one_server, exchange)
    assert pooled == direct
    assert pooled[:2] == ("08P01", "ERROR")


def test_deallocate_without_its_nul_goes_to_postgresql(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    """Not read as `deallocate stm`: PostgreSQL refuses the message, the statement stays."""

    def exchange(conn: w.PgWire) -> tuple[str, str]:
        conn.send_raw(w.parse("stm", "select 1") + w.parse("stmt", "select 2") + w.sync())
        conn.read_until_ready()
        conn.send_raw(w.message(b"Q", b"deallocate stmt"))
        got = conn.read_until_ready()
        for name, value in (("stm", "1"), ("stmt", "2")):
            assert w.rows(conn.run_prepared(name)) == [(value,)]
        error = w.first_error(got)
        assert error is not None and w.msg_types(got) == "EZ", got
        return error.sqlstate, error.message

    direct, pooled = on_both(pg, one_server, exchange)
    assert pooled == direct == ("08P01", "invalid string in message")


def test_eviction_inside_a_batch(one_server: PoolerProcess, pg: ExamplePostgres) -> None:
    conn = connect(one_server, pg)
    try:
        batch = (
            w.parse("a", "select 'a'")
            + w.bind("", "a")
            + w.execute()
            + w.parse("b", "select 'b'")
            + w.parse("c", "select 'c'")  # cache of 2: 'a' is evicted here
            + w.bind("", "a")  # ... and used again in the same batch
            + w.execute()
            + w.bind("", "c")
            + w.execute()
            + w.close("S", "a")
            + w.close("S", "b")
            + w.close("S", "c")  # so that the next round can parse them again
            + w.sync()
        )
        for _ in range(3):
            conn.send_raw(batch)
            got = conn.read_until_ready()
            assert w.first_error(got) is None, got
            assert w.msg_types(got) == "12DC112DC2DC333Z"
            assert w.rows(got) == [("a",), ("a",), ("c",)]
    finally:
        conn.close()


def test_client_vanishing_between_parse_and_sync(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    for _ in range(3):
        gone = connect(one_server, pg)
        gone.send_raw(w.parse("p", "select 42") + w.bind("", "p") + w.execute())
        gone.close_socket()
        conn = connect(one_server, pg)
        try:
            conn.send_raw(w.parse("p", "select 42") + w.bind("", "p") + w.execute() + w.sync())
            got = conn.read_until_ready()
            assert w.first_error(got) is None
            assert w.rows(got) == [("42",)]
        finally:
            conn.close()


def test_failed_parse_is_not_remembered(one_server: PoolerProcess, pg: ExamplePostgres) -> None:
    conn = connect(one_server, pg)
    try:
        for _ in range(2):
            conn.send_raw(w.parse("bad", "select nope") + w.sync())
            error = w.first_error(conn.read_until_ready())
            assert error is not None and error.sqlstate == "42703"
        conn.send_raw(w.query("create temp table later(nope int)"))
        conn.read_until_ready()
    finally:
        conn.close()


def test_flush_mode_reparse(one_server: PoolerProcess, pg: ExamplePostgres) -> None:
    conn = connect(one_server, pg)
    try:
        for i in range(3):
            conn.send_raw(w.parse(f"f{i}", "select 7") + w.flush())
            assert w.msg_types(conn.read_until(b"1")) == "1"
            conn.send_raw(w.bind("", f"f{i}") + w.execute() + w.flush())
            got = conn.read_until(b"C")
            assert w.rows(got) == [("7",)]
        conn.send_raw(w.sync())
        assert w.msg_types(conn.read_until_ready()) == "Z"
    finally:
        conn.close()


# Queries sent inside an extended-protocol batch, before its Sync; PostgreSQL skips what
# follows a failing extended message up to the Sync, a Query too.
_QUERIES_IN_A_BATCH = {
    "error-before-the-queries": (
        w.parse("", "select 1/0") + w.bind("", "") + w.execute() + w.query("select 42")
        + w.parse("", "select 2") + w.bind("", "") + w.execute() + w.query("select 43")
        + w.sync(),
        "1EZ",  # 1/0 fails at Bind: the plan folds the constant
    ),
    "error-between-the-queries": (
        w.parse("", "select 1") + w.bind("", "") + w.execute() + w.query("select 42")
        + w.parse("", "select 1/0") + w.bind("", "") + w.execute() + w.query("select 43")
        + w.sync(),
        "12DCTDCZ1EZ",
    ),
    # PostgreSQL then fails the session's next command with XX000 ("unexpected state
    # STARTED"): the pooler closes the server rather than give it to another client.
    "the-query-last": (
        w.parse("", "select 1") + w.bind("", "") + w.execute() + w.query("select 42")
        + w.sync(),
        "12DCTDCZZ",
    ),
    "the-query-fails": (
        w.parse("", "select 1") + w.bind("", "") + w.execute() + w.query("select 1/0")
        + w.parse("", "select 2") + w.bind("", "") + w.execute() + w.sync(),
        "12DCEZ12DCZ",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_QUERIES_IN_A_BATCH))
def test_queries_inside_a_batch_are_answered_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory, case: str
) -> None:
    """The answers are PostgreSQL's, and the pooler expects no ReadyForQuery for a Query
    that PostgreSQL skipped: the pool's one server goes back to the pool at the Sync,
    for the next client, while the first one stays connected."""
    batch, types = _QUERIES_IN_A_BATCH[case]
    proc = pooler(general={"query_wait_timeout": 3000}, pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[w.Message]:
        conn.send_raw(batch)
        got = [m for _ in range(types.count("Z")) for m in conn.read_until_ready()]
        return got + conn.read_available(0.2)

    direct, pooled = on_both(pg, proc, exchange)
    assert w.msg_types(direct) == types
    assert pooled == direct
    first, second = connect(proc, pg), connect(proc, pg)
    try:
        first.send_raw(batch)
        for _ in range(types.count("Z")):
            first.read_until_ready()
        assert second.execute_query("select 'next client'") == [("next client",)]
        assert first.execute_query("select 'first client'") == [("first client",)]
    finally:
        first.close()
        second.close()


def test_a_pinned_client_deallocates_its_statement(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    """A client that keeps its server between transactions (an advisory lock pins it)
    DEALLOCATEs its statement by its own name, which the server does not know."""

    def exchange(conn: w.PgWire) -> list[w.Message]:
        got = conn.simple_query("select pg_advisory_lock(4242)")
        conn.send_raw(w.parse("s1", "select 1") + w.bind("", "s1") + w.execute() + w.sync())
        got += conn.read_until_ready()
        got += conn.simple_query("DEALLOCATE s1")
        got += conn.run_prepared("s1")
        got += conn.simple_query("select pg_advisory_unlock(4242)")
        return [m for m in got if m[0] != b"N"]

    direct, pooled = on_both(pg, one_server, exchange)
    assert w.msg_types(direct) == "TDCZ12DCZCZEZTDCZ"
    assert w.comparable(pooled) == w.comparable(direct)


def test_a_client_cannot_deallocate_the_pools_statements(
    one_server: PoolerProcess, pg: ExamplePostgres
) -> None:
    """The name the pooler gives a statement on its servers is no client's: another
    client that DEALLOCATEs it by that name, between transactions, pinned to its
    server or inside a transaction block, gets PostgreSQL's answer for a statement its
    session never prepared, and the statement stays for the client that prepared it."""
    owner = connect(one_server, pg)
    owner.send_raw(w.parse("s1", "select 41") + w.bind("", "s1") + w.execute() + w.sync())
    assert w.rows(owner.read_until_ready()) == [("41",)]
    # One server: the other client's session is on the server that has the statement.
    (server_name,) = owner.execute_query("select name from pg_prepared_statements")[0]
    assert server_name is not None and server_name.startswith("DOORMAN_")

    def exchange(conn: w.PgWire) -> list[w.Message]:
        deallocate = f'DEALLOCATE "{server_name}"'
        got = conn.simple_query(deallocate)
        got += conn.simple_query("select pg_advisory_lock(4243)")
        got += conn.simple_query(deallocate)
        got += conn.simple_query("select pg_advisory_unlock(4243)")
        got += conn.simple_query("begin")
        got += conn.simple_query(deallocate)
        got += conn.simple_query("select 1")  # 25P02: the block failed
        got += conn.simple_query("rollback")
        return [m for m in got if m[0] != b"N"]

    try:
        direct, pooled = on_both(pg, one_server, exchange)
        assert w.msg_types(direct) == "EZTDCZEZTDCZCZEZEZCZ"
        assert w.comparable(pooled) == w.comparable(direct)
        owner.send_raw(w.bind("", "s1") + w.execute() + w.sync())
        assert w.rows(owner.read_until_ready()) == [("41",)]
        assert owner.execute_query("select name from pg_prepared_statements") == [(server_name,)]
    finally:
        owner.close()


@pytest.mark.parametrize("command", ["deallocate all", "discard all"])
def test_an_extended_reset_keeps_the_unnamed_statement(
    one_server: PoolerProcess, pg: ExamplePostgres, command: str
) -> None:
    """Run as an extended-protocol statement, DEALLOCATE ALL and DISCARD ALL drop the
    named statements but not the unnamed one (only a simple Query drops that)."""

    def exchange(conn: w.PgWire) -> list[w.Message]:
        conn.send_raw(w.parse("", "select 11 as v") + w.bind("", "") + w.execute() + w.sync())
        got = conn.read_until_ready()
        conn.send_raw(w.parse("named", "select 12") + w.sync())
        got += conn.read_until_ready()
        conn.send_raw(w.parse("reset", command) + w.bind("", "reset") + w.execute() + w.sync())
        got += conn.read_until_ready()
        conn.send_raw(w.bind("", "") + w.execute() + w.sync())
        got += conn.read_until_ready()
        got += conn.run_prepared("named")
        return got

    direct, pooled = on_both(pg, one_server, exchange)
    assert w.msg_types(direct) == "12DCZ1Z12CZ2DCZEZ"
    assert w.comparable(pooled) == w.comparable(direct)


def _copy_with_a_sync_inside(conn: w.PgWire) -> list[w.Message]:
    # A Sync between CopyData messages, which PostgreSQL ignores during COPY FROM STDIN.
    conn.send_raw(w.query("copy copied from stdin"))
    got = conn.read_until(b"G")
    conn.send_raw(w.copy_data("1\n") + w.sync() + w.copy_data("2\n") + w.copy_done())
    return got + conn.read_until_ready()


def _extended_copy(conn: w.PgWire) -> list[w.Message]:
    # libpq's order: the Sync right behind the Execute, before the copy has begun.
    conn.send_raw(w.parse("", "copy copied from stdin") + w.bind("", "") + w.execute() + w.sync())
    got = conn.read_until(b"G")
    conn.send_raw(w.copy_data("3\n") + w.copy_done() + w.sync())
    return got + conn.read_until_ready()


@pytest.mark.parametrize("copy", [_copy_with_a_sync_inside, _extended_copy])
@pytest.mark.parametrize("trickled", [False, True], ids=["whole", "trickled"])
def test_syncs_during_copy_in_expect_no_reply(
    one_server: PoolerProcess,
    pg: ExamplePostgres,
    copy: Callable[[w.PgWire], list[w.Message]],
    trickled: bool,
) -> None:
    """A Sync that reaches the server during COPY FROM STDIN is ignored there: the
    pooler expects nothing for it, and a statement the server already has, used after
    the copy in the same transaction, is answered as PostgreSQL answers it."""
    user = pg.md5_user
    wire = w.TricklingWire if trickled else w.PgWire
    answers = []
    for target in (pg, one_server):
        conn = wire.connect(target.host, target.port, user.name, "example_db", user.password)
        try:
            conn.send_raw(
                w.parse("s1", "select 5 as v") + w.bind("", "s1") + w.execute() + w.sync()
            )
            got = conn.read_until_ready()
            got += conn.simple_query("begin")
            got += conn.simple_query("create temp table copied(x int)")
            got += copy(conn)
            got += conn.read_available(0.2)
            conn.send_raw(
                w.parse("s2", "select 5 as v") + w.bind("", "s2") + w.execute() + w.sync()
            )
            got += conn.read_until_ready()
            got += conn.simple_query("select count(*), sum(x) from copied")
            got += conn.simple_query("commit")
            answers.append(got + conn.read_available(0.2))
        finally:
            conn.close()
    direct, pooled = answers
    assert w.first_error(direct) is None, direct
    assert pooled == direct


# ---- parity with PostgreSQL -----------------------------------------------------------


def npgsql_batch(conn: w.PgWire) -> None:
    """500 statements, a mix of new and repeated texts, one Sync (NpgsqlBatch-style)."""
    batch = b"".join(
        w.parse("", f"select {i % 37} as v") + w.bind("", "") + w.describe("P") + w.execute()
        for i in range(500)
    )
    conn.send_raw(batch + w.sync())


def describe_flow(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("d1", "select id, name from items where id = $1", [23])
        + w.describe("S", "d1")
        + w.sync()
    )
    conn.read_until_ready()
    conn.send_raw(w.bind("", "d1", ["3"]) + w.describe("P") + w.execute() + w.sync())


def prepare_describe_bind_mix(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("m1", "select $1::int", [23])
        + w.parse("m2", "select $1::text", [25])
        + w.describe("S", "m1")
        + w.bind("p1", "m1", ["5"])
        + w.describe("S", "m2")
        + w.bind("", "m2", ["x"])
        + w.execute()
        + w.execute("p1")
        + w.close("S", "m1")
        + w.close("P", "p1")
        + w.parse("m1", "select $1::int + 1", [23])
        + w.bind("", "m1", ["5"])
        + w.execute()
        + w.sync()
    )


def error_mid_batch(conn: w.PgWire) -> None:
    conn.send_raw(
        w.parse("e1", "select 1")
        + w.bind("", "e1")
        + w.execute()
        + w.parse("e2", "select 1/0")
        + w.bind("", "e2")
        + w.execute()
        + w.parse("e3", "select 3")
        + w.bind("", "e3")
        + w.execute()
        + w.sync()
    )


def rollback_after_error(conn: w.PgWire) -> None:
    conn.send_raw(w.query("begin"))
    conn.read_until_ready()
    conn.send_raw(w.parse("r1", "select 1/0") + w.bind("", "r1") + w.execute() + w.sync())
    conn.read_until_ready()
    conn.send_raw(w.parse("r2", "rollback") + w.bind("", "r2") + w.execute() + w.sync())


Scenario = Callable[[w.PgWire], None]
SCENARIOS: dict[str, Scenario] = {
    f.__name__: f
    for f in (
        npgsql_batch,
        describe_flow,
        prepare_describe_bind_mix,
        error_mid_batch,
        rollback_after_error,
    )
}


def run(
    target: PoolerProcess | ExamplePostgres, pg: ExamplePostgres, scenario: Scenario
) -> list[w.Message]:
    conn = connect(target, pg)
    try:
        start = len(conn.received)
        scenario(conn)
        conn.read_until_ready()
        return conn.received[start:]
    finally:
        conn.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_prepared_parity(pg: ExamplePostgres, pooler: PoolerFactory, name: str) -> None:
    proc = pooler(general={"server_prepared_statements_cache_size": 20}, pools=one_user_pool(pg, 1))
    scenario = SCENARIOS[name]
    direct = run(pg, pg, scenario)
    # Cold (statements new to the server), then warm (already prepared there).
    for _ in range(2):
        pooled = run(proc, pg, scenario)
        assert w.msg_types(pooled) == w.msg_types(direct)
        assert pooled == direct
