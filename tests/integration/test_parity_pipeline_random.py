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
from helpers.random_pipeline import INNER_QUERY, cut, random_batch
from helpers.seeds import seeds

CLIENTS = 3
SEEDS = seeds(40)
STEPS = 40


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
