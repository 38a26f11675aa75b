"""TLS with clients: SSLRequest, tls_mode, hostssl rules, client certificates, cancel
over TLS, failed handshakes, and the counters that report TLS connections."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.dbapi
import psycopg
import psycopg2
import pytest
import trustme

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess, deep_merge


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example", common_name="example_user_md5")
    files = Certs(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.server_key))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    for key in (files.server_key, files.client_key):
        key.chmod(0o600)  # libpq refuses a key others can read
    return files


def tls_general(certs: Certs, **extra: Any) -> dict[str, Any]:
    general: dict[str, Any] = {
        "tls_certificate": str(certs.server_cert),
        "tls_private_key": str(certs.server_key),
    }
    general.update(extra)
    return general


def tls_dsn(proc: PoolerProcess, user: str, password: str, certs: Certs, **params: str) -> str:
    """A libpq DSN that verifies the pooler's certificate against the test CA."""
    options = {"sslmode": "verify-full", "sslrootcert": str(certs.ca), **params}
    extra = " ".join(f"{k}={v}" for k, v in options.items())
    return (
        f"host={proc.host} port={proc.port} dbname=example_db user={user} "
        f"password={password} {extra}"
    )


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def clients_row(proc: PoolerProcess, user: str) -> dict[str, str | None]:
    return next(r for r in admin_rows(proc, "CLIENTS") if r["user"] == user)


def connections_row(proc: PoolerProcess) -> dict[str, str | None]:
    return admin_rows(proc, "CONNECTIONS")[0]


def non_admin_clients(proc: PoolerProcess) -> list[dict[str, str | None]]:
    return [r for r in admin_rows(proc, "CLIENTS") if r["user"] != "admin"]


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_psycopg_logs_in_over_verified_tls(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs, kind: str
) -> None:
    proc = pooler(general=tls_general(certs))
    user = pg.md5_user if kind == "md5" else pg.scram_user
    before = connections_row(proc)
    with psycopg.connect(tls_dsn(proc, user.name, user.password, certs), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select sum(id) from items").fetchone() == (5050,)
        assert clients_row(proc, user.name)["tls"] == "true"
    after = connections_row(proc)
    assert int(after["tls"] or 0) - int(before["tls"] or 0) == 1
    # The two admin console logins since `before` were plain.
    assert int(after["plain"] or 0) - int(before["plain"] or 0) == 2


def test_plain_clients_still_served_when_tls_is_offered(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs))
    user = pg.md5_user
    with psycopg.connect(
        proc.dsn(user.name, user.password), sslmode="disable", autocommit=True
    ) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
        assert clients_row(proc, user.name)["tls"] == "false"


def test_asyncpg_over_tls(pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs) -> None:
    proc = pooler(general=tls_general(certs))
    user = pg.scram_user

    async def main() -> None:
        conn = await asyncpg.connect(
            host=proc.host,
            port=proc.port,
            user=user.name,
            password=user.password,
            database="example_db",
            ssl=client_context(certs),
        )
        try:
            assert await conn.fetchval("select count(*) from items where id > $1", 90) == 10
        finally:
            await conn.close()

    asyncio.run(main())


def test_psycopg2_and_pg8000_over_tls(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs, tls_mode="require"))
    user = pg.scram_user
    conn2 = psycopg2.connect(tls_dsn(proc, user.name, user.password, certs))
    try:
        cur = conn2.cursor()
        cur.execute("select count(*) from items")
        assert cur.fetchone() == (100,)
    finally:
        conn2.close()
    conn8 = pg8000.dbapi.connect(
        user=user.name,
        password=user.password,
        host=proc.host,
        port=proc.port,
        database="example_db",
        ssl_context=client_context(certs),
    )
    try:
        cur8 = conn8.cursor()
        cur8.execute("select max(id) from items")
        assert cur8.fetchone() == [100]
    finally:
        conn8.close()


