"""TLS from the pooler to PostgreSQL: server_tls_mode from disable to verify-full, client
certificates, per-pool settings, cancel over TLS, reload, unusable files, a server that
answers SSLRequest wrongly, and the counters that report server TLS.

The embedded PostgreSQL has no SSL support, so these tests run a second cluster from
Debian's packaged server (/usr/lib/postgresql/<major>/bin).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, show_table
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess, deep_merge
from pg_doorman.app.embedded_pg import LocalPostgres, free_port, quote_ident

SSL_PG_BIN_ENV = "PG_DOORMAN_TEST_SSL_PG_BIN"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")

TLS_DB = "tls_db"
TLS_OWNER = "tls_owner"
PASSWORD = "secret"
TLS_ONLY = "tls_only"  # pg_hba: hostssl only
PLAIN_OK = "plain_ok"  # pg_hba: host, with or without TLS
MTLS_USER = "mtls_user"  # pg_hba: hostssl with clientcert=verify-full
USERS = (TLS_ONLY, PLAIN_OK, MTLS_USER)

SSL_QUERY = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@dataclass(frozen=True)
class ServerTlsCerts:
    ca: Path  # signs the server certificate (localhost only) and the client certificate
    other_ca: Path  # signs nothing PostgreSQL uses
    client_cert: Path  # CN = mtls_user
    client_key: Path


@dataclass(frozen=True)
class SslPostgres:
    server: LocalPostgres
    certs: ServerTlsCerts

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port


def ssl_pg_bin() -> Path | None:
    """PG_DOORMAN_TEST_SSL_PG_BIN, else the newest Debian server with a `postgres` binary."""
    override = os.environ.get(SSL_PG_BIN_ENV)
    if override:
        bin_dir = Path(override).expanduser()
        if not (bin_dir / "postgres").is_file():
            pytest.fail(f"{SSL_PG_BIN_ENV}={override} has no `postgres` binary", pytrace=False)
        return bin_dir
    found: list[tuple[int, Path]] = []
    for bin_dir in DEBIAN_PG_ROOT.glob("*/bin"):
        major = bin_dir.parent.name
        if major.isdigit() and (bin_dir / "postgres").is_file():
            found.append((int(major), bin_dir))
    return max(found)[1] if found else None


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def ssl_hba_lines() -> list[str]:
    lines = ["local all all trust"]
    for cidr in ("127.0.0.1/32", "::1/128"):
        lines += [
            f"host all postgres {cidr} trust",
            f"hostssl all {TLS_ONLY} {cidr} scram-sha-256",
            f"hostnossl all {TLS_ONLY} {cidr} reject",
            f"host all {PLAIN_OK} {cidr} scram-sha-256",
            f"hostssl all {MTLS_USER} {cidr} scram-sha-256 clientcert=verify-full",
        ]
    return lines


def write_certs(root: Path) -> tuple[ServerTlsCerts, dict[str, trustme.Blob]]:
    """The pooler's files under `root`, and what PostgreSQL needs, by file name."""
    root.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("mtls-client.example", common_name=MTLS_USER)
    files = ServerTlsCerts(
        ca=root / "ca.pem",
        other_ca=root / "other_ca.pem",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    files.client_key.chmod(0o600)
    for_postgres = {
        "server.crt": server.cert_chain_pems[0],
        "server.key": server.private_key_pem,
        "root.crt": ca.cert_pem,
    }
    return files, for_postgres


@pytest.fixture(scope="module")
def ssl_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SslPostgres]:
    """A PostgreSQL with ssl = on, the users above (password "secret") and `tls_db`."""
    bin_dir = ssl_pg_bin()
    if bin_dir is None:
        reason = f"no SSL-capable PostgreSQL under {DEBIAN_PG_ROOT} (set {SSL_PG_BIN_ENV})"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("server_tls")
    certs, for_postgres = write_certs(root / "certs")
    server = LocalPostgres(
        root / "data",
        port=free_port(),
        bin_dir=bin_dir,
        hba_lines=ssl_hba_lines(),
        settings={
            "listen_addresses": "127.0.0.1,::1" if ipv6_loopback() else "127.0.0.1",
            "ssl": "on",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "ssl_ca_file": "root.crt",
        },
    )
    try:
        server.init()
        # PostgreSQL wants its key owned by the user it runs as, and private.
        owner = server.datadir.stat()
        for name, blob in for_postgres.items():
            path = server.datadir / name
            blob.write_to_path(str(path))
            path.chmod(0o600)
            os.chown(path, owner.st_uid, owner.st_gid)
        server.start()
        server.create_role(TLS_OWNER, login=False)
        for user in USERS:
            server.create_role(user, password=PASSWORD)
        server.create_database(TLS_DB, owner=TLS_OWNER)
        members = ", ".join(quote_ident(u) for u in USERS)
        server.psql(f"GRANT {quote_ident(TLS_OWNER)} TO {members};")
    except BaseException:
        server.cleanup()
        raise
    try:
        yield SslPostgres(server, certs)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# --- the pooler in front of it ---------------------------------------------------------------


