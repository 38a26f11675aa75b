"""Python cost of one pooled transaction, without sockets.

Drives the real ClientConnection and ServerConnection objects through in-memory
transports: a client sends a query, the server answers, the server goes back to the
pool. What remains is the interpreter's share of the per-transaction CPU, the part
the pooler's code controls (syscalls and the event loop come on top). Run:

    python -m bench.relay_micro [--transactions N] [--mode simple|extended|prepared]

PG_DOORMAN_IMPL=python|compiled picks the implementation measured (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from pg_doorman import implementation
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


async def run(transactions: int, mode: str) -> list[float]:
    loop = asyncio.get_running_loop()
    config = parse_config(
        {
            "general": {
                "host": "127.0.0.1",
                "port": 1,
                "pg_hba": "host all all 127.0.0.1/32 trust",
                "log_client_connections": False,
                "log_client_disconnections": False,
            },
            "pools": {"bench": {"users": [{"username": "bench", "password": "", "pool_size": 1}]}},
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
    server._on_data = server._idle_data
    pool.size += 1
    pool.servers.add(server)
    pool.release(server, fresh=True)

    client = ClientConnection(pooler)
    client_transport = MemoryTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    client.data_received(messages.startup_message({"user": "bench", "database": "bench"}))
    for _ in range(100):
        await asyncio.sleep(0)
        if client.state_name == "idle":
            break
    assert client.state_name == "idle", client.state_name

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
        client.data_received(parse + messages.SYNC)
        server.data_received(messages.PARSE_COMPLETE + messages.READY_IDLE)
        rows = _query_reply(b"1")[len(row_description) :]
        if mode == "prepared":
            request = bind + execute + messages.SYNC
            reply = messages.BIND_COMPLETE + rows
        else:
            request = parse + bind + messages.build(b"D", b"P\x00") + execute + messages.SYNC
            reply = messages.BIND_COMPLETE + row_description + rows

    timings = []
    batch = 1000
    for _ in range(max(transactions // batch, 1)):
        started = time.perf_counter()
        for _ in range(batch):
            client.data_received(request)
            server.data_received(reply)
        timings.append((time.perf_counter() - started) / batch * 1e6)
        client_transport.written.clear()
        server_transport.written.clear()
    assert pool.stats.xact_count >= transactions
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple")
    args = parser.parse_args()
    timings = asyncio.run(run(args.transactions, args.mode))
    print(
        f"{args.mode}: {statistics.median(timings):.2f} µs of Python per transaction "
        f"(median of {len(timings)} batches of 1000; best {min(timings):.2f}; "
        f"{implementation.describe()})"
    )


if __name__ == "__main__":
    main()
