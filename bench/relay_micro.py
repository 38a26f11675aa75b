"""Python cost of one pooled transaction, without sockets.

Drives the real ClientConnection and ServerConnection objects through in-memory
transports: a client sends a query, the server answers, the server goes back to the
pool. What remains is the interpreter's share of the per-transaction CPU, the part
the pooler's code controls (syscalls and the event loop come on top). Run:

    python -m bench.relay_micro [--transactions N] [--mode simple|extended|prepared]
                                [--queued [--pressure]] [--listen-fanout]

With --queued two clients share the one server: each sends its next request while
the other's transaction runs, so every transaction waits in the pool's queue and is
handed the server as the previous one ends (what every transaction does when clients
outnumber pool_size). With --pressure as well, pool_size is 20 and the one server open
is above the warm threshold, so each queued request also goes through the pool's
pressure check (wait for a server to come back, or open one?) before it gets the
server back: what most transactions do when a few more clients than servers open are
busy, as with pgbench -c 10 (docs/configuration.md, "Pool pressure").

PG_DOORMAN_IMPL=python|compiled picks the implementation measured (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from pg_doorman import implementation
from pg_doorman.app.event_loop import new_event_loop
from pg_doorman.app.pooler import Pooler
from pg_doorman.config import parse_config
from pg_doorman.net.client import ClientConnection
from pg_doorman.net.server import ServerConnection
from pg_doorman.protocol import messages

SERVER_PARAMETERS = {
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "standard_conforming_strings": "on",
    "server_version": "18.0",
    "application_name": "pg_doorman",
}


class MemoryTransport:
    """Collects writes; the pieces of asyncio.Transport the pooler uses."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.written: list[bytes] = []
        self.peer = peer
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _query_reply(value: bytes) -> bytes:
    row_desc = messages.row_description([("?column?", 23)])
    row = messages.data_row([value.decode()])
    return row_desc + row + messages.command_complete("SELECT 1") + messages.READY_IDLE


