"""A statement a schema change reshaped, bound on a server that parsed it again: the
client gets PostgreSQL's own answer (0A000), which drivers recover from."""

from __future__ import annotations

from test_prepared_replan import Step, one_user_pool, play

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess

P, B, E, S, Q = w.parse, w.bind, w.execute, w.sync, w.query
SELECT_ALL = "select * from reshaped where id = $1"


def reshape_steps() -> list[Step]:
    """Client 0 prepares and describes a statement, and binds it with one (text)
    result format per column, as pgjdbc and pgx do. Client 1 adds a column to the
    table, then runs two other statements: on a server that keeps one statement, the
    first one is let go and parsed again at its next Bind, under the new table."""
    other = [(1, P("", f"select {k}") + B("", "") + E() + S(), 1) for k in range(2)]
    bind_two = B("", "s", ["1"], result_formats=[0, 0]) + E() + S()
    return [
        (0, P("s", SELECT_ALL, [23]) + w.describe("S", "s") + S(), 1),
        (0, bind_two, 1),
        (1, Q("alter table reshaped add column b int default 7"), 1),
        *other,
        (0, bind_two, 1),
        # In a transaction block, on the server that has parsed it again: the block
        # fails at the Bind, as with PostgreSQL.
        (0, Q("begin"), 1),
        (0, bind_two, 1),
        (0, Q("select 1"), 1),
        (0, Q("rollback"), 1),
        # Prepared again, the text reads the new column.
        (0, P("s2", SELECT_ALL, [23]) + w.describe("S", "s2") + S(), 1),
        (0, B("", "s2", ["1"], result_formats=[0, 0, 0]) + E() + S(), 1),
    ]


def by_column_names(reply: list[w.Reply]) -> list[w.Reply]:
    """RowDescriptions by their column names: the table's OID differs each time."""
    return [
        (t, w.row_description(p)) if t == b"T" and isinstance(p, bytes) else (t, p)
        for t, p in reply
    ]


def make_table(pg: ExamplePostgres, table: str) -> None:
    """`table` made anew (columns id and a, one row), owned by the md5 user."""
    user = pg.md5_user
    pg.psql(
        f"grant create on schema public to {user.name};"
        f" drop table if exists {table}; create table {table}(id int, a int);"
        f" alter table {table} owner to {user.name}; insert into {table} values (1, 10)",
        database="example_db",
    )


def direct_then_pooled(
    pg: ExamplePostgres, proc: PoolerProcess, table: str, steps: list[Step]
) -> tuple[list[list[w.Reply]], list[list[w.Reply]]]:
    """The replies to `steps` from PostgreSQL, then through `proc`, each starting from
    `table` made anew (make_table)."""
    replies = []
    for target in (pg, proc):
        make_table(pg, table)
        replies.append([by_column_names(reply) for reply in play(target, pg, steps)])
    return replies[0], replies[1]


