"""The tables behind the admin console's SHOW commands.

Each function reads the running pooler and returns (columns, rows); the console turns
them into RowDescription/DataRow messages. Column names follow PgDoorman (and so
PgBouncer where the two agree); times are microseconds unless the name says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from pg_doorman import __version__
from pg_doorman.config import RESTART_REQUIRED, GeneralConfig, PoolConfig, WebConfig
from pg_doorman.config.loader import (
    GENERAL_NOT_IMPLEMENTED,
    POOL_NOT_IMPLEMENTED,
    WEB_NOT_IMPLEMENTED,
)
from pg_doorman.net.server import ServerConnection
from pg_doorman.prepared.registry import NAMED, UNNAMED
from pg_doorman.stats.counters import PERCENTILES

if TYPE_CHECKING:
    from pg_doorman.app.pooler import PoolEntry, Pooler
    from pg_doorman.net.client import ClientConnection
    from pg_doorman.pool.pool import Pool

TEXT: Final = 25
INT8: Final = 20

Columns = Sequence[tuple[str, int]]
Rows = list[Sequence[object]]
Table = tuple[Columns, Rows]

_SECRET_KEYS: Final = frozenset({"admin_password"})
# Dataclass fields that are structure, not settings (users get a row of their own).
_NOT_SETTINGS: Final = frozenset({"name", "users", "auth_query"})


def _text(columns: Sequence[str]) -> Columns:
    return [(name, TEXT) for name in columns]


def _typed(*columns: str) -> Columns:
    """Columns named `name` (text) or `name:int` (bigint)."""
    out = []
    for column in columns:
        name, _, kind = column.partition(":")
        out.append((name, INT8 if kind == "int" else TEXT))
    return out


def _micros(seconds: float) -> int:
    return int(seconds * 1_000_000)


class ShowTables:
    """Every SHOW table of one pooler."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler

    def tables(self) -> dict[str, Callable[[], Table]]:
        return {
            "help": self.help,
            "config": self.config,
            "databases": self.databases,
            "pools": self.pools,
            "pools_extended": self.pools_extended,
            "pools_memory": self.pools_memory,
            "pool_memory": self.pools_memory,
            "clients": self.clients,
            "servers": self.servers,
            "stats": self.stats,
            "connections": self.connections,
            "lists": self.lists,
            "users": self.users,
            "version": self.version,
            "log_level": self.log_level,
            "prepared_statements": self.prepared_statements,
            "latency": self.latency,
        }

    # ---- helpers ------------------------------------------------------------

    def _pool_clients(self) -> dict[Pool, list[ClientConnection]]:
        by_pool: dict[Pool, list[ClientConnection]] = {}
        for client in self.pooler.clients.values():
            if client.pool is not None:
                by_pool.setdefault(client.pool, []).append(client)
        return by_pool

    def _entries(self) -> Iterator[tuple[str, str, PoolEntry]]:
        for (database, user), entry in self.pooler.entries.items():
            yield database, user, entry

    # ---- tables -------------------------------------------------------------

    def help(self) -> Table:
        items = [
            "SHOW HELP|CONFIG|DATABASES|POOLS|POOLS_EXTENDED|POOLS_MEMORY|CLIENTS|SERVERS"
            "|STATS|CONNECTIONS|LISTS|USERS|VERSION|LOG_LEVEL|PREPARED_STATEMENTS|LATENCY",
            "SHOW LISTS",
            "SHOW CONNECTIONS",
            "SHOW STATS",
            "SET log_level = '<level>'",
            "RELOAD",
            "PAUSE [<db>]",
            "RESUME [<db>]",
            "RECONNECT [<db>]",
            "KILL [<db>]",
            "SHUTDOWN",
        ]
        return _text(["item"]), [[item] for item in items]

    def config(self) -> Table:
        config = self.pooler.config
        rows: Rows = []
        rows.extend(
            _settings_rows("general", config.general, GeneralConfig(), GENERAL_NOT_IMPLEMENTED)
        )
        for name, pool in config.pools.items():
            prefix = f"pools.{_key(name)}"
            rows.extend(_settings_rows(prefix, pool, PoolConfig(name=name), POOL_NOT_IMPLEMENTED))
            users = ", ".join(user.username for user in pool.users)
            rows.append([f"{prefix}.users", users, "-", "yes"])
        rows.extend(_settings_rows("web", config.web, WebConfig(), WEB_NOT_IMPLEMENTED))
        return _text(["key", "value", "default", "changeable"]), rows

    def databases(self) -> Table:
        by_pool = self._pool_clients()
        rows: Rows = []
        for database, user, entry in self._entries():
            s = entry.pool.settings
            rows.append(
                [
                    database, s.server_host, s.server_port, s.server_database, user,
                    s.pool_size, s.min_pool_size, 0, s.pool_mode, s.pool_size,
                    entry.pool.size, len(by_pool.get(entry.pool, ())), int(entry.pool.paused),
                ]
            )  # fmt: skip
        columns = _typed(
            "name", "host", "port:int", "database", "force_user", "pool_size:int",
            "min_pool_size:int", "reserve_pool:int", "pool_mode", "max_connections:int",
            "current_connections:int", "current_client_connections:int", "paused:int",
        )  # fmt: skip
        return columns, rows

    def pools(self) -> Table:
        by_pool = self._pool_clients()
        now = time.monotonic()
        loop_now = self.pooler.loop.time()
        rows: Rows = []
        for database, user, entry in self._entries():
            pool = entry.pool
            clients = by_pool.get(pool, [])
            states = [c.state_name for c in clients]
            maxwait = pool.oldest_wait(loop_now)
            rows.append(
                [
                    database, user, pool.settings.pool_mode,
                    states.count("idle"), states.count("active"), states.count("waiting"), 0,
                    pool.active, len(pool.idle), _used_servers(pool, now), pool.connecting,
                    pool.settings.pool_size, int(maxwait), _micros(maxwait) % 1_000_000,
                    pool.stats.averages.xact_time, int(pool.paused), 0,
                    int(_oldest_active(pool, now) * 1000),
                ]
            )  # fmt: skip
        columns = _typed(
            "database", "user", "pool_mode", "cl_idle:int", "cl_active:int", "cl_waiting:int",
            "cl_cancel_req:int", "sv_active:int", "sv_idle:int", "sv_used:int", "sv_login:int",
            "pool_size:int", "maxwait:int", "maxwait_us:int", "avg_xact_time:int",
            "paused:int", "fallback_active:int", "oldest_active_age_ms:int",
        )  # fmt: skip
        return columns, rows

    def pools_extended(self) -> Table:
        by_pool = self._pool_clients()
        now = time.monotonic()
        loop_now = self.pooler.loop.time()
        rows: Rows = []
        for database, user, entry in self._entries():
            pool = entry.pool
            st = pool.stats
            states = [c.state_name for c in by_pool.get(pool, [])]
            maxwait = pool.oldest_wait(loop_now)
            row: list[object] = [
                database, user, states.count("active"), states.count("waiting"),
                pool.active, len(pool.idle), _used_servers(pool, now), pool.connecting,
                pool.settings.pool_size, int(maxwait), _micros(maxwait) % 1_000_000,
                pool.settings.pool_mode, st.bytes_received, st.bytes_sent,
            ]  # fmt: skip
            for q in (0.99, 0.95, 0.5):
                row.append(_micros(st.recent_quantile("query", q)))
                row.append(_micros(st.recent_quantile("transaction", q)))
            rows.append(row)
        columns = _typed(
            "database", "user", "cl_active:int", "cl_waiting:int", "sv_active:int",
            "sv_idle:int", "sv_used:int", "sv_login:int", "pool_size:int", "maxwait:int",
            "maxwait_us:int", "pool_mode", "bytes_received:int", "bytes_sent:int",
            "query_0.99:int", "transaction_0.99:int", "query_0.95:int",
            "transaction_0.95:int", "query_0.5:int", "transaction_0.5:int",
        )  # fmt: skip
        return columns, rows

    def pools_memory(self) -> Table:
        by_pool = self._pool_clients()
        rows: Rows = []
        for database, user, entry in self._entries():
            pool = entry.pool
            named = anonymous = held_bytes = 0
            for client in by_pool.get(pool, []):
                rewriter = client.rewriter
                if rewriter is None:
                    continue
                named += len(rewriter.named)
                held_bytes += sum(len(e.parse_message) for e in rewriter.named.values())
                if rewriter.unnamed is not None:
                    anonymous += 1
                    held_bytes += len(rewriter.unnamed.parse_message)
            rows.append(
                [
                    database, user, len(pool.statements), pool.statements.bytes,
                    named + anonymous, held_bytes, named, anonymous, 0, 0,
                ]
            )  # fmt: skip
        columns = _typed(
            "database", "user", "pool_prepared_count:int", "pool_prepared_bytes:int",
            "client_prepared_count:int", "client_prepared_bytes:int", "client_named_count:int",
            "client_anonymous_count:int", "client_anonymous_evictions_alive:int",
            "async_clients:int",
        )  # fmt: skip
        return columns, rows

    def latency(self) -> Table:
        """Percentiles of each pool's durations over the recent stats periods."""
        rows: Rows = []
        for database, user, entry in self._entries():
            st = entry.pool.stats
            for kind in ("query", "transaction", "wait"):
                row: list[object] = [database, user, kind, st.recent_count(kind)]
                row += [_micros(st.recent_quantile(kind, q)) for q in PERCENTILES]
                rows.append(row)
        columns = _typed("database", "user", "kind", "count:int", *(
            f"p{round(q * 100)}:int" for q in PERCENTILES
        ))  # fmt: skip
        return columns, rows

    def prepared_statements(self) -> Table:
        rows: Rows = []
        kinds = {NAMED: "named", UNNAMED: "anonymous", NAMED | UNNAMED: "mixed"}
        for _, _, entry in self._entries():
            pool = entry.pool
            for statement in pool.statements.entries():
                name = statement.name.decode()
                rows.append(
                    [
                        pool.name, name.removeprefix("DOORMAN_"), name,
                        statement.query.decode("utf-8", "replace"),
                        statement.hits + statement.misses, kinds.get(statement.kinds, "-"),
                        statement.hits, statement.misses,
                    ]
                )  # fmt: skip
        columns = _typed(
            "pool", "hash", "name", "query", "count_used:int", "kind", "hits:int", "misses:int"
        )
        return columns, rows

    def clients(self) -> Table:
        now = time.monotonic()
        rows: Rows = []
        for c in self.pooler.clients.values():
            state = c.state_name
            wait = "idle"
            if c.write_paused:
                wait = "write"
            elif state in ("active", "waiting"):
                wait = "read"
            rows.append(
                [
                    c.name, c.database, c.user, c.application_name, c.address or "unix",
                    c.port, "false", state, wait, c.transactions, c.queries, c.errors,
                    int(now - c.connected_at),
                ]
            )  # fmt: skip
        columns = _typed(
            "client_id", "database", "user", "application_name", "addr", "port:int", "tls",
            "state", "wait", "transaction_count:int", "query_count:int", "error_count:int",
            "age_seconds:int",
        )  # fmt: skip
        return columns, rows

    def servers(self) -> Table:
        now = time.monotonic()
        rows: Rows = []
        for _, _, entry in self._entries():
            pool = entry.pool
            for server in pool.servers:
                assert isinstance(server, ServerConnection)
                state = server.state_name
                wait = "write" if server.relay_paused else "read" if server.client else "idle"
                rows.append(
                    [
                        f"0x{server.server_id:08X}", server.backend_pid,
                        pool.settings.database, pool.settings.user,
                        server.parameters.get("application_name", ""), "false", state, wait,
                        server.transactions, server.queries, server.bytes_sent,
                        server.bytes_received, int(now - server.created),
                        server.statements.hits, server.statements.misses,
                        len(server.statements),
                    ]
                )  # fmt: skip
        columns = _typed(
            "server_id", "server_process_id:int", "database_name", "user", "application_name",
            "tls", "state", "wait", "transaction_count:int", "query_count:int",
            "bytes_sent:int", "bytes_received:int", "age_seconds:int", "prepare_cache_hit:int",
            "prepare_cache_miss:int", "prepare_cache_size:int",
        )  # fmt: skip
        return columns, rows

    def stats(self) -> Table:
        rows: Rows = []
        for database, user, entry in self._entries():
            st = entry.pool.stats
            avg = st.averages
            rows.append(
                [
                    database, user, st.xact_count, st.query_count, st.bytes_received,
                    st.bytes_sent, _micros(st.xact_time), _micros(st.query_time),
                    _micros(st.wait_time), st.total_errors, avg.xact_count, avg.query_count,
                    avg.received, avg.sent, avg.errors, avg.xact_time, avg.query_time,
                    avg.wait_time,
                ]
            )  # fmt: skip
        columns = _typed(
            "database", "user", "total_xact_count:int", "total_query_count:int",
            "total_received:int", "total_sent:int", "total_xact_time:int",
            "total_query_time:int", "total_wait_time:int", "total_errors:int",
            "avg_xact_count:int", "avg_query_count:int", "avg_recv:int", "avg_sent:int",
            "avg_errors:int", "avg_xact_time:int", "avg_query_time:int", "avg_wait_time:int",
        )  # fmt: skip
        return columns, rows

    def connections(self) -> Table:
        p = self.pooler
        plain = p.accepted_total - p.cancel_requests
        columns = _typed("total:int", "errors:int", "tls:int", "plain:int", "cancel:int")
        return columns, [[p.accepted_total, p.login_failures, 0, plain, p.cancel_requests]]

    def lists(self) -> Table:
        p = self.pooler
        states = [c.state_name for c in p.clients.values()]
        free_servers = sum(len(e.pool.idle) for e in p.entries.values())
        all_servers = sum(len(e.pool.servers) for e in p.entries.values())
        items = [
            ("databases", len({db for db, _ in p.entries})),
            ("users", len({user for _, user in p.entries})),
            ("pools", len(p.entries)),
            ("free_clients", states.count("idle")),
            ("used_clients", states.count("active") + states.count("waiting")),
            ("login_clients", states.count("startup") + states.count("login")),
            ("free_servers", free_servers),
            ("used_servers", all_servers - free_servers),
            ("dns_names", 0),
            ("dns_zones", 0),
            ("dns_queries", 0),
            ("dns_pending", 0),
        ]
        return _typed("list", "items:int"), [list(item) for item in items]

    def users(self) -> Table:
        rows: Rows = [[user, e.pool.settings.pool_mode] for _, user, e in self._entries()]
        return _text(["name", "pool_mode"]), rows

    def version(self) -> Table:
        return _text(["version"]), [[f"pg_doorman {__version__}"]]

    def log_level(self) -> Table:
        return _text(["log_level"]), [[current_log_level()]]


