"""A transparent TCP relay: the least any Python pooler does per transaction.

Each client connection gets its own upstream connection and bytes are copied both
ways, with no framing, pooling or bookkeeping at all. Its CPU per transaction is the
floor for a pooler written in Python (bench/floor.py measures it). Two event loops:

- `uvloop` (default): asyncio protocol callbacks on uvloop, as pg_doorman is built;
- `epoll`: no asyncio at all, a loop over `select.epoll` with `recv` and `send`, to
  see what is left once the asyncio machinery is gone.

    python -m bench.relay LISTEN_PORT UPSTREAM_PORT [--loop uvloop|epoll]
"""

from __future__ import annotations

import argparse
import asyncio
import select
import signal
import socket
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


class EpollRelay:
    """The same relay on a bare epoll loop. A peer that cannot take everything at once
    gets the rest when it is writable, and its source is not read meanwhile."""

    def __init__(self, host: str, port: int, upstream_port: int) -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.epoll = select.epoll()
        self.listener = socket.create_server((host, port), backlog=1024)
        self.listener.setblocking(False)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.sockets: dict[int, socket.socket] = {}
        self.peers: dict[int, int] = {}
        self.unsent: dict[int, bytes] = {}  # fd -> bytes still to write to it
        self.stopped = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        listen_fd = self.listener.fileno()
        while not self.stopped:
            try:
                # A timeout: Python retries a poll that a signal interrupted, so
                # SIGTERM's flag is seen only when poll returns.
                events = self.epoll.poll(0.5)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == listen_fd:
                    self._accept()
                elif mask & select.EPOLLOUT:
                    self._flush(fd)
                elif fd in self.sockets:
                    self._read(fd)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopped = True

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection((self.host, self.upstream_port))
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets[sock.fileno()] = sock
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.peers[client.fileno()] = upstream.fileno()
        self.peers[upstream.fileno()] = client.fileno()

    def _read(self, fd: int) -> None:
        try:
            data = self.sockets[fd].recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        peer = self.peers[fd]
        if self._send(peer, data) is False:
            self.epoll.modify(peer, select.EPOLLOUT)
            self.epoll.modify(fd, 0)  # stop reading the source until the peer drains

    def _flush(self, fd: int) -> None:
        if self._send(fd, self.unsent.pop(fd, b"")):
            self.epoll.modify(fd, select.EPOLLIN)
            self.epoll.modify(self.peers[fd], select.EPOLLIN)

    def _send(self, fd: int, data: bytes) -> bool | None:
        """Write to `fd`: True if all of it went out, False if the rest waits in
        `unsent`, None if an error closed the pair."""
        try:
            sent = self.sockets[fd].send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(fd)
            return None
        if sent < len(data):
            self.unsent[fd] = data[sent:]
            return False
        return True

    def _close(self, fd: int) -> None:
        for one in (fd, self.peers.get(fd, -1)):
            sock = self.sockets.pop(one, None)
            if sock is not None:
                self.epoll.unregister(one)
                self.peers.pop(one, None)
                self.unsent.pop(one, None)
                sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--loop", choices=("uvloop", "epoll"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "epoll":
        relay = EpollRelay(args.host, args.port, args.upstream_port)
        print(f"relaying {args.host}:{args.port} -> {args.upstream_port} on epoll", flush=True)
        relay.run()
    elif uvloop is not None:
        uvloop.run(serve(args.host, args.port, args.upstream_port))
    else:
        asyncio.run(serve(args.host, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
