"""SocketWriter on real sockets and real transports (uvloop's, and asyncio's own)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pg_doorman.net.writer import SocketWriter, direct_descriptor

uvloop = pytest.importorskip("uvloop")


class Endpoint(asyncio.Protocol):
    """Owns a SocketWriter as the pooler's connections do: stopped when the connection
    is lost, before the transport closes the descriptor."""

    def __init__(self) -> None:
        self.writer: SocketWriter | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.writer = SocketWriter(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.writer is not None
        self.writer.stop()
        if not self.lost.done():
            self.lost.set_result(exc)


def run(make_loop: Callable[[], asyncio.AbstractEventLoop], test: Awaitable[Any]) -> None:
    loop = make_loop()
    try:
        loop.run_until_complete(test)
    finally:
        loop.close()


async def adopt(sock: socket.socket) -> tuple[asyncio.Transport, Endpoint]:
    loop = asyncio.get_running_loop()
    transport, endpoint = await loop.connect_accepted_socket(Endpoint, sock)
    return transport, endpoint


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < size:
        chunk = await loop.sock_recv(sock, 256 * 1024)
        assert chunk, f"peer closed after {len(received)} of {size} bytes"
        received += chunk
    return bytes(received)


def test_writes_go_to_the_socket_and_stay_in_order_when_it_fills() -> None:
    async def main() -> None:
        ours, peer = socket.socketpair()
        for sock in (ours, peer):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        peer.setblocking(False)
        transport, endpoint = await adopt(ours)
        writer = endpoint.writer
        assert writer is not None and writer.direct
        # Numbered chunks of uneven sizes, far more than the socket buffers hold.
        chunks = [struct.pack("!I", i) * (100 + i * 37 % 3000) for i in range(600)]
        expected = b"".join(chunks)
        writer.write(chunks[0])
        assert not writer.queued  # the empty socket took the first chunk whole
        went_through_transport = False
        for chunk in chunks[1:]:
            writer.write(chunk)
            went_through_transport |= writer.queued
        assert went_through_transport  # the kernel refused some: the transport queued it
        assert transport.get_write_buffer_size() > 0
        assert await read_exactly(peer, len(expected)) == expected
        # Once the transport has sent all it held, writes go to the socket again.
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        writer.write(b"after")
        assert not writer.queued
        assert await read_exactly(peer, 5) == b"after"
        transport.close()
        await endpoint.lost
        peer.close()

    run(uvloop.new_event_loop, main())


def test_a_lost_connection_never_writes_to_its_descriptor_number_again() -> None:
    async def main() -> None:
        ours, peer = socket.socketpair()
        number = ours.fileno()
        transport, endpoint = await adopt(ours)
        writer = endpoint.writer
        assert writer is not None and writer.direct
        peer.close()  # end of file: uvloop closes the transport, then the descriptor
        await endpoint.lost
        await asyncio.sleep(0)  # the transport's close runs after connection_lost
        assert not writer.direct
        # The descriptor number is free now; a new socket takes the lowest free one.
        reused, listener = socket.socketpair()
        sockets = [reused, listener]
        while number not in (reused.fileno(), listener.fileno()) and len(sockets) < 64:
            sockets += socket.socketpair()
            reused, listener = sockets[-2], sockets[-1]
        assert number in (reused.fileno(), listener.fileno())
        other = listener if reused.fileno() == number else reused
        other.setblocking(False)
        with contextlib.suppress(RuntimeError):  # uvloop refuses a closed transport
            writer.write(b"late bytes")
        with pytest.raises(BlockingIOError):
            other.recv(100)  # nothing reached the connection that took the number
        for sock in sockets:
            sock.close()
        assert transport.is_closing()

    run(uvloop.new_event_loop, main())


def test_a_broken_pipe_is_reported_by_the_transport() -> None:
    async def main() -> None:
        ours, peer = socket.socketpair()
        transport, endpoint = await adopt(ours)
        transport.pause_reading()  # the end of file is not read: the write finds it
        writer = endpoint.writer
        assert writer is not None and writer.direct
        peer.close()
        writer.write(b"into a closed pipe")
        assert not writer.direct  # the error went to the transport, which closes
        lost = await asyncio.wait_for(endpoint.lost, 5)
        assert isinstance(lost, BrokenPipeError | ConnectionResetError)
        assert transport.is_closing()

    run(uvloop.new_event_loop, main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_transports_without_a_socket_of_their_own_are_written_through(loop_kind: str) -> None:
    """asyncio's own transports, and uvloop's TLS transport, are not written to directly;
    writes still arrive through them."""
    make_loop = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, endpoint = await adopt(ours)
        writer = endpoint.writer
        assert writer is not None
        assert writer.direct == (loop_kind == "uvloop")
        if loop_kind == "uvloop":
            # A transport of another kind, as the TLS layer's is to uvloop.
            assert direct_descriptor(_NotASocketTransport()) == -1  # type: ignore[arg-type]
        writer.write(b"hello")
        assert await read_exactly(peer, 5) == b"hello"
        transport.close()
        await endpoint.lost
        peer.close()

    run(make_loop, main())


class _NotASocketTransport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return default
