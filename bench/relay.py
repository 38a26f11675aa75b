"""A transparent TCP relay on uvloop: the least any Python pooler does per transaction.

Each client connection gets its own upstream connection and bytes are copied both
ways, with no framing, pooling or bookkeeping at all. Its CPU per transaction is the
floor for a pooler written as uvloop protocol callbacks (bench/floor.py measures it).

    python -m bench.relay LISTEN_PORT UPSTREAM_PORT [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

try:
    import uvloop
except ImportError:  # the pooler runs on plain asyncio then, and so does this
    uvloop = None  # type: ignore[assignment]


class Side(asyncio.Protocol):
    """One end of a relayed pair; writes what it reads to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)  # upstream still connecting
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Backpressure: a peer that cannot keep up stops this side's reading.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Side):
    def __init__(self, host: str, upstream_port: int) -> None:
        super().__init__()
        self.host = host
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(Side, self.host, self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:  # the client left meanwhile
            assert upstream.transport is not None
            upstream.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for data in self.pending:
            upstream.transport.write(data)
        self.pending.clear()


async def serve(host: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientSide(host, upstream_port), host, port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"relaying {host}:{port} -> {host}:{upstream_port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.run(serve(args.host, args.port, args.upstream_port))
    else:
        asyncio.run(serve(args.host, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