def test_without_a_certificate_ssl_is_refused(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    conn = w.PgWire(proc.host, proc.port)
    try:
        assert conn.start_tls(ssl.create_default_context()) == b"N"
        conn.startup(pg.md5_user.name, "example_db", pg.md5_user.password)
        assert conn.status == "I"
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_tls_mode_refuses_plain_logins(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs, mode: str
) -> None:
    general = tls_general(certs, tls_mode=mode)
    if mode == "verify-full":
        general["tls_ca_cert"] = str(certs.ca)
    proc = pooler(general=general)
    user = pg.md5_user
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    assert info.value.sqlstate == "28000"
    assert "Connection without SSL is not allowed by tls_mode." in str(info.value)
    params = {}
    if mode == "verify-full":
        params = {"sslcert": str(certs.client_cert), "sslkey": str(certs.client_key)}
    dsn = tls_dsn(proc, user.name, user.password, certs, **params)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_verify_full_requires_a_client_certificate_from_the_ca(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs, tmp_path: Path
) -> None:
    general = tls_general(certs, tls_mode="verify-full", tls_ca_cert=str(certs.ca))
    proc = pooler(general=general)
    user = pg.md5_user
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(tls_dsn(proc, user.name, user.password, certs), connect_timeout=10)
    # A certificate from another CA is refused too.
    stranger = trustme.CA().issue_cert("client.example", common_name="example_user_md5")
    stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "stranger.pem"))
    stranger.private_key_pem.write_to_path(str(tmp_path / "stranger.key"))
    (tmp_path / "stranger.key").chmod(0o600)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            tls_dsn(
                proc,
                user.name,
                user.password,
                certs,
                sslcert=str(tmp_path / "stranger.pem"),
                sslkey=str(tmp_path / "stranger.key"),
            ),
            connect_timeout=10,
        )
    dsn = tls_dsn(
        proc,
        user.name,
        user.password,
        certs,
        sslcert=str(certs.client_cert),
        sslkey=str(certs.client_key),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user.name,)
    assert "TLS handshake failed" in proc.log_text()


def test_hostssl_and_hostnossl_rules_see_the_tls_state(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    hba = (
        "hostnossl all example_user_md5 127.0.0.1/32 reject\n"
        "hostssl all all 127.0.0.1/32 md5\n"
        "host all admin 127.0.0.1/32 md5\n"
    )
    proc = pooler(general=tls_general(certs, pg_hba=hba))
    user = pg.md5_user
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    assert info.value.sqlstate == "28000"
    other = pg.scram_user  # no hostnossl line for it: no rule matches a plain login
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, other.name, "example_db", other.password)
    assert info.value.sqlstate == "28000"
    for who in (user, other):
        with psycopg.connect(tls_dsn(proc, who.name, who.password, certs), autocommit=True) as conn:
            assert conn.execute("select current_user").fetchone() == (who.name,)


def test_unix_socket_answers_ssl_request_with_n(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as sockdir:
        general = tls_general(
            certs,
            unix_socket_dir=sockdir,
            pg_hba="local all all md5\nhost all all 127.0.0.1/32 md5\n",
        )
        proc = pooler(general=general)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(f"{sockdir}/.s.PGSQL.{proc.port}")
            sock.sendall(w.ssl_request())
            assert sock.recv(1) == b"N"
        # libpq over the socket with sslmode=prefer falls back to a plain session.
        user = pg.md5_user
        dsn = f"host={sockdir} port={proc.port} dbname=example_db user={user.name}"
        with psycopg.connect(dsn, password=user.password, sslmode="prefer") as conn:
            assert not conn.pgconn.ssl_in_use
            assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_request_inside_tls(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs))
    user = pg.md5_user
    context = client_context(certs)
    conn = w.PgWire(proc.host, proc.port)
    try:
        assert conn.start_tls(context, "127.0.0.1") == b"S"
        conn.startup(user.name, "example_db", user.password)
        assert conn.backend_pid is not None and conn.secret_key is not None
        conn.send_raw(w.query("select pg_sleep(30)"))
        time.sleep(0.3)  # the query has reached PostgreSQL
        canceller = w.PgWire(proc.host, proc.port)
        try:
            assert canceller.start_tls(context, "127.0.0.1") == b"S"
            canceller.send_raw(w.cancel_request(conn.backend_pid, conn.secret_key))
            with pytest.raises((w.ConnectionClosed, ConnectionError, ssl.SSLError)):
                canceller.read_message()
        finally:
            canceller.close_socket()
        got = conn.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "57014"
    finally:
        conn.close()
    connections = connections_row(proc)
    assert (connections["tls"], connections["cancel"]) == ("1", "1")


