"""Random COPY programs give the same replies through the pooler as from PostgreSQL.

Three clients copy rows in and out of tables of their own, by simple queries and by
the extended protocol, with good and bad data, CopyDone or CopyFail, Syncs sent during
the copy (which PostgreSQL ignores) or after it, inside transaction blocks and out,
waiting for CopyInResponse or sending the data (and a second copy) without waiting,
sharing a pool of one of the shapes in helpers.pooler.RANDOM_POOLS. The same steps go
to direct connections, each client with tables of its own there too; every reply must
be PostgreSQL's, message for message, the tables' names aside.
"""

from __future__ import annotations

import random
import re
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
SIDES = ("direct", "pooled")

GOOD_ROWS = ("1\tone\n", "2\ttwo\n", "3\t\\N\n", "4\tfour\\tfive\n", "5\tsix\n")
BAD_ROWS = ("x\tnot a number\n", "6\n", "7\ttoo\tmany\n")
OTHER_QUERIES = (
    "begin",
    "commit",
    "rollback",
    "select 1/0",
    "truncate {table}",
    "select count(*), sum(id), string_agg(t, ',' order by id, t) from {table}",
)
COPY_OUT = (
    "copy {table} to stdout",
    "copy (select id, t from {table} order by id, t) to stdout with (format csv)",
    "copy (select 1/0) to stdout",
)
_TABLE = re.compile(r"copy_(direct|pooled)_(\d)")


def table(side: str, client: int) -> str:
    return f"copy_{side}_{client}"


def neutral(replies: list[w.Reply]) -> list[w.Reply]:
    """Replies with the tables' names made the same on both sides."""
    out: list[w.Reply] = []
    for type_, payload in replies:
        if isinstance(payload, list):
            payload = [(k, _TABLE.sub(r"copy_\2", v)) for k, v in payload]
        out.append((type_, payload))
    return out


