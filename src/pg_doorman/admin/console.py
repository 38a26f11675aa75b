"""Admin console on the virtual databases `pgdoorman` / `pgbouncer` (simple query only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pg_doorman import __version__
from pg_doorman.net.server import ServerConnection
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import MessageBuffer
from pg_doorman.protocol.messages import ProtocolError

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler
    from pg_doorman.net.client import ClientConnection

logger = logging.getLogger("pg_doorman.admin")

TEXT = 25
INT8 = 20

Rows = list[Sequence[object]]


def result(columns: Sequence[tuple[str, int]], rows: Rows, tag: str) -> bytes:
    parts = [messages.row_description(columns)]
    for row in rows:
        parts.append(messages.data_row(None if v is None else str(v) for v in row))
    parts.append(messages.command_complete(tag))
    return b"".join(parts)


class AdminConsole:
    def __init__(self, pooler: Pooler, client: ClientConnection) -> None:
        self.pooler = pooler
        self.client = client
        self._inbox = MessageBuffer()
        self._commands: dict[str, Callable[[], bytes]] = {
            "help": self._help,
            "version": self._version,
            "pools": self._pools,
            "clients": self._clients,
            "servers": self._servers,
            "stats": self._stats,
        }

    def greeting(self) -> bytes:
        params = {
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "TimeZone": "Etc/UTC",
            "server_version": __version__,
            "server_encoding": "UTF8",
            "standard_conforming_strings": "on",
            "integer_datetimes": "on",
            "application_name": "pg_doorman",
        }
        return b"".join(messages.parameter_status(k, v) for k, v in params.items())

    def data_received(self, data: bytes) -> None:
        self._inbox.feed(data)
        try:
            while (msg := self._inbox.next_message()) is not None:
                msg_type, body = msg
                if msg_type == codes.TERMINATE:
                    self.client.close()
                    return
                if msg_type != codes.QUERY:
                    self.client.fail(
                        sqlstate.PROTOCOL_VIOLATION,
                        "the admin console supports the simple query protocol only",
                    )
                    return
                self.client.write(self._run(messages.parse_query_text(body)))
        except ProtocolError as exc:
            self.client.fail(sqlstate.PROTOCOL_VIOLATION, f"invalid message: {exc}")

    def _run(self, text: str) -> bytes:
        replies = []
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            replies.append(messages.EMPTY_QUERY)
        for statement in statements:
            words = statement.lower().split()
            handler = None
            if len(words) == 2 and words[0] == "show":
                handler = self._commands.get(words[1])
            if handler is None:
                replies.append(
                    messages.error_response(
                        "ERROR", sqlstate.SYNTAX_ERROR, f"unsupported admin command: {statement}"
                    )
                )
                break
            replies.append(handler())
        replies.append(messages.READY_IDLE)
        return b"".join(replies)

    def _help(self) -> bytes:
        rows: Rows = [[f"SHOW {name.upper()}"] for name in self._commands]
        return result([("item", TEXT)], rows, "SHOW")

    def _version(self) -> bytes:
        return result([("version", TEXT)], [[f"pg_doorman {__version__}"]], "SHOW")

    def _pools(self) -> bytes:
        rows: Rows = []
        for (database, user), entry in self.pooler.entries.items():
            pool = entry.pool
            clients = [c for c in self.pooler.clients.values() if c.pool is pool]
            rows.append(
                [
                    database,
                    user,
                    pool.settings.pool_mode,
                    sum(1 for c in clients if c.state_name == "idle"),
                    sum(1 for c in clients if c.state_name == "active"),
                    sum(1 for c in clients if c.state_name == "waiting"),
                    pool.active,
                    len(pool.idle),
                    pool.connecting,
                    pool.settings.pool_size,
                    int(pool.oldest_wait(self.pooler.loop.time())),
                    int(pool.paused),
                ]
            )
        columns = [
            ("database", TEXT), ("user", TEXT), ("pool_mode", TEXT), ("cl_idle", INT8),
            ("cl_active", INT8), ("cl_waiting", INT8), ("sv_active", INT8), ("sv_idle", INT8),
            ("sv_login", INT8), ("pool_size", INT8), ("maxwait", INT8), ("paused", INT8),
        ]  # fmt: skip
        return result(columns, rows, "SHOW")

    def _clients(self) -> bytes:
        now = time.monotonic()
        rows: Rows = [
            [
                c.name, c.database, c.user, c.application_name, c.address or "unix",
                c.state_name, c.transactions, c.queries, int(now - c.connected_at),
            ]
            for c in self.pooler.clients.values()
        ]  # fmt: skip
        columns = [
            ("client_id", TEXT), ("database", TEXT), ("user", TEXT), ("application_name", TEXT),
            ("addr", TEXT), ("state", TEXT), ("transaction_count", INT8),
            ("query_count", INT8), ("age_seconds", INT8),
        ]  # fmt: skip
        return result(columns, rows, "SHOW")

    def _servers(self) -> bytes:
        now = time.monotonic()
        rows: Rows = []
        for entry in self.pooler.entries.values():
            for server in entry.pool.servers:
                assert isinstance(server, ServerConnection)
                rows.append(
                    [
                        f"0x{server.server_id:08X}", server.backend_pid,
                        entry.pool.settings.database, entry.pool.settings.user,
                        server.state_name, server.transactions, server.queries,
                        int(now - server.created),
                    ]
                )  # fmt: skip
        columns = [
            ("server_id", TEXT), ("server_process_id", INT8), ("database_name", TEXT),
            ("user", TEXT), ("state", TEXT), ("transaction_count", INT8), ("query_count", INT8),
            ("age_seconds", INT8),
        ]  # fmt: skip
        return result(columns, rows, "SHOW")

    def _stats(self) -> bytes:
        rows: Rows = []
        for (database, user), entry in self.pooler.entries.items():
            st = entry.pool.stats
            rows.append(
                [
                    database, user, st.xact_count, st.query_count, st.bytes_received,
                    st.bytes_sent, int(st.xact_time * 1e6), int(st.query_time * 1e6),
                    int(st.wait_time * 1e6), st.total_errors,
                ]
            )  # fmt: skip
        columns = [
            ("database", TEXT), ("user", TEXT), ("total_xact_count", INT8),
            ("total_query_count", INT8), ("total_received", INT8), ("total_sent", INT8),
            ("total_xact_time", INT8), ("total_query_time", INT8), ("total_wait_time", INT8),
            ("total_errors", INT8),
        ]  # fmt: skip
        return result(columns, rows, "SHOW")
