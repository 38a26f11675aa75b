"""A session the pooler ends while the client is inside a message its server is
sending (a large row read slowly): a FATAL then would be read as the rest of that
message, so the client sees its connection close instead; between messages it gets
the FATAL."""

from __future__ import annotations

import signal

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.raw_clients import RawClients, read_to_the_end

ROW_BYTES = 16 * 1024 * 1024
# One DataRow far larger than what the socket buffers between the pooler and a client
# that stops reading can hold: the pooler is left inside it.
BIG_ROW = f"select repeat('x', {ROW_BYTES})"
INSIDE = "in the middle of a message to the client: closed without an error message"


def inside_a_big_row(
    raw: RawClients, proc: PoolerProcess, pg: ExamplePostgres
) -> tuple[w.PgWire, bytes]:
    """A client that has read the start of BIG_ROW and then stops reading; what it read."""
    conn = raw.send_and_stop_reading(proc, pg, BIG_ROW)
    conn.sock.settimeout(30)
    got = bytearray()
    while len(got) < 256 * 1024:
        chunk = conn.sock.recv(64 * 1024)
        assert chunk, "closed before the row came"
        got += chunk
    return conn, bytes(got)


def assert_cut_inside_the_row(stream: bytes) -> None:
    """`stream` is a RowDescription and the start of the DataRow, nothing after: every
    byte past the row's headers is the row's own."""
    assert stream[:1] == b"T"
    row = 1 + int.from_bytes(stream[1:5], "big")
    assert stream[row : row + 1] == b"D"
    assert int.from_bytes(stream[row + 1 : row + 5], "big") == 4 + 2 + 4 + ROW_BYTES
    value = stream[row + 11 :]
    assert 0 < len(value) < ROW_BYTES
    assert value == b"x" * len(value), value[-200:]


def fatal_of(conn: w.PgWire) -> tuple[str, str]:
    """The FATAL an idle client finds waiting."""
    messages = conn.wait_closed()
    errors = [w.error_fields(p) for t, p in messages if t == b"E"]
    assert len(errors) == 1, messages
    return errors[0]["C"], errors[0]["M"]


def test_kill_closes_a_client_inside_a_row_and_tells_an_idle_one(
    pg: ExamplePostgres, pooler: PoolerFactory, raw: RawClients
) -> None:
    proc = pooler(general={"proxy_copy_data_timeout": 0}, pools=md5_user_pool(pg, pool_size=2))
    idle = raw.login(proc, pg)
    assert w.rows(idle.simple_query("select 1")) == [("1",)]
    reading, start = inside_a_big_row(raw, proc, pg)
    console = admin_console(proc)
    try:
        assert w.first_error(console.simple_query(f"KILL {EXAMPLE_DB}")) is None
        assert_cut_inside_the_row(start + read_to_the_end(reading.sock))
        assert fatal_of(idle) == ("57P01", "database killed by the administrator")
        proc.wait_for_log(f"database killed by the administrator (57P01), {INSIDE}")
        # One line per client.
        assert proc.log_text().count("database killed by the administrator (57P01)") == 2
        assert w.first_error(console.simple_query(f"RESUME {EXAMPLE_DB}")) is None
    finally:
        console.close()
    after = raw.login(proc, pg)
    assert w.rows(after.simple_query("select 2")) == [("2",)]


def test_a_stop_past_shutdown_timeout_closes_a_client_inside_a_row(
    pg: ExamplePostgres, pooler: PoolerFactory, raw: RawClients
) -> None:
    proc = pooler(
        general={"proxy_copy_data_timeout": 0, "shutdown_timeout": 1000},
        pools=md5_user_pool(pg, pool_size=2),
    )
    reading, start = inside_a_big_row(raw, proc, pg)
    proc.send_signal(signal.SIGTERM)
    # Nothing more is read until the second the transaction had to end is over.
    proc.wait_for_log("pooler is shutting down (57P01)")
    assert_cut_inside_the_row(start + read_to_the_end(reading.sock))
    assert proc.wait_exit() == 0
    assert f"pooler is shutting down (57P01), {INSIDE}" in proc.log_text()
