"""Scenarios from PgBouncer's test suite that are hardest on a transaction pooler, ported
to this pooler where no other test here asserts the same: prepared statements moved
between servers, shared and evicted, failed prepares, COPY through named statements,
cancels of every server at once, parameters that follow their client, `options`
parsing, exact backend counts. Each test is named after its PgBouncer counterpart
(`test_sNN_`: the NNth of the scenarios most worth porting); `test_x_` ones come from
the transaction-pooling edge cases PgBouncer documents."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect, on_both
from helpers.pooler import PoolerFactory, PoolShape, Replace, serve_a_client


def pools(pg: ExamplePostgres, size: int, cache: int = 0, **general: Any) -> dict[str, Any]:
    config: dict[str, Any] = PoolShape(size, server_cache=cache).config(pg)
    config["general"].update(general)
    return config


def backends(pg: ExamplePostgres, user: str) -> list[int]:
    out = pg.psql(
        f"select pid from pg_stat_activity where usename = '{user}' "
        "and backend_type = 'client backend' order by pid"
    )
    return [int(line) for line in out.split()]


# --- S2: test_prepared_statement / test_prepared_statement_params ------------------------


@pytest.mark.parametrize("sql,params", [("select 1", []), ("select $1::int", ["41"])])
def test_s02_statement_reprepared_on_another_server_then_shared(
    pg: ExamplePostgres, pooler: PoolerFactory, sql: str, params: list[str]
) -> None:
    """Client 1 prepares; client 2 then holds that server in a transaction, so client 1
    runs its statement on the other server (re-prepared there). Client 2 prepares the
    same text under its own name and reuses the server-side statement: no errors, and
    each server holds the text once."""
    proc = pooler(**pools(pg, 2))
    first = connect(proc, pg)
    second = connect(proc, pg)
    expected = [(params[0] if params else "1",)]
    try:
        first.send_raw(w.parse("p1", sql) + w.sync())
        assert w.msg_types(first.read_until_ready()) == "1Z"
        second.execute_query("begin")
        first.send_raw(w.bind("", "p1", params) + w.execute() + w.sync())
        got = first.read_until_ready()
        assert w.first_error(got) is None and w.rows(got) == expected
        second.execute_query("commit")
        second.send_raw(w.parse("mine", sql) + w.bind("", "mine", params) + w.execute() + w.sync())
        got = second.read_until_ready()
        assert w.first_error(got) is None and w.rows(got) == expected
        first.send_raw(w.bind("", "p1", params) + w.execute() + w.sync())
        assert w.rows(first.read_until_ready()) == expected
        # The server client 2 used holds the statement once, under the pooler's name.
        texts = second.execute_query(
            "select name, statement from pg_prepared_statements order by name"
        )
        assert [t for _, t in texts].count(sql) == 1, texts
        assert all(name is not None and name.startswith("DOORMAN_") for name, _ in texts)
    finally:
        first.close()
        second.close()


# --- S3: test_prepared_statement_pipeline -------------------------------------------------


def test_s03_pipeline_of_new_known_and_unprepared_statements(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """After warming, one write mixes an already-prepared statement, a new one, the
    unnamed statement and a simple query, in both orders; replies are PostgreSQL's."""
    proc = pooler(**pools(pg, 1, cache=3))

    def run(name: str) -> bytes:
        return w.bind("", name) + w.execute() + w.sync()

    def exchange(conn: w.PgWire) -> list[w.Message]:
        conn.send_raw(w.parse("known", "select 'known' as k") + w.sync())
        conn.read_until_ready()
        forward = (
            run("known")
            + w.parse("new1", "select 'new1'")
            + run("new1")
            + w.parse("", "select 'unnamed'")
            + run("")
            + w.query("select 'simple'")
            + run("new1")
        )
        backward = (
            w.query("select 'simple2'")
            + w.parse("", "select 'unnamed2'")
            + run("")
            + w.parse("new2", "select 'new2' as n")
            + run("new2")
            + run("new1")
            + run("known")
        )
        conn.send_raw(forward + backward)
        replies = []
        for _ in range(10):
            replies += conn.read_until_ready()
        return replies

    direct, pooled = on_both(pg, proc, exchange)
    assert w.comparable(pooled) == w.comparable(direct)
    assert w.rows(pooled) == [
        ("known",),
        ("new1",),
        ("unnamed",),
        ("simple",),
        ("new1",),
        ("simple2",),
        ("unnamed2",),
        ("new2",),
        ("new1",),
        ("known",),
    ]


