"""A listening server (listen_fanout) that PostgreSQL terminates: the log and the
client's error say it was terminated, with PostgreSQL's reason."""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.listen import fanout_pool
from helpers.pg_relay import PostgresRelay, end_user_backends
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.sockets import pump

TERMINATED = "terminating connection due to administrator command"
# AuthenticationRequest codes that wait for the client: cleartext, MD5, SASL, SASL continue.
ASKING = {struct.pack("!i", code) for code in (3, 5, 10, 11)}


class TerminatingProxy(PostgresRelay):
    """A TCP relay in front of PostgreSQL. Armed, it terminates the next connection's
    backend (pg_terminate_backend) as soon as its login is over, and passes the
    server's ReadyForQuery on only together with the FATAL that follows it, in one
    write: the pooler reads both at once, as when the termination comes right after
    the login."""

    def __init__(self, pg: ExamplePostgres) -> None:
        self.armed = threading.Event()
        self.terminated: list[int] = []
        super().__init__(pg)

    def relay_for_connection(self) -> Callable[[socket.socket, socket.socket], None]:
        if self.armed.is_set():
            self.armed.clear()
            return self._terminate_after_login
        return pump

    def _terminate_after_login(self, server: socket.socket, client: socket.socket) -> None:
        held = b""
        pid = 0
        offset = 0
        while True:  # the login's messages, up to its ReadyForQuery
            if len(held) - offset < 5:
                held += server.recv(65536)
                continue
            msg_type = held[offset : offset + 1]
            length = struct.unpack("!i", held[offset + 1 : offset + 5])[0]
            if len(held) - offset < 1 + length:
                held += server.recv(65536)
                continue
            if msg_type == b"K":
                pid = struct.unpack("!i", held[offset + 5 : offset + 9])[0]
            elif msg_type == b"Z":
                break
            offset += 1 + length
            if msg_type == b"R" and held[offset - length + 4 : offset - length + 8] in ASKING:
                # A request the pooler answers before PostgreSQL sends more.
                client.sendall(held[:offset])
                held, offset = held[offset:], 0
        self.pg.psql(f"select pg_terminate_backend({pid})", database=EXAMPLE_DB)
        self.terminated.append(pid)
        while data := server.recv(65536):  # the FATAL, then the end of the connection
            held += data
        client.sendall(held)
        client.close()


@pytest.fixture
def proxy(pg: ExamplePostgres) -> Iterator[TerminatingProxy]:
    relay = TerminatingProxy(pg)
    yield relay
    relay.close()
    end_user_backends(pg)


def fanout_through(proxy: TerminatingProxy, pg: ExamplePostgres) -> dict[str, object]:
    return {
        EXAMPLE_DB: {
            "server_host": "127.0.0.1",
            "server_port": proxy.port,
            "server_tls_mode": "disable",
            "listen_fanout": True,
            "users": [{"username": pg.md5_user.name, "pool_size": 1}],
        }
    }


def logged_in(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    return w.PgWire.connect(
        proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, pg.md5_user.password
    )


def test_a_listening_server_terminated_right_after_login_is_said_to_be_terminated(
    pg: ExamplePostgres, pooler: PoolerFactory, proxy: TerminatingProxy
) -> None:
    """PostgreSQL's FATAL came in the same read as the login's ReadyForQuery: the
    LISTEN fails with PostgreSQL's reason (57P01), not as a protocol violation, and the
    next LISTEN opens a new listening server."""
    proc = pooler(pools=fanout_through(proxy, pg))
    conn = logged_in(proc, pg)
    try:
        assert w.rows(conn.simple_query("select 1")) == [("1",)]  # the pool's own server
        proxy.armed.set()
        reply = conn.simple_query("LISTEN jobs", timeout=10)
        assert len(proxy.terminated) == 1
        assert w.msg_types(reply) == "EZ"
        fields = w.error_fields(reply[0][1])
        assert fields["S"] == "ERROR" and fields["C"] == "57P01"
        assert TERMINATED in fields["M"]
        # The client goes on; the next LISTEN gets a listening server.
        assert w.rows(conn.simple_query("select 2")) == [("2",)]
        reply = conn.simple_query("LISTEN jobs", timeout=10)
        assert w.msg_types(reply) == "CZ"
    finally:
        conn.close()
    log = proc.log_text()
    assert "server sent data after login" not in log
    assert f"server closed the connection right after login: {TERMINATED}" in log


def test_a_pooled_server_terminated_right_after_login_is_opened_again(
    pg: ExamplePostgres, pooler: PoolerFactory, proxy: TerminatingProxy
) -> None:
    """The same for a server of the pool: the pool logs PostgreSQL's reason and opens
    another one for the waiting client, whose query runs."""
    proc = pooler(pools=fanout_through(proxy, pg))
    proxy.armed.set()
    conn = logged_in(proc, pg)
    try:
        assert w.rows(conn.simple_query("select 1", timeout=10)) == [("1",)]
        assert len(proxy.terminated) == 1
    finally:
        conn.close()
    log = proc.log_text()
    assert "server sent data after login" not in log
    said = f"cannot connect to server: server closed the connection right after login: {TERMINATED}"
    assert said in log


def test_a_listening_server_terminated_later_is_lost_for_postgresqls_reason(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """pg_terminate_backend of the listening server: the line saying its clients are
    disconnected gives PostgreSQL's reason."""
    proc = pooler(pools=fanout_pool(pg))
    conn = logged_in(proc, pg)
    try:
        reply = conn.simple_query("LISTEN jobs")
        assert w.msg_types(reply) == "CZ"
        hub_pid = re.search(r"\(pid (\d+)\) listens for the pool's clients", proc.log_text())
        assert hub_pid is not None
        out = pg.psql(f"select pg_terminate_backend({hub_pid[1]})", database=EXAMPLE_DB)
        assert out.split() == ["t"]
        type_, payload = conn.read_message(timeout=10)
        assert type_ == b"E" and "LISTEN again" in w.error_fields(payload)["M"]
    finally:
        conn.close()
    proc.wait_for_log("listening server")
    assert f"lost (server closed the connection: {TERMINATED})" in proc.log_text()
