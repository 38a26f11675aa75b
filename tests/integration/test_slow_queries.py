"""log_min_duration_statement: a log line for each request that took at least that long,
with its statement, through the simple and extended protocols and prepared statements."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import asyncpg
import psycopg

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.listen import md5_user_pool
from helpers.metrics import scrape
from helpers.metrics import value as metric
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port

LINE = re.compile(r"client #c\d+ from [0-9.]+: request took ([0-9.]+) ms on server \d+ \(pid \d+\)")


def slow_lines(proc: PoolerProcess) -> list[str]:
    return [line for line in proc.log_text().splitlines() if "request took" in line]


def wait_lines(proc: PoolerProcess, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while len(slow_lines(proc)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    return slow_lines(proc)


def raw(proc: PoolerProcess, pg: ExamplePostgres) -> contextlib.closing[w.PgWire]:
    user = pg.md5_user
    return contextlib.closing(
        w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
    )


def test_slow_requests_are_logged_with_their_statement(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    proc = pooler(
        general={"log_min_duration_statement": "150ms"},
        pools=md5_user_pool(pg, 2),
        web={"enabled": True, "host": "127.0.0.1", "port": port},
    )

    def counted() -> float:
        family = scrape(port)["pg_doorman_pools_slow_requests"]
        mine = {"user": pg.md5_user.name, "database": EXAMPLE_DB}
        return metric(family, "pg_doorman_pools_slow_requests_total", **mine)

    assert counted() == 0
    with raw(proc, pg) as conn:
        conn.simple_query("select 1")
        conn.simple_query("select pg_sleep(0.3) as\n  slept")
        conn.simple_query("select 2")
    lines = wait_lines(proc, 1)
    assert len(lines) == 1, lines
    match = LINE.search(lines[0])
    assert match is not None, lines[0]
    assert 300.0 <= float(match.group(1)) < 10_000.0
    assert lines[0].endswith(": select pg_sleep(0.3) as slept")
    assert f"pool {pg.md5_user.name}@{EXAMPLE_DB}: " in lines[0]

    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Extended protocol: the Parse's text, parameters never shown.
        conn.execute("select pg_sleep(%s), %s::text", [0.2, "secret value"])
        # Prepared: the second Bind finds its text in the pool's registry.
        for _ in range(2):
            conn.execute("select pg_sleep(%s) as again", [0.2], prepare=True)
        conn.execute("select 3")
    lines = wait_lines(proc, 4)
    assert [line.rsplit(": ", 1)[1] for line in lines[1:]] == [
        "select pg_sleep($1), $2::text",
        "select pg_sleep($1) as again",
        "select pg_sleep($1) as again",
    ], lines
    assert "secret value" not in proc.log_text()
    assert counted() == 4


def test_think_time_inside_a_transaction_is_not_counted(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Each request is timed from when it reaches the server, not from the last answer."""
    proc = pooler(general={"log_min_duration_statement": 150}, pools=md5_user_pool(pg))
    with raw(proc, pg) as conn:
        conn.simple_query("begin")
        time.sleep(0.3)  # the client thinks
        conn.simple_query("select 'quick'")
        time.sleep(0.3)
        conn.simple_query("select pg_sleep(0.2), 'slow'")
        conn.simple_query("commit")
    lines = wait_lines(proc, 1)
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["select pg_sleep(0.2), 'slow'"]


def test_asyncpg_and_pipelined_requests(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(general={"log_min_duration_statement": 0}, pools=md5_user_pool(pg))
    user = pg.md5_user

    async def main() -> None:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            assert await conn.fetchval("select $1::int + 1", 41) == 42
        finally:
            await conn.close()

    asyncio.run(main())
    # 0 logs every request: asyncpg's introspection and the query itself among them.
    assert any(line.endswith(": select $1::int + 1") for line in wait_lines(proc, 1))
    before = len(slow_lines(proc))
    with raw(proc, pg) as conn:
        # Two requests in one write. Their answers come in one read (one line for both,
        # which says so) or in two (the second's text was not kept, and its line says so).
        conn.send_raw(w.query("select pg_sleep(0.05)") + w.query("select 'second'"))
        replies = conn.read_until_ready() + conn.read_until_ready()
        assert w.first_error(replies) is None
    lines = wait_lines(proc, before + 2)[before:]
    shown = [line.rsplit(": ", 1)[1] for line in lines]
    assert shown[0] == "select pg_sleep(0.05)"
    assert "sent while an earlier request was unanswered" in " ".join(shown[1:]) or (
        "with 1 more request(s) sent with it" in lines[0]
    ), lines


def test_off_by_default_per_pool_and_on_reload(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=md5_user_pool(pg))
    with raw(proc, pg) as conn:
        conn.simple_query("select pg_sleep(0.2)")
    time.sleep(0.2)
    assert slow_lines(proc) == []
    config = proc.config
    config["pools"][EXAMPLE_DB]["log_min_duration_statement"] = "100ms"
    proc.reload_and_wait(config)
    with raw(proc, pg) as conn:
        conn.simple_query("select pg_sleep(0.2), 'after reload'")
    assert wait_lines(proc, 1)[0].endswith(": select pg_sleep(0.2), 'after reload'")
    # The pool's own value wins over [general]'s.
    config["general"]["log_min_duration_statement"] = 0
    config["pools"][EXAMPLE_DB]["log_min_duration_statement"] = "off"
    proc.reload_and_wait(config)
    with raw(proc, pg) as conn:
        conn.simple_query("select pg_sleep(0.2), 'pool off'")
    time.sleep(0.2)
    assert len(slow_lines(proc)) == 1