def test_a_reshaped_statement_gets_postgresql_s_error(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The pooler used to pass on the server's 08P01 "bind message has 2 result
    formats but query has 3 columns", which drivers do not recover from (pgjdbc kept
    failing with it on every use)."""
    proc = pooler(
        general={"server_prepared_statements_cache_size": 1},
        pools=one_user_pool(pg.md5_user.name, 1),
    )
    direct, pooled = direct_then_pooled(pg, proc, "reshaped", reshape_steps())
    codes = [dict(fields)["C"] for reply in direct for t, fields in reply if t == b"E"]
    assert codes == ["0A000", "0A000", "25P02"]
    # The pooler finds the change itself, with a Describe of the statement it parses
    # again ahead of the Bind, and refuses the Bind as PostgreSQL does: the server
    # never gets to refuse the Bind's formats (then the pooler would keep the server's
    # words as the error's detail, for a client that miscounted its formats).
    details = []
    for reply in pooled:
        for t, fields in reply:
            if t == b"E" and isinstance(fields, list):
                details += [value for key, value in fields if key == "D"]
                fields[:] = [(key, value) for key, value in fields if key != "D"]
    assert details == []
    assert pooled == direct


SELECT_RERUN = "select * from rerun where id = $1"


def run(name: str, text: str = SELECT_RERUN, value: str = "1") -> bytes:
    """A batch of its own that parses `text` (its parameter an int4 when it is
    SELECT_RERUN, else inferred) as `name` and runs it with `value`."""
    types = [23] if text == SELECT_RERUN else []
    return P(name, text, types) + B("", name, [value]) + w.describe("P") + E() + S()


def rerun_steps() -> list[Step]:
    """Statements the server holds for the pool when a table they read changes, then
    parsed again by clients in a batch of their own (as psycopg, pgjdbc and
    node-postgres run each query outside a transaction block), which PostgreSQL
    plans afresh; and one prepared before the change, bound without a new Parse,
    which it refuses."""
    return [
        (0, run(""), 1),
        (0, run("s"), 1),
        (1, Q("alter table rerun add column b int default 7"), 1),
        (0, run(""), 1),  # unnamed, as every execution of psycopg's and node-postgres's
        (1, Q("alter table rerun add column c int default 8"), 1),
        (1, run("t"), 1),  # named, as pgjdbc's from the fifth execution on
        (0, run(""), 1),
        (0, B("", "s", ["1"]) + E() + S(), 1),  # prepared before: refused
        (0, run("s2"), 1),
        # Another Parse (sent to the server) between, and two Binds of the statement.
        (1, Q("alter table rerun drop column b"), 1),
        (0, P("", SELECT_RERUN, [23]) + P("o", "select 2") + B("", "", ["1"]) + E()
            + B("", "", ["1"]) + w.describe("P") + E() + S(), 1),
        # Prepared as asyncpg prepares (Parse, Describe, Sync), then run: the Describe
        # is refused, after the ParameterDescription.
        (0, P("d", SELECT_RERUN, [23]) + w.describe("S", "d") + S(), 1),
        (1, Q("alter table rerun add column d int default 9"), 1),
        (1, P("e", SELECT_RERUN, [23]) + w.describe("S", "e") + S(), 1),
        (1, B("", "e", ["1"]) + E() + S(), 1),
        # A Query between may begin a transaction block: not run again.
        (1, Q("alter table rerun drop column c"), 1),
        (0, P("q", SELECT_RERUN, [23]) + Q("select 3") + B("", "q", ["1"]) + E() + S(), 2),
        (0, run(""), 1),
    ]  # fmt: skip


def test_a_batch_refused_for_a_schema_change_runs_again(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client's Parse the server already had (for another client, before a table
    changed) is not sent, so the server refuses the Bind behind it (0A000 "cached
    plan must not change result type") where PostgreSQL alone would have parsed the
    text again. When the batch is a transaction of its own, the pooler runs it again
    with the text parsed anew, and the client gets what PostgreSQL would have sent."""
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    direct, pooled = direct_then_pooled(pg, proc, "rerun", rerun_steps())
    codes = [dict(fields)["C"] for reply in direct for t, fields in reply if t == b"E"]
    assert codes == ["0A000"]  # the statement prepared before the change
    # Behind a Query the server's refusal reaches the client (where PostgreSQL parses
    # the text anew): the batch is not run again.
    refused = pooled.pop(-2)
    direct.pop(-2)
    assert [t for t, _ in refused] == [b"1", b"T", b"D", b"C", b"Z", b"E", b"Z"]
    assert dict(refused[5][1])["C"] == "0A000"
    assert pooled == direct
    assert proc.log_text().count("ran again with the text parsed anew") == 4


