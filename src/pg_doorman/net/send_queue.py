"""How much of what was written to a connection its peer has yet to take.

proxy_copy_data_timeout tells a client that reads slowly from one that has stopped by
whether this goes down. The transport's own buffer alone would not do: it shrinks only
when the kernel's send buffer has room again, and the kernel reports room only once a
third or so of that buffer (several MB once autotuned) is free, which a slow reader may
take longer than the timeout to free. The kernel's send queue goes down with every
byte the peer acknowledges, which it does as its reader takes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from typing import Final

# Linux's SIOCOUTQ: bytes of a TCP socket not yet acknowledged by the peer, or of a
# Unix socket not yet read by the peer. Elsewhere the transport's buffer is all there is.
_OUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INT: Final = struct.Struct("i")


def untaken_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to `transport` that its peer has not taken yet, as far as the
    system tells: the transport's buffer plus the socket's send queue."""
    held = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _OUTQ is None or sock is None:
        return held
    with contextlib.suppress(OSError, ValueError):
        queued: int = _INT.unpack(fcntl.ioctl(sock.fileno(), _OUTQ, bytes(_INT.size)))[0]
        return held + queued
    return held
