"""What proxy_copy_data_timeout reads: the size of the backend message the relay is
inside of, and how much of what was written to a client it has yet to take."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import Callable

import pytest

from pg_doorman.net.send_queue import untaken_bytes
from pg_doorman.protocol.framing import BackendScanner


def data_row(value: bytes) -> bytes:
    body = struct.pack("!hi", 1, len(value)) + value
    return b"D" + struct.pack("!I", len(body) + 4) + body


def test_the_scanner_knows_the_size_of_the_message_it_is_inside_of() -> None:
    scanner = BackendScanner({})
    row = data_row(b"x" * 100_000)
    ready = b"Z\x00\x00\x00\x05I"
    assert scanner.feed(row[:30_000]) == row[:30_000]
    assert (scanner.need, scanner.passing_size) == (len(row) - 30_000, len(row))
    scanner.feed(row[30_000:60_000])  # the rest of it, still not all
    assert (scanner.need, scanner.passing_size) == (len(row) - 60_000, len(row))
    smaller = data_row(b"y" * 10)
    scanner.feed(row[60_000:] + smaller + ready[:3])
    assert scanner.need == 0
    scanner.feed(ready[3:] + smaller[:8])
    assert (scanner.need, scanner.passing_size) == (len(smaller) - 8, len(smaller))


def _event_loops() -> list[str]:
    loops = ["asyncio"]
    if sys.platform.startswith("linux"):
        loops.append("uvloop")
    return loops


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's SIOCOUTQ")
@pytest.mark.parametrize("event_loop", _event_loops())
def test_untaken_bytes_count_the_kernel_queue_and_fall_as_the_peer_reads(
    event_loop: str,
) -> None:
    """A transport's own buffer says nothing of the bytes the kernel holds for a peer
    that reads nothing; untaken_bytes counts them, drops as the peer reads, and is 0
    once the peer has read everything."""
    if event_loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        runner: Callable[..., object] = uvloop.run
    else:
        runner = asyncio.run
    listener = socket.create_server(("127.0.0.1", 0))
    total = 8 * 1024 * 1024

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, *listener.getsockname()[:2])
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            transport.write(b"x" * total)
            await asyncio.sleep(0.2)
            held = transport.get_write_buffer_size()
            before = untaken_bytes(transport)
            assert before > held > 0
            received = len(peer.recv(256 * 1024))
            assert received > 0
            deadline = time.monotonic() + 10
            while untaken_bytes(transport) >= before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert untaken_bytes(transport) < before
            peer.setblocking(False)
            while received < total and time.monotonic() < deadline:
                try:
                    received += len(peer.recv(1024 * 1024))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            assert received == total
            while untaken_bytes(transport) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert untaken_bytes(transport) == 0
        finally:
            transport.close()
            peer.close()

    try:
        runner(main())
    finally:
        listener.close()
