"""Patroni-assisted fallback: the pool's own server is a Unix socket directory where no
PostgreSQL listens, as when the local PostgreSQL of a Patroni node is down; a
Patroni-style REST API lists the cluster's members, and the example PostgreSQL plays the
member that is up (over TCP). When its socket appears in the directory, the pool goes
back to it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.cancel import cancel_midway
from helpers.console import admin_rows
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port


class PatroniApi:
    """GET /cluster answered with `members`, as a Patroni node's REST API does."""

    def __init__(self, members: list[dict[str, Any]]) -> None:
        self.members = members
        self.requests = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests += 1
                if self.path != "/cluster":
                    self.send_error(404)
                    return
                body = json.dumps({"members": api.members, "scope": "demo"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def member(name: str, role: str, port: int) -> dict[str, Any]:
    return {"name": name, "role": role, "state": "running", "host": "127.0.0.1", "port": port}


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """The pool's Unix socket directory, empty: its PostgreSQL is down. (Short, for the
    socket path limit.)"""
    path = Path(tempfile.mkdtemp(prefix="pgd-fb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(
    pg: ExamplePostgres, pooler: PoolerFactory, local: Path, urls: list[str], **extra: Any
) -> tuple[PoolerProcess, int]:
    web = free_port()
    general = extra.pop("general", {})
    proc = pooler(
        general=general,
        web={"enabled": True, "host": "127.0.0.1", "port": web},
        pools={
            "example_db": {
                "server_host": str(local),
                "server_port": pg.port,
                "patroni_api_urls": urls,
                **extra,
            }
        },
    )
    if general.get("workers", 1) > 1:
        proc.wait_for_log(f"all {general['workers']} workers ready", timeout=30)
    return proc, web


def server_address(conn: psycopg.Connection[Any]) -> tuple[str | None, int | None]:
    """Where the session's backend was reached: (None, None) over a Unix socket."""
    row = conn.execute("select host(inet_server_addr()), inet_server_port()").fetchone()
    assert row is not None
    return row[0], row[1]


def connect(proc: PoolerProcess, pg: ExamplePostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(proc.dsn(pg.md5_user.name, pg.md5_user.password), autocommit=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_new_servers_open_on_the_synchronous_standby_until_the_local_server_is_back(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    local_dir: Path,
    workers: int,
    refused_port: Callable[[], int],
) -> None:
    dead = refused_port()
    api = PatroniApi(
        [member("node1", "leader", dead), member("node2", "sync_standby", pg.port)],
    )
    try:
        proc, web = start(
            pg,
            pooler,
            local_dir,
            # The first URL is a node that is down as well: the other one answers.
            [f"http://127.0.0.1:{refused_port()}", api.url],
            fallback_cooldown="5s",
            fallback_lifetime="1s",
            general={"workers": workers},
        )
        with connect(proc, pg) as conn:
            assert server_address(conn) == ("127.0.0.1", pg.port)
        assert api.requests == 1
        log = proc.log_text()
        assert "server unavailable (cannot connect to server" in log
        assert (
            f"new servers open on 127.0.0.1:{pg.port} (Patroni member node2, sync_standby)" in log
        )
        families = scrape(web)
        pool = {"pool": "example_db"}
        active = families["pg_doorman_fallback_active"]
        assert value(active, "pg_doorman_fallback_active", **pool) == 1
        assert value(
            families["pg_doorman_fallback_host"],
            "pg_doorman_fallback_host",
            host="127.0.0.1",
            port=str(pg.port),
            **pool,
        )
        for name, expected in [
            ("pg_doorman_patroni_api_requests_total", 1),
            ("pg_doorman_patroni_api_errors_total", 0),
            ("pg_doorman_fallback_connections_total", 1),
            ("pg_doorman_patroni_api_duration_seconds_count", 1),
        ]:
            family = families[name.removesuffix("_total").removesuffix("_count")]
            assert value(family, name, **pool) == expected, name
        # The leader (a later wave) was never tried.
        failures = families["pg_doorman_fallback_candidate_failures"]
        assert all(s.value == 0 for s in failures if s.name.endswith("_total"))
        rows = [r for r in admin_rows(proc, "POOLS") if r["user"] == pg.md5_user.name]
        assert [r["fallback_active"] for r in rows] == ["1"]

        # The local PostgreSQL is back: its socket appears where the pool looks for it.
        os.symlink(pg.socket_dir / f".s.PGSQL.{pg.port}", local_dir / f".s.PGSQL.{pg.port}")
        back = "server reachable again; new servers open there, not on 127.0.0.1"
        deadline = time.monotonic() + 30
        # A new connection each time: two workers take turns with them, and only the
        # worker that fell back logs the return, once one of its clients needs a server.
        while True:
            with connect(proc, pg) as conn:
                local = server_address(conn) == (None, None)
            if local and back in proc.log_text():
                break
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.2)
        families = scrape(web)
        active = families["pg_doorman_fallback_active"]
        assert value(active, "pg_doorman_fallback_active", **pool) == 0
        assert not families.get("pg_doorman_fallback_host")
    finally:
        api.close()


def test_the_other_members_race_when_the_synchronous_standby_fails(
    pg: ExamplePostgres, pooler: PoolerFactory, local_dir: Path, refused_port: Callable[[], int]
) -> None:
    """Then the member that logged in is used again without asking Patroni."""
    dead_sync, dead_leader = refused_port(), refused_port()
    api = PatroniApi(
        [
            member("node1", "sync_standby", dead_sync),
            member("node2", "replica", pg.port),
            member("node3", "leader", dead_leader),
        ]
    )
    try:
        proc, web = start(pg, pooler, local_dir, [api.url], fallback_cooldown="30s")
        first, second = connect(proc, pg), connect(proc, pg)
        try:
            first.execute("begin")
            assert server_address(first) == ("127.0.0.1", pg.port)
            second.execute("begin")  # the first holds its server: a second one opens
            assert server_address(second) == ("127.0.0.1", pg.port)
            first.execute("commit")
            second.execute("commit")
        finally:
            first.close()
            second.close()
        assert api.requests == 1
        log = proc.log_text()
        assert f"fallback member 127.0.0.1:{dead_sync} rejected (connect_error" in log
        assert "(Patroni member node2, replica)" in log
        families = scrape(web)
        pool = {"pool": "example_db"}
        hits = families["pg_doorman_fallback_cache_hits"]
        assert value(hits, "pg_doorman_fallback_cache_hits_total", **pool) >= 1
        opened = families["pg_doorman_fallback_connections"]
        assert value(opened, "pg_doorman_fallback_connections_total", **pool) >= 2
        failures = families["pg_doorman_fallback_candidate_failures"]
        refused = value(
            failures, "pg_doorman_fallback_candidate_failures_total", reason="connect_error", **pool
        )
        assert 1 <= refused <= 2  # the leader may still be trying when the replica wins
    finally:
        api.close()


def test_a_cancel_reaches_the_member_the_server_was_opened_on(
    pg: ExamplePostgres, pooler: PoolerFactory, local_dir: Path
) -> None:
    api = PatroniApi([member("node2", "sync_standby", pg.port)])
    try:
        proc, _ = start(pg, pooler, local_dir, [api.url])
        with connect(proc, pg) as conn:
            assert server_address(conn) == ("127.0.0.1", pg.port)
            # Sent to the pool's own (missing) socket, the cancel would be lost and the
            # query would run its 30 s.
            cancel_midway(conn, 30)
            assert conn.execute("select 1").fetchone() == (1,)
        assert "could not forward cancel" not in proc.log_text()
    finally:
        api.close()


def test_without_an_answer_from_patroni_clients_get_the_reason_and_a_reload_fixes_it(
    pg: ExamplePostgres, pooler: PoolerFactory, local_dir: Path, refused_port: Callable[[], int]
) -> None:
    down = f"http://127.0.0.1:{refused_port()}"
    proc, web = start(pg, pooler, local_dir, [down], general={"query_wait_timeout": 1500})
    with pytest.raises(psycopg.OperationalError, match="Patroni API could not be asked"):
        connect(proc, pg)
    assert f"Patroni API unavailable: {down}:" in proc.log_text()
    families = scrape(web)
    errors = families["pg_doorman_patroni_api_errors"]
    assert value(errors, "pg_doorman_patroni_api_errors_total", pool="example_db") >= 1
    # The admin console still answers, and shows the pool in fallback.
    rows = admin_rows(proc, "POOLS")
    assert {r["fallback_active"] for r in rows if r["user"] == pg.md5_user.name} == {"1"}

    # A reload points the pool at a Patroni API that answers: the next login gets in.
    api = PatroniApi([member("node2", "replica", pg.port)])
    try:
        config = proc.config
        config["pools"]["example_db"]["patroni_api_urls"] = [down, api.url]
        proc.reload_and_wait(config)
        with connect(proc, pg) as conn:
            assert server_address(conn) == ("127.0.0.1", pg.port)
    finally:
        api.close()

    # Without patroni_api_urls the pool does not fall back any more.
    del config["pools"]["example_db"]["patroni_api_urls"]
    proc.reload_and_wait(config)
    assert {r["fallback_active"] for r in admin_rows(proc, "POOLS")} == {"0"}
