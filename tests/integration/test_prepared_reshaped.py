"""A statement a schema change reshaped, bound on a server that parsed it again: the
client gets PostgreSQL's own answer (0A000), which drivers recover from."""

from __future__ import annotations

from test_prepared_replan import Step, one_user_pool, play

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory

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


def test_a_reshaped_statement_gets_postgresql_s_error(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The pooler used to pass on the server's 08P01 "bind message has 2 result
    formats but query has 3 columns", which drivers do not recover from (pgjdbc kept
    failing with it on every use)."""
    user = pg.md5_user
    pg.psql(f"grant create on schema public to {user.name}", database="example_db")
    proc = pooler(
        general={"server_prepared_statements_cache_size": 1},
        pools=one_user_pool(user.name, 1),
    )
    replies = []
    for target in (pg, proc):
        pg.psql(
            "drop table if exists reshaped; create table reshaped(id int, a int);"
            f" alter table reshaped owner to {user.name}; insert into reshaped values (1, 10)",
            database="example_db",
        )
        replies.append([by_column_names(reply) for reply in play(target, pg, reshape_steps())])
    direct, pooled = replies
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
