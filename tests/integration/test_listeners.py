"""Listeners and socket options as the config sets them, read back from the kernel:
server sockets, IPv6 listening, and the Unix socket file's life (stale, live, upgrade,
shutdown)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import stat
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from test_upgrade import successors, upgrade  # noqa: F401 (successors: a fixture)

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port, process_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sockets")

_PIDFD_GETFD = 438  # the same number on every Linux architecture


def _copy_descriptor(pid: int, fd: int) -> int:
    """A descriptor of this process for process `pid`'s descriptor `fd`."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copied = int(libc.syscall(_PIDFD_GETFD, pidfd, fd, 0))
        if copied < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return copied
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def tcp_sockets_of(pid: int) -> Iterator[list[socket.socket]]:
    """The connected TCP sockets process `pid` holds, to call getsockopt on."""
    found: list[socket.socket] = []
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if not os.readlink(entry).startswith("socket:"):
                    continue
                sock = socket.socket(fileno=_copy_descriptor(pid, int(entry.name)))
                if sock.type != socket.SOCK_STREAM or sock.family == socket.AF_UNIX:
                    sock.close()
                    continue
                try:
                    sock.getpeername()
                except OSError:  # a listener
                    sock.close()
                    continue
                found.append(sock)
        yield found
    finally:
        for sock in found:
            sock.close()


def buffer_sizes(sock: socket.socket) -> tuple[int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def keepalive(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


# ---- TCP socket options -------------------------------------------------------------


def test_server_and_client_sockets_carry_the_tcp_options(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """tcp_keepalives_* apply to both sides, tcp_socket_buffer_size too (Linux doubles
    the 64 KiB); linger and the user timeout to the client side only."""
    proc = pooler(
        general={
            "tcp_keepalives_idle": 31,
            "tcp_keepalives_interval": 7,
            "tcp_keepalives_count": 3,
            "tcp_user_timeout": 17,
            "tcp_so_linger": 4,
            "tcp_socket_buffer_size": "64KB",
        }
    )
    assert proc.pid is not None
    user = pg.scram_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        with tcp_sockets_of(proc.pid) as sockets:
            clients = [s for s in sockets if s.getsockname()[1] == proc.port]
            servers = [s for s in sockets if s.getpeername()[1] == pg.port]
            assert len(clients) == 1 and len(servers) == 1, [s.getpeername() for s in sockets]
            for sock in (*clients, *servers):
                assert keepalive(sock) == (1, 31, 7, 3)
                assert buffer_sizes(sock) == (131072, 131072)
            client, server = clients[0], servers[0]
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 17_000
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == (
                (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
            )
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# ---- IPv6 ---------------------------------------------------------------------------


def _bindv6only() -> bool:
    return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_host_ipv6_wildcard_takes_ipv6_and_ipv4_clients(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """host = "::" as in PgDoorman: one dual-stack socket, IPv4 clients included
    unless the system sets net.ipv6.bindv6only."""
    proc = pooler(general={"host": "::"})
    user = pg.md5_user
    hosts = ["::1"] if _bindv6only() else ["::1", "127.0.0.1"]
    for host in hosts:
        dsn = f"host={host} port={proc.port} dbname={EXAMPLE_DB} user={user.name}"
        with psycopg.connect(dsn, password=user.password, autocommit=True) as conn:
            assert conn.execute("select inet_client_addr() is not null").fetchone() == (True,)


def test_bracketed_ipv6_host_and_a_dual_stack_web_listener(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """host = "[::1]" (an IPv6 address as URLs write it, which PgDoorman takes) listens
    on ::1; the web listener binds as the pooler's do, so [web] host = "::" answers
    IPv4 scrapes too unless the system sets net.ipv6.bindv6only."""
    web_port = free_port()
    proc = pooler(general={"host": "[::1]"}, web={"enabled": True, "host": "::", "port": web_port})
    user = pg.md5_user
    dsn = f"host=::1 port={proc.port} dbname={EXAMPLE_DB} user={user.name}"
    with psycopg.connect(dsn, password=user.password, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    hosts = ["[::1]"] if _bindv6only() else ["[::1]", "127.0.0.1"]
    for host in hosts:
        url = f"http://{host}:{web_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"pg_doorman_pools_clients" in response.read()


# ---- the Unix socket file -----------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as name:
        yield Path(name)


UNIX_HBA = "local all all md5\nhost all all 127.0.0.1/32 md5\n"


def unix_query(pg: ExamplePostgres, directory: Path, port: int) -> int:
    """Log in over the socket in `directory` and return the pooler's answer."""
    user = pg.md5_user
    dsn = f"host={directory} port={port} dbname={EXAMPLE_DB} user={user.name}"
    with psycopg.connect(dsn, password=user.password, autocommit=True, connect_timeout=10) as c:
        row = c.execute("select 1").fetchone()
        assert row is not None
        return int(row[0])


def unix_pooler(pooler: PoolerFactory, directory: Path, **general: object) -> PoolerProcess:
    settings = {"unix_socket_dir": str(directory), "pg_hba": UNIX_HBA, **general}
    return pooler(general=settings)


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_file_has_its_mode_and_is_removed_at_shutdown(
    pg: ExamplePostgres, pooler: PoolerFactory, socket_dir: Path, workers: int
) -> None:
    proc = unix_pooler(pooler, socket_dir, unix_socket_mode="0660", workers=workers)
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    path = socket_dir / f".s.PGSQL.{proc.port}"
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    assert unix_query(pg, socket_dir, proc.port) == 1
    assert proc.stop() == 0
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(
    pg: ExamplePostgres, pooler: PoolerFactory, socket_dir: Path
) -> None:
    """What a killed pooler leaves: a socket file nobody listens on."""
    config = pooler.config(general={"unix_socket_dir": str(socket_dir), "pg_hba": UNIX_HBA})
    port = config["general"]["port"]
    path = socket_dir / f".s.PGSQL.{port}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.exists()
    proc = pooler(config)
    assert unix_query(pg, socket_dir, proc.port) == 1


def test_a_live_socket_file_of_another_pooler_is_not_taken(
    pg: ExamplePostgres, pooler: PoolerFactory, socket_dir: Path
) -> None:
    """A second pooler on the same port and directory (SO_REUSEPORT lets it share the
    TCP port) must not unlink the first one's socket: it fails to start instead."""
    first = unix_pooler(pooler, socket_dir)
    path = socket_dir / f".s.PGSQL.{first.port}"
    inode = path.lstat().st_ino
    second = pooler(
        general={"port": first.port, "unix_socket_dir": str(socket_dir), "pg_hba": UNIX_HBA},
        start=False,
    )
    second.spawn()
    assert second.wait_exit() != 0
    assert "another process is listening on it" in second.log_text()
    assert path.lstat().st_ino == inode
    assert unix_query(pg, socket_dir, first.port) == 1


def test_the_socket_file_serves_through_an_upgrade(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    socket_dir: Path,
    successors: list[int],  # noqa: F811
) -> None:
    """The new process takes the listening socket over: the old one must not remove
    the file on its way out; the new one removes it when it stops."""
    proc = unix_pooler(pooler, socket_dir, shutdown_timeout=2000)
    path = socket_dir / f".s.PGSQL.{proc.port}"
    successor = upgrade(proc, successors)
    assert unix_query(pg, socket_dir, proc.port) == 1
    assert proc.wait_exit() == 0
    assert path.exists()
    assert unix_query(pg, socket_dir, proc.port) == 1
    os.kill(successor, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while process_alive(successor):
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    assert not path.exists()
