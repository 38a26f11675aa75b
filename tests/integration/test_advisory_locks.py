"""Session-level advisory locks in transaction pooling mode.

A `pg_advisory_lock` outlives its transaction, on the server that ran it. With
pin_on_advisory_lock (the default) the pooler asks that server, after a transaction
that called such a function, whether its session holds advisory locks; while it does,
the client keeps the server, so its own unlock reaches the lock and no other client is
handed a server whose session holds someone else's lock. Off, the pooler releases the
locks at check-in and warns the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import asyncpg
import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.fake_backend import ONE_ROW, QueryBackend, stand_in_pool
from helpers.listen import md5_user_pool
from helpers.metrics import scrape
from helpers.metrics import value as metric
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port

PINNED = "holds session-level advisory locks; it keeps server"
UNPINNED = "holds no advisory locks; server"


def logged_in(proc: PoolerProcess, pg: ExamplePostgres) -> contextlib.closing[w.PgWire]:
    """A raw connection of the md5 user, closed when the `with` block ends."""
    return contextlib.closing(
        w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, pg.md5_user.password)
    )


def assert_logged(proc: PoolerProcess, text: str, times: int) -> None:
    """`text` is logged `times` times (the check that logs it runs after the reply).

    The line is logged when the check answers, and only for a client still connected:
    a test lets each client it counts send a query after its last lock call, which is
    answered after the check, before it disconnects."""
    deadline = time.monotonic() + 10
    while proc.log_text().count(text) < times and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    assert proc.log_text().count(text) == times


def value(conn: w.PgWire, sql: str) -> str | None:
    reply = conn.simple_query(sql)
    assert w.first_error(reply) is None, w.first_error(reply)
    ((result,),) = w.rows(reply)
    return result


def test_the_lock_holder_keeps_its_server_until_it_unlocks(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    with logged_in(proc, pg) as holder, logged_in(proc, pg) as other:
        assert value(holder, "select pg_advisory_lock(4201)") == ""
        pid = value(holder, "select pg_backend_pid()")
        # The other client, on the pool's other server, cannot take it...
        assert value(other, "select pg_try_advisory_lock(4201)") == "f"
        # ... and the holder stays on its server, where its unlock finds the lock
        # (through PgBouncer it lands on any server and returns false).
        for _ in range(5):
            assert value(holder, "select pg_backend_pid()") == pid
        assert value(holder, "select pg_advisory_unlock(4201)") == "t"
        assert value(other, "select pg_try_advisory_lock(4201)") == "t"
        assert value(other, "select pg_advisory_unlock(4201)") == "t"
        assert value(other, "select 1") == "1"  # answered after the check
        assert value(holder, "select 1") == "1"  # answered after its unlock's check
    # Each client kept its server while it held the lock, and only then.
    assert_logged(proc, PINNED, 2)
    assert_logged(proc, UNPINNED, 2)


def times_out_waiting(proc: PoolerProcess, pg: ExamplePostgres) -> bool:
    """A new client's query waits for a server until query_wait_timeout."""
    with logged_in(proc, pg) as conn:
        conn.send_raw(w.query("select 1"))
        replies = conn.wait_closed()
    error = w.first_error(replies)
    return error is not None and error.sqlstate == "53300"


def test_the_server_goes_back_to_the_pool_once_the_locks_are_released(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    # One server: while the holder keeps it, another client waits (here until its
    # query_wait_timeout); after the unlock the other client is served.
    proc = pooler(pools=md5_user_pool(pg), general={"query_wait_timeout": 500})
    with logged_in(proc, pg) as holder:
        reply = holder.simple_query("select pg_advisory_lock_shared(1), pg_advisory_lock(2)")
        assert w.rows(reply) == [("", "")]
        assert times_out_waiting(proc, pg)
        # Two locks taken, one released: still held, still pinned.
        assert value(holder, "select pg_advisory_unlock(2)") == "t"
        assert times_out_waiting(proc, pg)
        assert value(holder, "select pg_advisory_unlock_shared(1)") == "t"
        # Answered after the check: the server is back before the other client waits.
        assert value(holder, "select 2") == "2"
        with logged_in(proc, pg) as other:
            assert value(other, "select 1") == "1"


def test_a_disconnecting_holder_leaves_no_lock_behind(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg))
    with logged_in(proc, pg) as holder:
        assert value(holder, "select pg_advisory_lock(4202)") == ""
    with logged_in(proc, pg) as other:
        # The pool's one server, which held the lock, is handed over without it.
        assert value(other, "select pg_try_advisory_lock(4202)") == "t"
        assert value(other, "select count(*) from pg_locks where locktype = 'advisory'") == "1"