def user_entry(user: str) -> dict[str, Any]:
    """Clients log in with md5; the pooler logs in to PostgreSQL with the plaintext."""
    return {
        "username": user,
        "password": w.md5_password_hash(PASSWORD, user),
        "server_username": user,
        "server_password": PASSWORD,
        "pool_size": 2,
    }


def tls_pool(ssl_pg: SslPostgres, **settings: Any) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "server_host": ssl_pg.host,
        "server_port": ssl_pg.port,
        "pool_mode": "transaction",
        "users": [user_entry(u) for u in USERS],
    }
    pool.update(settings)
    return pool


def start_pooler(
    pooler: PoolerFactory,
    ssl_pg: SslPostgres,
    *,
    general: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    **sections: Any,
) -> PoolerProcess:
    """A pooler with the pool `tls_db` in front of the SSL cluster (and example_db)."""
    return pooler(
        general=general or {}, pools={TLS_DB: tls_pool(ssl_pg, **(pool or {}))}, **sections
    )


def connect(proc: PoolerProcess, user: str, database: str = TLS_DB) -> psycopg.Connection[Any]:
    return psycopg.connect(proc.dsn(user, PASSWORD, database), autocommit=True, connect_timeout=20)


def backend_ssl(proc: PoolerProcess, user: str) -> bool:
    """Whether the PostgreSQL backend serving this user's client runs TLS."""
    with connect(proc, user) as conn:
        row = conn.execute(SSL_QUERY).fetchone()
    assert row is not None
    return bool(row[0])


def backend_login_error(
    proc: PoolerProcess, user: str, password: str = PASSWORD, database: str = TLS_DB
) -> w.ServerError:
    """The ErrorResponse a client gets when the pooler cannot log in to PostgreSQL for it,
    whether at the client's login or at its first query."""
    with pytest.raises(w.ServerError) as info:
        conn = w.PgWire.connect(proc.host, proc.port, user, database, password, timeout=30)
        try:
            conn.execute_query("select 1")
        finally:
            conn.close()
    return info.value


def pool_servers(proc: PoolerProcess, user: str, database: str = TLS_DB) -> list[dict[str, Any]]:
    """SHOW SERVERS' rows of one pool."""
    console = admin_console(proc)
    try:
        rows = show_table(console, "SERVERS")
    finally:
        console.close()
    return [r for r in rows if r["database_name"] == database and r["user"] == user]


def web_section() -> tuple[dict[str, Any], int]:
    port = free_port()
    return {"enabled": True, "host": "127.0.0.1", "port": port}, port


# --- the cluster itself ------------------------------------------------------------------------


def test_ssl_cluster_enforces_its_hba_rules(ssl_pg: SslPostgres) -> None:
    """The rules the pooler tests rely on hold when libpq connects directly."""
    dsn = ssl_pg.server.dsn(TLS_ONLY, PASSWORD, TLS_DB)
    with psycopg.connect(dsn.replace("sslmode=disable", "sslmode=require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf"):
        psycopg.connect(dsn, connect_timeout=10)


# --- modes -----------------------------------------------------------------------------------


def test_require_runs_the_backend_over_tls(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    web, port = web_section()
    proc = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "require"}, web=web)
    assert backend_ssl(proc, TLS_ONLY)
    rows = pool_servers(proc, TLS_ONLY)
    assert rows and all(r["tls"] == "true" for r in rows), rows
    samples = [s for family in scrape(port).values() for s in family]
    mine = {"pool": TLS_DB}
    assert value(samples, "pg_doorman_server_tls_connections", **mine) >= 1
    handshakes = "pg_doorman_server_tls_handshake_duration_seconds"
    assert value(samples, f"{handshakes}_count", **mine) >= 1
    assert value(samples, f"{handshakes}_sum", **mine) > 0
    assert value(samples, "pg_doorman_server_tls_handshake_errors_total", **mine) == 0