def test_a_failed_or_abandoned_handshake_leaves_the_pooler_serving(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs))
    # Garbage where the TLS hello belongs.
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
        sock.sendall(b"this is not a TLS record\r\n" * 4)
        # The pooler closes it (after a TLS alert, if any): reads end.
        deadline = time.monotonic() + 10
        while sock.recv(4096):
            assert time.monotonic() < deadline
    # A client that leaves right after the S.
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
    # A client that stops before its handshake, while others log in.
    stalled = socket.create_connection((proc.host, proc.port), timeout=10)
    stalled.sendall(w.ssl_request())
    assert stalled.recv(1) == b"S"
    user = pg.md5_user
    with psycopg.connect(tls_dsn(proc, user.name, user.password, certs), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    stalled.close()
    deadline = time.monotonic() + 10
    while rows := non_admin_clients(proc):
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert proc.log_text().count("TLS handshake failed") >= 2


def test_client_login_timeout_cuts_a_stalled_handshake(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs, client_login_timeout=500))
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the pooler, not by us
        assert time.monotonic() - started < 8
    # Nothing of that client is left behind.
    deadline = time.monotonic() + 5
    while non_admin_clients(proc):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert connections_row(proc)["errors"] == "1"


def test_tls_rate_limit_spaces_handshakes(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler(general=tls_general(certs, tls_rate_limit_per_second=100))
    context = client_context(certs)
    done: list[float] = []

    def handshake() -> None:
        with socket.create_connection((proc.host, proc.port), timeout=20) as sock:
            sock.sendall(w.ssl_request())
            assert sock.recv(1) == b"S"
            with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                done.append(time.monotonic())

    started = time.monotonic()
    threads = [threading.Thread(target=handshake) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(done) == 30
    # 100 a second, one at a time: the 30th cannot finish before 0.29 s.
    assert max(done) - started >= 0.29
    assert proc.log_text().count("delayed") >= 20
    user = pg.md5_user
    with psycopg.connect(tls_dsn(proc, user.name, user.password, certs), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_tls_with_two_workers(pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs) -> None:
    proc = pooler(general=tls_general(certs, workers=2))
    proc.wait_for_log("all 2 workers ready", timeout=30)
    user = pg.scram_user
    results: list[bool] = []

    def login() -> None:
        dsn = tls_dsn(proc, user.name, user.password, certs)
        with psycopg.connect(dsn, autocommit=True) as conn:
            results.append(bool(conn.pgconn.ssl_in_use))
            assert conn.execute("select 1").fetchone() == (1,)

    threads = [threading.Thread(target=login) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [True] * 4


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"tls_certificate": "/nonexistent/server.pem"}, "general.tls_certificate"),
        ({"tls_private_key": "WRONG"}, "general.tls_certificate"),
        ({"tls_mode": "verify-full", "tls_ca_cert": "/nonexistent/ca.pem"}, "general.tls_ca_cert"),
    ],
)
def test_unusable_tls_files_are_config_errors(
    pooler: PoolerFactory, certs: Certs, override: dict[str, str], key: str
) -> None:
    general = tls_general(certs, **override)
    if general["tls_private_key"] == "WRONG":
        general["tls_private_key"] = str(certs.client_key)  # not the certificate's key
    proc = pooler(general=general, start=False)
    proc.spawn()
    assert proc.wait_exit(20) == 2
    assert f"invalid configuration: {key}: cannot load" in proc.log_text()


