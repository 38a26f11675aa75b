"""Client socket options from [general]: set on the listening socket, inherited by
every accepted connection on Linux, or set on each connection."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

from helpers.sockets import connect, loopback_listener
from pg_doorman.config.schema import GeneralConfig
from pg_doorman.net.sockopts import INHERITS_SOCKET_OPTIONS, apply_socket_options

TUNED = GeneralConfig(
    tcp_keepalives_idle=7,
    tcp_keepalives_interval=3,
    tcp_keepalives_count=4,
    tcp_user_timeout=12,
    tcp_so_linger=2,
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with loopback_listener() as sock:
        yield sock


def assert_tuned(sock: socket.socket) -> None:
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_000
    linger = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    assert linger == (1).to_bytes(4, "little") + (2).to_bytes(4, "little")


def test_options_on_an_accepted_connection(listener: socket.socket) -> None:
    client, accepted = connect(listener)
    with client, accepted:
        apply_socket_options(accepted, TUNED)
        assert_tuned(accepted)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inheritance is Linux's")
def test_connections_inherit_the_listening_socket_options(listener: socket.socket) -> None:
    assert INHERITS_SOCKET_OPTIONS
    apply_socket_options(listener, TUNED)
    client, accepted = connect(listener)
    with client, accepted:
        assert_tuned(accepted)


def test_no_delay_false_turns_it_off(listener: socket.socket) -> None:
    client, accepted = connect(listener)
    with client, accepted:
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the loop leaves it
        apply_socket_options(accepted, GeneralConfig(tcp_no_delay=False))
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        apply_socket_options(accepted, GeneralConfig())
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