def test_a_failed_try_lock_or_a_transaction_lock_does_not_pin(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2), general={"query_wait_timeout": 2000})
    with (
        logged_in(proc, pg) as holder,
        logged_in(proc, pg) as trier,
        logged_in(proc, pg) as third,
    ):
        assert value(holder, "select pg_advisory_lock(4203)") == ""
        assert value(holder, "select 1") == "1"  # answered after the check
        assert value(trier, "select pg_try_advisory_lock(4203)") == "f"
        # The trier holds nothing: its server went back, so the third client has one.
        assert value(third, "select 3") == "3"
        assert w.msg_types(trier.simple_query("begin")) == "CZ"
        assert value(trier, "select pg_advisory_xact_lock(4204)") == ""
        assert w.msg_types(trier.simple_query("commit")) == "CZ"
        assert value(third, "select pg_try_advisory_lock(4204)") == "t"
        assert value(third, "select pg_advisory_unlock(4204)") == "t"
        assert value(third, "select 1") == "1"  # answered after the check
    assert_logged(proc, PINNED, 2)  # the holder, and the third client for a moment
    assert_logged(proc, UNPINNED, 1)


def test_a_request_sent_during_the_check_waits_for_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    with logged_in(proc, pg) as conn:
        # Sent together: the second arrives while the server is being asked.
        conn.send_raw(
            w.query("select pg_advisory_lock(4205), pg_backend_pid()")
            + w.query("select pg_backend_pid(), pg_advisory_unlock(4205)")
            + w.query("select count(*) from pg_locks where locktype = 'advisory'")
        )
        first = conn.read_until_ready()
        second = conn.read_until_ready()
        third = conn.read_until_ready()
        ((_, pid),) = w.rows(first)
        assert w.rows(second) == [(pid, "t")]
        assert w.rows(third) == [("0",)]
        assert conn.read_available(wait=0.2) == []


def test_upper_case_and_schema_qualified_names_are_found(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    with logged_in(proc, pg) as holder:
        assert value(holder, "SELECT PG_ADVISORY_LOCK(4206)") == ""
        pid = value(holder, "select pg_backend_pid()")
        assert value(holder, "select pg_catalog.pg_try_advisory_lock(4207)") == "t"
        assert value(holder, "select pg_backend_pid()") == pid
        assert value(holder, 'select "pg_advisory_unlock_all"()') == ""
        assert value(holder, "select 1") == "1"  # sent after the check, answered after it
    assert_logged(proc, PINNED, 1)
    assert_logged(proc, UNPINNED, 1)


def read_lock_warning(conn: w.PgWire) -> None:
    """The next message is the warning that the locks are released."""
    type_, payload = conn.read_message(timeout=10)
    assert type_ == b"N"
    fields = w.error_fields(payload)
    assert (fields["S"], fields["C"]) == ("WARNING", "01000")
    assert fields["M"].startswith("session-level advisory locks are released")
    assert "pin_on_advisory_lock" in fields["H"]


def test_without_pinning_the_locks_are_released_and_the_client_warned(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pin_on_advisory_lock=False))
    with logged_in(proc, pg) as holder, logged_in(proc, pg) as other:
        reply = holder.simple_query("select pg_advisory_lock(4208)")
        assert w.msg_types(reply) == "TDCZ"  # PostgreSQL's reply, untouched
        read_lock_warning(holder)
        assert holder.read_available(wait=0.2) == []
        # The pool's one server, without the lock: no one is locked out by it.
        assert value(other, "select pg_try_advisory_lock(4208)") == "t"
        read_lock_warning(other)
        # Within the transaction it holds the lock (the unlock finds it); an unlock
        # alone draws no warning.
        assert w.msg_types(other.simple_query("begin")) == "CZ"
        assert value(other, "select pg_advisory_lock(4208)") == ""
        assert value(other, "select pg_advisory_unlock(4208)") == "t"
        assert w.msg_types(other.simple_query("commit")) == "CZ"
        read_lock_warning(other)
        assert value(other, "select pg_advisory_unlock(4208)") == "f"
        assert other.read_available(wait=0.2) == []
    assert PINNED not in proc.log_text()


