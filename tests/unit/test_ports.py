"""Ports for test servers: drawn once per process, and ones that stay refused."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import pytest

from pg_doorman.app.embedded_pg import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    """A port drawn for one server and not bound by it yet must not be drawn again
    for another (the pooler under test once got the port a test had taken for a
    server that was down, and connected to itself)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # and it was free


def test_a_refused_port_refuses_and_cannot_be_taken(refused_port: Callable[[], int]) -> None:
    port = refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as sock, pytest.raises(OSError) as taken:
        sock.bind(("127.0.0.1", port))
    assert taken.value.errno == errno.EADDRINUSE
