"""Server logins that fail or are given up leave the pool's accounting as it was.

A backend that refuses a login (and keeps its socket open until the pooler closes
it), or one that never answers within connect_timeout: the pooler opens servers only
for the clients that ask, and stops when they are gone: a server that never joined
the pool gives back no slot when its socket closes (counting it would make the pool
believe it is below its minimum and open servers in a loop).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory


class LoginFailingBackend:
    """A stand-in for PostgreSQL that either refuses every login with 22023 or never
    answers; either way it holds the socket until the pooler closes it, and counts
    the connections it got and those still open."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.accepted, self.open

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            with sock:
                header = sock.recv(4)
                if len(header) == 4 and self.refuse:
                    (length,) = struct.unpack("!i", header)
                    sock.recv(length - 4)
                    sock.sendall(
                        w.message(
                            b"E",
                            b"SFATAL\0VFATAL\0C22023\0"
                            + b'Minvalid value for parameter "work_mem": "lots"\0\0',
                        )
                    )
                while sock.recv(4096):  # until the pooler closes it
                    pass
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1


def settled_counts(backend: LoginFailingBackend, quiet: float = 1.0) -> tuple[int, int]:
    """The backend's counts once no connection came or went for `quiet` seconds."""
    deadline = time.monotonic() + 10
    last = backend.counts()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = backend.counts()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"the pooler kept opening server connections: {last}")


@pytest.mark.parametrize("refuse", [True, False], ids=["login-refused", "connect-timeout"])
def test_failed_server_logins_do_not_open_more_servers(
    pg: ExamplePostgres, pooler: PoolerFactory, refuse: bool
) -> None:
    backend = LoginFailingBackend(refuse)
    try:
        user = pg.md5_user
        proc = pooler(
            general={"connect_timeout": 200, "query_wait_timeout": 700},
            pools={
                "example_db": {
                    "server_host": "127.0.0.1",
                    "server_port": backend.port,
                    "users": [{"username": user.name, "pool_size": 2}],
                }
            },
        )
        for _ in range(3):
            with pytest.raises(w.ServerError) as info:
                w.PgWire.connect(proc.host, proc.port, user.name, "example_db", user.password)
            expected = "22023" if refuse else "08006"
            assert info.value.sqlstate == expected, info.value.fields
        accepted, still_open = settled_counts(backend)
        if refuse:
            # A refusal is final: one server per login, no retries.
            assert accepted == 3, proc.log_text()
        else:
            # Timeouts are retried with a backoff while the client waits.
            assert 3 <= accepted <= 3 * 7, proc.log_text()
        assert still_open == 0, proc.log_text()
        # Nothing was opened once the clients were gone.
        time.sleep(0.5)
        assert backend.counts() == (accepted, 0), proc.log_text()
    finally:
        backend.close()