# --- reload ----------------------------------------------------------------------------------


def issue_server_cert(root: Path) -> Path:
    """A new CA and a certificate for 127.0.0.1 from it, written to `root`
    (server.pem, server.key); returns the CA's file."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    root.mkdir(parents=True, exist_ok=True)
    server.private_key_pem.write_to_path(str(root / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    return root / "ca.pem"


def verified_dsn(proc: PoolerProcess, pg: ExamplePostgres, ca: Path) -> str:
    """A DSN that checks the pooler's certificate against the CA in `ca`."""
    user = pg.md5_user
    return (
        f"host={proc.host} port={proc.port} dbname=example_db user={user.name} "
        f"password={user.password} sslmode=verify-full sslrootcert={ca}"
    )


def tls_select(proc: PoolerProcess, pg: ExamplePostgres, ca: Path) -> int:
    with psycopg.connect(verified_dsn(proc, pg, ca), autocommit=True) as conn:
        row = conn.execute("select 1").fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_picks_up_a_renewed_certificate(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, workers: int
) -> None:
    """A certificate renewed at the same path is used for new connections after SIGHUP;
    a session already in TLS goes on; the reload says what changed."""
    files = tmp_path / "live"
    first_ca = issue_server_cert(files)
    general = {
        "tls_certificate": str(files / "server.pem"),
        "tls_private_key": str(files / "server.key"),
        "workers": workers,
    }
    proc = pooler(general=general)
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    assert tls_select(proc, pg, first_ca) == 1
    early = psycopg.connect(verified_dsn(proc, pg, first_ca), autocommit=True)
    try:
        renewed_ca = issue_server_cert(tmp_path / "renewed")
        for name in ("server.pem", "server.key"):
            (files / name).write_bytes((tmp_path / "renewed" / name).read_bytes())
        proc.reload()
        proc.wait_for_log("client TLS settings or files changed", timeout=10)
        if workers > 1:
            deadline = time.monotonic() + 10
            while proc.log_text().count("client TLS settings or files changed") < workers:
                assert time.monotonic() < deadline, "not every worker reloaded"
                time.sleep(0.1)
        for _ in range(3):  # with two workers, each one serves some of them
            assert tls_select(proc, pg, renewed_ca) == 1
            with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
                tls_select(proc, pg, first_ca)
        assert early.execute("select 2").fetchone() == (2,)
        assert early.pgconn.ssl_in_use
    finally:
        early.close()


