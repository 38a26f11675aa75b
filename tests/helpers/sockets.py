"""Loopback TCP sockets for unit tests of socket handling."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def connect(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client connection to `listener` and its accepted end."""
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return client, accepted


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Relay `source` to `sink` until either end closes, then shut both down: a
    shutdown, unlike a close, wakes the other direction's thread blocked in recv and
    lets the peers see the end at once."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        shut_down(source, sink)


def shut_down(*sockets: socket.socket) -> None:
    """Shut each socket down in both directions, ignoring ones already gone."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
