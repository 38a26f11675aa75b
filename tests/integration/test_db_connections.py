"""max_db_connections: the servers of all users of one database, counted together in
PostgreSQL's pg_stat_activity; the reserve, min_connection_lifetime and
min_guaranteed_pool_size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.console import admin_rows
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess, deep_merge
from pg_doorman.app.embedded_pg import free_port


def backends(pg: ExamplePostgres, *users: str) -> list[int]:
    names = ", ".join(f"'{user}'" for user in users)
    out = pg.psql(
        f"select pid from pg_stat_activity where usename in ({names}) "
        "and backend_type = 'client backend' order by pid"
    )
    return [int(line) for line in out.split()]


def settled_backends(
    pg: ExamplePostgres, *users: str, until: Callable[[list[int]], bool]
) -> list[int]:
    """backends(), read again until `until` holds (at most 5 s): a server the pooler
    closed (an eviction) leaves pg_stat_activity only once its backend has exited,
    which may come after the client the eviction served has its answer."""
    deadline = time.monotonic() + 5
    found = backends(pg, *users)
    while not until(found) and time.monotonic() < deadline:
        time.sleep(0.05)
        found = backends(pg, *users)
    return found


USERS = [
    {"username": "example_user_md5", "pool_size": 5},
    {"username": "example_user_scram", "pool_size": 5},
]


def start(pg: ExamplePostgres, pooler: PoolerFactory, **pool: Any) -> PoolerProcess:
    """example_db with its md5 and SCRAM users, pool_size 5 each, and `pool`'s keys."""
    assert [u["username"] for u in USERS] == [pg.md5_user.name, pg.scram_user.name]
    return pooler(pools={"example_db": {"users": USERS, **pool}})


def connect(proc: PoolerProcess, pg: ExamplePostgres, which: str) -> psycopg.Connection[Any]:
    user = pg.md5_user if which == "md5" else pg.scram_user
    return psycopg.connect(proc.dsn(user.name, user.password), autocommit=True)


