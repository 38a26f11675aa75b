"""A connection's writes, straight to its socket while the transport holds none back.

uvloop's `transport.write` appends the bytes to a list, tries to send them, and then
clears the list through a Python method call: about 1,000 instructions per write on top
of the system call, twice per transaction, for a list that almost always holds one item
for an instant. `SocketWriter.write` sends with one system call on the transport's own
(non-blocking) socket instead, and hands the transport whatever the kernel did not take,
so the transport's buffering, flow control (`pause_writing`) and error handling are the
same as before. Bytes never overtake each other: once the transport holds some, every
later write goes through it until it has sent them all.

The system call is `send_now` from the C helper `_send` with the compiled build: it keeps
the GIL, which `os.write` releases and takes back around every call (about 500
instructions, as much as the rest of a write); a send with MSG_DONTWAIT never waits, so
nothing else could have run meanwhile. With the sources, `os.write` does the same job.

The descriptor is only written to while the transport owns it: uvloop closes it after
the protocol's `connection_lost` returns, and the descriptor's number may belong to
another connection after that. The owner calls `stop()` as soon as the connection is
closing or lost, or its socket moves to another process; from then on everything goes
through the transport, which drops or refuses what comes too late, as it always did.
TLS transports, and the transports of other event loops, are always written through.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Final

from pg_doorman import implementation

_os_write: Final = os.write


def send_with_os_write(fd: int, data: bytes) -> int:
    """`_send.send_now` with the standard library: the bytes the kernel took, 0 when
    the socket is full; OSError for anything else."""
    try:
        return _os_write(fd, data)
    except (BlockingIOError, InterruptedError):
        return 0


def _pick_send() -> Callable[[int, bytes], int]:
    if implementation.ACTIVE == "compiled":  # the build holds the C helper too
        from pg_doorman.net import _send

        return _send.send_now
    return send_with_os_write


# What every write sends with (see the module's docstring).
send_now: Final = _pick_send()


def _direct_transport_types() -> frozenset[type]:
    """uvloop's stream transports over a socket the pooler may write to itself (none
    where uvloop is not installed)."""
    try:
        from uvloop import loop as uvloop_loop
    except ImportError:
        return frozenset()
    # Public classes of uvloop.loop that its type stubs leave out.
    return frozenset({uvloop_loop.TCPTransport, uvloop_loop.UnixTransport})  # type: ignore[attr-defined]


# The types themselves, found once: reading an extension type's `__module__` and
# `__name__` builds new strings each time, which every connection would pay for.
_DIRECT_TRANSPORTS: Final = _direct_transport_types()


def direct_descriptor(transport: asyncio.BaseTransport) -> int:
    """The descriptor of the socket under uvloop's plain TCP or Unix `transport`, -1
    for any other transport (TLS, another event loop's)."""
    if type(transport) not in _DIRECT_TRANSPORTS:
        return -1
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        fd: int = sock.fileno()
    except OSError:
        return -1
    return fd


class SocketWriter:
    """Writes for one transport; see the module's docstring."""

    __slots__ = ("_fd", "_queued", "_transport", "_transport_write")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        # Bound once: calling it skips the method lookup `transport.write(...)` costs.
        self._transport_write = transport.write
        self._fd = direct_descriptor(transport)
        # The transport may hold bytes not sent yet: ask it before writing directly.
        self._queued = False

    @property
    def direct(self) -> bool:
        """Whether writes may still go to the socket itself."""
        return self._fd >= 0

    @property
    def queued(self) -> bool:
        """Whether the transport may still hold bytes of an earlier write."""
        return self._queued

    def write(self, data: bytes) -> None:
        fd = self._fd
        if fd < 0:
            self._transport_write(data)
            return
        if self._queued:
            if self._transport.get_write_buffer_size():
                self._transport_write(data)
                return
            self._queued = False
        try:
            sent = send_now(fd, data)
        except OSError:
            # A reset or a broken pipe: the transport meets the same error on its own
            # write and reports it (connection_lost) as it always does.
            self._fd = -1
            self._transport_write(data)
            return
        if sent < len(data):
            # The socket's buffer is full: the transport keeps the rest and sends it when
            # the socket can take it, pausing the protocol if it piles up.
            self._queued = True
            self._transport_write(data[sent:])

    def stop(self) -> None:
        """Write through the transport from now on (the connection is closing or gone,
        or its socket is being handed over)."""
        self._fd = -1
