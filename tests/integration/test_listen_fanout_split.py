"""listen_fanout with pin_on_listen: a client pinned to its server (for a LISTEN in a
transaction) hears some channels from that server and others through the pool's
listening server (the hub). A notification of the hub's must not land inside one the
pinned server is in the middle of sending, nor wait for the client's next transaction
once that one is whole."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pg_relay import PostgresRelay, end_user_backends
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.sockets import shut_down

SPLIT_AT = 12  # bytes of a split notification passed on before the pause


class SplittingProxy(PostgresRelay):
    """A TCP relay in front of PostgreSQL that passes on a NotificationResponse on
    channel `split_channel` in two parts: its first SPLIT_AT bytes, then, once
    `release` is set, the rest. Everything else goes on as it comes."""

    def __init__(self, pg: ExamplePostgres, split_channel: str) -> None:
        self.channel = split_channel.encode()
        self.split_sent = threading.Event()  # the first part is on its way
        self.release = threading.Event()
        super().__init__(pg)

    def close(self) -> None:
        self.release.set()
        super().close()

    def relay_for_connection(self) -> Callable[[socket.socket, socket.socket], None]:
        return self._relay

    def _relay(self, server: socket.socket, pooler: socket.socket) -> None:
        """Server to pooler, message by message (every backend message is framed)."""
        held = b""
        try:
            while True:
                while len(held) < 5 or len(held) < 1 + struct.unpack("!i", held[1:5])[0]:
                    data = server.recv(65536)
                    if not data:
                        return
                    held += data
                end = 1 + struct.unpack("!i", held[1:5])[0]
                message, held = held[:end], held[end:]
                if message[:1] == b"A" and message[9:].split(b"\x00")[0] == self.channel:
                    pooler.sendall(message[:SPLIT_AT])
                    self.split_sent.set()
                    self.release.wait()
                    message = message[SPLIT_AT:]
                pooler.sendall(message)
        except OSError:
            pass
        finally:
            shut_down(server, pooler)


@pytest.fixture
def proxy(pg: ExamplePostgres) -> Iterator[SplittingProxy]:
    relay = SplittingProxy(pg, split_channel="pinned")
    yield relay
    relay.close()
    end_user_backends(pg)


def pinned_listener(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    """A client that LISTENs on "hub" through the hub, then on "pinned" in a
    transaction, which pins it to its server."""
    conn = w.PgWire.connect(
        proc.host, proc.port, pg.md5_user.name, EXAMPLE_DB, pg.md5_user.password
    )
    for statement in ("LISTEN hub", "BEGIN", "LISTEN pinned", "COMMIT"):
        assert w.msg_types(conn.simple_query(statement)) == "CZ"
    assert "until it disconnects (pin_on_listen)" in proc.log_text()
    return conn


def notification(payload: bytes) -> tuple[str, str]:
    """A NotificationResponse's channel and payload."""
    channel, message, _ = payload[4:].split(b"\x00")
    return channel.decode(), message.decode()


def test_a_hub_notification_waits_for_the_end_of_the_pinned_servers_notification(
    pg: ExamplePostgres, pooler: PoolerFactory, proxy: SplittingProxy
) -> None:
    """The pinned server has sent part of a notification when the hub's comes: the
    hub's goes out right after the server's is whole (not inside it, not at the
    client's next transaction), and both read as PostgreSQL's messages."""
    pools = {
        EXAMPLE_DB: {
            "server_host": "127.0.0.1",
            "server_port": proxy.port,
            "server_tls_mode": "disable",
            "listen_fanout": True,
            "pin_on_listen": True,
            "users": [{"username": pg.md5_user.name, "pool_size": 2}],
        }
    }
    proc = pooler(pools=pools)
    conn = pinned_listener(proc, pg)
    try:
        pg.psql("NOTIFY pinned, 'from the pinned server'", database=EXAMPLE_DB)
        assert proxy.split_sent.wait(10)
        time.sleep(0.3)  # the pooler has read the first part
        pg.psql("NOTIFY hub, 'through the hub'", database=EXAMPLE_DB)
        time.sleep(0.5)  # the hub has passed it on
        proxy.release.set()
        got = [conn.read_message(timeout=5) for _ in range(2)]
        assert [type_ for type_, _ in got] == [b"A", b"A"]
        assert [notification(payload) for _, payload in got] == [
            ("pinned", "from the pinned server"),
            ("hub", "through the hub"),
        ]
        # Nothing else came, and the client goes on.
        assert conn.read_available(wait=0.3) == []
        assert w.rows(conn.simple_query("select 1")) == [("1",)]
    finally:
        conn.close()
