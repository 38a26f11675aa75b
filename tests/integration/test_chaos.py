"""Many clients and many kinds of trouble at once, then the books must balance.

Clients run queries, transactions, pipelines, errors and cancels through a small pool
while others vanish mid-query, and either the backends are killed at random or an
operator runs admin commands. Every answer must be right, a lost connection must be
owed to a killed backend (admin commands cost none), and once the clients are gone the
pool's counts must match what PostgreSQL sees (no leaked, doubled or phantom servers)
and the pooler must still serve.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

APPLICATION = "chaos_backend"
POOL_SIZE = 4
MIN_POOL_SIZE = 2
CLIENTS = 16
# In session mode each client holds a server while connected, and one that vanishes
# opens a second connection for a moment.
SESSION_POOL_SIZE = 2 * CLIENTS
DURATION = 6.0
KILL_EVERY = 0.15
OPERATE_EVERY = 0.1

# What a client may see when the backend under its transaction is killed.
LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, e.g. the pooler's 08006
    asyncpg.AdminShutdownError,  # 57P01 from pg_terminate_backend, relayed
    asyncpg.ConnectionDoesNotExistError,
    ConnectionError,
)


def lost_connection(exc: Exception, conn: asyncpg.Connection | None, after: str) -> None:
    """Check that `exc` says the connection was lost (else fail with it)."""
    if isinstance(exc, LOST):
        return
    if isinstance(exc, asyncpg.InterfaceError) and conn is not None and conn.is_closed():
        # Lost under asyncpg: its rollback on the way out of a transaction, or the next
        # query after a timed-out one (asyncpg still cancelling it), reports the
        # closed connection instead of the loss.
        return
    if isinstance(exc, asyncpg.InternalClientError):
        # asyncpg loses track of its protocol state when the backend under a
        # transaction dies (asyncpg#1069; against PostgreSQL directly too): the
        # connection is unusable.
        return
    raise AssertionError(f"after {after!r}: {exc!r}") from exc


class Tally:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.done: Counter[str] = Counter()
        self.lost = 0
        # What each loss looked like, for the failure message.
        self.lost_to: Counter[str] = Counter()
        self.kills = 0

    def lose(self, why: BaseException | str) -> None:
        self.lost += 1
        self.lost_to[why if isinstance(why, str) else f"{type(why).__name__}: {why}"[:120]] += 1


async def one_action(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> str:
    """One random piece of work on `conn`, checking its answers; returns its kind."""
    roll = rng.random()
    n = rng.randrange(1_000_000)
    if roll < 0.35:
        kind = "query"
        assert await conn.fetchval("select $1::int + 1", n) == n + 1
    elif roll < 0.55:
        kind = "transaction"
        async with conn.transaction():
            first = await conn.fetchval("select pg_backend_pid()")
            assert await conn.fetchval("select $1::text || 'x'", str(n)) == f"{n}x"
            # A transaction keeps its server to the end.
            assert await conn.fetchval("select pg_backend_pid()") == first
    elif roll < 0.65:
        kind = "rows"
        rows = await conn.fetch("select g, g * $1::int from generate_series(1, 50) g", n % 1000)
        assert [(r[0], r[1]) for r in rows] == [(g, g * (n % 1000)) for g in range(1, 51)]
    elif roll < 0.72:
        kind = "pipeline"
        await conn.executemany("select $1::int", [(i,) for i in range(20)])
    elif roll < 0.80:
        kind = "error"
        try:
            await conn.fetchval("select 1 / $1::int", 0)
        except asyncpg.DivisionByZeroError:
            pass
        else:
            raise AssertionError("1/0 returned a value")
    elif roll < 0.88:
        kind = "cancel"
        try:
            await asyncio.wait_for(conn.fetchval("select pg_sleep(10)"), 0.05)
        except TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(10) returned within 50 ms")
    else:
        kind = "idle"
        await asyncio.sleep(rng.uniform(0, 0.02))
    tally.done[kind] += 1
    return kind


async def vanish(dsn: str, rng: random.Random, tally: Tally) -> None:
    """A client that goes away in the middle of a transaction's query."""
    conn: asyncpg.Connection | None = None
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("begin")
    except Exception as exc:
        lost_connection(exc, conn, "vanish")
        tally.lose(exc)
        if conn is not None:
            conn.terminate()
        return
    # Long enough that no delay of a loaded event loop lets it finish first.
    query = asyncio.ensure_future(conn.fetchval("select pg_sleep(5)"))
    await asyncio.sleep(rng.uniform(0, 0.03))
    conn.terminate()
    # Whatever asyncpg makes of its own connection going away, it is not an answer.
    results = await asyncio.gather(query, return_exceptions=True)
    assert isinstance(results[0], Exception), results
    tally.done["vanish"] += 1