def test_inside_a_transaction_block_the_refusal_reaches_the_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The error fails the block, which may hold the client's earlier work: the batch
    cannot run again, and the client gets the server's 0A000 (where PostgreSQL alone
    parses the text anew), once; after the ROLLBACK the text runs with the new column."""
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    steps: list[Step] = [
        (0, run(""), 1),
        (1, Q("alter table rerun add column b int default 7"), 1),
        (0, Q("begin"), 1),
        (0, run(""), 1),
        (0, Q("rollback"), 1),
        (0, run(""), 1),
    ]
    direct, pooled = direct_then_pooled(pg, proc, "rerun", steps)
    assert w.msg_types(direct[3]) == "12TDCZ"
    assert [t for t, _ in pooled[3]] == [b"1", b"E", b"Z"]
    assert dict(pooled[3][1][1])["C"] == "0A000"
    assert pooled[3][2] == (b"Z", b"E")
    assert pooled[:3] == direct[:3] and pooled[4:] == direct[4:]
    assert "ran again" not in proc.log_text()


INFERRED = "select id from rerun where a = $1"  # $1's type inferred from column a


def test_a_statement_whose_parameter_type_changed_is_parsed_anew(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A text whose parameter type PostgreSQL infers from a column: after the column
    turns from int to text, a Parse of it infers text, but the server's statement
    keeps the int of its first Parse, and its Bind fails the analysis again (42883
    "operator does not exist: text = integer"). The pooler used to bind the server's
    statement for every client that parsed the text, and each failed, until the
    server let it go; now the batch runs again with the text parsed anew, as for a
    changed result, and in a transaction block the client meets the error once."""
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    inferred = run("", INFERRED, "10")
    steps: list[Step] = [
        (0, inferred, 1),
        (1, inferred, 1),
        (1, Q("alter table rerun alter column a type text"), 1),
        (0, inferred, 1),
        (1, inferred, 1),
        (1, Q("alter table rerun alter column a type int using a::int"), 1),
        (0, Q("begin"), 1),
        (0, inferred, 1),
        (0, Q("rollback"), 1),
        (0, inferred, 1),
        (1, inferred, 1),
    ]
    direct, pooled = direct_then_pooled(pg, proc, "rerun", steps)
    assert all(w.msg_types(reply) in ("12TDCZ", "CZ") for reply in direct), direct
    in_block = pooled.pop(7)
    direct.pop(7)
    assert [t for t, _ in in_block] == [b"1", b"E", b"Z"]
    assert dict(in_block[1][1])["C"] == "42883"
    assert pooled == direct
    assert proc.log_text().count("ran again with the text parsed anew") == 1


def prepare_as_asyncpg(conn: w.PgWire, name: str) -> list[w.Reply]:
    """asyncpg's prepare and first use: Parse, Describe and Flush, and once the
    Describe is answered (or refused), Bind, Execute and Sync."""
    conn.send_raw(P(name, SELECT_RERUN, [23]) + w.describe("S", name) + w.flush())
    got: list[w.Message] = []
    while not got or got[-1][0] not in (b"T", b"n", b"E"):
        got.append(conn.read_message(timeout=10))
    conn.send_raw(B("", name, ["1"]) + E() + S())
    got += conn.read_until_ready()
    return by_column_names(w.comparable(got))


def test_a_statement_prepared_with_a_flush_after_a_schema_change_is_parsed_anew(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A batch that ends with a Flush rather than a Sync, as asyncpg prepares each
    statement new to a connection: when the server refuses the Describe for a
    changed table, the pooler brings the server back with a Sync of its own and
    describes the statement parsed anew; asyncpg used to raise
    InvalidCachedStatementError from the first query of the text on each new
    connection until the server let the statement go."""
    proc = pooler(pools=one_user_pool(pg.md5_user.name, 1))
    user = pg.md5_user
    replies = []
    for target in (pg, proc):
        make_table(pg, "rerun")
        got = []
        for step in range(3):
            if step == 1:
                pg.psql("alter table rerun add column b int default 7", database="example_db")
            conn = w.PgWire.connect(
                target.host, target.port, user.name, "example_db", user.password
            )
            try:
                got.append(prepare_as_asyncpg(conn, f"p{step}"))
            finally:
                conn.close()
        replies.append(got)
    direct, pooled = replies
    assert [w.msg_types(r) for r in direct] == ["1tT2DCZ"] * 3, direct
    assert pooled == direct
    assert proc.log_text().count("ran again with the text parsed anew") == 1