def _used_servers(pool: Pool, now: float) -> int:
    """Idle servers due for the idle check before their next use, and those in it."""
    due = sum(1 for server in pool.idle if server.checkout_state(now) == 2)
    return due + pool.probing


def _oldest_active(pool: Pool, now: float) -> float:
    oldest = 0.0
    for server in pool.servers:
        if isinstance(server, ServerConnection) and server.client is not None:
            oldest = max(oldest, now - server.xact_started)
    return oldest


def _key(name: str) -> str:
    return name if name.replace("_", "").isalnum() else json.dumps(name)


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _settings_rows(
    prefix: str, current: Any, defaults: Any, not_implemented: frozenset[str]
) -> Iterator[list[object]]:
    """One SHOW CONFIG row per key; keys not implemented yet are never `changeable`."""
    for field in dataclasses.fields(current):
        name = field.name
        if name in _NOT_SETTINGS:
            continue
        key = f"{prefix}.{name}"
        value = _format(getattr(current, name))
        default = _format(getattr(defaults, name))
        if name in _SECRET_KEYS:
            value = default = "********"
        changeable = key not in RESTART_REQUIRED and name not in not_implemented
        yield [key, value, default or "-", "yes" if changeable else "no"]


LOG_LEVEL_NAMES: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
}


def current_log_level() -> str:
    """The root level, plus any `logger=level` overrides set at runtime."""
    root = logging.getLogger()
    text = LOG_LEVEL_NAMES.get(root.level, "off")
    overrides = [
        f"{name}={LOG_LEVEL_NAMES.get(logger.level, 'off')}"
        for name, logger in sorted(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger)
        and name.startswith("pg_doorman")
        and logger.level != logging.NOTSET
    ]
    return ",".join([text, *overrides])