async def client(dsn: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    conn: asyncpg.Connection | None = None
    last = "connect"
    while time.monotonic() < deadline:
        if rng.random() < 0.04:
            await vanish(dsn, rng, tally)
            continue
        if conn is not None and conn.is_closed():
            # Lost between two actions: a backend killed while asyncpg was still
            # cancelling the last one's query after the timeout gave up on it.
            tally.lose("closed between actions")
            conn = None
        try:
            if conn is None:
                conn = await asyncpg.connect(dsn)
                last = "connect"
            last = await one_action(conn, rng, tally)
            lost: Exception | None = None
        except Exception as exc:
            lost_connection(exc, conn, last)
            lost = exc
        if lost is not None:
            tally.lose(lost)
            assert conn is not None
            conn.terminate()
            conn = None
    if conn is not None:
        await conn.close()


async def killer(pg: ExamplePostgres, rng: random.Random, deadline: float, tally: Tally) -> None:
    """Terminate a random backend of the pool every KILL_EVERY seconds."""
    admin = await asyncpg.connect(pg.dsn())
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(KILL_EVERY)
            pids = [
                r[0]
                for r in await admin.fetch(
                    "select pid from pg_stat_activity where application_name = $1",
                    APPLICATION,
                )
            ]
            if pids and await admin.fetchval("select pg_terminate_backend($1)", rng.choice(pids)):
                tally.kills += 1
    finally:
        await admin.close()


ADMIN_COMMANDS = (
    "RECONNECT",
    "PAUSE",
    "SHOW POOLS",
    "SHOW SERVERS",
    "SHOW CLIENTS",
    "SHOW STATS",
    "reload",
)


async def operator(
    proc: PoolerProcess,
    commands: tuple[str, ...],
    rng: random.Random,
    deadline: float,
    tally: Tally,
) -> None:
    """Every OPERATE_EVERY seconds, one of `commands` on the pool's database: replace
    its servers, pause it briefly, look at it, or reload the (same) configuration. The
    commands go in rounds, each once per round in a shuffled order, so that a run of a
    round's length has tried every one of them whatever the seed."""
    console = await asyncpg.connect(proc.dsn("admin", "admin", database="pgdoorman"))
    round_: list[str] = []
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(OPERATE_EVERY)
            if not round_:
                round_ = rng.sample(commands, len(commands))
            command = round_.pop()
            if command == "reload":
                proc.reload()
            elif command in ("RECONNECT", "PAUSE"):
                await console.execute(f"{command} {EXAMPLE_DB}")
                if command == "PAUSE":
                    await asyncio.sleep(rng.uniform(0.02, 0.15))
                    await console.execute(f"RESUME {EXAMPLE_DB}")
            else:
                await console.execute(command)
            tally.done[command] += 1
    finally:
        await console.close()


async def reconfigurer(
    proc: PoolerProcess, name: str, rng: random.Random, deadline: float, tally: Tally
) -> None:
    """Every OPERATE_EVERY seconds, reload with user `name`'s pool changed: another size
    and minimum, servers that expire after a fraction of a second or after an hour, room
    for one to four prepared statements per server (asyncpg names every statement, so
    they keep being closed and parsed again). Each change applies to the pool in place,
    under its clients. The pool's own settings come back at the end."""
    original = copy.deepcopy(proc.config)
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(OPERATE_EVERY)
            config = copy.deepcopy(original)
            pool = config["pools"][EXAMPLE_DB]
            (user,) = (u for u in pool["users"] if u["username"] == name)
            user["pool_size"] = rng.randint(2, 6)
            user["min_pool_size"] = rng.randint(0, 2)
            pool["server_lifetime"] = rng.choice([150, 400, 3_600_000])
            pool["server_prepared_statements_cache_size"] = rng.randint(1, 4)
            proc.reload(config)
            tally.done["reload"] += 1
    finally:
        proc.reload_and_wait(original)


def pool_numbers(proc: PoolerProcess, user: str) -> dict[str, Any]:
    pools = [
        r for r in admin_rows(proc, "POOLS") if r["database"] == EXAMPLE_DB and r["user"] == user
    ]
    databases = [
        r
        for r in admin_rows(proc, "DATABASES")
        if r["name"] == EXAMPLE_DB and r["force_user"] == user
    ]
    assert len(pools) == 1 and len(databases) == 1
    numbers: dict[str, Any] = {
        k: int(pools[0][k] or 0)
        for k in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")
    }
    numbers["current_connections"] = int(databases[0]["current_connections"] or 0)
    return numbers


def backends(pg: ExamplePostgres) -> int:
    sql = f"select count(*) from pg_stat_activity where application_name = '{APPLICATION}'"
    return int(pg.psql(sql).strip())


def pool_size_for(pool_mode: str) -> int:
    return SESSION_POOL_SIZE if pool_mode == "session" else POOL_SIZE


def chaos_pooler(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int, pool_mode: str = "transaction"
) -> PoolerProcess:
    """A pool of pool_size_for(pool_mode) servers (MIN_POOL_SIZE kept), split between
    the workers."""
    user = pg.scram_user
    proc = pooler(
        general={"query_wait_timeout": 15_000, "workers": workers},
        pools={
            EXAMPLE_DB: {
                "application_name": APPLICATION,
                "pool_mode": pool_mode,
                "users": [
                    {
                        "username": user.name,
                        "password": user.pooler_password,
                        "pool_size": pool_size_for(pool_mode),
                        "min_pool_size": MIN_POOL_SIZE,
                    }
                ],
            }
        },
    )
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    return proc


Disruptor = Callable[[random.Random, float, Tally], Awaitable[None]]


def run_clients(proc: PoolerProcess, pg: ExamplePostgres, disrupt: Disruptor) -> Tally:
    """CLIENTS clients for DURATION seconds beside `disrupt(rng, deadline, tally)`, all
    drawn from one seed (CHAOS_SEED, or a random one kept in the tally)."""
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    dsn = proc.dsn(pg.scram_user.name, pg.scram_user.password)
    tally = Tally(seed)

    async def main() -> None:
        deadline = time.monotonic() + DURATION
        rng = random.Random(seed)
        await asyncio.gather(
            disrupt(random.Random(rng.random()), deadline, tally),
            *(client(dsn, rng.randrange(1 << 30), deadline, tally) for _ in range(CLIENTS)),
        )

    asyncio.run(main())
    for kind in ("query", "transaction", "rows", "pipeline", "error", "cancel", "vanish"):
        assert tally.done[kind] > 0, tally.done
    return tally


def assert_books_balance(
    proc: PoolerProcess, pg: ExamplePostgres, context: str, pool_mode: str = "transaction"
) -> None:
    """No clients left, as many servers as PostgreSQL has backends for the pool, the
    pooler still serving, and no error of its own in its log."""
    user = pg.scram_user
    deadline = time.monotonic() + 10
    while True:
        numbers = pool_numbers(proc, user.name)
        open_backends = backends(pg)
        settled = (
            numbers["cl_active"] == numbers["cl_waiting"] == 0
            and numbers["sv_active"] == numbers["sv_login"] == 0
            and numbers["current_connections"]
            == numbers["sv_idle"] + numbers["sv_used"]
            == open_backends
            and MIN_POOL_SIZE <= open_backends <= pool_size_for(pool_mode)
        )
        if settled:
            break
        assert time.monotonic() < deadline, f"{context}; pool {numbers}, backends {open_backends}"
        time.sleep(0.2)

    async def still_serving() -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            assert await conn.fetchval("select 41 + 1") == 42
        finally:
            await conn.close()

    asyncio.run(still_serving())
    log = proc.log_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def closed_clients(proc: PoolerProcess) -> Counter[str]:
    """Why the pooler closed clients, by message and SQLSTATE, from its log."""
    log = proc.log_text()
    return Counter(re.findall(r"client #c\d+: (.* \(\w{5}\))$", log, re.MULTILINE))


@pytest.mark.parametrize(
    ("workers", "pool_mode"),
    [(1, "transaction"), (2, "transaction"), (1, "session"), (2, "session")],
    ids=["one-process", "two-workers", "one-process-session", "two-workers-session"],
)
def test_the_books_balance_after_backends_die_under_load(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int, pool_mode: str
) -> None:
    proc = chaos_pooler(pg, pooler, workers, pool_mode)
    tally = run_clients(proc, pg, partial(killer, pg))
    context = f"seed {tally.seed} (CHAOS_SEED replays it), {tally.done}, lost {tally.lost} "
    context += f"({dict(tally.lost_to)}) connections to {tally.kills} killed backends"
    assert tally.kills > 5, context
    # Each kill breaks at most the one client whose server it was.
    assert tally.lost <= tally.kills, context
    assert_books_balance(proc, pg, context, pool_mode)
    # The pooler closed clients only because their server died under them.
    reasons = closed_clients(proc)
    assert set(reasons) <= {"server connection lost during the transaction (08006)"}, reasons


@pytest.mark.parametrize(
    ("workers", "pool_mode"),
    [(1, "transaction"), (2, "transaction"), (1, "session"), (2, "session")],
    ids=["one-process", "two-workers", "one-process-session", "two-workers-session"],
)
def test_admin_commands_under_load_lose_no_client(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int, pool_mode: str
) -> None:
    """RECONNECT, PAUSE/RESUME, SHOW and reloads while the clients run: none of them
    costs a client its connection or a wrong answer. (In session mode PAUSE waits for
    the sessions to end, which these clients never do: it is left out there.)"""
    proc = chaos_pooler(pg, pooler, workers, pool_mode)
    commands = ADMIN_COMMANDS
    if pool_mode == "session":
        commands = tuple(command for command in commands if command != "PAUSE")
    tally = run_clients(proc, pg, partial(operator, proc, commands))
    context = f"seed {tally.seed} (CHAOS_SEED replays it), {tally.done}, lost {tally.lost}"
    assert tally.lost == 0, (
        f"{context} {dict(tally.lost_to)}; pooler log:\n{proc.log_text()[-3000:]}"
    )
    assert tally.done["RECONNECT"] and tally.done["reload"], context
    assert tally.done["PAUSE"] or pool_mode == "session", context
    assert_books_balance(proc, pg, context, pool_mode)
    assert not closed_clients(proc), closed_clients(proc)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_pool_changes_under_load_lose_no_client(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """Reloads that resize the pool, expire its servers and shrink its statement cache
    while the clients run: no client loses its connection or gets a wrong answer, and
    in the end the pool counts exactly the servers PostgreSQL has for it."""
    proc = chaos_pooler(pg, pooler, workers)
    tally = run_clients(proc, pg, partial(reconfigurer, proc, pg.scram_user.name))
    context = f"seed {tally.seed} (CHAOS_SEED replays it), {tally.done}, lost {tally.lost}"
    assert tally.lost == 0, (
        f"{context} {dict(tally.lost_to)}; pooler log:\n{proc.log_text()[-3000:]}"
    )
    assert tally.done["reload"] > 10, context
    assert_books_balance(proc, pg, context)
    assert not closed_clients(proc), closed_clients(proc)