def copy_data_messages(rng: random.Random) -> tuple[list[str], bytes]:
    """Rows of good and sometimes bad data, split into CopyData messages at random
    places (a row may span two of them), and how the copy ends."""
    rows = [rng.choice(GOOD_ROWS) for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.3:
        rows.insert(rng.randint(0, len(rows)), rng.choice(BAD_ROWS))
    text = "".join(rows).encode()
    data = b""
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        end = min(len(text), pos + rng.randint(1, 20))
        data += w.copy_data(text[pos:end])
        pos = end
    parts.append(f"rows {rows!r}")
    if rng.random() < 0.2:
        parts.append("CopyFail")
        data += w.copy_fail("client gave up")
    else:
        parts.append("CopyDone")
        data += w.copy_done()
    return parts, data


class Step:
    """One client step: what starts it, and what follows once the server has answered
    with CopyInResponse (nothing for steps that do not copy in)."""

    def __init__(self, text: str, start: str, then: bytes, extended: bool) -> None:
        self.text = text
        self.start = start  # SQL with {table}
        self.then = then
        self.extended = extended
        self.sync_inside = False

    def first_write(self, name: str) -> bytes:
        sql = self.start.format(table=name)
        if not self.extended:
            return w.query(sql)
        data = w.parse("", sql) + w.bind("", "") + w.execute()
        # libpq sends Sync right behind the Execute, not knowing it starts a COPY;
        # PostgreSQL ignores a Sync (and a Flush) during copy-in. Others Flush and
        # wait for CopyInResponse.
        return data + (w.sync() if self.sync_inside else w.flush())


def random_step(rng: random.Random) -> Step:
    kind = rng.random()
    if kind < 0.45:
        extended = rng.random() < 0.5
        parts, data = copy_data_messages(rng)
        step = Step("", "copy {table} from stdin", data, extended)
        if extended:
            step.sync_inside = rng.random() < 0.5
            step.then += w.sync()
        step.text = (
            f"{'extended' if extended else 'simple'} copy in"
            f"{' (Sync behind Execute)' if step.sync_inside else ''}: {' '.join(parts)}"
        )
        return step
    if kind < 0.6:
        sql = rng.choice(COPY_OUT)
        extended = rng.random() < 0.5
        step = Step(f"{'extended' if extended else 'simple'} {sql}", sql, b"", extended)
        step.sync_inside = extended
        return step
    sql = rng.choice(OTHER_QUERIES)
    return Step(sql, sql, b"", False)


# Ends a write of pipelined steps: its error says everything before it has been
# answered. A syntax error, as no statement is answered the same in every state (in a
# failed transaction PostgreSQL refuses anything but its end with 25P02, after parsing).
_FENCE = "fence"


def run_pipelined(conn: w.PgWire, steps: list[Step], name: str) -> list[w.Message]:
    """Send the steps and their copy data in one write, without waiting for
    CopyInResponse, then a query whose answer ends the replies to read."""
    conn.send_raw(b"".join(s.first_write(name) + s.then for s in steps) + w.query(_FENCE))
    replies: list[w.Message] = []
    while True:
        replies += conn.read_until_ready()
        type_, payload = replies[-2]
        if type_ == b"E" and w.error_fields(payload).get("C") == "42601":
            return replies


def run_step(conn: w.PgWire, step: Step, name: str) -> list[w.Message]:
    """Send the step, the copy data once PostgreSQL asks for it, and read to
    ReadyForQuery."""
    conn.send_raw(step.first_write(name))
    if not step.then:
        return conn.read_until_ready()
    replies = conn.read_until(b"GEZ")
    if replies[-1][0] == b"G":
        conn.send_raw(step.then)
        replies += conn.read_until_ready()
    elif replies[-1][0] == b"E":
        if step.extended and not step.sync_inside:
            conn.send_raw(w.sync())  # refused before any copy: end the batch
        replies += conn.read_until_ready()
    return replies


@pytest.fixture(scope="module")
def copy_tables(pg: ExamplePostgres) -> Iterator[None]:
    names = [table(side, i) for side in SIDES for i in range(CLIENTS)]
    user = pg.md5_user.name
    pg.psql(
        "".join(
            f"create table {n} (id int not null, t text); grant all on {n} to {user};"
            for n in names
        ),
        database=EXAMPLE_DB,
    )
    yield
    pg.psql("".join(f"drop table {n};" for n in names), database=EXAMPLE_DB)


@pytest.fixture(scope="module", params=RANDOM_POOLS, ids=str)
def copy_pooler(
    request: pytest.FixtureRequest,
    pg: ExamplePostgres,
    tmp_path_factory: pytest.TempPathFactory,
    copy_tables: None,
) -> Iterator[tuple[PoolerProcess, int]]:
    shape: PoolShape = request.param
    with pool_of(pg, tmp_path_factory.mktemp("parity-copy"), shape) as proc:
        yield proc, shape.servers_per_worker


@pytest.mark.parametrize("seed", SEEDS)
def test_random_copy_program(
    pg: ExamplePostgres, copy_pooler: tuple[PoolerProcess, int], seed: int
) -> None:
    proc, servers = copy_pooler
    rng = random.Random(seed)
    direct = [connect(pg, pg) for _ in range(CLIENTS)]
    pooled = [connect(proc, pg) for _ in range(CLIENTS)]
    program: list[str] = []
    try:
        for client in range(CLIENTS):
            for side, conn in zip(SIDES, (direct[client], pooled[client]), strict=True):
                conn.execute_query(f"truncate {table(side, client)}")
        for number in range(STEPS):
            client = next_client(rng, direct, servers)
            step = random_step(rng)
            if step.then and rng.random() < 0.3:
                steps = [step]
                if rng.random() < 0.5:
                    second = random_step(rng)
                    if second.then:
                        steps.append(second)
                texts = " + ".join(s.text for s in steps)
                program.append(f"  {number:2d} client {client}: pipelined {texts}")
                try:
                    got = run_pipelined(direct[client], steps, table("direct", client))
                    mine = run_pipelined(pooled[client], steps, table("pooled", client))
                except TimeoutError as exc:
                    listing = "\n".join(program)
                    pytest.fail(f"seed {seed}, step {number}: {exc}\nprogram:\n{listing}")
            else:
                program.append(f"  {number:2d} client {client}: {step.text}")
                got = run_step(direct[client], step, table("direct", client))
                mine = run_step(pooled[client], step, table("pooled", client))
            expected, actual = neutral(w.comparable(got)), neutral(w.comparable(mine))
            if actual != expected:
                listing = "\n".join(program)
                pytest.fail(
                    f"seed {seed}, step {number} differs\nPostgreSQL: {expected}\n"
                    f"pooler:     {actual}\nprogram:\n{listing}"
                )
        for client in range(CLIENTS):
            for conn in (direct[client], pooled[client]):
                if conn.status != "I":
                    conn.simple_query("rollback")
        sql = "select id, t from {} order by id, t"
        for client in range(CLIENTS):
            want = direct[client].execute_query(sql.format(table("direct", client)))
            assert pooled[client].execute_query(sql.format(table("pooled", client))) == want
    finally:
        for conn in direct + pooled:
            conn.close()