def pid_of(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def in_thread(conn: psycopg.Connection[Any], sql: str) -> tuple[threading.Thread, list[Any]]:
    """Run `sql` on `conn` in a thread; its result (or error) lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            started = time.monotonic()
            row = conn.execute(sql).fetchone()
            outcome.append((row, time.monotonic() - started))
        except Exception as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_user_waits_while_the_others_hold_every_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pg, pooler, max_db_connections=2, min_connection_lifetime=0)
    names = (pg.md5_user.name, pg.scram_user.name)
    holders = [connect(proc, pg, "md5") for _ in range(2)]
    waiter = connect(proc, pg, "scram")
    try:
        for conn in holders:
            conn.execute("begin")
            pid_of(conn)
        thread, outcome = in_thread(waiter, "select 42")
        time.sleep(0.5)
        assert outcome == []  # still waiting: both servers are in transactions
        assert len(backends(pg, *names)) == 2
        holders[0].execute("commit")  # its server goes idle and is taken for the waiter
        thread.join(5)
        assert outcome and outcome[0][0] == (42,)
        found = settled_backends(pg, *names, until=lambda pids: len(pids) == 2)
        assert len(found) == 2, found
    finally:
        for conn in [*holders, waiter]:
            conn.close()


def test_an_idle_server_of_another_user_is_closed_for_a_waiting_one(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    proc = pooler(
        web={"enabled": True, "host": "127.0.0.1", "port": port},
        pools={
            "example_db": {"users": USERS, "max_db_connections": 1, "min_connection_lifetime": 0}
        },
    )
    names = (pg.md5_user.name, pg.scram_user.name)
    # Each user's first login borrows a server too: four servers taken in all.
    with connect(proc, pg, "md5") as first, connect(proc, pg, "scram") as second:
        idle_pid = pid_of(first)  # then idle in the md5 user's pool
        assert backends(pg, pg.md5_user.name) == [idle_pid]
        taken = pid_of(second)
        assert taken != idle_pid
        assert settled_backends(pg, *names, until=lambda pids: pids == [taken]) == [taken]
        # And back: the md5 user gets a server again the same way.
        assert pid_of(first) not in (idle_pid, taken)
    assert "evicted for example_user_scram@example_db" in proc.log_text()
    assert "evicted for example_user_md5@example_db" in proc.log_text()
    (row,) = admin_rows(proc, "POOL_COORDINATOR")
    exhaustions = row.pop("exhaustions")
    assert row == {
        "database": "example_db",
        "max_db_conn": "1",
        "current": "1",
        "reserve_size": "0",
        "reserve_used": "0",
        "evictions": "4",
        "reserve_acq": "0",
        "waiting_users": "0",
    }
    family = scrape(port)["pg_doorman_pool_coordinator"]
    for name, kind, expected in [
        ("pg_doorman_pool_coordinator_total", "evictions", 4),
        ("pg_doorman_pool_coordinator", "max_connections", 1),
        ("pg_doorman_pool_coordinator", "connections", 1),
        ("pg_doorman_pool_coordinator_total", "reserve_acquisitions", 0),
        ("pg_doorman_pool_coordinator_total", "exhaustions", int(exhaustions or 0)),
    ]:
        assert value(family, name, type=kind, database="example_db") == expected, kind


def test_min_connection_lifetime_keeps_a_young_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pg, pooler, max_db_connections=1, min_connection_lifetime=1500)
    with connect(proc, pg, "md5") as first, connect(proc, pg, "scram") as second:
        opened = time.monotonic()
        idle_pid = pid_of(first)
        thread, outcome = in_thread(second, "select pg_backend_pid()")
        thread.join(5)
        ((row, _),) = outcome
        # Taken only once it had been open for min_connection_lifetime.
        assert time.monotonic() - opened >= 1.4
        assert row[0] != idle_pid
        found = settled_backends(pg, pg.md5_user.name, until=lambda pids: idle_pid not in pids)
        assert idle_pid not in found


def test_the_reserve_opens_after_reserve_pool_timeout_and_closes_after_use(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(pg, pooler, max_db_connections=1, reserve_pool_size=1, reserve_pool_timeout=500)
    names = (pg.md5_user.name, pg.scram_user.name)
    with connect(proc, pg, "md5") as holder, connect(proc, pg, "scram") as waiter:
        holder.execute("begin")
        held = pid_of(holder)
        thread, outcome = in_thread(waiter, "select pg_backend_pid()")
        thread.join(5)
        ((row, waited),) = outcome
        assert waited >= 0.45  # the reserve is for clients that waited reserve_pool_timeout
        assert row[0] != held
        # Released with nobody waiting, the reserve server closes: back to the limit.
        deadline = time.monotonic() + 5
        while backends(pg, *names) != [held]:
            assert time.monotonic() < deadline, backends(pg, *names)
            time.sleep(0.05)
        holder.execute("commit")
    rows = [r for r in admin_rows(proc, "DATABASES") if r["name"] == "example_db"]
    assert {r["reserve_pool"] for r in rows} == {"1"}


def test_min_guaranteed_pool_size_is_never_taken(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = start(
        pg,
        pooler,
        max_db_connections=2,
        min_connection_lifetime=0,
        min_guaranteed_pool_size=1,
    )
    proc.reload(deep_merge(proc.config, {"general": {"query_wait_timeout": 1000}}))
    proc.wait_for_log("configuration reloaded")
    with (
        connect(proc, pg, "md5") as md5,
        connect(proc, pg, "scram") as scram_a,
        connect(proc, pg, "scram") as scram_b,
    ):
        kept = pid_of(md5)  # the md5 user's one server, idle: its guaranteed floor
        scram_a.execute("begin")
        pid_of(scram_a)  # the second and last server of the database
        with pytest.raises(psycopg.errors.TooManyConnections, match="query_wait_timeout"):
            scram_b.execute("select 1")
        scram_b.close()  # not the exit's COMMIT on a connection the pooler closed
        assert kept in backends(pg, pg.md5_user.name)
        assert pid_of(md5) == kept
        scram_a.execute("commit")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_limit_holds_under_load_from_both_users(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """Six clients of two users run short transactions as fast as they can; sampled all
    along, the pooler never holds more than max_db_connections servers of them,
    PostgreSQL lists the ones it holds, and every backend of theirs that it lists
    beyond those leaves: a server the pooler let go is closed, not kept out of sight.
    With two workers each one holds its half."""
    proc = pooler(
        general={"workers": workers},
        pools={
            "example_db": {
                "users": [
                    {"username": pg.md5_user.name, "pool_size": 4},
                    {"username": pg.scram_user.name, "pool_size": 4},
                ],
                "max_db_connections": 2,
                "min_connection_lifetime": 0,
            }
        },
    )
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    names = (pg.md5_user.name, pg.scram_user.name)
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def client(which: str) -> None:
        count = 0
        try:
            with connect(proc, pg, which) as conn:
                while not stop.is_set():
                    with conn.transaction():
                        conn.execute("select pg_sleep(0.002)")
                    count += 1
        except BaseException as exc:
            errors.append(exc)
        done.append(count)

    threads = [threading.Thread(target=client, args=(w,)) for w in ["md5", "scram"] * 3]
    for thread in threads:
        thread.start()

    def held() -> set[int]:
        """The backends of the pooler's servers of the two users, as it lists them."""
        return {
            int(row["server_process_id"] or 0)
            for row in admin_rows(proc, "servers")
            if row["user"] in names
        }

    most_listed = 0
    most_held = 0
    let_go: set[int] = set()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            before = held()
            seen = set(backends(pg, *names))
            after = held()
            most_held = max(most_held, len(before), len(after))
            most_listed = max(most_listed, len(seen & before & after))
            # PostgreSQL lists a backend until it has exited, which comes after the
            # pooler closed its server (an eviction for the other user): the ones the
            # pooler does not hold after the sample are checked below to leave.
            let_go |= seen - after
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert 1 <= most_held <= 2
    assert 1 <= most_listed <= 2
    kept = held()
    assert len(kept) <= 2
    lingering = set(
        settled_backends(pg, *names, until=lambda found: not (set(found) & let_go - kept))
    )
    assert lingering & let_go - kept == set()
    assert len(done) == 6 and all(count > 0 for count in done), done
    # The workers' shares add up to the configured limit.
    (row,) = admin_rows(proc, "POOL_COORDINATOR")
    assert row["max_db_conn"] == "2"
    assert row["waiting_users"] == "0"


def test_reload_lowers_the_limit(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Servers in transactions close as they are released; idle ones at once."""
    proc = start(pg, pooler, max_db_connections=3, min_connection_lifetime=0)
    user = pg.md5_user.name
    conns = [connect(proc, pg, "md5") for _ in range(3)]

    def lower_to(limit: int) -> None:
        proc.reload_and_wait(
            deep_merge(proc.config, {"pools": {"example_db": {"max_db_connections": limit}}})
        )

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(backends(pg, user)) != count:
            assert time.monotonic() < deadline, backends(pg, user)
            time.sleep(0.05)

    try:
        for conn in conns:
            conn.execute("begin")
            pid_of(conn)
        assert len(backends(pg, user)) == 3
        lower_to(2)
        assert len(backends(pg, user)) == 3  # all busy: nothing closes yet
        for conn in conns:
            conn.execute("commit")  # the first released is over the limit: closed
        wait_for(2)
        lower_to(1)  # both idle now: one closes at once
        wait_for(1)
        assert conns[0].execute("select 1").fetchone() == (1,)
        (row,) = admin_rows(proc, "POOL_COORDINATOR")
        assert row["max_db_conn"] == "1" and row["current"] == "1"
    finally:
        for conn in conns:
            conn.close()
