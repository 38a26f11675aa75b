"""The [general] tcp_* options of client and server connections, and the buffer sizes
of Unix-socket connections (unix_socket_buffer_size).

Linux copies a listening socket's options to every connection it accepts, so setting
them once on the listener saves several setsockopt calls per connection.
"""

from __future__ import annotations

import contextlib
import socket
import sys

from pg_doorman.config.schema import GeneralConfig

INHERITS_SOCKET_OPTIONS = sys.platform.startswith("linux")


def apply_socket_options(sock: socket.socket, general: GeneralConfig) -> None:
    """The [general] tcp_* options, on a client connection or a listening socket."""
    with contextlib.suppress(OSError):
        if not general.tcp_no_delay:
            # asyncio and uvloop both enable TCP_NODELAY on every TCP connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, general.tcp_keepalives_idle)
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, general.tcp_keepalives_interval
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, general.tcp_keepalives_count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # 0 turns it off: also undoes an earlier value after a reload.
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, general.tcp_user_timeout * 1000
            )
        if general.tcp_so_linger > 0:
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_LINGER,
                (1).to_bytes(4, "little") + general.tcp_so_linger.to_bytes(4, "little"),
            )
        if general.tcp_socket_buffer_size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, general.tcp_socket_buffer_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, general.tcp_socket_buffer_size)


def apply_server_socket_options(
    sock: socket.socket, keepalive: tuple[int, int, int], buffer_size: int
) -> None:
    """A TCP connection to PostgreSQL: TCP_NODELAY, keepalive with the [general]
    tcp_keepalives_idle/_interval/_count (seconds), and tcp_socket_buffer_size (0: the
    kernel's autotuning). As PgDoorman: no linger and no user timeout here."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle, interval, count = keepalive
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if buffer_size:
            set_buffer_sizes(sock, buffer_size)


def options_key(general: GeneralConfig) -> tuple[object, ...]:
    """What `apply_socket_options` sets, to tell whether two configs tune alike."""
    return (
        general.tcp_no_delay,
        general.tcp_keepalives_idle,
        general.tcp_keepalives_interval,
        general.tcp_keepalives_count,
        general.tcp_user_timeout,
        general.tcp_so_linger,
        general.tcp_socket_buffer_size,
    )


def set_buffer_sizes(sock: socket.socket, size: int) -> None:
    """SO_SNDBUF and SO_RCVBUF of one connection (Linux doubles them for its own
    bookkeeping and caps them at net.core.wmem_max/rmem_max)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
