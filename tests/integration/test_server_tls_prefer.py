"""server_tls_mode = "prefer" falls back to plain text the way libpq's sslmode=prefer
does: after a TLS handshake that fails, and after PostgreSQL refuses the login over TLS
(a `hostssl ... reject` rule). `require` fails in both cases.

Runs its own SSL cluster from Debian's packaged server, like test_server_tls.py, so that
its SSL settings and pg_hba rules can differ.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_server_tls import (
    DEBIAN_PG_ROOT,
    PASSWORD,
    SSL_PG_BIN_ENV,
    SSL_QUERY,
    backend_login_error,
    pool_servers,
    ssl_pg_bin,
    user_entry,
    web_section,
    write_certs,
)

from helpers import pgwire as w
from helpers.fake_backend import LOGIN_OK, ONE_ROW, FakeBackend, read_message, read_startup
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import LocalPostgres, free_port, quote_ident

DB = "prefer_db"
EITHER = "either_user"  # pg_hba: plain or TLS
PLAIN_ONLY = "plain_only"  # pg_hba: TLS rejected, plain accepted
USERS = (EITHER, PLAIN_ONLY)
FALLBACK_LOG = "server_tls_mode prefer: connecting again without TLS"
SSL_REQUEST_CODE = 80877103


@pytest.fixture(scope="module")
def prefer_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL with ssl = on, `prefer_db`, and the users above (password "secret")."""
    bin_dir = ssl_pg_bin()
    if bin_dir is None:
        reason = f"no SSL-capable PostgreSQL under {DEBIAN_PG_ROOT} (set {SSL_PG_BIN_ENV})"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    # Not under pytest's base temp directory: a pytest starting meanwhile takes the
    # others' bits off its parent, and the server reading its config files again at a
    # reload (as its own unprivileged user, by absolute path) would be refused.
    root = Path(tempfile.mkdtemp(prefix="pg_doorman-prefer-tls-"))
    try:
        _, for_postgres = write_certs(root / "certs")
        cidr = "127.0.0.1/32"
        server = LocalPostgres(
            root / "data",
            port=free_port(),
            bin_dir=bin_dir,
            hba_lines=[
                "local all all trust",
                f"host all postgres {cidr} trust",
                f"hostssl all {PLAIN_ONLY} {cidr} reject",
                f"host all all {cidr} scram-sha-256",
            ],
            settings={
                "listen_addresses": "127.0.0.1",
                "ssl": "on",
                "ssl_cert_file": "server.crt",
                "ssl_key_file": "server.key",
            },
        )
        try:
            server.init()
            owner = server.datadir.stat()
            for name in ("server.crt", "server.key"):
                path = server.datadir / name
                for_postgres[name].write_to_path(str(path))
                path.chmod(0o600)
                os.chown(path, owner.st_uid, owner.st_gid)
            server.start()
            for user in USERS:
                server.create_role(user, password=PASSWORD)
            server.create_database(DB)
            server.psql(f"GRANT ALL ON DATABASE {quote_ident(DB)} TO {', '.join(USERS)};")
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def handshake_fails(prefer_pg: LocalPostgres) -> Iterator[LocalPostgres]:
    """The cluster still answers S to SSLRequest, but speaks only TLS 1.0 and 1.1, which
    the pooler (TLS 1.2 or later) does not: every handshake fails with an alert."""
    prefer_pg.psql(
        "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1';\n"
        "ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.1';\n"
    )
    prefer_pg.reload()
    try:
        yield prefer_pg
    finally:
        prefer_pg.psql(
            "ALTER SYSTEM RESET ssl_min_protocol_version;\n"
            "ALTER SYSTEM RESET ssl_max_protocol_version;\n"
        )
        prefer_pg.reload()


def libpq_connect(server: LocalPostgres, user: str, sslmode: str) -> psycopg.Connection[Any]:
    dsn = server.dsn(user, PASSWORD, DB).replace("sslmode=disable", f"sslmode={sslmode}")
    return psycopg.connect(dsn, autocommit=True, connect_timeout=20)


def start(
    pooler: PoolerFactory, server: LocalPostgres, mode: str, web: dict[str, Any]
) -> PoolerProcess:
    pool = {
        "server_host": server.host,
        "server_port": server.port,
        "pool_mode": "transaction",
        "server_tls_mode": mode,
        "users": [user_entry(u) for u in USERS],
    }
    return pooler(pools={DB: pool}, web=web)


def handshake_errors(port: int) -> float:
    """The pool's failed TLS handshakes (labelled by pool, all its users together)."""
    return value(
        scrape(port)["pg_doorman_server_tls_handshake_errors"],
        "pg_doorman_server_tls_handshake_errors_total",
        pool=DB,
    )