async def run(
    transactions: int,
    mode: str,
    queued: bool = False,
    pressure: bool = False,
    listen_fanout: bool = False,
    log_min_duration: int = -1,
) -> list[float]:
    loop = asyncio.get_running_loop()
    # With pressure: room for 19 more servers, and the warm threshold (5 % of 20) is
    # the one open, so a queued client waits for it to come back rather than opening one.
    pool_size, warm_ratio = (20, 5) if pressure else (1, 20)
    config = parse_config(
        {
            "general": {
                "host": "127.0.0.1",
                "port": 1,
                "pg_hba": "host all all 127.0.0.1/32 trust",
                "log_client_connections": False,
                "log_client_disconnections": False,
                "log_min_duration_statement": log_min_duration,
            },
            "pools": {
                "bench": {
                    "scaling_warm_pool_ratio": warm_ratio,
                    "listen_fanout": listen_fanout,
                    "users": [{"username": "bench", "password": "", "pool_size": pool_size}],
                }
            },
        }
    )
    pooler = Pooler(config, loop)
    entry = pooler.pool_entry("bench", "bench")
    assert entry is not None
    pool = entry.pool
    pool.server_parameters = dict(SERVER_PARAMETERS)

    server = ServerConnection(pool, 1, loop)
    server_transport = MemoryTransport()
    server.connection_made(server_transport)  # type: ignore[arg-type]
    server.parameters.update(SERVER_PARAMETERS)
    pool.size += 1
    pool.servers.add(server)
    pool.release(server, time.monotonic(), fresh=True)

    clients = []
    client_transports = []
    for port in (40000, 40001) if queued else (40000,):
        client = ClientConnection(pooler)
        client_transport = MemoryTransport(("127.0.0.1", port))
        client.connection_made(client_transport)  # type: ignore[arg-type]
        client.data_received(messages.startup_message({"user": "bench", "database": "bench"}))
        for _ in range(100):
            await asyncio.sleep(0)
            if client.state_name == "idle":
                break
        assert client.state_name == "idle", client.state_name
        clients.append(client)
        client_transports.append(client_transport)

    row_description = messages.row_description([("?column?", 23)])
    if mode == "simple":
        request = messages.query("select 1")
        reply = _query_reply(b"1")
    else:
        # Steady state: the statement is already prepared on the server, so its Parse
        # is answered by the pooler and the server only binds and executes.
        name = b"" if mode == "extended" else b"s1"
        parse = messages.build(b"P", name + b"\x00select $1::int\x00\x00\x01\x00\x00\x00\x17")
        bind = messages.build(
            b"B", b"\x00" + name + b"\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"
        )
        execute = messages.build(b"E", b"\x00\x00\x00\x00\x00")
        for each in clients:
            server_transport.written.clear()
            each.data_received(parse + messages.SYNC)
            # The second client's Parse is answered by the pooler: the server, which
            # already has the statement, only sees the Sync.
            sent = b"".join(server_transport.written)
            if sent == messages.SYNC:
                server.data_received(messages.READY_IDLE)
            else:
                # The pool's first Parse of a text comes with a Describe of it, which
                # teaches the pooler its result columns (prepared/registry.py).
                described = messages.build(b"t", b"\x00\x01\x00\x00\x00\x17") + row_description
                server.data_received(messages.PARSE_COMPLETE + described + messages.READY_IDLE)
        rows = _query_reply(b"1")[len(row_description) :]
        if mode == "prepared":
            request = bind + execute + messages.SYNC
            reply = messages.BIND_COMPLETE + rows
        else:
            request = parse + bind + messages.build(b"D", b"P\x00") + execute + messages.SYNC
            reply = messages.BIND_COMPLETE + row_description + rows

    timings = []
    batch = 1000
    # Two requests per round: from the same client, or with --queued from each of the
    # two in turn, each queueing behind the other's transaction.
    first = second = clients[0]
    if queued:
        # The first client holds the server; from here on each request queues behind
        # the transaction in progress and gets the server when that one's reply ends.
        first, second = clients
        first.data_received(request)
        for _ in range(2):  # once through the queue, checked
            second.data_received(request)
            assert pool.waiting == 1 and second.state_name == "waiting", second.state_name
            server.data_received(reply)
            assert pool.waiting == 0 and second.server is server
            first, second = second, first
        assert pool.size == 1 and pool.connecting == 0  # waited for the server, opened none
        # Under pressure the check ran: it armed the timer that looks again when the
        # first queued client's patience runs out.
        assert (pool._patience_timer is not None) is pressure
    for _ in range(max(transactions // batch, 1)):
        started = time.perf_counter()
        for _ in range(batch // 2):
            second.data_received(request)
            server.data_received(reply)
            first.data_received(request)
            server.data_received(reply)
        timings.append((time.perf_counter() - started) / batch * 1e6)
        for transport in client_transports:
            transport.written.clear()
        server_transport.written.clear()
    assert pool.stats.xact_count >= transactions
    assert server.slow_query_seconds == (log_min_duration / 1000 if log_min_duration >= 0 else -1)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple")
    parser.add_argument(
        "--queued", action="store_true", help="two clients, one server: every transaction waits"
    )
    parser.add_argument(
        "--pressure",
        action="store_true",
        help="with --queued: pool_size 20, so each wait also runs the pool-pressure check",
    )
    parser.add_argument(
        "--listen-fanout",
        action="store_true",
        help="the pool reads each transaction's first statement for a LISTEN",
    )
    parser.add_argument(
        "--log-min-duration",
        type=int,
        default=-1,
        metavar="MS",
        help="log_min_duration_statement: each request's start is kept for a slow log",
    )
    args = parser.parse_args()
    if args.pressure and not args.queued:
        parser.error("--pressure needs --queued")
    # The pooler's own loop (uvloop when installed): the pool reads its clock.
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        timings = runner.run(
            run(
                args.transactions,
                args.mode,
                args.queued,
                args.pressure,
                args.listen_fanout,
                args.log_min_duration,
            )
        )
    mode = f"{args.mode}, queued" if args.queued else args.mode
    if args.pressure:
        mode += " under pool pressure"
    if args.listen_fanout:
        mode += ", listen_fanout"
    if args.log_min_duration >= 0:
        mode += f", log_min_duration_statement {args.log_min_duration} ms"
    print(
        f"{mode}: {statistics.median(timings):.2f} µs of Python per transaction "
        f"(median of {len(timings)} batches of 1000; best {min(timings):.2f}; "
        f"{implementation.describe()})"
    )


if __name__ == "__main__":
    main()