def test_reload_with_an_unusable_certificate_keeps_the_running_one(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    files = tmp_path / "live"
    ca = issue_server_cert(files)
    general = {
        "tls_certificate": str(files / "server.pem"),
        "tls_private_key": str(files / "server.key"),
    }
    proc = pooler(general=general)
    (files / "server.pem").write_text("not a certificate\n")
    proc.reload()
    proc.wait_for_log("reload failed, the old configuration stays", timeout=10)
    assert "general.tls_certificate: cannot load the certificate" in proc.log_text()
    assert tls_select(proc, pg, ca) == 1


def test_reload_turns_tls_on_and_requires_it(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    """tls_certificate and tls_mode take effect at a reload: SSLRequest is answered S
    from then on, and tls_mode = require refuses plain logins that come after it."""
    proc = pooler()
    user = pg.md5_user
    plain = (
        f"host={proc.host} port={proc.port} dbname=example_db user={user.name} "
        f"password={user.password}"
    )
    with psycopg.connect(plain + " sslmode=prefer", autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
    proc.reload(deep_merge(proc.config, {"general": tls_general(certs)}))
    proc.wait_for_log("client TLS settings or files changed", timeout=10)
    assert tls_select(proc, pg, certs.ca) == 1
    config = {r["key"]: r for r in admin_rows(proc, "CONFIG")}
    assert config["general.tls_certificate"]["value"] == str(certs.server_cert)
    assert config["general.tls_certificate"]["changeable"] == "yes"
    with psycopg.connect(plain + " sslmode=disable", autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    proc.reload(deep_merge(proc.config, {"general": tls_general(certs, tls_mode="require")}))
    deadline = time.monotonic() + 10
    while proc.log_text().count("client TLS settings or files changed") < 2:
        assert time.monotonic() < deadline, "the second reload did not apply"
        time.sleep(0.1)
    with pytest.raises(psycopg.OperationalError, match="not allowed by tls_mode"):
        psycopg.connect(plain + " sslmode=disable")
    assert tls_select(proc, pg, certs.ca) == 1


# --- direct TLS ------------------------------------------------------------------------------


def client_hello(certs: Certs, *, alpn: bool = True) -> bytes:
    """The first bytes a direct-TLS client sends: its TLS hello, as a record."""
    context = client_context(certs)
    if alpn:
        context.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def closed_without_answer(proc: PoolerProcess, first: bytes) -> bool:
    """Send `first` on a new connection; True when the pooler hangs up without a byte."""
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(first)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_direct_tls_logins(pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs) -> None:
    """PostgreSQL 17's sslnegotiation=direct: TLS from the first byte, no SSLRequest;
    libpq and asyncpg, counted and listed as TLS sessions, hostssl rules apply."""
    hba = "host all admin 127.0.0.1/32 md5\nhostssl all all 127.0.0.1/32 md5\n"
    proc = pooler(general=tls_general(certs, pg_hba=hba))
    user = pg.md5_user
    dsn = tls_dsn(proc, user.name, user.password, certs, sslnegotiation="direct")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
        assert clients_row(proc, user.name)["tls"] == "true"

    async def with_asyncpg() -> int:
        context = client_context(certs)
        context.set_alpn_protocols(["postgresql"])  # asyncpg leaves a given context as it is
        conn = await asyncpg.connect(
            host=proc.host,
            port=proc.port,
            user=user.name,
            password=user.password,
            database="example_db",
            ssl=context,
            direct_tls=True,
        )
        try:
            return int(await conn.fetchval("select 2"))
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == 2
    assert connections_row(proc)["tls"] == "2"


def test_direct_tls_is_refused_without_alpn_or_with_bytes_after_the_hello(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    """Without ALPN `postgresql` the TLS session may be meant for another protocol;
    bytes sent after the hello, before the pooler's answer, cannot be TLS records the
    client was entitled to send. Both are closed, as PostgreSQL closes them, and the
    pooler serves on."""
    proc = pooler(general=tls_general(certs))
    assert closed_without_answer(proc, client_hello(certs) + b"more")
    with (
        socket.create_connection((proc.host, proc.port), timeout=10) as raw,
        client_context(certs).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(w.startup_message({"user": "x", "database": "example_db"}))
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            answer = tls.recv(1)  # closed under the TLS layer: refused all the same
        assert answer == b""
    log = proc.log_text()
    assert "direct TLS without the postgresql ALPN protocol" in log
    assert "direct TLS with data after its hello" in log
    user = pg.md5_user
    dsn = tls_dsn(proc, user.name, user.password, certs, sslnegotiation="direct")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_direct_tls_without_a_certificate_is_closed(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    proc = pooler()
    assert closed_without_answer(proc, client_hello(certs))
    assert "direct TLS, but TLS is not offered here" in proc.log_text()
    user = pg.md5_user
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            tls_dsn(proc, user.name, user.password, certs, sslnegotiation="direct"),
            connect_timeout=10,
        )
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_libpq_channel_binding_required(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    """Over TLS the pooler offers SCRAM-SHA-256-PLUS: libpq with channel_binding=require
    logs in, by SSLRequest and by direct TLS, and through the pool's SCRAM passthrough."""
    proc = pooler(general=tls_general(certs))
    user = pg.scram_user
    for negotiation in ("postgres", "direct"):
        dsn = tls_dsn(
            proc,
            user.name,
            user.password,
            certs,
            channel_binding="require",
            sslnegotiation=negotiation,
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select current_user").fetchone() == (user.name,)


def plus_login(
    proc: PoolerProcess, certs: Certs, user: str, mechanism: str, client: w.ScramClient
) -> list[w.Message]:
    """A SCRAM login over TLS with `mechanism` and `client`'s GS2 header and binding
    data: the pooler's replies, up to ReadyForQuery or the connection's end."""
    conn = w.PgWire("127.0.0.1", proc.port)
    try:
        assert conn.start_tls(client_context(certs), server_hostname="127.0.0.1") == b"S"
        conn.send_raw(w.startup_message({"user": user, "database": "example_db"}))
        kind, payload = conn.read_message()
        assert (kind, payload[:4]) == (b"R", w.AUTH_SASL.to_bytes(4, "big"))
        assert payload[4:] == b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
        conn.send_raw(w.sasl_initial_response(mechanism, client.first_message()))
        kind, payload = conn.read_message()
        if kind != b"R":
            return [(kind, payload), *conn.wait_closed()]
        conn.send_raw(w.sasl_response(client.final_message(payload[4:])))
        reply = conn.read_message()
        if reply[0] == b"E":
            return [reply, *conn.wait_closed()]
        return [reply, *conn.read_until_ready()]
    finally:
        conn.close_socket()


def test_scram_plus_binds_the_login_to_the_tls_session(
    pg: ExamplePostgres, pooler: PoolerFactory, certs: Certs
) -> None:
    """The binding data is the hash of the certificate the client was shown
    (tls-server-end-point): right, it logs in; anything else, or a client that says it
    could bind but was not offered to (a downgrade), is refused with 08P01."""
    proc = pooler(general=tls_general(certs))
    user = pg.scram_user
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
        with client_context(certs).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            shown = tls.getpeercert(binary_form=True)
    assert shown is not None
    binding = hashlib.sha256(shown).digest()  # trustme signs with SHA-256
    bound = "p=tls-server-end-point,,"

    def login(mechanism: str, **client: Any) -> list[w.Message]:
        return plus_login(proc, certs, user.name, mechanism, w.ScramClient(user.password, **client))

    accepted = login("SCRAM-SHA-256-PLUS", gs2_header=bound, binding=binding)
    assert w.msg_types(accepted)[-1] == "Z", accepted
    assert w.msg_types(login("SCRAM-SHA-256"))[-1] == "Z"  # "n,,": may not bind
    refused = {
        "wrong data": login("SCRAM-SHA-256-PLUS", gs2_header=bound, binding=b"\x00" * 32),
        "no data": login("SCRAM-SHA-256-PLUS", gs2_header=bound),
        "other type": login("SCRAM-SHA-256-PLUS", gs2_header="p=tls-unique,,", binding=binding),
        "PLUS unbound": login("SCRAM-SHA-256-PLUS"),
        "bound without PLUS": login("SCRAM-SHA-256", gs2_header=bound, binding=binding),
        "downgrade": login("SCRAM-SHA-256", gs2_header="y,,"),
    }
    for case, replies in refused.items():
        error = w.first_error(replies)
        assert error is not None and error.sqlstate == "08P01", (case, replies)
        assert not [m for m in replies if m[0] == b"R" and m[1][:4] == bytes(4)], case


def test_scram_plus_is_not_offered_without_tls(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """Without TLS there is nothing to bind to: SCRAM-SHA-256 alone is offered, and a
    client that picks SCRAM-SHA-256-PLUS anyway is refused."""
    proc = pooler()
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": pg.scram_user.name, "database": "example_db"}))
        kind, payload = conn.read_message()
        assert (kind, payload[4:]) == (b"R", b"SCRAM-SHA-256\x00\x00")
        client = w.ScramClient(pg.scram_user.password, gs2_header="p=tls-server-end-point,,")
        conn.send_raw(w.sasl_initial_response("SCRAM-SHA-256-PLUS", client.first_message()))
        error = w.first_error(conn.wait_closed())
        assert error is not None and error.sqlstate == "08P01"
    finally:
        conn.close_socket()