def test_prefer_logs_in_in_plain_when_the_tls_handshake_fails(
    pooler: PoolerFactory, handshake_fails: LocalPostgres
) -> None:
    server = handshake_fails
    # libpq itself, on the same server: prefer falls back to plain, require fails.
    with libpq_connect(server, EITHER, "prefer") as direct:
        assert not direct.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="SSL error"):
        libpq_connect(server, EITHER, "require")

    web, port = web_section()
    proc = start(pooler, server, "prefer", web)
    with psycopg.connect(proc.dsn(EITHER, PASSWORD, DB), autocommit=True) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (False,)
        assert conn.execute("select current_user").fetchone() == (EITHER,)
    assert [r["tls"] for r in pool_servers(proc, EITHER, DB)] == ["false"]
    # Each failed handshake counts, and logs one warning with its reason.
    failed = f"TLS handshake with server {server.host}:{server.port} failed: "
    warnings = [line for line in proc.log_text().splitlines() if FALLBACK_LOG in line]
    assert warnings and all("WARNING" in line and failed in line for line in warnings), warnings
    assert handshake_errors(port) == len(warnings)

    web, port = web_section()
    strict = start(pooler, server, "require", web)
    error = backend_login_error(strict, EITHER, database=DB)
    assert error.sqlstate == "08006", error.fields
    assert error.message.startswith(failed), error.message
    assert handshake_errors(port) >= 1
    assert pool_servers(strict, EITHER, DB) == []
    assert FALLBACK_LOG not in strict.log_text()


def test_prefer_logs_in_in_plain_when_postgresql_refuses_tls_logins(
    pooler: PoolerFactory, prefer_pg: LocalPostgres
) -> None:
    """A `hostssl ... reject` rule refuses the TLS login with 28000; libpq's prefer then
    tries plain text on a new connection, and so does the pooler."""
    with libpq_connect(prefer_pg, PLAIN_ONLY, "prefer") as direct:
        assert not direct.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="pg_hba"):
        libpq_connect(prefer_pg, PLAIN_ONLY, "require")

    web, port = web_section()
    proc = start(pooler, prefer_pg, "prefer", web)
    with psycopg.connect(proc.dsn(PLAIN_ONLY, PASSWORD, DB), autocommit=True) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (False,)
    with psycopg.connect(proc.dsn(EITHER, PASSWORD, DB), autocommit=True) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
    assert [r["tls"] for r in pool_servers(proc, PLAIN_ONLY, DB)] == ["false"]
    assert [r["tls"] for r in pool_servers(proc, EITHER, DB)] == ["true"]
    # The handshake succeeded; only the login was refused.
    assert handshake_errors(port) == 0

    strict = start(pooler, prefer_pg, "require", web_section()[0])
    error = backend_login_error(strict, PLAIN_ONLY, database=DB)
    assert error.sqlstate == "28000"
    assert "pg_hba" in error.message


class DropsTlsServesPlain(FakeBackend):
    """Answers S to SSLRequest, then hangs up (at once, or after reading the
    ClientHello); lets a plain startup in and answers its queries. Records each
    connection's kind in order."""

    def __init__(self, read_hello: bool) -> None:
        self.read_hello = read_hello
        self.kinds: list[str] = []
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        body = read_startup(sock)
        if body[:4] == struct.pack("!i", SSL_REQUEST_CODE):
            self.kinds.append("ssl")
            sock.sendall(b"S")
            if self.read_hello:
                sock.recv(65536)
            return
        self.kinds.append("plain")
        sock.sendall(LOGIN_OK)
        while (msg_type := read_message(sock)[0]) != b"X":
            assert msg_type == b"Q", msg_type
            sock.sendall(ONE_ROW)


def tls_stand_in_pool(port: int, mode: str) -> dict[str, Any]:
    return {
        DB: {
            "server_host": "127.0.0.1",
            "server_port": port,
            "server_tls_mode": mode,
            "users": [user_entry(EITHER)],
        }
    }


@pytest.mark.parametrize("read_hello", [False, True], ids=["at-once", "after-hello"])
def test_prefer_logs_in_in_plain_when_the_server_hangs_up_in_the_handshake(
    pooler: PoolerFactory, read_hello: bool
) -> None:
    backend = DropsTlsServesPlain(read_hello)
    try:
        web, port = web_section()
        proc = pooler(pools=tls_stand_in_pool(backend.port, "prefer"), web=web)
        conn = w.PgWire.connect(proc.host, proc.port, EITHER, DB, PASSWORD, timeout=10)
        try:
            assert conn.execute_query("select 1") == [("1",)]
        finally:
            conn.close()
        assert backend.kinds == ["ssl", "plain"]
        assert handshake_errors(port) == 1
        assert proc.log_text().count(FALLBACK_LOG) == 1

        strict = pooler(pools=tls_stand_in_pool(backend.port, "require"))
        error = backend_login_error(strict, EITHER, database=DB)
        assert error.sqlstate == "08006", error.fields
        prefix = f"TLS handshake with server 127.0.0.1:{backend.port} failed: "
        assert error.message.startswith(prefix), error.message
        assert error.message.removeprefix(prefix).strip(), "no reason given"
        # Every attempt of require's stayed a TLS one: none went on in plain text.
        retried = backend.kinds[2:]
        assert retried and set(retried) == {"ssl"}, backend.kinds
    finally:
        backend.close()
