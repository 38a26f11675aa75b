"""Random pipeline batches: simple queries, and extended-protocol batches that parse,
bind and run the unnamed statement (some stopping at a row limit, some with a simple
query before their Sync), each ending with its Sync. Each batch parses what it runs,
so none depends on the outcome of another sent in the same write. The insert needs a
table `pipeline_log (x int)` the user may write to."""

from __future__ import annotations

import random

from . import pgwire as w

QUERIES = (
    "select 1",
    "select 1/0",
    "begin",
    "commit",
    "rollback",
    "select id from items where id <= 3 order by id",
    "select 'a'; select 2/0; select 3",
    "select 'x'; select 'y'",
    "savepoint s",
    "rollback to savepoint s",
    "",
    "selec 1",
    "select pg_sleep(0.01)",
)
STATEMENTS = (
    ("select id, name from items where id <= $1 order by id", (b"3",)),
    ("select $1::int * 2", (b"21",)),
    ("select $1::int", (b"x",)),
    ("select 1/0", ()),
    ("select nope", ()),
    ("insert into pipeline_log values ($1)", (b"1",)),
    ("select repeat('x', $1::int) as big, 1 as after", (b"300000",)),
)


# A simple query sent inside an extended batch, before its Sync: PostgreSQL runs it in
# its place (with a ReadyForQuery of its own), or skips it with the rest of the batch
# after an error. It cannot fail itself, and its row tells which happened. An extended
# statement follows it: as the last message before the Sync, PostgreSQL 18 would fail
# the session's next command (see framing.QUERY_IN_BATCH), which through the pooler
# may be another client's, on a server the pooler closes instead.
INNER_QUERY = "select 'inner query'"
AFTER_INNER = "select 'after the inner query'"


def random_batch(rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.45:
        sql = rng.choice(QUERIES)
        return f"Query({sql!r})", w.query(sql)
    sql, values = rng.choice(STATEMENTS)
    rows = rng.choice((0, 0, 1, 2))
    data = w.parse("", sql) + w.bind("", "", list(values))
    text = f"Parse/Bind({sql!r}, {list(values)})"
    if rng.random() < 0.3:
        data += w.describe("P", "")
        text += " Describe(P)"
    data += w.execute("", rows)
    text += f" Execute({rows})"
    if rows and rng.random() < 0.5:
        data += w.execute("", 0)  # the rest of a suspended portal
        text += " Execute(0)"
    if rng.random() < 0.15:
        data += w.query(INNER_QUERY) + w.parse("", AFTER_INNER) + w.bind("", "") + w.execute()
        text += f" Query({INNER_QUERY!r}) Parse/Bind({AFTER_INNER!r}) Execute(0)"
    return text + " Sync", data + w.sync()


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """The write in one to three pieces."""
    points = sorted(rng.randrange(1, len(data)) for _ in range(rng.randint(0, 2)))
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [piece for piece in pieces if piece]
