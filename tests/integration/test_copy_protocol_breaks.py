"""A peer that breaks the protocol right behind the end of a message whose start has
already gone to the other side: neither side may be left inside that message as if
it were whole."""

from __future__ import annotations

import socket
import struct
import time

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect
from helpers.fake_backend import (
    LOGIN_OK,
    ONE_ROW,
    QueryBackend,
    read_message,
    read_startup,
    stand_in_pool,
)
from helpers.pooler import PoolerFactory, PoolShape


def test_a_client_breaking_the_protocol_inside_copy_data_does_not_pass_its_server_on(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A bad row ends the COPY (ErrorResponse, ReadyForQuery) while the client is inside
    a CopyData message, so the server stays with it until the message is whole. The
    client then sends the rest of that message and, behind it, bytes that are no
    message: the pooler refuses them and forwards nothing of that read, so the server
    still waits for the end of the CopyData. It must not serve the next client, whose
    query it would read as copy data and never answer."""
    proc = pooler(general={"query_wait_timeout": 3000}, pools=PoolShape(1).config(pg)["pools"])
    conn = connect(proc, pg)
    try:
        conn.send_raw(w.query("copy items from stdin"))
        conn.read_until(b"G")
        unfinished = w.copy_data("1000\tone\n" * 100)
        conn.send_raw(w.copy_data("bad\n") + unfinished[:9])
        got = conn.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "22P02" and w.msg_types(got) == "EZ"
        conn.send_raw(unfinished[9:] + b"\x00" * 5)
        error = w.first_error(conn.wait_closed())
        assert error is not None and error.sqlstate == "08P01"
    finally:
        conn.close_socket()
    other = connect(proc, pg)
    try:
        assert other.execute_query("select 'next client'") == [("next client",)]
        assert other.execute_query("select count(*) from items") == [("100",)]
    finally:
        other.close()


class RowCutShortBackend(QueryBackend):
    """Answers `select broken` with a long DataRow in two writes: all but its last
    bytes, then (once the pooler has surely relayed the first part) those bytes with,
    right behind them, the header of a 300 MB row: more than the pooler takes in one
    message (a real server sends one for a row that large, but when its bytes arrive
    is not up to a test)."""

    ROW_BODY = struct.pack("!hi", 1, 200_000) + b"x" * 200_000

    def serve(self, sock: socket.socket) -> None:
        read_startup(sock)
        sock.sendall(LOGIN_OK)
        while True:
            msg_type, body = read_message(sock)
            if msg_type == b"X":
                return
            if body.rstrip(b"\x00") != b"select broken":
                sock.sendall(ONE_ROW)
                continue
            row = w.message(b"D", self.ROW_BODY)
            sock.sendall(w.message(b"T", struct.pack("!h", 1) + w.cstr("x") + bytes(18)))
            sock.sendall(row[:-10])
            time.sleep(0.5)
            sock.sendall(row[-10:] + b"D" + struct.pack("!I", 300_000_000))


def test_a_server_breaking_the_protocol_inside_a_row_is_not_answered_for_in_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The server sends the end of a long DataRow, the start of which the client has,
    and behind it in the same read a message longer than the pooler takes. The pooler
    refuses that read whole: the client, still inside the row, must not get the
    pooler's FATAL error as the row's last bytes (a row it would take as PostgreSQL's),
    only the connection closing."""
    backend = RowCutShortBackend()
    try:
        proc = pooler(pools=stand_in_pool(backend, pg))
        user = pg.md5_user
        conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
        conn.send_raw(w.query("select broken"))
        got = conn.wait_closed()
        # With the error put in, the row came whole, its last bytes the error's.
        assert w.msg_types(got) == "T", [payload[-20:] for _, payload in got]
        assert "invalid data from server" in proc.log_text()
    finally:
        backend.close()