def test_discard_all_lets_the_server_go(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=md5_user_pool(pg), general={"query_wait_timeout": 2000})
    with logged_in(proc, pg) as holder, logged_in(proc, pg) as other:
        assert value(holder, "select pg_advisory_lock(4209)") == ""
        assert w.msg_types(holder.simple_query("DISCARD ALL")) == "CZ"
        assert value(other, "select pg_try_advisory_lock(4209)") == "t"
        assert value(other, "select pg_advisory_unlock(4209)") == "t"
        assert value(other, "select 1") == "1"  # answered after the check
    assert_logged(proc, UNPINNED, 2)  # the holder at DISCARD ALL, the other at its unlock


def test_session_mode_is_untouched(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_mode="session"))
    with logged_in(proc, pg) as holder:
        assert value(holder, "select pg_advisory_lock(4210)") == ""
        assert holder.read_available(wait=0.2) == []
        assert value(holder, "select pg_advisory_unlock(4210)") == "t"
    assert PINNED not in proc.log_text()


@pytest.mark.parametrize("statement_cache_size", [0, 100])
def test_asyncpg_prepared_lock_and_unlock(
    pg: ExamplePostgres, pooler: PoolerFactory, statement_cache_size: int
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    user = pg.md5_user

    async def main() -> None:
        dsn = proc.dsn(user.name, user.password)
        holder = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
        other = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
        try:
            for key in (11, 12):
                await holder.execute("select pg_advisory_lock($1)", key)
            pid = await holder.fetchval("select pg_backend_pid()")
            assert not await other.fetchval("select pg_try_advisory_lock($1)", 11)
            for _ in range(3):
                assert await holder.fetchval("select pg_backend_pid()") == pid
            for key in (11, 12):
                assert await holder.fetchval("select pg_advisory_unlock($1)", key)
            assert await other.fetchval("select pg_try_advisory_lock($1)", 12)
        finally:
            await holder.close()
            await other.close()

    asyncio.run(main())
    assert_logged(proc, PINNED, 2)  # the holder, then the other client
    assert_logged(proc, UNPINNED, 1)  # the holder, after its last unlock


def test_psycopg_prepared_statements(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    with (
        psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as holder,
        psycopg.connect(dsn, autocommit=True) as other,
    ):
        # Prepared on first use: later executions are Binds of the named statement.
        for key in (21, 22, 21):
            holder.execute("select pg_advisory_lock(%s)", (key,))
        assert other.execute("select pg_try_advisory_lock(21)").fetchone() == (False,)
        for key in (21, 22, 21):
            row = holder.execute("select pg_advisory_unlock(%s)", (key,)).fetchone()
            assert row == (True,)
        assert other.execute("select pg_try_advisory_lock(21)").fetchone() == (True,)


def test_a_holder_whose_server_is_terminated_is_told_and_others_go_on(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    with logged_in(proc, pg) as holder, logged_in(proc, pg) as other:
        assert value(holder, "select pg_advisory_lock(4211)") == ""
        pid = value(holder, "select pg_backend_pid()")
        assert value(other, f"select pg_terminate_backend({pid})") == "t"
        # Its locks went with the server: it is disconnected, not moved to another.
        # PostgreSQL's FATAL, as from PostgreSQL alone.
        replies = holder.wait_closed()
        codes = [w.error_fields(payload)["C"] for type_, payload in replies if type_ == b"E"]
        assert codes == ["57P01"], replies
        assert value(other, "select pg_try_advisory_lock(4211)") == "t"
        with logged_in(proc, pg) as third:
            assert value(third, "select 3") == "3"


def test_the_metrics_count_the_clients_that_hold_locks(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    web = {"enabled": True, "host": "127.0.0.1", "port": port}
    proc = pooler(web=web, pools=md5_user_pool(pg, pool_size=3, pin_on_listen=True))
    mine = {"user": pg.md5_user.name, "database": EXAMPLE_DB}

    def pinned(reason: str) -> float:
        families = scrape(port)
        family = families["pg_doorman_pools_pinned_clients"]
        return metric(family, "pg_doorman_pools_pinned_clients", reason=reason, **mine)

    with logged_in(proc, pg) as first, logged_in(proc, pg) as second:
        assert (pinned("advisory_lock"), pinned("listen")) == (0, 0)
        assert value(first, "select pg_advisory_lock(4212)") == ""
        assert value(second, "select pg_advisory_lock(4213)") == ""
        for conn in (first, second):
            assert value(conn, "select 1") == "1"  # answered after its check
        assert (pinned("advisory_lock"), pinned("listen")) == (2, 0)
        assert w.msg_types(second.simple_query("LISTEN doorman_pinned")) == "CZ"
        assert (pinned("advisory_lock"), pinned("listen")) == (2, 1)
        assert value(first, "select pg_advisory_unlock(4212)") == "t"
        assert value(first, "select 1") == "1"
        assert (pinned("advisory_lock"), pinned("listen")) == (1, 1)
    deadline = time.monotonic() + 10  # the pooler sees them leave a moment later
    while (pinned("advisory_lock"), pinned("listen")) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (pinned("advisory_lock"), pinned("listen")) == (0, 0)


class SlowLockCheckBackend(QueryBackend):
    """Answers every query with one row, but the pooler's advisory lock check only once
    `answer_check` is set. Records the texts of the queries it got."""

    def __init__(self) -> None:
        self.checking = threading.Event()
        self.answer_check = threading.Event()
        self.texts: list[bytes] = []
        super().__init__()

    def reply(self, text: bytes) -> bytes | None:
        self.texts.append(text)
        if b"pg_locks" in text:
            self.checking.set()
            self.answer_check.wait(10)
        return ONE_ROW  # for the check: a row, so the locks are held


def test_a_cancel_during_the_check_cancels_the_request_waiting_for_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A request sent while the pooler asks the server about advisory locks waits for
    the answer; a cancel meanwhile answers it with 57014, as PostgreSQL would a
    running one, and it never reaches the server. What follows it runs after the
    check."""
    backend = SlowLockCheckBackend()
    try:
        proc = pooler(pools=stand_in_pool(backend, pg, 1))
        with logged_in(proc, pg) as conn:
            assert value(conn, "select pg_advisory_lock(4214)") == "1"
            assert backend.checking.wait(5)
            conn.send_raw(w.query("select 'canceled'"))
            time.sleep(0.5)  # read by the pooler, held behind the check
            assert conn.backend_pid is not None and conn.secret_key is not None
            w.cancel(proc.host, proc.port, conn.backend_pid, conn.secret_key)
            canceled = conn.read_until_ready(timeout=5)
            error = w.first_error(canceled)
            assert error is not None and error.sqlstate == "57014", canceled
            assert w.msg_types(canceled) == "EZ"
            conn.send_raw(w.query("select 'after'"))
            backend.answer_check.set()
            assert w.rows(conn.read_until_ready(timeout=5)) == [("1",)]
        assert b"select 'canceled'" not in backend.texts
        assert b"select 'after'" in backend.texts
    finally:
        backend.answer_check.set()
        backend.close()


def test_the_client_s_statement_timeout_does_not_cut_the_check(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The check runs in the client's session, under its statement_timeout. Held up
    (here by an exclusive lock on the pg_locks view) it waits rather than being
    cancelled, which would have left the client pinned without a lock; an error of
    the check is logged."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=2))
    with logged_in(proc, pg) as holder:
        assert value(holder, "select pg_advisory_lock(4215)") == ""
        reply = holder.simple_query("set statement_timeout = 100")
        assert w.first_error(reply) is None, reply
        with psycopg.connect(pg.dsn("postgres", database=EXAMPLE_DB)) as blocker:
            blocker.execute("lock table pg_catalog.pg_locks in access exclusive mode")
            assert value(holder, "select pg_advisory_unlock(4215)") == "t"
            holder.send_raw(w.query("select 'after the check'"))
            time.sleep(0.5)  # the check waits for the view's lock, past the timeout
        # The lock is gone with the blocker's transaction: the check answers.
        assert w.rows(holder.read_until_ready(timeout=10)) == [("after the check",)]
    assert_logged(proc, UNPINNED, 1)
    assert "advisory lock check" not in proc.log_text()


class FailingLockCheckBackend(QueryBackend):
    """Answers every query with one row, and the pooler's advisory lock check with an
    error."""

    def reply(self, text: bytes) -> bytes | None:
        if b"pg_locks" in text:
            error = w.cstr("SERROR") + w.cstr("C57014") + w.cstr("Mcanceling statement") + b"\0"
            return w.message(b"E", error) + w.message(b"Z", b"I")
        return ONE_ROW


def test_a_failed_check_keeps_the_client_pinned_and_says_why(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    backend = FailingLockCheckBackend()
    try:
        proc = pooler(pools=stand_in_pool(backend, pg, 1))
        with logged_in(proc, pg) as conn:
            assert value(conn, "select pg_advisory_lock(4216)") == "1"
            assert value(conn, "select 2") == "1"  # answered after the check
        assert_logged(proc, "the advisory lock check on server", 1)
        assert "failed (canceling statement); the client keeps the server" in proc.log_text()
        assert_logged(proc, PINNED, 1)
    finally:
        backend.close()
