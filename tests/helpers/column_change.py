"""A table whose one column changes type under a prepared statement: `int` holding the
bits of pi as a float4, then `real`. Read as the old type, the new column's bytes give
a wrong integer rather than an error, which is what the tests of result columns catch."""

from __future__ import annotations

from . import ExamplePostgres

SELECT_V = "select v from tr where id = $1"
AS_INT = 1078530011  # the bits of pi as a float4, read as an int4
AS_REAL = 1078530048.0  # the int4 stored, turned into a real by the ALTER


def new_table(pg: ExamplePostgres) -> None:
    """Table `tr` afresh, its column `v` an int."""
    pg.psql(
        "drop table if exists tr; create table tr(id int, v int);"
        f" insert into tr values (1, {AS_INT}); grant all on tr to public",
        database=pg.database,
    )


def to_real(pg: ExamplePostgres) -> None:
    pg.psql("alter table tr alter column v type real", database=pg.database)
