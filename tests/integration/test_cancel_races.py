"""Cancel requests and the wait queue where timing decides: a cancel that comes while
the pooler sets the client's parameters on its server, one racing the end of the
transaction, a client leaving the queue, a cancel of a queued pipeline.

Stand-in servers where the timing must be controlled, PostgreSQL elsewhere.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, pool_row
from helpers.fake_backend import (
    ONE_ROW,
    FakeBackend,
    GatedLoginBackend,
    login_ok,
    read_exact,
    read_message,
    stand_in_pool,
)
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess

CANCEL_CODE = 80877102


CANCELED = w.error_response("57014", "canceling statement due to user request") + w.message(
    b"Z", b"I"
)


class CancelBackend(FakeBackend):
    """A stand-in PostgreSQL that knows its sessions by pid and acts on CancelRequests
    much as PostgreSQL does: a cancel interrupts the query its session runs at the time
    (a query "runs" here while the backend waits, see run()), or the next one that
    waits.

    - the first query containing `hold_text` is held until a cancel for its session
      arrives (or `release` is set), then answered with 57014 if canceled;
    - a query containing "sleep" runs for `sleep_seconds` unless canceled meanwhile;
    - anything else is answered with one row at once.
    Records every (pid, query text) and every cancel (pid)."""

    def __init__(
        self,
        hold_text: bytes = b"set_config",
        sleep_seconds: float = 3.0,
        *,
        hold_once: bool = True,
        self_cancel: bool = False,
    ) -> None:
        self.hold_text = hold_text
        self.hold_once = hold_once
        # The held query is canceled by someone else at once (pg_cancel_backend).
        self.self_cancel = self_cancel
        self.sleep_seconds = sleep_seconds
        self.cond = threading.Condition()
        self.next_pid = 1000
        self.queries: list[tuple[int, bytes]] = []
        self.cancels: list[int] = []
        self.pending_cancel: set[int] = set()
        self.holding = threading.Event()
        self.held_once = False
        self.release = threading.Event()
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        (length,) = struct.unpack("!i", read_exact(sock, 4))
        body = read_exact(sock, length - 4)
        (code,) = struct.unpack("!i", body[:4])
        if code == CANCEL_CODE:
            pid, _secret = struct.unpack("!ii", body[4:12])
            with self.cond:
                self.cancels.append(pid)
                self.pending_cancel.add(pid)
                self.cond.notify_all()
            return  # PostgreSQL closes the cancel connection once it signalled
        with self.cond:
            pid = self.next_pid
            self.next_pid += 1
        sock.sendall(login_ok(pid))
        while True:
            msg_type, body = read_message(sock)
            if msg_type == b"X":
                return
            text = body.rstrip(b"\x00")
            with self.cond:
                self.queries.append((pid, text))
                # A cancel that came while the session was idle is kept for its next
                # query here (PostgreSQL drops it): the stand-in's threads are slower
                # to read an already sent query than PostgreSQL, and a late cancel that
                # hits the next query is what the tests look for anyway.
            if self.hold_text in text and not (self.hold_once and self.held_once):
                self.held_once = True
                self.holding.set()
                canceled = self.self_cancel or self.run(pid, 10.0, self.release)
            elif b"sleep" in text:
                canceled = self.run(pid, self.sleep_seconds, None)
            else:
                canceled = False
            sock.sendall(CANCELED if canceled else ONE_ROW)

    def run(self, pid: int, seconds: float, until: threading.Event | None) -> bool:
        """Run a query of session `pid` for up to `seconds`: True if canceled."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while pid not in self.pending_cancel:
                if until is not None and until.is_set():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.05))
            self.pending_cancel.discard(pid)
            return True

    def texts(self) -> list[bytes]:
        with self.cond:
            return [text for _, text in self.queries]


def login(proc: PoolerProcess, pg: ExamplePostgres, **params: str) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(
        proc.host, proc.port, user.name, EXAMPLE_DB, user.password, params=params
    )


def cancel_key(conn: w.PgWire) -> tuple[int, bytes]:
    assert conn.backend_pid is not None and conn.secret_key is not None
    return conn.backend_pid, conn.secret_key


# ---- a cancel while the pooler sets the client's parameters ------------------------


def cancel_while_held(proc: PoolerProcess, conn: w.PgWire, backend: CancelBackend) -> None:
    """Send conn's cancel while the stand-in holds the pooler's SET, which it answers
    0.3 s later (a cancel reaching it meanwhile interrupts it, as PostgreSQL would)."""
    sender = threading.Thread(target=w.cancel, args=(proc.host, proc.port, *cancel_key(conn)))
    sender.start()
    time.sleep(0.3)
    backend.release.set()
    sender.join(10)


@pytest.fixture
def cancel_backend() -> Iterator[CancelBackend]:
    backend = CancelBackend()
    yield backend
    backend.release.set()
    backend.close()