def test_disable_sends_a_plain_login_that_hostssl_refuses(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    proc = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "disable"})
    error = backend_login_error(proc, TLS_ONLY)
    assert error.sqlstate == "28000"
    assert "pg_hba" in error.message
    assert not backend_ssl(proc, PLAIN_OK)
    assert [r["tls"] for r in pool_servers(proc, PLAIN_OK)] == ["false"]


def test_allow_retries_over_tls_after_a_pg_hba_refusal(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    """allow is the default: plain first, TLS only when PostgreSQL says 28000."""
    proc = start_pooler(pooler, ssl_pg)
    assert backend_ssl(proc, TLS_ONLY)
    assert not backend_ssl(proc, PLAIN_OK)
    assert [r["tls"] for r in pool_servers(proc, TLS_ONLY)] == ["true"]
    assert [r["tls"] for r in pool_servers(proc, PLAIN_OK)] == ["false"]


def test_prefer_uses_tls_when_the_server_offers_it(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    proc = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "prefer"})
    assert backend_ssl(proc, PLAIN_OK)


def test_require_refuses_a_server_without_tls(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={EXAMPLE_DB: {"server_tls_mode": "require"}})
    user = pg.md5_user
    error = backend_login_error(proc, user.name, user.password, EXAMPLE_DB)
    assert "does not support TLS" in error.message


