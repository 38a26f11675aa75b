"""Steering a running pooler: PAUSE/RESUME, RECONNECT, KILL, RELOAD/SIGHUP, SHUTDOWN."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import pool_row
from helpers.fake_backend import GatedLoginBackend, stand_in_pool
from helpers.pooler import PoolerFactory, PoolerProcess


def client(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    return w.PgWire.connect(proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, "test")


def tags(messages: list[w.Message]) -> list[str]:
    return [w.command_tag(p) for t, p in messages if t == b"C"]


def notices(messages: list[w.Message]) -> list[str]:
    return [w.error_fields(p)["M"] for t, p in messages if t == b"N"]


def pause_while_busy(busy: w.PgWire, console: w.PgWire, pause: str, begin: str) -> list[str]:
    """Open a transaction on `busy`, send `pause` on the console and return the NOTICEs
    it sends before it starts waiting for that transaction."""
    busy.simple_query(begin)
    console.send_raw(w.query(pause))
    return notices(console.read_until(b"N"))


def test_pause_waits_for_transactions_and_resume_releases_the_queue(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    busy, late, console = client(proc, pg), client(proc, pg), admin(proc)
    try:
        # PAUSE says why it waits and does not finish while the transaction runs.
        said = pause_while_busy(busy, console, "PAUSE example_db", "begin; select 1")
        assert "waiting for 1 active server connection" in said[0]
        assert not [m for m in console.read_available(0.5) if m[0] in b"CZ"]
        # A new transaction queues behind the pause.
        late.send_raw(w.query("select 42"))
        assert late.read_available(0.3) == []
        # The open transaction may finish; then PAUSE completes.
        assert w.first_error(busy.simple_query("select 2; commit")) is None
        done = console.read_until_ready()
        assert tags(done) == ["PAUSE"]
        assert pool_row(console, pg.md5_user.name)["paused"] == "1"
        assert pool_row(console, pg.md5_user.name)["sv_idle"] == "0"  # servers closed
        assert late.read_available(0.3) == []
        assert tags(console.simple_query("RESUME example_db")) == ["RESUME"]
        got = late.read_until_ready()
        assert w.rows(got) == [("42",)]
        assert pool_row(console, pg.md5_user.name)["paused"] == "0"
    finally:
        for conn in (busy, late, console):
            conn.close_socket()


def test_pause_waits_for_a_server_being_opened_and_closes_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A server whose login is under way when PAUSE comes counts as busy: PAUSE returns
    once it is in, closes it with the rest, and none stays connected while paused."""
    backend = GatedLoginBackend()
    user = pg.md5_user
    proc = pooler(
        general={"query_wait_timeout": 30_000, "connect_timeout": 30_000},
        pools=stand_in_pool(backend, pg, 2),
    )
    replies: list[list[w.Message]] = []

    def query() -> None:
        conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
        try:
            replies.append(conn.simple_query("select 1"))
        finally:
            conn.close_socket()

    asking = threading.Thread(target=query)
    asking.start()
    console = admin(proc)
    try:
        assert backend.login_started.wait(10)
        console.send_raw(w.query(f"PAUSE {EXAMPLE_DB}"))
        said = console.read_until(b"N")
        assert "1 server connections being opened" in notices(said)[0]
        assert not [m for m in console.read_available(0.5) if m[0] in b"CZ"]
        backend.gate.set()
        assert tags(console.read_until_ready()) == ["PAUSE"]
        row = pool_row(console, user.name)
        assert (row["paused"], row["sv_idle"], row["sv_active"]) == ("1", "0", "0"), row
        deadline = time.monotonic() + 5
        while backend.counts()[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.counts() == (1, 0)  # the one server opened, and closed
        assert tags(console.simple_query(f"RESUME {EXAMPLE_DB}")) == ["RESUME"]
        asking.join(10)
        assert [w.rows(reply) for reply in replies] == [[("1",)]]
    finally:
        backend.gate.set()
        console.close_socket()
        asking.join(10)
        backend.close()


def test_pause_can_be_cancelled_and_unknown_database_errors(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    busy, console = client(proc, pg), admin(proc)
    try:
        pause_while_busy(busy, console, "PAUSE", "begin")
        assert console.backend_pid is not None and console.secret_key is not None
        canceller = w.PgWire(proc.host, proc.port)
        canceller.send_raw(w.cancel_request(console.backend_pid, console.secret_key))
        canceller.close_socket()
        got = console.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "57014" and "RESUME" in error.message
        assert pool_row(console, pg.md5_user.name)["paused"] == "1"
        assert tags(console.simple_query("RESUME")) == ["RESUME"]
        assert w.first_error(busy.simple_query("commit")) is None
        for command in ("PAUSE nope", "RESUME nope", "RECONNECT nope", "KILL nope"):
            error = w.first_error(console.simple_query(command))
            assert error is not None and error.sqlstate == "3D000", command
            assert 'No pool for database "nope"' in error.message
    finally:
        busy.close_socket()
        console.close_socket()


def test_reconnect_replaces_servers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={EXAMPLE_DB: {"users": [{"username": "example_user_md5", "pool_size": 1}]}})
    dsn = proc.dsn(pg.md5_user.name, "test")
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute("select pg_backend_pid()").fetchone()
        assert before == conn.execute("select pg_backend_pid()").fetchone()
        console = admin(proc)
        try:
            assert tags(console.simple_query("RECONNECT example_db")) == ["RECONNECT"]
            after = conn.execute("select pg_backend_pid()").fetchone()
            assert after != before
            # A server busy during RECONNECT is replaced when its transaction ends.
            conn.execute("begin")
            inside = conn.execute("select pg_backend_pid()").fetchone()
            assert tags(console.simple_query("RECONNECT")) == ["RECONNECT"]
            assert conn.execute("select pg_backend_pid()").fetchone() == inside
            conn.execute("commit")
            assert conn.execute("select pg_backend_pid()").fetchone() != inside
        finally:
            console.close()


def test_kill_disconnects_clients_and_servers_until_resume(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    idle, in_tx, console = client(proc, pg), client(proc, pg), admin(proc)
    try:
        idle.simple_query("select 1")
        in_tx.simple_query("begin; select pg_backend_pid()")
        pid_rows = w.rows(in_tx.received)
        assert tags(console.simple_query("KILL example_db")) == ["KILL"]
        for conn in (idle, in_tx):
            error = w.first_error(conn.wait_closed())
            assert error is not None and error.sqlstate == "57P01"
        # The backend of the open transaction was closed too.
        backend_pid = int(str(pid_rows[-1][0]))
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as direct:
            deadline = time.monotonic() + 5
            while direct.execute(
                "select count(*) from pg_stat_activity where pid = %s", (backend_pid,)
            ).fetchone() != (0,):
                assert time.monotonic() < deadline, "killed backend still there"
                time.sleep(0.05)
        row = pool_row(console, pg.md5_user.name)
        assert (row["paused"], row["cl_idle"], row["sv_active"], row["sv_idle"]) == (
            "1",
            "0",
            "0",
            "0",
        )
        # New clients may log in but wait until RESUME.
        late = client(proc, pg)
        late.send_raw(w.query("select 7"))
        assert late.read_available(0.3) == []
        console.simple_query("RESUME")
        assert w.rows(late.read_until_ready()) == [("7",)]
        late.close()
    finally:
        for conn in (idle, in_tx, console):
            conn.close_socket()


def _user(proc: PoolerProcess, name: str) -> dict[str, Any]:
    users: list[dict[str, Any]] = proc.config["pools"][EXAMPLE_DB]["users"]
    return next(u for u in users if u["username"] == name)


def test_reload_applies_changes_and_keeps_the_old_config_on_errors(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user.name
    with psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn:
        before = conn.execute("select pg_backend_pid()").fetchone()
        console = admin(proc)
        try:
            _user(proc, user)["pool_size"] = 9
            running_port = proc.port
            proc.write_config(
                {**proc.config, "general": {**proc.config["general"], "port": running_port + 1}}
            )
            got = console.simple_query("RELOAD")
            assert tags(got) == ["RELOAD"] and w.first_error(got) is None
            assert pool_row(console, user)["pool_size"] == "9"
            # The port needs a restart: the reload says so and keeps the running one.
            assert any("general.port" in n and "restart" in n for n in notices(got))
            config_rows = console.simple_query("SHOW CONFIG")
            port_row = next(r for r in w.rows(config_rows) if r[0] == "general.port")
            assert port_row[1] == str(running_port)
            proc.config["general"]["port"] = running_port
            # A size change keeps servers and clients.
            assert conn.execute("select pg_backend_pid()").fetchone() == before

            # An invalid file: an error naming the key; the running config stays.
            proc.config["general"]["query_wait_timeout"] = "soon"
            proc.write_config()
            error = w.first_error(console.simple_query("RELOAD"))
            assert error is not None and error.sqlstate == "F0000"
            assert "general.query_wait_timeout" in error.message
            assert pool_row(console, user)["pool_size"] == "9"
            assert conn.execute("select 1").fetchone() == (1,)

            # Backend settings changed: servers are replaced, the client stays.
            del proc.config["general"]["query_wait_timeout"]
            proc.config["pools"][EXAMPLE_DB]["application_name"] = "reloaded"
            proc.write_config()
            got = console.simple_query("RELOAD")
            assert w.first_error(got) is None
            row = conn.execute(
                "select application_name from pg_stat_activity where pid = pg_backend_pid()"
            ).fetchone()
            assert row == ("reloaded",)
        finally:
            console.close()


def test_sighup_reloads_pools_and_retires_removed_ones(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    scram = pg.scram_user.name
    with psycopg.connect(proc.dsn(scram, "test"), autocommit=True) as doomed:
        doomed.execute("select 1")
        users = proc.config["pools"][EXAMPLE_DB]["users"]
        proc.config["pools"][EXAMPLE_DB]["users"] = [u for u in users if u["username"] != scram]
        proc.config["pools"]["second_db"] = {
            "server_host": pg.host,
            "server_port": pg.port,
            "server_database": EXAMPLE_DB,
            "users": [{"username": pg.md5_user.name, "password": pg.md5_user.pooler_password,
                       "pool_size": 2}],
        }  # fmt: skip
        proc.write_config()
        proc.reload()
        proc.wait_for_log("configuration reloaded")
        # The removed pool's idle client is told why it is disconnected.
        with pytest.raises(psycopg.OperationalError, match="configuration reload"):
            doomed.execute("select 1")
        doomed.close()  # not the exit's COMMIT on a connection the pooler closed
    with psycopg.connect(
        proc.dsn(pg.md5_user.name, "test", database="second_db"), autocommit=True
    ) as conn:
        assert conn.execute("select current_database()").fetchone() == (EXAMPLE_DB,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proc.dsn(scram, "test"))


def test_a_login_whose_pool_a_reload_retires_is_told_to_reconnect(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The pool is retired while the client is still answering the password request:
    the client is told at once (57P01), rather than queued on a closed pool until
    query_wait_timeout."""
    proc = pooler()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as warm:
        warm.execute("select 1")  # the pool knows its server parameters
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": user.name, "database": EXAMPLE_DB}))
        type_, payload = conn.read_message()
        assert type_ == b"R" and payload[:4] == (w.AUTH_MD5).to_bytes(4, "big"), payload
        users = proc.config["pools"][EXAMPLE_DB]["users"]
        proc.config["pools"][EXAMPLE_DB]["users"] = [u for u in users if u["username"] != user.name]
        proc.reload_and_wait(proc.config)
        answer = w.md5_response(user.password, user.name, payload[4:8])
        conn.send(b"p", w.cstr(answer))
        error = w.first_error(conn.wait_closed(5))
        assert error is not None and error.sqlstate == "57P01", error
        assert "reconnect" in str(error)
    finally:
        conn.close_socket()


def test_a_pool_replaced_by_a_reload_keeps_what_scram_passthrough_learnt(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A pool_mode change replaces the pool. The SCRAM ClientKey the old pool learnt
    from a client's login still fits the unchanged verifier, so the new pool opens its
    min_pool_size servers at once, not only after somebody logs in again."""
    user = pg.scram_user
    proc = pooler(
        pools={
            EXAMPLE_DB: {
                "application_name": "replaced_pool",
                "users": [{"username": user.name, "password": user.pooler_password,
                           "pool_size": 3, "min_pool_size": 1}],
            }
        }
    )  # fmt: skip
    sql = "select count(*) from pg_stat_activity where application_name = 'replaced_pool'"
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        conn.execute("select 1")  # the login teaches the pool the ClientKey
    config = proc.config
    (entry,) = (u for u in config["pools"][EXAMPLE_DB]["users"] if u["username"] == user.name)
    entry["pool_mode"] = "session"
    entry["min_pool_size"] = 2
    refused = proc.log_text().count("passthrough")
    proc.reload_and_wait(config)
    assert "pool example_user_scram@example_db retired" in proc.log_text()
    deadline = time.monotonic() + 10
    while int(pg.psql(sql).strip()) != 2:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.1)
    assert proc.log_text().count("passthrough") == refused
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_shutdown_command_stops_the_pooler(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    console = admin(proc)
    got = console.simple_query("SHUTDOWN")
    assert w.rows(got) == [("t",)] and tags(got) == ["SHUTDOWN"]
    console.close_socket()
    assert proc.wait_exit(15) == 0


def test_reload_and_reconnect_under_load_lose_nothing(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Clients keep running transactions while the pool shrinks, grows and reconnects:
    every transaction succeeds and the pool ends within its new size."""
    import threading

    proc = pooler()
    user = pg.md5_user.name
    errors: list[BaseException] = []
    done = [0]
    stop = threading.Event()

    def worker() -> None:
        try:
            with psycopg.connect(proc.dsn(user, "test"), autocommit=True) as conn:
                while not stop.is_set():
                    with conn.transaction():
                        row = conn.execute("select %s::int + 1", (done[0],)).fetchone()
                        assert row is not None
                    done[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    console = admin(proc)
    try:
        for size in (1, 4, 2):
            time.sleep(0.3)
            _user(proc, user)["pool_size"] = size
            proc.write_config()
            assert w.first_error(console.simple_query("RELOAD")) is None
            time.sleep(0.3)
            assert tags(console.simple_query("RECONNECT")) == ["RECONNECT"]
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    try:
        assert not errors, errors
        assert done[0] > 50
        row = pool_row(console, user)
        assert row["pool_size"] == "2"
        assert int(row["sv_active"] or 0) + int(row["sv_idle"] or 0) <= 2
    finally:
        console.close()


def test_console_that_vanishes_during_pause_leaves_the_pooler_working(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    busy, console = client(proc, pg), admin(proc)
    try:
        pause_while_busy(busy, console, "PAUSE example_db", "begin")
        console.close_socket()  # gone while PAUSE waits
        assert w.first_error(busy.simple_query("select 1; commit")) is None
        second = admin(proc)
        assert pool_row(second, pg.md5_user.name)["paused"] == "1"  # the pause holds
        assert tags(second.simple_query("RESUME")) == ["RESUME"]
        assert w.rows(busy.simple_query("select 5")) == [("5",)]
        second.close()
    finally:
        busy.close_socket()