# --- S4: test_prepared_statement_pipeline_stress ------------------------------------------


def test_s04_pipeline_stress_with_constant_eviction(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Two clients, pipelines of 0-9 queries, 100 iterations each, over 100 distinct
    statements with a 512-byte text parameter; servers keep 16 statements, so eviction
    and re-prepare happen all the time. Every result must match."""
    import random

    proc = pooler(**pools(pg, 2, cache=16))
    user = pg.md5_user
    failures: list[BaseException] = []
    checked: list[int] = []
    payload = "z" * 512

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(
                proc.dsn(user.name, user.password), autocommit=True, prepare_threshold=0
            ) as conn:
                for _ in range(100):
                    picks = [rng.randrange(100) for _ in range(rng.randrange(10))]
                    with conn.pipeline():
                        cursors = [
                            conn.execute(f"select %s::text || '{i}' as c{i}", (payload,))
                            for i in picks
                        ]
                    for i, cur in zip(picks, cursors, strict=True):
                        assert cur.fetchone() == (payload + str(i),)
                        checked.append(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(checked) > 500 and len(set(checked)) > 90


# --- S5: test_evict_statement_cache_pipeline_failure --------------------------------------


def test_s05_failed_parse_in_a_pipeline_with_a_cache_of_one(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(**pools(pg, 1, cache=1))
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), autocommit=True, prepare_threshold=0
    ) as conn:
        with pytest.raises(psycopg.errors.SyntaxError), conn.pipeline():
            first = conn.execute("select 1")
            conn.execute("selec 1")
        assert first.fetchone() == (1,)
        for _ in range(2):
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.execute("select 2", prepare=True).fetchone() == (2,)


# --- S8: test_prepared_failed_prepare / _pipeline -----------------------------------------


@pytest.fixture
def fresh_table(pg: ExamplePostgres) -> Any:
    name = "later_" + uuid.uuid4().hex[:8]
    yield name
    pg.psql(f"drop table if exists {name}", database=EXAMPLE_DB)


def test_s08_failed_prepare_then_create_table(
    pg: ExamplePostgres, pooler: PoolerFactory, fresh_table: str
) -> None:
    proc = pooler(**pools(pg, 1))
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), autocommit=True, prepare_threshold=0
    ) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(f"select * from {fresh_table}")
        conn.execute(f"create table {fresh_table} (a int)")
        conn.execute(f"insert into {fresh_table} values (5)")
        assert conn.execute(f"select * from {fresh_table}").fetchall() == [(5,)]


def test_s08_failed_prepare_in_a_pipeline_then_create_table(
    pg: ExamplePostgres, pooler: PoolerFactory, fresh_table: str
) -> None:
    """Raw protocol, so the same names are used: a pipeline whose second batch fails
    to parse; the others are unaffected; after CREATE TABLE the same Parse works."""
    proc = pooler(**pools(pg, 1))
    conn = connect(proc, pg)
    try:

        def batch(name: str, sql: str) -> bytes:
            return w.parse(name, sql) + w.bind("", name) + w.execute() + w.sync()

        pipeline = (
            batch("a", "select 'a'")
            + batch("t", f"select a from {fresh_table}")
            + batch("b", "select 'b'")
        )
        conn.send_raw(pipeline)
        got = [conn.read_until_ready() for _ in range(3)]
        assert [w.msg_types(g) for g in got] == ["12DCZ", "EZ", "12DCZ"]
        error = w.first_error(got[1])
        assert error is not None and error.sqlstate == "42P01"
        conn.execute_query(f"create table {fresh_table} (a int)")
        conn.execute_query(f"insert into {fresh_table} values (7)")
        conn.send_raw(w.close("S", "a") + w.close("S", "b") + w.sync())
        conn.read_until_ready()
        conn.send_raw(pipeline)
        got = [conn.read_until_ready() for _ in range(3)]
        assert [w.msg_types(g) for g in got] == ["12DCZ"] * 3, got
        assert [w.rows(g) for g in got] == [[("a",)], [("7",)], [("b",)]]
    finally:
        conn.close()


# --- S10: test_discard_all (two clients) --------------------------------------------------


def test_s10_discard_all_forgets_only_its_own_clients_statements(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """DISCARD ALL runs on the shared server (dropping the server-side statement); the
    other client's statement must still run, the discarding client's is gone."""
    proc = pooler(**pools(pg, 1))
    first = connect(proc, pg)
    second = connect(proc, pg)
    try:
        for conn in (first, second):
            conn.send_raw(w.parse("s", "select 7") + w.sync())
            conn.read_until_ready()
        assert w.msg_types(first.simple_query("DISCARD ALL")) == "CZ"
        assert w.rows(second.run_prepared("s")) == [("7",)]
        error = w.first_error(first.run_prepared("s"))
        assert error is not None and error.sqlstate == "26000"
        # And the discarding client can prepare the name again.
        first.send_raw(w.parse("s", "select 8") + w.bind("", "s") + w.execute() + w.sync())
        assert w.rows(first.read_until_ready()) == [("8",)]
        assert w.rows(second.run_prepared("s")) == [("7",)]
    finally:
        first.close()
        second.close()


# --- S11: test_parse_larger_than_pkt_buf_with_varcache_change -----------------------------


def test_s11_large_parse_behind_a_parameter_sync(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client whose DateStyle/TimeZone differ from the other client's shares one
    server with it, so before each of its transactions the pooler must SET them; its
    40 kB Parse and Bind still round-trip as on a direct connection."""
    proc = pooler(**pools(pg, 1))
    user = pg.md5_user
    params = {"DateStyle": "German, DMY", "TimeZone": "Asia/Tokyo"}
    name = "n" * 8_000
    text = "select '" + "x" * 40_000 + "'::text || $1::text as v, '2020-01-02'::date::text d"

    def exchange(conn: w.PgWire, other: w.PgWire | None) -> list[list[w.Message]]:
        out = []
        for _ in range(2):
            if other is not None:
                other.execute_query("select 1")  # the server now has the defaults again
            conn.send_raw(w.parse(name, text) + w.describe("S", name) + w.sync())
            out.append([m for m in conn.read_until_ready() if m[0] != b"S"])
            if other is not None:
                other.execute_query("select 2")
            conn.send_raw(
                w.bind("", name, ["y" * 40_000])
                + w.describe("P")
                + w.execute()
                + w.close("S", name)
                + w.sync()
            )
            out.append([m for m in conn.read_until_ready() if m[0] != b"S"])
        return out

    direct_conn = w.PgWire.connect(
        pg.host, pg.port, user.name, EXAMPLE_DB, user.password, params=params
    )
    pooled_conn = w.PgWire.connect(
        proc.host, proc.port, user.name, EXAMPLE_DB, user.password, params=params
    )
    other = connect(proc, pg)
    try:
        direct = exchange(direct_conn, None)
        pooled = exchange(pooled_conn, other)
    finally:
        for c in (direct_conn, pooled_conn, other):
            c.close()
    assert pooled == direct
    assert w.rows(pooled[1]) == [("x" * 40_000 + "y" * 40_000, "02.01.2020")]


# --- S12: test_pipeline_flushes_on_full_pkt_buf / _with_half_pkt_buf_prepare (4 KB) ----


def test_s12_flush_then_a_4k_parse_and_two_2k_parses(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(**pools(pg, 1))

    def sql_of(size: int, tag: str) -> str:
        head = f"select '{tag}' as t, '"
        return head + "p" * (size - len(head) - 1 - 5 - 4 - 2 - 2 - 1) + "'"

    big = sql_of(4096, "big")

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        out = []
        conn.send_raw(w.flush() + w.parse("", big) + w.flush())
        out.append(conn.read_until(b"1"))
        conn.send_raw(w.bind("", "") + w.execute() + w.sync())
        out.append(conn.read_until_ready())
        half_a, half_b = sql_of(2048, "a"), sql_of(2048, "b")
        conn.send_raw(
            w.parse("ha", half_a)
            + w.parse("hb", half_b)
            + w.bind("", "ha")
            + w.execute()
            + w.bind("", "hb")
            + w.execute()
            + w.sync()
        )
        out.append(conn.read_until_ready())
        return out

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["1", "2DCZ", "112DC2DCZ"]


# --- S13: test_copy_stdin_error_before_copy_done_in_transaction ---------------------------


def test_s13_copy_error_before_copy_done_inside_a_transaction(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(**pools(pg, 1, **{"query_wait_timeout": 5000}))
    conn = connect(proc, pg)
    try:
        conn.execute_query("begin")
        conn.execute_query("create temp table t (a int) on commit drop")
        conn.send_raw(w.query("copy t from stdin"))
        conn.read_until(b"G")
        conn.send_raw(w.copy_data("bad\n"))
        got = conn.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "22P02" and conn.status == "E"
        conn.send_raw(w.copy_data("1\n") + w.copy_done())
        assert conn.read_available(0.3) == []
        assert w.msg_types(conn.simple_query("rollback")) == "CZ" and conn.status == "I"
        assert serve_a_client(proc, pg) < 2.0
        assert conn.execute_query("select 'after'") == [("after",)]
    finally:
        conn.close()


# --- S14: test_copy_stdin_success_prepared / test_copy_stdout_prepared / errors -----------


@pytest.fixture
def copy_table(pg: ExamplePostgres) -> Any:
    name = "copyp_" + uuid.uuid4().hex[:8]
    pg.psql(f"create table {name} (a int); grant all on {name} to public", database=EXAMPLE_DB)
    yield name
    pg.psql(f"drop table if exists {name}", database=EXAMPLE_DB)


@pytest.mark.parametrize("rows", ["1\n2\n", "1\nbad\n"], ids=["good", "bad-row"])
def test_s14_copy_through_named_prepared_statements(
    pg: ExamplePostgres, pooler: PoolerFactory, copy_table: str, rows: str
) -> None:
    """COPY FROM STDIN and TO STDOUT as named prepared statements, each run twice (the
    second time from the prepared name alone), with a Sync right behind the Execute
    and one after the copy data; the replies are PostgreSQL's."""
    proc = pooler(**pools(pg, 1, cache=1))

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        out = []
        conn.execute_query(f"truncate {copy_table}")
        conn.send_raw(
            w.parse("cin", f"copy {copy_table} from stdin")
            + w.parse("cout", f"copy (select a from {copy_table} order by a) to stdout")
            + w.sync()
        )
        out.append(w.comparable(conn.read_until_ready()))
        for _ in range(2):
            conn.send_raw(w.bind("", "cin") + w.execute() + w.sync())
            start = conn.read_until(b"GEZ")
            if start[-1][0] == b"G":
                conn.send_raw(w.copy_data(rows) + w.copy_done() + w.sync())
                start += conn.read_until_ready()
            out.append(w.comparable(start))
            conn.send_raw(w.bind("", "cout") + w.execute() + w.sync())
            out.append(w.comparable(conn.read_until_ready()))
            # Another statement in between, so the small cache evicts one of them.
            conn.send_raw(w.parse("", "select 'x'") + w.bind("", "") + w.execute() + w.sync())
            out.append(w.comparable(conn.read_until_ready()))
        return out

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct


# --- S16: test_cancel_pool_size / test_cancel_wait ----------------------------------------


def test_s16_every_server_cancelled_at_once_while_others_wait(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Three sessions fill pool_size=3 with long sleeps, two more wait for a server;
    cancels for all three at once get through (they need no pool slot), each holder
    gets 57014, and the waiting clients are then served."""
    proc = pooler(**pools(pg, 3, **{"query_wait_timeout": 20_000}))
    holders = [connect(proc, pg) for _ in range(3)]
    waiters = [connect(proc, pg) for _ in range(2)]
    try:
        for conn in holders:
            conn.send_raw(w.query("select pg_sleep(15)"))
        time.sleep(0.5)
        for i, conn in enumerate(waiters):
            conn.send_raw(w.query(f"select 'waiter {i}'"))
        time.sleep(0.3)
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=w.cancel, args=(proc.host, proc.port, c.backend_pid, c.secret_key)
            )
            for c in holders
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for conn in holders:
            error = w.first_error(conn.read_until_ready(timeout=5))
            assert error is not None and error.sqlstate == "57014"
        for i, conn in enumerate(waiters):
            got = conn.read_until_ready(timeout=5)
            assert w.first_error(got) is None and w.rows(got) == [(f"waiter {i}",)]
        assert time.monotonic() - started < 5
        for conn in holders:
            assert conn.execute_query("select 'alive'") == [("alive",)]
    finally:
        for conn in holders + waiters:
            conn.close()


# --- S17: test_track_extra_parameters -----------------------------------------------------

SIX = {
    "IntervalStyle": ("iso_8601", "sql_standard"),
    "standard_conforming_strings": ("off", "on"),
    "TimeZone": ("Europe/Amsterdam", "Asia/Tokyo"),
    "DateStyle": ("German, DMY", "SQL, MDY"),
    "application_name": ("client_one", "client_two"),
    "client_encoding": ("LATIN1", "SQL_ASCII"),
}


@pytest.mark.parametrize("sync_server_parameters", [True, False], ids=["sync", "default"])
def test_s17_six_parameters_set_by_two_clients_follow_each(
    pg: ExamplePostgres, pooler: PoolerFactory, sync_server_parameters: bool
) -> None:
    """Two clients SET different values of six parameters over one server; each
    client's SHOW returns its own value as PostgreSQL spells it. (application_name is
    followed only with sync_server_parameters, docs/configuration.md.)"""
    proc = pooler(**pools(pg, 1, **{"sync_server_parameters": sync_server_parameters}))
    clients = [connect(proc, pg), connect(proc, pg)]
    try:
        for i, conn in enumerate(clients):
            for name, values in SIX.items():
                conn.execute_query(f"set {name} = '{values[i]}'")
        for _ in range(2):
            for i, conn in enumerate(clients):
                for name, values in SIX.items():
                    if name == "application_name" and not sync_server_parameters:
                        continue
                    shown = conn.execute_query(f"show {name}")[0][0]
                    assert shown == values[i], (i, name, shown)
    finally:
        for conn in clients:
            conn.close()


# --- S18: test_options_startup_param / _larger_than_pktbuf / test_empty_application_name --


OPTIONS = [
    ("  -c    datestyle=German,\\ YMD", "datestyle"),
    ("-ctimezone=Europe/Amsterdam", "timezone"),
    ("--timezone=Europe/Amsterdam -c datestyle=German,\\ YMD", "datestyle"),
    ("--statement-timeout=1234", "statement_timeout"),
    ("-c search_path=a\\\\b,public", "search_path"),
]


@pytest.mark.parametrize("options,setting", OPTIONS)
def test_s18_options_startup_parameter(
    pg: ExamplePostgres, pooler: PoolerFactory, options: str, setting: str
) -> None:
    """The options startup parameter is read as PostgreSQL reads it (-c, -cX, --x=y,
    dashes in names, backslash escapes); the value follows the client over a server
    another client uses in between."""
    proc = pooler(**pools(pg, 1))
    user = pg.md5_user
    params = {"options": options}
    direct = w.PgWire.connect(pg.host, pg.port, user.name, EXAMPLE_DB, user.password, params=params)
    pooled = w.PgWire.connect(
        proc.host, proc.port, user.name, EXAMPLE_DB, user.password, params=params
    )
    other = connect(proc, pg)
    try:
        expected = direct.execute_query(f"show {setting}")
        for _ in range(2):
            assert pooled.execute_query(f"show {setting}") == expected
            assert other.execute_query(f"show {setting}") != expected
    finally:
        for c in (direct, pooled, other):
            c.close()


def test_s18_startup_message_larger_than_4k(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(**pools(pg, 1))
    user = pg.md5_user
    value = "v" * 6000
    params = {"options": f"-c myapp.big={value}", "application_name": "a" * 60}
    conn = w.PgWire.connect(
        proc.host, proc.port, user.name, EXAMPLE_DB, user.password, params=params
    )
    other = connect(proc, pg)
    try:
        assert len(w.startup_message({"user": user.name, **params})) > 6000
        for _ in range(2):
            assert conn.execute_query("show myapp.big") == [(value,)]
            other.execute_query("select 1")
    finally:
        conn.close()
        other.close()


def test_s18_empty_application_name_is_kept_and_can_be_set(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """With sync_server_parameters (without it the server keeps the pool's
    application_name, `pg_doorman` by default: docs/configuration.md)."""
    proc = pooler(**pools(pg, 1, sync_server_parameters=True))
    user = pg.md5_user
    conn = w.PgWire.connect(
        proc.host,
        proc.port,
        user.name,
        EXAMPLE_DB,
        user.password,
        params={"application_name": ""},
    )
    other = w.PgWire.connect(
        proc.host,
        proc.port,
        user.name,
        EXAMPLE_DB,
        user.password,
        params={"application_name": "other_app"},
    )
    try:
        assert conn.parameters.get("application_name") == ""
        other.execute_query("select 1")
        assert conn.execute_query("show application_name") == [("",)]
        conn.execute_query("set application_name = 'test'")
        assert conn.execute_query("show application_name") == [("test",)]
    finally:
        conn.close()
        other.close()


# --- S20: test_pool_size / test_server_idle_timeout ---------------------------------------


def test_s20_exact_backend_count_under_load(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Six concurrent sleeping clients over pool_size=3: exactly three backends."""
    proc = pooler(**pools(pg, 3, **{"query_wait_timeout": 10_000}))
    user = pg.md5_user
    clients = [connect(proc, pg) for _ in range(6)]
    try:
        for conn in clients:
            conn.send_raw(w.query("select pg_sleep(0.6)"))
        time.sleep(0.3)
        assert len(backends(pg, user.name)) == 3
        for conn in clients:
            assert w.first_error(conn.read_until_ready(timeout=5)) is None
        assert len(backends(pg, user.name)) == 3
    finally:
        for conn in clients:
            conn.close()


def test_s20_idle_timeout_closes_idle_servers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(**pools(pg, 2, **{"idle_timeout": 300, "retain_connections_time": 100}))
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert pid in backends(pg, user.name)
        deadline = time.monotonic() + 3
        while pid in backends(pg, user.name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid not in backends(pg, user.name)
        assert conn.execute("select 1").fetchone() == (1,)


# --- Also worth porting: test_auth_query_no_set_commands ----------------------------------


def test_auth_query_lookup_ignores_the_clients_startup_parameters(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The lookup connection must not run with the logging-in client's settings (a
    client-chosen search_path there would let it pick the functions the lookup
    calls). The lookup only returns a row under the default search_path."""
    lookup = (
        "SELECT usename, passwd FROM pg_shadow WHERE usename = $1 "
        "AND current_setting('search_path') = '\"$user\", public' "
        "AND current_setting('application_name') NOT LIKE 'evil%'"
    )
    proc = pooler(
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [{"username": pg.trust_user.name, "password": "", "pool_size": 2}]
                ),
                "auth_query": {"query": lookup, "user": pg.superuser, "min_interval": "0"},
            }
        }
    )
    user = pg.md5_user
    conn = w.PgWire.connect(
        proc.host,
        proc.port,
        user.name,
        EXAMPLE_DB,
        user.password,
        params={"options": "-c search_path=evil,pg_catalog", "application_name": "evil_app"},
    )
    try:
        assert conn.execute_query("show search_path") == [("evil,pg_catalog",)]
        assert conn.execute_query("select current_user") == [(user.name,)]
    finally:
        conn.close()


# --- Section 3 edge cases -----------------------------------------------------------------


def test_x_unnamed_statement_used_in_a_later_transaction_on_another_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """pulumi-postgresql #865: Parse("")+Sync, then Bind("") in a new transaction that
    lands on another server (the first is held by another client)."""
    proc = pooler(**pools(pg, 2))
    first = connect(proc, pg)
    second = connect(proc, pg)
    try:
        first.send_raw(w.parse("", "select 'unnamed' as u") + w.sync())
        assert w.msg_types(first.read_until_ready()) == "1Z"
        second.execute_query("begin")
        got = first.run_prepared("")
        assert w.first_error(got) is None and w.rows(got) == [("unnamed",)]
        second.execute_query("commit")
        got = first.run_prepared("")
        assert w.first_error(got) is None and w.rows(got) == [("unnamed",)]
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    "reset",
    [
        "select 1; deallocate all",
        "do $$ begin execute 'deallocate all'; end $$",
    ],
    ids=["multi-statement", "do-block"],
)
def test_x_a_deallocate_all_the_pooler_cannot_see_by_its_tag(
    pg: ExamplePostgres, pooler: PoolerFactory, reset: str
) -> None:
    """DEALLOCATE ALL run where its tag doesn't show (behind another statement,
    inside a DO block or a function) drops the pooler's statements on that server.
    Another client's statement on that server may fail once with 26000 when the
    pooler could not see it happen, but then works again: the server's record must
    not stay wrong (every later use failing until server_lifetime)."""
    proc = pooler(**pools(pg, 1))
    first = connect(proc, pg)
    second = connect(proc, pg)
    try:
        first.send_raw(w.parse("s", "select 7") + w.sync())
        first.read_until_ready()
        got = second.simple_query(reset)
        assert w.first_error(got) is None, got
        attempts = [first.run_prepared("s") for _ in range(3)]
        second.send_raw(w.parse("t", "select 7") + w.bind("", "t") + w.execute() + w.sync())
        attempts.append(second.read_until_ready())
        error = w.first_error(attempts[0])
        assert error is None or error.sqlstate == "26000", attempts
        for got in attempts[1:]:
            assert w.first_error(got) is None and w.rows(got) == [("7",)], attempts
    finally:
        first.close()
        second.close()