def test_prefer_falls_back_to_plain_without_tls(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler(pools={EXAMPLE_DB: {"server_tls_mode": "prefer"}})
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select count(*) from items").fetchone() == (100,)
    assert [r["tls"] for r in pool_servers(proc, user.name, EXAMPLE_DB)] == ["false"]


def test_unix_socket_backends_never_use_tls(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    """Even require stays plain on a Unix socket, as libpq does."""
    proc = start_pooler(
        pooler,
        ssl_pg,
        pool={"server_host": str(ssl_pg.server.socket_dir), "server_tls_mode": "require"},
    )
    assert not backend_ssl(proc, PLAIN_OK)
    assert [r["tls"] for r in pool_servers(proc, PLAIN_OK)] == ["false"]


# --- certificate checks ------------------------------------------------------------------------


def test_verify_full_accepts_the_name_in_the_certificate(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    general = {"server_tls_mode": "verify-full", "server_tls_ca_cert": str(ssl_pg.certs.ca)}
    proc = start_pooler(pooler, ssl_pg, general=general, pool={"server_host": "localhost"})
    assert backend_ssl(proc, TLS_ONLY)


def test_verify_full_refuses_a_host_name_the_certificate_lacks(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    """The certificate names localhost only; the pool connects to 127.0.0.1."""
    general = {"server_tls_mode": "verify-full", "server_tls_ca_cert": str(ssl_pg.certs.ca)}
    proc = start_pooler(pooler, ssl_pg, general=general)
    error = backend_login_error(proc, TLS_ONLY)
    assert "certificate verify failed" in error.message


def test_verify_ca_ignores_the_host_name(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    general = {"server_tls_mode": "verify-ca", "server_tls_ca_cert": str(ssl_pg.certs.ca)}
    proc = start_pooler(pooler, ssl_pg, general=general)
    assert backend_ssl(proc, TLS_ONLY)


def test_verify_ca_refuses_a_certificate_from_another_ca(
    pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    web, port = web_section()
    general = {"server_tls_mode": "verify-ca", "server_tls_ca_cert": str(ssl_pg.certs.other_ca)}
    proc = start_pooler(pooler, ssl_pg, general=general, web=web)
    error = backend_login_error(proc, TLS_ONLY)
    assert "certificate verify failed" in error.message
    errors = value(
        scrape(port)["pg_doorman_server_tls_handshake_errors"],
        "pg_doorman_server_tls_handshake_errors_total",
        pool=TLS_DB,
    )
    assert errors >= 1


def test_client_certificate_for_mutual_tls(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    certs = ssl_pg.certs
    with_cert = start_pooler(
        pooler,
        ssl_pg,
        general={
            "server_tls_mode": "require",
            "server_tls_certificate": str(certs.client_cert),
            "server_tls_private_key": str(certs.client_key),
        },
    )
    with connect(with_cert, MTLS_USER) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)
        assert conn.execute("select current_user").fetchone() == (MTLS_USER,)
    without_cert = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "require"})
    backend_login_error(without_cert, MTLS_USER)


def test_pool_setting_overrides_general(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    proc = start_pooler(
        pooler,
        ssl_pg,
        general={"server_tls_mode": "disable"},
        pool={"server_tls_mode": "require"},
    )
    assert backend_ssl(proc, PLAIN_OK)


# --- cancel and reload ---------------------------------------------------------------------


def test_cancel_reaches_a_tls_backend(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    """A cancel for a client served by a TLS backend still reaches PostgreSQL (the pooler
    sends it inside TLS too)."""
    proc = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "require"})
    outcome: list[BaseException | None] = []
    with connect(proc, TLS_ONLY) as conn:
        assert conn.execute(SSL_QUERY).fetchone() == (True,)

        def sleep() -> None:
            try:
                conn.execute("select pg_sleep(10)")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=sleep)
        thread.start()
        # Cancel only once the query runs on PostgreSQL.
        with psycopg.connect(ssl_pg.server.dsn(), autocommit=True) as direct:
            deadline = time.monotonic() + 10
            while direct.execute(
                "select count(*) from pg_stat_activity"
                " where query = 'select pg_sleep(10)' and state = 'active'"
            ).fetchone() != (1,):
                assert time.monotonic() < deadline, "the query did not start"
                time.sleep(0.05)
        started = time.monotonic()
        conn.cancel()
        thread.join(15)
        assert not thread.is_alive()
        assert time.monotonic() - started < 5
        assert len(outcome) == 1
        assert isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        assert conn.execute("select 1").fetchone() == (1,)


def test_reload_switches_new_servers_to_tls(pooler: PoolerFactory, ssl_pg: SslPostgres) -> None:
    proc = start_pooler(pooler, ssl_pg, general={"server_tls_mode": "disable"})
    assert not backend_ssl(proc, PLAIN_OK)
    proc.reload(deep_merge(proc.config, {"general": {"server_tls_mode": "require"}}))
    proc.wait_for_log("configuration reloaded")
    deadline = time.monotonic() + 10
    while not backend_ssl(proc, PLAIN_OK):
        assert time.monotonic() < deadline, "no TLS server after the reload"
        time.sleep(0.2)
    while (tls := [r["tls"] for r in pool_servers(proc, PLAIN_OK)]) != ["true"] * len(tls):
        assert time.monotonic() < deadline, f"plain servers kept after the reload: {tls}"
        time.sleep(0.2)


# --- unusable files and broken servers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "settings", "key"),
    [
        (
            "general",
            {"server_tls_mode": "verify-ca", "server_tls_ca_cert": "/nonexistent/ca.pem"},
            "general.server_tls_ca_cert",
        ),
        (
            "pool",
            {"server_tls_mode": "verify-ca", "server_tls_ca_cert": "/nonexistent/ca.pem"},
            f"pools.{TLS_DB}.server_tls_ca_cert",
        ),
        (
            "general",
            {
                "server_tls_mode": "require",
                "server_tls_certificate": "/nonexistent/client.pem",
                "server_tls_private_key": "/nonexistent/client.key",
            },
            "general.server_tls_certificate",
        ),
    ],
)
def test_unusable_server_tls_files_are_config_errors(
    pooler: PoolerFactory, ssl_pg: SslPostgres, where: str, settings: dict[str, str], key: str
) -> None:
    general = settings if where == "general" else {}
    pool = settings if where == "pool" else {}
    proc = pooler(general=general, pools={TLS_DB: tls_pool(ssl_pg, **pool)}, start=False)
    proc.spawn()
    assert proc.wait_exit(20) == 2
    assert key in proc.log_text()


@contextlib.contextmanager
def wrong_ssl_answer(reply: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server that answers the first 8 bytes of each connection with `reply`; its
    port and the requests it read."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    requests: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with sock:
                sock.settimeout(5)
                try:
                    request = b""
                    while len(request) < 8 and (chunk := sock.recv(8 - len(request))):
                        request += chunk
                    requests.append(request)
                    sock.sendall(reply)
                    while sock.recv(4096):  # until the pooler hangs up
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], requests
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def test_bytes_after_the_ssl_answer_are_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, ssl_pg: SslPostgres
) -> None:
    """Bytes sent before the handshake did not come through TLS: a man in the middle may
    have injected them (CVE-2021-23222)."""
    with wrong_ssl_answer(b"Sgarbage") as (port, requests):
        proc = start_pooler(
            pooler,
            ssl_pg,
            pool={"server_host": "127.0.0.1", "server_port": port, "server_tls_mode": "require"},
        )
        error = backend_login_error(proc, PLAIN_OK)
        assert "after its answer to SSLRequest" in error.message
        assert requests and requests[0] == w.ssl_request()
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select count(*) from items").fetchone() == (100,)
