"""Random pipelines give the same replies through the pooler as from PostgreSQL.

Each step, a client writes one to four batches at once (simple queries, and
extended-protocol batches that parse, bind and run the unnamed statement, some
stopping at a row limit, some with a simple query before their Sync), cut into pieces
at random places, and only then reads the replies. Three clients share a pool of one
of the shapes in helpers.pooler.RANDOM_POOLS.
Each batch parses what it runs, so no batch depends on the outcome of another in the
same write: what docs/prepared-statements.md lists as differences in a pipeline cannot
arise, and every reply must be PostgreSQL's, message for message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect, next_client
from helpers.pooler import RANDOM_POOLS, PoolerProcess, PoolShape, pool_of
from helpers.seeds import seeds

CLIENTS = 3
SEEDS = seeds(40)
STEPS = 40

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


def read_replies(conn: w.PgWire, batches: list[tuple[str, bytes]]) -> list[w.Message]:
    out: list[w.Message] = []
    for text, _ in batches:
        got = conn.read_until_ready()
        if INNER_QUERY in text and w.rows(got)[-1:] == [("inner query",)]:
            got += conn.read_until_ready()  # it ran: the Sync's ReadyForQuery follows
        out += got
    return out


@pytest.fixture(scope="module")
def pipeline_log(pg: ExamplePostgres) -> Iterator[None]:
    user = pg.md5_user.name
    pg.psql(
        f"create table pipeline_log (x int); grant all on pipeline_log to {user}",
        database=EXAMPLE_DB,
    )
    yield
    pg.psql("drop table pipeline_log", database=EXAMPLE_DB)


@pytest.fixture(scope="module", params=RANDOM_POOLS, ids=str)
def pipeline_pooler(
    request: pytest.FixtureRequest,
    pg: ExamplePostgres,
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_log: None,
) -> Iterator[tuple[PoolerProcess, int]]:
    shape: PoolShape = request.param
    with pool_of(pg, tmp_path_factory.mktemp("parity-pipeline"), shape) as proc:
        yield proc, shape.servers_per_worker


@pytest.mark.parametrize("seed", SEEDS)
def test_random_pipeline(
    pg: ExamplePostgres, pipeline_pooler: tuple[PoolerProcess, int], seed: int
) -> None:
    proc, servers = pipeline_pooler
    rng = random.Random(seed)
    direct = [connect(pg, pg) for _ in range(CLIENTS)]
    pooled = [connect(proc, pg) for _ in range(CLIENTS)]
    program: list[str] = []
    try:
        for number in range(STEPS):
            client = next_client(rng, direct, servers)
            batches = [random_batch(rng) for _ in range(rng.randint(1, 4))]
            data = b"".join(batch for _, batch in batches)
            pieces = cut(rng, data)
            program.append(
                f"  {number:2d} client {client}, {len(pieces)} piece(s): "
                + " | ".join(text for text, _ in batches)
            )
            answers = []
            for conn in (direct[client], pooled[client]):
                for piece in pieces:
                    conn.send_raw(piece)
                    time.sleep(0.001)
                answers.append(w.comparable(read_replies(conn, batches)))
            if answers[0] != answers[1]:
                listing = "\n".join(program)
                pytest.fail(
                    f"seed {seed}, step {number} differs\nPostgreSQL: {answers[0]}\n"
                    f"pooler:     {answers[1]}\nprogram:\n{listing}"
                )
        for conn in direct + pooled:
            if conn.status != "I":
                conn.simple_query("rollback")
    finally:
        for conn in direct + pooled:
            conn.close()
