"""Startup negotiation and malformed input: clear errors, and the pooler keeps serving."""

from __future__ import annotations

import socket
import struct
import threading

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.fake_backend import (
    ONE_ROW,
    QueryBackend,
    stand_in_pool,
)
from helpers.pooler import PoolerFactory, PoolerProcess, serve_a_client


def raw_socket(proc: PoolerProcess) -> socket.socket:
    sock = socket.create_connection((proc.host, proc.port), timeout=5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_ssl_and_gssenc_requests_are_refused_then_startup_works(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.gssenc_request())
        assert conn.read_bytes(1) == b"N"
        assert conn.request_ssl() == b"N"
        conn.startup(user.name, "example_db", user.password)
        assert conn.execute_query("select 7") == [("7",)]
    finally:
        conn.close()


def test_libpq_sslmode_prefer_falls_back(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.scram_user
    dsn = proc.dsn(user.name, user.password).replace("sslmode=disable", "sslmode=prefer")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_protocol_3_2_gets_negotiation(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    conn = w.PgWire(proc.host, proc.port)
    try:
        received = conn.startup(
            user.name,
            "example_db",
            user.password,
            params={"_pq_.made_up": "1"},
            protocol=(3 << 16) | 2,
        )
        negotiation = [payload for t, payload in received if t == b"v"]
        assert len(negotiation) == 1
        newest_minor, count = struct.unpack_from("!ii", negotiation[0])
        assert (newest_minor, count) == (0, 1)
        assert negotiation[0][8:] == b"_pq_.made_up\x00"
        assert conn.execute_query("select 1") == [("1",)]
    finally:
        conn.close()


@pytest.mark.parametrize("length", [4, 10_001, 2**31 - 1])
def test_bad_startup_length_rejected(
    pg: ExamplePostgres, pooler: PoolerFactory, length: int
) -> None:
    proc = pooler()
    with raw_socket(proc) as sock:
        sock.sendall(struct.pack("!i", length) + b"\x00" * 8)
        reply = read_all(sock)
    assert reply[:1] == b"E"
    fields = w.error_fields(reply[5:])
    assert fields["C"] == "08P01"
    assert fields["S"] == "FATAL"
    serve_a_client(proc, pg)


def test_missing_user_rejected(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with raw_socket(proc) as sock:
        sock.sendall(w.startup_message({"database": "example_db"}))
        reply = read_all(sock)
    assert w.error_fields(reply[5:])["C"] == "28000"


def test_replication_connection_rejected(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    with raw_socket(proc) as sock:
        sock.sendall(w.startup_message({"user": pg.md5_user.name, "replication": "database"}))
        reply = read_all(sock)
    assert w.error_fields(reply[5:])["C"] == "0A000"


def test_garbage_after_login_is_a_protocol_violation(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    conn.send_raw(b"Z\x00\x00\x00\x05I")  # a backend message type from a client
    received = conn.wait_closed()
    error = w.first_error(received)
    assert error is not None and error.sqlstate == "08P01" and error.severity == "FATAL"
    serve_a_client(proc, pg)


def test_negative_message_length_mid_session(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    conn.execute_query("select 1")
    conn.send_raw(b"Q\xff\xff\xff\xf0select 1")
    error = w.first_error(conn.wait_closed())
    assert error is not None and error.sqlstate == "08P01"
    serve_a_client(proc, pg)


def test_client_vanishing_mid_batch_leaves_server_clean(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools={"example_db": {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})
    user = pg.md5_user
    conn = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
    # Half a batch: Parse/Bind/Execute without Sync, then gone.
    conn.send_raw(w.parse("s1", "select 1") + w.bind("", "s1") + w.execute())
    conn.close_socket()
    for _ in range(3):
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as other:
            assert other.execute("select 42").fetchone() == (42,)
            # The abandoned named statement doesn't exist on the server we get.
            names = other.execute("select name from pg_prepared_statements").fetchall()
            assert ("s1",) not in names


def test_random_bytes_do_not_hurt(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    import random

    proc = pooler()
    rng = random.Random(1234)
    for _ in range(30):
        with raw_socket(proc) as sock:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
            sock.shutdown(socket.SHUT_WR)
            read_all(sock)
    serve_a_client(proc, pg)


def test_config_errors_exit_2_before_listening(pooler: PoolerFactory) -> None:
    proc = pooler(pools={"example_db": {"pool_mode": "statement"}}, start=False)
    proc.spawn()
    assert proc.wait_exit() == 2
    assert "pools.example_db.pool_mode" in proc.log_text()


def test_check_config_flag(pooler: PoolerFactory) -> None:
    import subprocess
    import sys

    good = pooler(start=False)
    path = good.write_config()
    ok = subprocess.run(
        [sys.executable, "-m", "pg_doorman", "-t", str(path)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    bad = pooler(general={"port": "not a port"}, start=False)
    bad_path = bad.write_config()
    failed = subprocess.run(
        [sys.executable, "-m", "pg_doorman", "-t", str(bad_path)], capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert "general.port" in failed.stderr


class ProtocolBreakingBackend(QueryBackend):
    """Lets anyone in, answers the empty query and any other query with one row,
    except `select broken`, which gets `broken_reply`."""

    def __init__(self, broken_reply: bytes) -> None:
        self.broken_reply = broken_reply
        self.broken_sent = threading.Event()
        super().__init__()

    def reply(self, text: bytes) -> bytes | None:
        if text == b"select broken":
            return self.broken_reply
        if not text:
            return w.message(b"I") + w.message(b"Z", b"I")
        return ONE_ROW

    def answered(self, text: bytes) -> None:
        if text == b"select broken":
            self.broken_sent.set()


@pytest.mark.parametrize(
    "broken_reply",
    [
        b"Z\x00\x00\x00\x04",  # ReadyForQuery without its status byte
        b"C\x00\x00\x00\x02xyzZ\x00\x00\x00\x05I",  # a length shorter than its header
        b"D\xff\xff\xff\xf0",  # a negative length
        b"T\x7f\xff\xff\xff",  # a length beyond any message size
    ],
    ids=["ready-for-query-too-short", "length-below-4", "negative-length", "huge-length"],
)
def test_server_breaking_the_protocol_fails_its_client_only(
    pg: ExamplePostgres, pooler: PoolerFactory, broken_reply: bytes
) -> None:
    backend = ProtocolBreakingBackend(broken_reply)
    try:
        user = pg.md5_user
        proc = pooler(pools=stand_in_pool(backend, pg, 2))
        bystander = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
        victim = w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
        assert bystander.execute_query("select 1") == [("1",)]
        victim.send_raw(w.query("select broken"))
        error = w.first_error(victim.wait_closed())
        # Set by the fake backend's thread once sendall() returned, which may be after
        # the pooler already read the reply and closed the client.
        assert backend.broken_sent.wait(5)
        assert error is not None and error.sqlstate == "08006" and error.severity == "FATAL"
        assert "not valid protocol" in error.fields["D"]
        assert "invalid data from server" in proc.log_text()
        # The broken server is gone; everyone else goes on, on a healthy one.
        assert bystander.execute_query("select 2") == [("1",)]
        bystander.close()
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
            assert conn.execute("select 3").fetchone() == ("1",)
    finally:
        backend.close()


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_a_malformed_message_during_the_login_is_a_protocol_violation(
    pg: ExamplePostgres, pooler: PoolerFactory, kind: str
) -> None:
    """The client's answer to the password request has an impossible length: an
    08P01 error names it and the connection closes, as for any login error, not an
    aborted transport (the compiled build once turned this into a TypeError)."""
    proc = pooler()
    user = pg.md5_user if kind == "md5" else pg.scram_user
    conn = w.PgWire(proc.host, proc.port)
    conn.send_raw(w.startup_message({"user": user.name, "database": "example_db"}))
    request_type, _ = conn.read_message()
    assert request_type == b"R"
    conn.send_raw(b"p" + struct.pack("!I", 0x9C000000) + b"x" * 16)
    error = w.first_error(conn.wait_closed())
    assert error is not None and error.sqlstate == "08P01" and error.severity == "FATAL"
    assert "invalid message during login" in error.message
    log = proc.log_text()
    assert "Fatal error on transport" not in log and "Traceback" not in log
    serve_a_client(proc, pg)
