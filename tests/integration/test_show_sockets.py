"""SHOW SOCKETS and pg_doorman_sockets against a running pooler, and
tcp_socket_buffer_size on the /metrics listener's connections."""

from __future__ import annotations

import copy
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg
import pytest
from test_listeners import buffer_sizes, tcp_sockets_of

from helpers import ExamplePostgres
from helpers.metrics import scrape
from helpers.pooler import DEFAULT_POOL_SIZE, PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

_TCP_STATES = (
    "established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait", "close",
    "close_wait", "last_ack", "listen", "closing", "new_syn_recv", "bound_inactive",
)  # fmt: skip
# PgDoorman's columns in its order (its two last IPv6 ones are misnamed tcp_*: here tcp6_*).
COLUMNS = [
    *(f"tcp_{state}" for state in _TCP_STATES),
    *(f"tcp6_{state}" for state in _TCP_STATES),
    "unix_free", "unix_unconnected", "unix_connecting", "unix_connected",
    "unix_disconnecting", "unix_dgram", "unix_seq_packet", "unknown",
]  # fmt: skip
N_CLIENTS = DEFAULT_POOL_SIZE  # each holds a transaction, so a server each
WORKERS = 2


def web(port: int) -> dict[str, Any]:
    return {"enabled": True, "host": "127.0.0.1", "port": port}


def admin_psycopg(proc: PoolerProcess) -> psycopg.Connection[tuple[object, ...]]:
    # ClientCursor sends plain Query messages: the console speaks simple protocol only.
    return psycopg.connect(
        proc.dsn("admin", "admin", "pgdoorman"),
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
    )


def show_sockets(console: psycopg.Connection[tuple[object, ...]]) -> dict[str, int]:
    cur = console.execute("SHOW SOCKETS")
    assert cur.description is not None
    assert [d.name for d in cur.description] == COLUMNS
    (row,) = cur.fetchall()
    return {d.name: int(str(value)) for d, value in zip(cur.description, row, strict=True)}


def by_kind(row: dict[str, int]) -> dict[str, int]:
    """SHOW SOCKETS' row added up as the metric's `type` labels."""
    kinds = {"tcp": 0, "tcp6": 0, "unix": 0, "unknown": row["unknown"]}
    for name, count in row.items():
        kind = name.split("_", 1)[0]
        if kind in ("tcp", "tcp6", "unix"):
            kinds[kind] += count
    return kinds


def metric(port: int) -> dict[str, int]:
    return {
        sample.labels["type"]: int(sample.value)
        for sample in scrape(port).get("pg_doorman_sockets", [])
    }


def eventually(
    read: Callable[[], dict[str, int]], done: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """`read()` again (counts are cached for a second) until `done` holds for it."""
    deadline = time.monotonic() + 15
    while True:
        got = read()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def show_and_scrape(
    console: psycopg.Connection[tuple[object, ...]], port: int
) -> tuple[dict[str, int], dict[str, int]]:
    """SHOW SOCKETS, then /metrics, again until they agree: a scrape that counts anew
    also sees its own connection."""
    deadline = time.monotonic() + 15
    while True:
        shown, served = show_sockets(console), metric(port)
        if by_kind(shown) == served or time.monotonic() > deadline:
            return shown, served
        time.sleep(0.1)


@contextmanager
def clients_in_transactions(proc: PoolerProcess, pg: ExamplePostgres) -> Iterator[None]:
    """N_CLIENTS clients, each inside a transaction: N_CLIENTS servers in use."""
    user = pg.md5_user
    with ExitStack() as stack:
        for _ in range(N_CLIENTS):
            conn = stack.enter_context(psycopg.connect(proc.dsn(user.name, user.password)))
            assert conn.execute("select 1").fetchone() == (1,)  # opens a transaction
        yield


def test_show_sockets_and_the_metric_count_the_poolers_sockets(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    port = free_port()
    proc = pooler(web=web(port))
    with admin_psycopg(proc) as console:
        idle = show_sockets(console)
        # The client port and /metrics; the console's own connection.
        assert idle["tcp_listen"] == 2, idle
        assert idle["tcp_established"] >= 1, idle
        with clients_in_transactions(proc, pg):
            # Each client's connection and the server it holds.
            busy = eventually(
                lambda: show_sockets(console),
                lambda row: row["tcp_established"] >= idle["tcp_established"] + 2 * N_CLIENTS,
            )
            assert busy["tcp_established"] >= idle["tcp_established"] + 2 * N_CLIENTS, busy
            assert busy["tcp_listen"] == 2, busy
            # The metric carries the same counts.
            shown, served = show_and_scrape(console, port)
            assert by_kind(shown) == served, (shown, served)
            assert served["tcp"] >= 2 * N_CLIENTS + 2, served
        # The clients are gone; their servers stay in the pool.
        after = eventually(
            lambda: show_sockets(console),
            lambda row: row["tcp_established"] <= busy["tcp_established"] - N_CLIENTS,
        )
        assert after["tcp_established"] <= busy["tcp_established"] - N_CLIENTS, after
        assert metric(port)["tcp"] < served["tcp"]


def test_with_workers_the_supervisors_sockets_count_too(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The console runs in a worker; the listeners are the supervisor's, and each
    worker's connection channel (a SOCK_SEQPACKET pair) has an end in both."""
    port = free_port()
    proc = pooler(general={"workers": WORKERS}, web=web(port))
    proc.wait_for_log(f"all {WORKERS} workers ready", timeout=30)
    with admin_psycopg(proc) as console:
        idle = show_sockets(console)
        assert idle["tcp_listen"] == 2, idle
        assert idle["unix_seq_packet"] >= 2 * WORKERS, idle
        with clients_in_transactions(proc, pg):
            busy = eventually(
                lambda: show_sockets(console),
                lambda row: row["tcp_established"] >= idle["tcp_established"] + 2 * N_CLIENTS,
            )
            assert busy["tcp_established"] >= idle["tcp_established"] + 2 * N_CLIENTS, busy
            served = metric(port)  # by the supervisor, for every process
            assert served["tcp"] >= 2 * N_CLIENTS + 2, served
            assert served["unix"] >= 2 * WORKERS, served


def web_connection_buffers(proc: PoolerProcess, port: int) -> tuple[int, int]:
    """SO_RCVBUF/SO_SNDBUF of the pooler's end of a connection to /metrics, held open
    (no request sent) while they are read."""
    assert proc.pid is not None
    with socket.create_connection(("127.0.0.1", port)):
        deadline = time.monotonic() + 10
        while True:
            with tcp_sockets_of(proc.pid) as sockets:
                accepted = [s for s in sockets if s.getsockname()[1] == port]
                if accepted or time.monotonic() > deadline:
                    assert len(accepted) == 1, accepted
                    return buffer_sizes(accepted[0])
            time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_the_metrics_listener_gets_tcp_socket_buffer_size(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """40 KiB (Linux doubles it): not the kernel's defaults for TCP (128 KiB to receive,
    16 KiB to send). With workers the supervisor serves /metrics."""
    port = free_port()
    proc = pooler(general={"tcp_socket_buffer_size": "40KB", "workers": workers}, web=web(port))
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    assert web_connection_buffers(proc, port) == (81920, 81920)
    if workers == 1:
        # A reload applies to the connections accepted after it, as for clients.
        config = copy.deepcopy(proc.config)
        config["general"]["tcp_socket_buffer_size"] = "24KB"
        proc.reload_and_wait(config)
        assert web_connection_buffers(proc, port) == (49152, 49152)