def test_a_cancel_during_the_parameter_sync_cancels_the_clients_query(
    pg: ExamplePostgres, pooler: PoolerFactory, cancel_backend: CancelBackend
) -> None:
    """The client's query is sent; the pooler first SETs the client's startup
    parameters on the server it got. A cancel arriving meanwhile is for the client's
    query: the client must get 57014 for it (PostgreSQL would cancel the running
    query), not wait for it to run to its end."""
    backend = cancel_backend
    proc = pooler(pools=stand_in_pool(backend, pg))
    with contextlib.closing(login(proc, pg, statement_timeout="5s")) as conn:
        conn.send_raw(w.query("select pg_sleep(3)"))
        assert backend.holding.wait(5), backend.texts()
        started = time.monotonic()
        cancel_while_held(proc, conn, backend)
        reply = conn.read_until_ready(timeout=10)
        took = time.monotonic() - started
        error = w.first_error(reply)
        assert error is not None and error.sqlstate == "57014", (reply, took)
        assert took < 2.0


def test_a_cancel_during_the_parameter_sync_keeps_the_clients_parameters(
    pg: ExamplePostgres, pooler: PoolerFactory, cancel_backend: CancelBackend
) -> None:
    """Whatever becomes of the canceled query, the client's startup parameters are its
    own still: the next server it gets must be given them too (they were not refused by
    the server, a cancel interrupted the statement setting them)."""
    backend = cancel_backend
    proc = pooler(pools=stand_in_pool(backend, pg))
    with contextlib.closing(login(proc, pg, statement_timeout="5s")) as conn:
        conn.send_raw(w.query("select 1"))
        assert backend.holding.wait(5), backend.texts()
        cancel_while_held(proc, conn, backend)
        conn.read_until_ready(timeout=10)
        # The server that got the cancel is not reused: the next query is on a new one,
        # which must get the client's statement_timeout as well.
        assert w.first_error(conn.simple_query("select 'next'", timeout=10)) is None
        syncs = [t for t in backend.texts() if b"statement_timeout" in t]
        assert len(syncs) == 2, backend.texts()
    assert "dropping startup parameters" not in proc.log_text()


def test_after_a_cancel_during_the_sync_the_pool_serves_the_next_client(
    pg: ExamplePostgres, pooler: PoolerFactory, cancel_backend: CancelBackend
) -> None:
    """The server whose SET was hit is not left failed for someone else: the next client
    (and the same one) are served, nothing hangs."""
    backend = cancel_backend
    proc = pooler(pools=stand_in_pool(backend, pg), general={"query_wait_timeout": 3000})
    with contextlib.closing(login(proc, pg, statement_timeout="5s")) as conn:
        conn.send_raw(w.query("select 1"))
        assert backend.holding.wait(5)
        cancel_while_held(proc, conn, backend)
        conn.read_until_ready(timeout=10)
        with contextlib.closing(login(proc, pg)) as other:
            assert w.rows(other.simple_query("select 1", timeout=5)) == [("1",)]
        assert w.rows(conn.simple_query("select 1", timeout=5)) == [("1",)]


def test_a_sync_canceled_by_someone_else_keeps_the_clients_parameters(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The pooler's SET canceled by pg_cancel_backend (or statement_timeout of another
    tool...): 57014 is no refusal of the parameters, the client keeps them."""
    backend = CancelBackend(self_cancel=True)
    try:
        proc = pooler(pools=stand_in_pool(backend, pg))
        with contextlib.closing(login(proc, pg, statement_timeout="5s")) as conn:
            assert w.rows(conn.simple_query("select 1", timeout=5)) == [("1",)]
            assert w.rows(conn.simple_query("select 2", timeout=5)) == [("1",)]
            syncs = [t for t in backend.texts() if b"statement_timeout" in t]
            assert len(syncs) == 2, backend.texts()
        assert "dropping startup parameters" not in proc.log_text()
    finally:
        backend.close()


# ---- a late cancel never reaches the next client of the server ---------------------


def test_a_cancel_racing_the_ready_for_query_never_hits_the_next_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Client A's query ends (its ReadyForQuery is released by the stand-in) while its
    cancel is on the way; client B, queued for the pool's one server, gets the server
    next and runs a query that a cancel would interrupt. B must never be canceled,
    whichever of the two the pooler sees first."""
    backend = CancelBackend(hold_text=b"hold", sleep_seconds=0.3, hold_once=False)
    try:
        proc = pooler(pools=stand_in_pool(backend, pg), general={"query_wait_timeout": 10_000})
        a = login(proc, pg)
        b = login(proc, pg)
        try:
            for delay in (0.0, 0.0, 0.0005, 0.001, 0.002, 0.004, 0.008):
                backend.release.clear()
                backend.holding.clear()
                a.send_raw(w.query("select 'hold'"))
                assert backend.holding.wait(5)
                b.send_raw(w.query("select 'sleep'"))
                time.sleep(0.05)  # B is queued
                releaser = threading.Timer(delay, backend.release.set)
                releaser.start()
                w.cancel(proc.host, proc.port, *cancel_key(a))
                releaser.join()
                a_reply = a.read_until_ready(timeout=5)
                b_reply = b.read_until_ready(timeout=5)
                assert w.first_error(b_reply) is None, (delay, b_reply)
                error = w.first_error(a_reply)
                assert error is None or error.sqlstate == "57014"
        finally:
            a.close()
            b.close()
    finally:
        backend.release.set()
        backend.close()


