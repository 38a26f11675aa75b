"""Raw protocol clients of the md5 user that read a server's large messages slowly or
not at all, closed when the test ends (before its pooler stops, which would wait for
the clients still inside a transaction)."""

from __future__ import annotations

import socket
import time

from . import EXAMPLE_DB, ExamplePostgres
from . import pgwire as w
from .pooler import PoolerProcess

READY_IDLE = b"Z\x00\x00\x00\x05I"


class RawClients:
    def __init__(self) -> None:
        self.opened: list[w.PgWire] = []

    def login(
        self, proc: PoolerProcess, pg: ExamplePostgres, receive_buffer: int | None = None
    ) -> w.PgWire:
        """A logged-in client; given `receive_buffer`, its socket holds at most about
        that many bytes it has not read."""
        user = pg.md5_user
        conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
        self.opened.append(conn)
        if receive_buffer is not None:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        return conn

    def send_and_stop_reading(self, proc: PoolerProcess, pg: ExamplePostgres, sql: str) -> w.PgWire:
        conn = self.login(proc, pg, 32 * 1024)
        conn.send_raw(w.query(sql))
        return conn

    def close(self) -> None:
        for conn in self.opened:
            conn.close_socket()


def read_to_the_end(sock: socket.socket, pause: float = 0.0, size: int = 256 * 1024) -> bytes:
    """Everything until ReadyForQuery, or until the pooler closes the connection;
    `pause` seconds between reads."""
    sock.settimeout(30)
    got = bytearray()
    while not got.endswith(READY_IDLE):
        try:
            chunk = sock.recv(size)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
        if pause:
            time.sleep(pause)
    return bytes(got)
