"""A server login that needs an expensive PBKDF2 does not stall the pooler's other clients.

The role's SCRAM verifier is made by PostgreSQL with a very high `scram_iterations`, and
the pooler logs in to it with a plaintext `server_password`: its side of SCRAM is a
PBKDF2 over that many rounds. A relay between the pooler and PostgreSQL tells the test
when the pooler has been sent the salt and count (server-first-message): from then on
the pooler is computing, and another client's queries must still be answered.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import ADMIN_PASSWORD, ADMIN_USER, PoolerFactory, PoolerProcess
from helpers.sockets import pump

SLOW_ROLE = "slow_scram_role"
SLOW_PASSWORD = "slow-secret"
# Rounds PostgreSQL hashes the role's password with (its default is 4096): long enough
# for the other client's queries, a fraction of a second to a few seconds of PBKDF2.
SLOW_ITERATIONS = 3_000_000
APP = "slow_app"
APP_PASSWORD = "app-pass"
SLOW_DB = "slow_db"
OTHER_CLIENT_QUERIES = 50
SASL_CONTINUE_CODE = struct.pack("!i", 11)  # AuthenticationSASLContinue


class LoginRelay:
    """Relays TCP connections to PostgreSQL; sets `salt_sent` once it has passed an
    AuthenticationSASLContinue (the server-first-message) on to the pooler."""

    def __init__(self, pg: ExamplePostgres) -> None:
        self.target = (pg.host, pg.port)
        self.salt_sent = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                pooler_side, _ = self.listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(self.target)
            self.sockets += [pooler_side, server_side]
            for thread in (
                threading.Thread(target=pump, args=(pooler_side, server_side)),
                threading.Thread(target=self._watch_server, args=(server_side, pooler_side)),
            ):
                thread.daemon = True
                thread.start()

    def _watch_server(self, source: socket.socket, sink: socket.socket) -> None:
        """Forward PostgreSQL's messages one at a time, so that the event is set right
        after the server-first-message has gone out."""
        pending = b""
        try:
            while data := source.recv(65536):
                pending += data
                while len(pending) >= 5:
                    length = struct.unpack("!i", pending[1:5])[0]
                    if len(pending) < 1 + length:
                        break
                    message, pending = pending[: 1 + length], pending[1 + length :]
                    sink.sendall(message)
                    if message[:1] == b"R" and message[5:9] == SASL_CONTINUE_CODE:
                        self.salt_sent.set()
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def slow_role(pg: ExamplePostgres) -> Iterator[str]:
    """A role whose stored SCRAM verifier has SLOW_ITERATIONS rounds."""
    pg.psql(
        f"SET scram_iterations = {SLOW_ITERATIONS};\n"
        f"CREATE ROLE {SLOW_ROLE} LOGIN PASSWORD '{SLOW_PASSWORD}';\n"
    )
    try:
        stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SLOW_ROLE}'")
        assert stored.startswith(f"SCRAM-SHA-256${SLOW_ITERATIONS}:"), stored
        yield SLOW_ROLE
    finally:
        pg.psql(f"DROP ROLE IF EXISTS {SLOW_ROLE}")


@pytest.fixture
def relay(pg: ExamplePostgres) -> Iterator[LoginRelay]:
    relay = LoginRelay(pg)
    yield relay
    relay.close()


def test_other_clients_are_served_while_a_server_login_derives_scram_keys(
    pg: ExamplePostgres, pooler: PoolerFactory, slow_role: str, relay: LoginRelay
) -> None:
    proc = pooler(
        general={"connect_timeout": 120_000},
        pools={
            SLOW_DB: {
                "server_host": "127.0.0.1",
                "server_port": relay.port,
                "server_database": EXAMPLE_DB,
                "server_tls_mode": "disable",
                "users": [
                    {
                        "username": APP,
                        "password": w.md5_password_hash(APP_PASSWORD, APP),
                        "server_username": slow_role,
                        "server_password": SLOW_PASSWORD,
                        "pool_size": 1,
                    }
                ],
            }
        },
    )
    user = pg.md5_user
    events: list[str] = []
    slow_outcome: list[object] = []

    def slow_login() -> None:
        try:
            conn = psycopg.connect(
                proc.dsn(APP, APP_PASSWORD, database=SLOW_DB), connect_timeout=120
            )
        except Exception as exc:
            slow_outcome.append(exc)
            events.append("slow login failed")
            return
        events.append("slow login done")
        with conn:
            slow_outcome.append(conn.execute("select current_user").fetchone())

    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)  # its server is warm
        login = threading.Thread(target=slow_login, daemon=True)
        login.start()
        assert relay.salt_sent.wait(120), "the pooler never got the server-first-message"
        for i in range(OTHER_CLIENT_QUERIES):
            assert other.execute("select %s::int", (i,)).fetchone() == (i,)
            events.append(f"query {i}")
        login.join(120)
        assert not login.is_alive()

    assert slow_outcome == [(slow_role,)]
    # Every query of the other client was answered while the keys were being derived.
    expected = [f"query {i}" for i in range(OTHER_CLIENT_QUERIES)] + ["slow login done"]
    assert events == expected


def admin_scram_login(proc: PoolerProcess, password: str) -> tuple[str, list[w.Message]]:
    """A SCRAM login to the admin console: the salt offered and what followed the proof."""
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": ADMIN_USER, "database": "pgdoorman"}))
        kind, payload = conn.read_message()
        assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL)
        client = w.ScramClient(password)
        conn.send_raw(w.sasl_initial_response("SCRAM-SHA-256", client.first_message()))
        kind, payload = conn.read_message()
        assert (kind, int.from_bytes(payload[:4], "big")) == (b"R", w.AUTH_SASL_CONTINUE)
        first = payload[4:]
        salt = dict(item.split("=", 1) for item in first.decode().split(","))["s"]
        conn.send_raw(w.sasl_response(client.final_message(first)))
        return salt, conn.read_until_ready() if password == ADMIN_PASSWORD else conn.wait_closed()
    finally:
        conn.close_socket()


def test_the_admin_scram_verifier_is_derived_once(pooler: PoolerFactory) -> None:
    """Under a scram-sha-256 line the admin logs in with SCRAM against a verifier the
    pooler derives from admin_password once (one salt, as a PostgreSQL role has), not
    with a PBKDF2 of a fresh salt at every login."""
    proc = pooler(general={"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"})
    salts = set()
    for _ in range(3):
        salt, received = admin_scram_login(proc, ADMIN_PASSWORD)
        salts.add(salt)
        assert w.first_error(received) is None
        assert w.msg_types(received).endswith("Z")
    wrong_salt, received = admin_scram_login(proc, "wrong")
    error = w.first_error(received)
    assert error is not None and error.sqlstate == "28P01"
    assert salts == {wrong_salt}
    # And through libpq, with the console answering.
    dsn = proc.dsn(ADMIN_USER, ADMIN_PASSWORD, database="pgdoorman")
    with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as console:
        assert console.execute("SHOW VERSION").fetchone() is not None