# ---- a client leaving the queue ----------------------------------------------------


def pool_counts(proc: PoolerProcess, pg: ExamplePostgres) -> dict[str, str | None]:
    console = admin_console(proc)
    try:
        return pool_row(console, pg.md5_user.name)
    finally:
        console.close()


def backends_of(pg: ExamplePostgres) -> list[tuple[str, str]]:
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as direct:
        rows = direct.execute(
            "select state, coalesce(query, '') from pg_stat_activity where usename = %s",
            (pg.md5_user.name,),
        ).fetchall()
    return [(str(s), str(q)) for s, q in rows]


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["close", "reset", "terminate"])
def test_a_queued_client_that_leaves_is_forgotten(
    pg: ExamplePostgres, pooler: PoolerFactory, how: str
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=1), general={"query_wait_timeout": 20_000})
    with contextlib.closing(login(proc, pg)) as holder:
        holder.execute_query("begin")
        holder.execute_query("select 1")
        queued = login(proc, pg)
        queued.send_raw(w.query("select 'queued'"))
        assert wait_for(lambda: pool_counts(proc, pg)["cl_waiting"] == "1")
        if how == "reset":
            queued.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            queued.close_socket()
        elif how == "terminate":
            queued.close()  # Terminate behind the queued query
        else:
            queued.close_socket()
        assert wait_for(lambda: pool_counts(proc, pg)["cl_waiting"] == "0")
        row = pool_counts(proc, pg)
        assert (row["cl_waiting"], row["maxwait"], row["sv_active"]) == ("0", "0", "1"), row
        holder.execute_query("commit")
        # The server is back, idle and clean; nobody else got it.
        assert wait_for(lambda: pool_counts(proc, pg)["sv_idle"] == "1")
        assert backends_of(pg) == [("idle", "commit")]
        with contextlib.closing(login(proc, pg)) as later:
            assert w.rows(later.simple_query("select 'later'", timeout=3)) == [("later",)]
        assert len(backends_of(pg)) == 1


def waited(row: dict[str, str | None]) -> int:
    """A SHOW POOLS row's maxwait, in microseconds."""
    return int(row["maxwait"] or 0) * 1_000_000 + int(row["maxwait_us"] or 0)


def test_a_login_that_leaves_while_waiting_for_the_first_server_is_forgotten(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A pool's first login waits for a server to learn its parameters. A client that
    goes away meanwhile leaves the queue at once, not when the server comes or
    query_wait_timeout passes, and the server it waited for serves the next client."""
    backend = GatedLoginBackend()
    try:
        proc = pooler(
            general={"query_wait_timeout": 30_000, "connect_timeout": 30_000},
            pools=stand_in_pool(backend, pg),
        )
        user = pg.md5_user
        leaving = w.PgWire(proc.host, proc.port)
        leaving.send_raw(w.startup_message({"user": user.name, "database": EXAMPLE_DB}))
        _, salt_reply = leaving.read_message()
        leaving.send_raw(
            w.password_message(w.md5_response(user.password, user.name, salt_reply[4:8]))
        )
        assert backend.login_started.wait(10)
        time.sleep(0.2)
        # Queued for the server being opened: the pool's oldest wait (not a client in
        # cl_waiting, as it has not logged in).
        assert waited(pool_counts(proc, pg)) >= 200_000
        leaving.close_socket()
        assert wait_for(lambda: waited(pool_counts(proc, pg)) == 0)
        backend.gate.set()
        with contextlib.closing(login(proc, pg)) as later:
            assert w.rows(later.simple_query("select 1", timeout=5)) == [("1",)]
        assert backend.counts() == (1, 1)  # the one server, kept
    finally:
        backend.gate.set()
        backend.close()


# ---- a cancel of a queued client ---------------------------------------------------


def test_a_cancel_for_a_queued_client_cancels_only_its_first_pipelined_request(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=1), general={"query_wait_timeout": 20_000})
    with contextlib.closing(login(proc, pg)) as holder, contextlib.closing(login(proc, pg)) as q:
        holder.execute_query("begin")
        holder.execute_query("select 1")
        q.send_raw(
            w.query("select 'first'")
            + w.parse("s1", "select 'second'")
            + w.sync()
            + w.bind("", "s1")
            + w.execute()
            + w.sync()
            + w.query("select 'third'")
        )
        assert q.read_available(0.3) == []
        w.cancel(proc.host, proc.port, *cancel_key(q))
        first = q.read_until_ready(timeout=3)
        assert [t for t, _ in first] == [b"E", b"Z"]
        error = w.first_error(first)
        assert error is not None and error.sqlstate == "57014"
        assert q.read_available(0.3) == []  # the rest still waits for the server
        holder.execute_query("commit")
        assert w.msg_types(q.read_until_ready(timeout=5)) == "1Z"
        assert w.rows(q.read_until_ready(timeout=5)) == [("second",)]
        assert w.rows(q.read_until_ready(timeout=5)) == [("third",)]
        assert q.read_available(0.2) == []
        assert w.rows(holder.simple_query("select 'holder'")) == [("holder",)]
