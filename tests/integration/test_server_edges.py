"""The pooler as PostgreSQL's client: SCRAM, md5 and cleartext logins to servers that
behave in unusual but legal ways (or not), TLS to servers, login errors, Patroni
fallback, auth_query lookups with odd names and results. Stand-in servers play
PostgreSQL where a real one would not misbehave on demand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console, pool_row
from helpers.fake_backend import LOGIN_OK, ONE_ROW, FakeBackend, read_exact, read_message
from helpers.pooler import PoolerFactory, PoolerProcess, Replace
from pg_doorman.app.embedded_pg import quote_ident, quote_literal

SERVER_PASSWORD = "the-real-password"
APP = "app"
APP_PASSWORD = "apppass"


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _read_startup_or_ssl(sock: socket.socket) -> tuple[bool, bytes]:
    (length,) = struct.unpack("!i", read_exact(sock, 4))
    body = read_exact(sock, length - 4)
    return body[:4] == struct.pack("!i", 80877103), body


def _serve_queries(sock: socket.socket) -> None:
    while True:
        msg_type, _ = read_message(sock)
        if msg_type == b"X":
            return
        sock.sendall(ONE_ROW)


class LoginBackend(FakeBackend):
    """A stand-in PostgreSQL that checks the pooler's password for user `app` the way
    PostgreSQL does, by the method `method` ("scram", "md5", "password"), with a SCRAM
    salt of any length, any iteration count and any mechanism list; over TLS when
    `tls` is a trustme server certificate (SSLRequest answered S)."""

    def __init__(
        self,
        method: str = "scram",
        *,
        password: str = SERVER_PASSWORD,
        salt: bytes = b"0123456789abcdef",
        iterations: int = 4096,
        mechanisms: tuple[str, ...] = ("SCRAM-SHA-256",),
        tls: trustme.LeafCert | None = None,
        skip_final: bool = False,
    ) -> None:
        self.method = method
        self.password = password
        self.salt = salt
        self.iterations = iterations
        self.mechanisms = mechanisms
        self.tls = tls
        self.skip_final = skip_final
        self.results: list[str] = []
        self.gs2_headers: list[bytes] = []
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        is_ssl, _ = _read_startup_or_ssl(sock)
        if is_ssl:
            if self.tls is None:
                sock.sendall(b"N")
            else:
                sock.sendall(b"S")
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self.tls.configure_cert(context)
                sock = context.wrap_socket(sock, server_side=True)
            _read_startup_or_ssl(sock)
        ok = {"scram": self._scram, "md5": self._md5, "password": self._cleartext}[self.method](
            sock
        )
        self.results.append("ok" if ok else "refused")
        if not ok:
            sock.sendall(
                w.error_response("28P01", 'password authentication failed for user "app"', "FATAL")
            )
            return
        sock.sendall(LOGIN_OK)
        _serve_queries(sock)

    def _md5(self, sock: socket.socket) -> bool:
        salt = os.urandom(4)
        sock.sendall(w.message(b"R", struct.pack("!i", 5) + salt))
        _, body = read_message(sock)
        return body.rstrip(b"\0").decode() == w.md5_response(self.password, APP, salt)

    def _cleartext(self, sock: socket.socket) -> bool:
        sock.sendall(w.message(b"R", struct.pack("!i", 3)))
        _, body = read_message(sock)
        return body.rstrip(b"\0").decode() == self.password

    def _scram(self, sock: socket.socket) -> bool:
        listed = b"".join(m.encode() + b"\0" for m in self.mechanisms) + b"\0"
        sock.sendall(w.message(b"R", struct.pack("!i", 10) + listed))
        _, initial = read_message(sock)
        mechanism, rest = initial.split(b"\0", 1)
        assert mechanism == b"SCRAM-SHA-256", mechanism
        client_first = rest[4:].decode()
        gs2, _, bare = client_first.partition(",,")
        self.gs2_headers.append(gs2.encode())
        cnonce = bare.split("r=", 1)[1]
        server_first = (
            f"r={cnonce}srv{base64.b64encode(os.urandom(9)).decode()},"
            f"s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        )
        sock.sendall(w.message(b"R", struct.pack("!i", 11) + server_first.encode()))
        _, final = read_message(sock)
        final_text = final.decode()
        without_proof, _, proof_text = final_text.rpartition(",p=")
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), self.salt, self.iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        proof = base64.b64decode(proof_text)
        recovered = bytes(
            a ^ b for a, b in zip(proof, _hmac(stored_key, auth_message), strict=False)
        )
        if hashlib.sha256(recovered).digest() != stored_key:
            return False
        if not self.skip_final:
            signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
            final_msg = b"v=" + base64.b64encode(signature)
            sock.sendall(w.message(b"R", struct.pack("!i", 12) + final_msg))
        return True


def app_pool(port: int, **extra: Any) -> dict[str, Any]:
    user = {
        "username": APP,
        "password": w.md5_password_hash(APP_PASSWORD, APP),
        "server_username": APP,
        "server_password": SERVER_PASSWORD,
        "pool_size": 1,
    }
    user.update(extra.pop("user", {}))
    if extra.pop("passthrough", False):
        del user["server_username"], user["server_password"]
    return {
        EXAMPLE_DB: {
            "server_host": "127.0.0.1",
            "server_port": port,
            "users": Replace([user]),
            **extra,
        }
    }


def app_query(proc: PoolerProcess, password: str = APP_PASSWORD) -> list[tuple[str | None, ...]]:
    conn = w.PgWire.connect(proc.host, proc.port, APP, EXAMPLE_DB, password, timeout=10)
    try:
        return conn.execute_query("select 1")
    finally:
        conn.close()


def app_refused(proc: PoolerProcess, timeout: float = 10) -> w.ServerError:
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, APP, EXAMPLE_DB, APP_PASSWORD, timeout=timeout)
    return info.value


@pytest.fixture(scope="module")
def server_cert() -> tuple[trustme.CA, trustme.LeafCert]:
    ca = trustme.CA()
    return ca, ca.issue_cert("localhost", "127.0.0.1")


# --- 1. server SCRAM, md5, cleartext -----------------------------------------------------


@pytest.mark.parametrize(
    ("salt", "iterations", "mechanisms"),
    [
        (os.urandom(28), 4096, ("SCRAM-SHA-256",)),
        (os.urandom(10), 4096, ("SCRAM-SHA-256",)),
        (os.urandom(1), 4096, ("SCRAM-SHA-256",)),
        (os.urandom(16), 150_000, ("SCRAM-SHA-256",)),
        (os.urandom(16), 1, ("SCRAM-SHA-256",)),
        (os.urandom(16), 4096, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        (os.urandom(16), 4096, ("SCRAM-SHA-1", "SCRAM-SHA-256", "OAUTHBEARER")),
    ],
    ids=["salt28", "salt10", "salt1", "iter150k", "iter1", "plus-first-no-tls", "others"],
)
def test_server_scram_with_unusual_parameters(
    pooler: PoolerFactory, salt: bytes, iterations: int, mechanisms: tuple[str, ...]
) -> None:
    backend = LoginBackend(salt=salt, iterations=iterations, mechanisms=mechanisms)
    try:
        proc = pooler(pools=app_pool(backend.port))
        assert app_query(proc) == [("1",)]
        assert backend.results == ["ok"]
        assert backend.gs2_headers == [b"n"]
    finally:
        backend.close()


def test_server_scram_passthrough_with_a_28_byte_salt(pooler: PoolerFactory) -> None:
    """Passthrough: the pooler stores a verifier whose salt is 28 bytes (Cloud SQL),
    a client logs in by SCRAM, the pooler replays its ClientKey to the server."""
    salt = os.urandom(28)
    verifier = w.scram_verifier(SERVER_PASSWORD, salt, 4096)
    backend = LoginBackend(salt=salt)
    try:
        proc = pooler(pools=app_pool(backend.port, user={"password": verifier}, passthrough=True))
        assert app_query(proc, SERVER_PASSWORD) == [("1",)]
        assert "ok" in backend.results
    finally:
        backend.close()


@pytest.mark.parametrize("method", ["md5", "password"])
def test_server_md5_and_cleartext_logins(pooler: PoolerFactory, method: str) -> None:
    backend = LoginBackend(method)
    try:
        proc = pooler(pools=app_pool(backend.port))
        assert app_query(proc) == [("1",)]
        assert backend.results == ["ok"]
    finally:
        backend.close()


def test_server_that_skips_the_scram_final_message_is_refused(pooler: PoolerFactory) -> None:
    """A server that takes the proof and says AuthenticationOk without ever sending
    its own signature (SASLFinal) has not proven that it knows the password: the docs
    promise the signature is always verified with explicit credentials. libpq refuses
    such a server too."""
    backend = LoginBackend(skip_final=True)
    try:
        proc = pooler(pools=app_pool(backend.port))
        error = app_refused(proc)
        assert error.sqlstate == "28P01", error.fields
    finally:
        backend.close()


class AskingBackend(FakeBackend):
    """Asks for authentication method `code` (7 GSS, 9 SSPI, 10 SASL with `payload`)."""

    def __init__(self, code: int, payload: bytes = b"") -> None:
        self.code = code
        self.payload = payload
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        _read_startup_or_ssl(sock)
        sock.sendall(w.message(b"R", struct.pack("!i", self.code) + self.payload))
        while sock.recv(4096):
            pass


@pytest.mark.parametrize(
    ("code", "payload"),
    [(7, b""), (9, b""), (10, b"SCRAM-SHA-256-PLUS\0\0"), (2, b"")],
    ids=["gss", "sspi", "plus-only", "kerberos5"],
)
def test_unsupported_server_auth_gives_a_clear_error(
    pooler: PoolerFactory, code: int, payload: bytes
) -> None:
    backend = AskingBackend(code, payload)
    try:
        proc = pooler(
            general={"connect_timeout": 2000, "query_wait_timeout": 3000},
            pools=app_pool(backend.port),
        )
        started = time.monotonic()
        error = app_refused(proc)
        assert time.monotonic() - started < 2.0, "failed only after a timeout"
        assert error.sqlstate == "0A000", error.fields
        proc.wait_for_log("cannot connect to server")
        time.sleep(0.3)
        assert backend.counts()[1] == 0, "the refused server connection stays open"
    finally:
        backend.close()


# --- 2. TLS to servers -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_tls_server_offering_plus_first(
    pooler: PoolerFactory,
    tmp_path: Path,
    server_cert: tuple[trustme.CA, trustme.LeafCert],
    mode: str,
) -> None:
    ca, leaf = server_cert
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    backend = LoginBackend(mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), tls=leaf)
    try:
        extra: dict[str, Any] = {"server_tls_mode": mode}
        if mode.startswith("verify"):
            extra["server_tls_ca_cert"] = str(ca_file)
        proc = pooler(pools=app_pool(backend.port, **extra))
        assert app_query(proc) == [("1",)]
        assert backend.results == ["ok"]
    finally:
        backend.close()


def test_tls_verify_failure_is_reported_and_logged(
    pooler: PoolerFactory, tmp_path: Path, server_cert: tuple[trustme.CA, trustme.LeafCert]
) -> None:
    _, leaf = server_cert
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    backend = LoginBackend(tls=leaf)
    try:
        proc = pooler(
            pools=app_pool(
                backend.port, server_tls_mode="verify-full", server_tls_ca_cert=str(other)
            )
        )
        error = app_refused(proc)
        assert error.sqlstate == "08006", error.fields
        assert "certificate verify failed" in error.message
        proc.wait_for_log("certificate verify failed")
    finally:
        backend.close()


class HandshakeDropBackend(FakeBackend):
    """Answers S to SSLRequest, then closes: at once, or after reading the ClientHello."""

    def __init__(self, read_hello: bool) -> None:
        self.read_hello = read_hello
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        _read_startup_or_ssl(sock)
        sock.sendall(b"S")
        if self.read_hello:
            sock.recv(65536)


@pytest.mark.parametrize("read_hello", [False, True], ids=["at-once", "after-hello"])
@pytest.mark.parametrize("mode", ["require"])  # prefer then logs in in plain text
def test_tls_server_closing_during_the_handshake(
    pooler: PoolerFactory, read_hello: bool, mode: str
) -> None:
    backend = HandshakeDropBackend(read_hello)
    try:
        proc = pooler(
            general={"connect_timeout": 3000, "query_wait_timeout": 4000},
            pools=app_pool(backend.port, server_tls_mode=mode),
        )
        started = time.monotonic()
        error = app_refused(proc)
        elapsed = time.monotonic() - started
        assert error.sqlstate == "08006", error.fields
        assert elapsed < 4.5, elapsed
        proc.wait_for_log("cannot connect to server")
    finally:
        backend.close()


# --- 5. login errors ---------------------------------------------------------------------


class RefusingBackend(FakeBackend):
    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        _read_startup_or_ssl(sock)
        sock.sendall(w.error_response(self.code, self.text, "FATAL"))
        while sock.recv(4096):
            pass


@pytest.mark.parametrize(
    ("code", "text", "permanent"),
    [
        ("28P01", 'password authentication failed for user "app"', True),
        ("3D000", 'database "example_db" does not exist', True),
        ("53300", "sorry, too many clients already", False),
        ("57P03", "the database system is starting up", False),
    ],
)
def test_login_errors_reach_the_client(
    pooler: PoolerFactory, code: str, text: str, permanent: bool
) -> None:
    backend = RefusingBackend(code, text)
    try:
        proc = pooler(
            general={"connect_timeout": 1000, "query_wait_timeout": 1000},
            pools=app_pool(backend.port),
        )
        started = time.monotonic()
        error = app_refused(proc)
        elapsed = time.monotonic() - started
        assert error.sqlstate == code, error.fields
        assert text in error.message
        if permanent:
            assert elapsed < 0.9, elapsed
        assert elapsed < 2.5, elapsed
        time.sleep(0.5)
        console = admin_console(proc)
        try:
            row = pool_row(console, APP)
        finally:
            console.close()
        assert row["sv_login"] == "0" and row["sv_idle"] == "0", row
        assert backend.counts()[1] == 0
    finally:
        backend.close()


# --- 3. Patroni fallback -----------------------------------------------------------------


class Patroni:
    """GET /cluster: `body` (bytes) or, with `silent`, no answer at all."""

    def __init__(self, body: bytes, silent: bool = False) -> None:
        self.body = body
        self.silent = silent
        self.requests = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests += 1
                if api.silent:
                    time.sleep(10)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(api.body)))
                self.end_headers()
                self.wfile.write(api.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentBackend(FakeBackend):
    """Accepts and never answers (a host whose packets vanish would do the same)."""

    def serve(self, sock: socket.socket) -> None:
        while sock.recv(4096):
            pass


@pytest.fixture
def local_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgd-rv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fallback_pooler(
    pg: ExamplePostgres, pooler: PoolerFactory, local: Path, url: str, **extra: Any
) -> PoolerProcess:
    general = {"query_wait_timeout": 2500, "connect_timeout": 1000}
    general.update(extra.pop("general", {}))
    return pooler(
        general=general,
        pools={
            EXAMPLE_DB: {
                "server_host": str(local),
                "server_port": pg.port,
                "patroni_api_urls": [url],
                **extra,
            }
        },
    )


def test_fallback_skips_members_patroni_reports_stopped(
    pg: ExamplePostgres, pooler: PoolerFactory, local_dir: Path
) -> None:
    """Patroni still lists a sync_standby that is stopped (its host gone: connects hang);
    a replica is streaming. The stopped member is no candidate (PgDoorman keeps only
    running/streaming members), so the client gets a server at once, not after the
    fallback_connect_timeout of a wave that cannot succeed."""
    dead = SilentBackend()
    members = [
        {
            "name": "n1",
            "role": "sync_standby",
            "state": "stopped",
            "host": "127.0.0.1",
            "port": dead.port,
        },
        {
            "name": "n2",
            "role": "replica",
            "state": "streaming",
            "host": "127.0.0.1",
            "port": pg.port,
        },
    ]
    api = Patroni(json.dumps({"members": members}).encode())
    try:
        proc = fallback_pooler(pg, pooler, local_dir, api.url, fallback_connect_timeout=3000)
        user = pg.md5_user
        started = time.monotonic()
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert time.monotonic() - started < 2.0, time.monotonic() - started
    finally:
        api.close()
        dead.close()


@pytest.mark.parametrize("kind", ["garbage", "silent", "no-running", "empty"])
def test_fallback_without_a_usable_patroni_answer(
    pg: ExamplePostgres, pooler: PoolerFactory, local_dir: Path, kind: str
) -> None:
    body = {
        "garbage": b"<html>oops</html>",
        "silent": b"",
        "no-running": json.dumps({"members": []}).encode(),
        "empty": b"",
    }[kind]
    api = Patroni(body, silent=kind == "silent")
    try:
        proc = fallback_pooler(pg, pooler, local_dir, api.url, patroni_api_timeout=500)
        user = pg.md5_user
        started = time.monotonic()
        with pytest.raises(w.ServerError) as info:
            w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
        elapsed = time.monotonic() - started
        assert info.value.sqlstate == "08006", info.value.fields
        assert "server unavailable" in info.value.message
        assert elapsed < 3.5, elapsed
    finally:
        api.close()


# --- 4. auth_query -----------------------------------------------------------------------

LOOKUP = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"


def aq_pooler(pooler: PoolerFactory, pg: ExamplePostgres, query: str = LOOKUP) -> PoolerProcess:
    return pooler(
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [{"username": pg.trust_user.name, "password": "", "pool_size": 2}]
                ),
                "auth_query": {"query": query, "user": pg.superuser, "min_interval": "0"},
            }
        }
    )


@pytest.mark.parametrize(
    "name", ['o\'brien "q" ü ☃', "x' OR '1'='1", "a" * 63], ids=["quotes-unicode", "inject", "63"]
)
def test_auth_query_odd_user_names(pg: ExamplePostgres, pooler: PoolerFactory, name: str) -> None:
    password = "pw-" + name[:5]
    pg.psql(
        f"DROP ROLE IF EXISTS {quote_ident(name)};\n"
        f"SET password_encryption = 'scram-sha-256';\n"
        f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)};\n"
        f"GRANT ALL ON DATABASE {EXAMPLE_DB} TO {quote_ident(name)};"
    )
    try:
        proc = aq_pooler(pooler, pg)
        with psycopg.connect(proc.dsn(name, password), autocommit=True) as conn:
            assert conn.execute("select current_user").fetchone() == (name,)
        # An injection attempt that would match every row finds nobody.
        with pytest.raises(w.ServerError) as info:
            w.PgWire.connect(proc.host, proc.port, "nobody' OR 'x'='x", EXAMPLE_DB, password)
        assert info.value.sqlstate == "28P01"
    finally:
        pg.psql(
            f"REVOKE ALL ON DATABASE {EXAMPLE_DB} FROM {quote_ident(name)};\n"
            f"DROP ROLE IF EXISTS {quote_ident(name)};"
        )


@pytest.mark.parametrize(
    ("query", "sqlstate"),
    [
        (LOOKUP + " UNION ALL " + LOOKUP, "08006"),
        ("SELECT usename, NULL::text AS passwd FROM pg_shadow WHERE usename = $1", "28P01"),
        ("SELECT usename, 42 AS passwd FROM pg_shadow WHERE usename = $1", "28P01"),
        ("SELECT usename, passwd::bytea AS passwd FROM pg_shadow WHERE usename = $1", "28P01"),
    ],
    ids=["two-rows", "null", "int", "bytea"],
)
def test_auth_query_odd_results(
    pg: ExamplePostgres, pooler: PoolerFactory, query: str, sqlstate: str
) -> None:
    proc = aq_pooler(pooler, pg, query)
    user = pg.md5_user
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
    assert info.value.sqlstate == sqlstate, info.value.fields
    assert psycopg.connect(proc.dsn(pg.trust_user.name, ""), autocommit=True).execute(
        "select 1"
    ).fetchone() == (1,)
