"""A TCP relay in front of the test PostgreSQL, for tests that shape what the pooler
receives from its servers; and the clean-up such tests need afterwards."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from . import ExamplePostgres
from .sockets import pump, shut_down


class PostgresRelay:
    """Accepts connections (the pooler's, to `port`) and relays each to PostgreSQL: the
    pooler's bytes as they come, PostgreSQL's as relay_for_connection() says, which
    subclasses change."""

    def __init__(self, pg: ExamplePostgres) -> None:
        self.pg = pg
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        # shutdown, not only close: it wakes the pump blocked in recv on each, and
        # PostgreSQL's end sees the connection end now.
        shut_down(*self._sockets)
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.pg.host, self.pg.port))
            self._sockets += [downstream, upstream]
            threading.Thread(target=pump, args=(downstream, upstream), daemon=True).start()
            relay = self.relay_for_connection()
            threading.Thread(target=relay, args=(upstream, downstream), daemon=True).start()

    def relay_for_connection(self) -> Callable[[socket.socket, socket.socket], None]:
        """What relays the next connection's server bytes to the pooler (asked in the
        order the connections are accepted)."""
        return pump


def end_user_backends(pg: ExamplePostgres) -> None:
    """Terminate the md5 user's backends and wait until they are gone: the next test
    may count them."""
    user = pg.md5_user.name
    pg.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{user}'")
    count = f"select count(*) from pg_stat_activity where usename = '{user}'"
    deadline = time.monotonic() + 10
    while pg.psql(count).strip() != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
