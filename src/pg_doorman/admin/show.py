"""The tables behind the admin console's SHOW commands.

Each function reads the running pooler and returns (columns, rows); the console turns
them into RowDescription/DataRow messages. Column names follow PgDoorman (and so
PgBouncer where the two agree); times are microseconds unless the name says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from pg_doorman import __version__
from pg_doorman.admin.snapshot import SCALING_KEYS, PoolData, Snapshot
from pg_doorman.config import RESTART_REQUIRED, GeneralConfig, PoolConfig, WebConfig
from pg_doorman.config.loader import (
    GENERAL_NOT_APPLICABLE,
    GENERAL_NOT_IMPLEMENTED,
    POOL_NOT_APPLICABLE,
    POOL_NOT_IMPLEMENTED,
    WEB_NOT_IMPLEMENTED,
)
from pg_doorman.config.schema import AuthQueryConfig, TalosConfig
from pg_doorman.net.patroni_api import redacted_url
from pg_doorman.prepared.registry import NAMED, UNNAMED
from pg_doorman.stats.counters import PERCENTILES, quantile_of, recent_count_of
from pg_doorman.stats.sockets import COLUMNS as SOCKET_COLUMNS

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler

TEXT: Final = 25
INT8: Final = 20

Columns = Sequence[tuple[str, int]]
Rows = list[Sequence[object]]
Table = tuple[Columns, Rows]

# auth_query's `password` and `server_password` included: users get no settings rows.
_SECRET_KEYS: Final = frozenset({"admin_password", "password", "server_password"})
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
    """Every SHOW table: some read the config, the rest a (merged) snapshot."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.local: dict[str, Callable[[], Table]] = {
            "help": self.help,
            "config": self.config,
            "users": self.users,
            "version": self.version,
            "log_level": self.log_level,
        }
        self.from_snapshot: dict[str, Callable[[Snapshot], Table]] = {
            "databases": databases,
            "pools": pools,
            "pools_extended": pools_extended,
            "pools_memory": pools_memory,
            "pool_memory": pools_memory,
            "clients": clients,
            "servers": servers,
            "stats": stats,
            "connections": connections,
            "lists": lists,
            "prepared_statements": prepared_statements,
            "latency": latency,
            "auth_query": auth_query,
            "pool_coordinator": pool_coordinator,
            "pool_scaling": pool_scaling,
            "startup_parameters": startup_parameters,
            "sockets": sockets,
        }

    def help(self) -> Table:
        items = [
            "SHOW HELP|CONFIG|DATABASES|POOLS|POOLS_EXTENDED|POOLS_MEMORY|CLIENTS|SERVERS"
            "|STATS|CONNECTIONS|LISTS|USERS|VERSION|LOG_LEVEL|PREPARED_STATEMENTS|LATENCY"
            "|AUTH_QUERY|POOL_COORDINATOR|POOL_SCALING|STARTUP_PARAMETERS|SOCKETS",
            "SHOW LISTS",
            "SHOW CONNECTIONS",
            "SHOW STATS",
            "SET log_level = '<level>'",
            "RELOAD",
            "UPGRADE",
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
            _settings_rows(
                "general",
                config.general,
                GeneralConfig(),
                GENERAL_NOT_IMPLEMENTED | GENERAL_NOT_APPLICABLE,
            )
        )
        for name, pool in config.pools.items():
            prefix = f"pools.{_key(name)}"
            ignored = POOL_NOT_APPLICABLE | POOL_NOT_IMPLEMENTED
            rows.extend(_settings_rows(prefix, pool, PoolConfig(name=name), ignored))
            users = ", ".join(user.username for user in pool.users)
            rows.append([f"{prefix}.users", users, "-", "yes"])
            if pool.auth_query is not None:
                defaults = AuthQueryConfig(query="", user="")
                rows.extend(
                    _settings_rows(f"{prefix}.auth_query", pool.auth_query, defaults, frozenset())
                )
        rows.extend(_settings_rows("web", config.web, WebConfig(), WEB_NOT_IMPLEMENTED))
        rows.extend(_settings_rows("talos", config.talos, TalosConfig(), frozenset()))
        return _text(["key", "value", "default", "changeable"]), rows

    def users(self) -> Table:
        rows: Rows = [
            [user, entry.pool.settings.pool_mode]
            for (_, user), entry in self.pooler.listed_entries()
        ]
        return _text(["name", "pool_mode"]), rows

    def version(self) -> Table:
        return _text(["version"]), [[f"pg_doorman {__version__}"]]

    def log_level(self) -> Table:
        return _text(["log_level"]), [[current_log_level()]]


def _maxwait(p: PoolData) -> tuple[int, int]:
    """maxwait split as PgBouncer shows it: whole seconds and the microseconds beyond."""
    micros = _micros(p["maxwait"])
    return micros // 1_000_000, micros % 1_000_000


def _recent_quantile(p: PoolData, kind: str, q: float) -> int:
    h = p["histograms"][kind]
    return _micros(quantile_of(h["counts"], q, h["base"]))


def databases(snap: Snapshot) -> Table:
    rows: Rows = [
        [
            p["database"], p["server_host"], p["server_port"], p["server_database"], p["user"],
            p["pool_size"], p["min_pool_size"], p["reserve_pool"], p["pool_mode"], p["pool_size"],
            p["size"],
            p["clients"], p["paused"],
        ]
        for p in snap["pools"]
    ]  # fmt: skip
    columns = _typed(
        "name", "host", "port:int", "database", "force_user", "pool_size:int",
        "min_pool_size:int", "reserve_pool:int", "pool_mode", "max_connections:int",
        "current_connections:int", "current_client_connections:int", "paused:int",
    )  # fmt: skip
    return columns, rows


def pools(snap: Snapshot) -> Table:
    rows: Rows = [
        [
            p["database"], p["user"], p["pool_mode"], p["cl_idle"], p["cl_active"],
            p["cl_waiting"], 0, p["sv_active"], p["sv_idle"], p["sv_used"], p["sv_login"],
            p["pool_size"], *_maxwait(p), p["averages"]["xact_time"], p["paused"],
            p["fallback_active"], int(p["oldest_active"] * 1000),
        ]
        for p in snap["pools"]
    ]  # fmt: skip
    columns = _typed(
        "database", "user", "pool_mode", "cl_idle:int", "cl_active:int", "cl_waiting:int",
        "cl_cancel_req:int", "sv_active:int", "sv_idle:int", "sv_used:int", "sv_login:int",
        "pool_size:int", "maxwait:int", "maxwait_us:int", "avg_xact_time:int",
        "paused:int", "fallback_active:int", "oldest_active_age_ms:int",
    )  # fmt: skip
    return columns, rows


def pools_extended(snap: Snapshot) -> Table:
    rows: Rows = []
    for p in snap["pools"]:
        row: list[object] = [
            p["database"], p["user"], p["cl_active"], p["cl_waiting"], p["sv_active"],
            p["sv_idle"], p["sv_used"], p["sv_login"], p["pool_size"], *_maxwait(p),
            p["pool_mode"], p["bytes_received"], p["bytes_sent"],
        ]  # fmt: skip
        for q in (0.99, 0.95, 0.5):
            row.append(_recent_quantile(p, "query", q))
            row.append(_recent_quantile(p, "transaction", q))
        rows.append(row)
    columns = _typed(
        "database", "user", "cl_active:int", "cl_waiting:int", "sv_active:int",
        "sv_idle:int", "sv_used:int", "sv_login:int", "pool_size:int", "maxwait:int",
        "maxwait_us:int", "pool_mode", "bytes_recieved:int", "bytes_sent:int",
        "query_0.99:int", "transaction_0.99:int", "query_0.95:int",
        "transaction_0.95:int", "query_0.5:int", "transaction_0.5:int",
    )  # fmt: skip
    return columns, rows


def pools_memory(snap: Snapshot) -> Table:
    rows: Rows = [
        [
            p["database"], p["user"], len(p["statements"]),
            sum(row[5] for row in p["statements"]),
            p["client_named"] + p["client_anonymous"], p["client_prepared_bytes"],
            p["client_named"], p["client_anonymous"], 0, 0,
        ]
        for p in snap["pools"]
    ]  # fmt: skip
    columns = _typed(
        "database", "user", "pool_prepared_count:int", "pool_prepared_bytes:int",
        "client_prepared_count:int", "client_prepared_bytes:int", "client_named_count:int",
        "client_anonymous_count:int", "client_anonymous_evictions_alive:int",
        "async_clients:int",
    )  # fmt: skip
    return columns, rows


def latency(snap: Snapshot) -> Table:
    """Percentiles of each pool's durations over the recent stats periods."""
    rows: Rows = []
    for p in snap["pools"]:
        for kind in ("query", "transaction", "wait"):
            h = p["histograms"][kind]
            count = recent_count_of(h["counts"], h["base"])
            row: list[object] = [p["database"], p["user"], kind, count]
            row += [_recent_quantile(p, kind, q) for q in PERCENTILES]
            rows.append(row)
    columns = _typed("database", "user", "kind", "count:int", *(
        f"p{round(q * 100)}:int" for q in PERCENTILES
    ))  # fmt: skip
    return columns, rows


def prepared_statements(snap: Snapshot) -> Table:
    rows: Rows = []
    kinds = {NAMED: "named", UNNAMED: "anonymous", NAMED | UNNAMED: "mixed"}
    for p in snap["pools"]:
        for name, query, hits, misses, kind, _ in p["statements"]:
            rows.append(
                [
                    f"{p['user']}@{p['database']}", name.removeprefix("DOORMAN_"), name, query,
                    hits + misses, kinds.get(kind, "-"), hits, misses,
                ]
            )  # fmt: skip
    columns = _typed(
        "pool", "hash", "name", "query", "count_used:int", "kind", "hits:int", "misses:int"
    )
    return columns, rows


def clients(snap: Snapshot) -> Table:
    # PgDoorman's columns in its order; `port` (PgBouncer has it) comes last so that
    # scripts reading PgDoorman's columns by position still work.
    columns = _typed(
        "client_id", "database", "user", "application_name", "addr", "tls", "state",
        "wait", "transaction_count:int", "query_count:int", "error_count:int",
        "age_seconds:int", "port:int",
    )  # fmt: skip
    return columns, list(snap["clients"])


def servers(snap: Snapshot) -> Table:
    columns = _typed(
        "server_id", "server_process_id:int", "database_name", "user", "application_name",
        "tls", "state", "wait", "transaction_count:int", "query_count:int",
        "bytes_sent:int", "bytes_received:int", "age_seconds:int", "prepare_cache_hit:int",
        "prepare_cache_miss:int", "prepare_cache_size:int",
    )  # fmt: skip
    return columns, list(snap["servers"])


def stats(snap: Snapshot) -> Table:
    rows: Rows = []
    for p in snap["pools"]:
        avg = p["averages"]
        rows.append(
            [
                p["database"], p["user"], p["xact_count"], p["query_count"],
                p["bytes_received"], p["bytes_sent"], _micros(p["xact_time"]),
                _micros(p["query_time"]), _micros(p["wait_time"]), sum(p["errors"].values()),
                avg["xact_count"], avg["query_count"], avg["received"], avg["sent"],
                avg["errors"], avg["xact_time"], avg["query_time"], avg["wait_time"],
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


AUTH_QUERY_COLUMNS: Final = (
    "cache_entries", "cache_hits", "cache_misses", "cache_refetches", "cache_rate_limited",
    "auth_success", "auth_failure", "executor_queries", "executor_errors",
    "dynamic_pools_current", "dynamic_pools_created", "dynamic_pools_destroyed",
)  # fmt: skip


def auth_query(snap: Snapshot) -> Table:
    """One row per pool with an auth_query: its cache, logins, lookups and pools."""
    return _by_database(snap["auth_query"], AUTH_QUERY_COLUMNS)


def _by_database(rows: list[dict[str, Any]], names: tuple[str, ...]) -> Table:
    """A table of `database` and the integer columns `names`, by database name."""
    columns = _typed("database", *(f"{name}:int" for name in names))
    table: Rows = [
        [row["database"], *(row[name] for name in names)]
        for row in sorted(rows, key=lambda row: row["database"])
    ]
    return columns, table


# PgDoorman's column names and order, then this pooler's `waiting_users`.
POOL_COORDINATOR_COLUMNS: Final = (
    ("max_db_conn", "max_db_connections"),
    ("current", "current_connections"),
    ("reserve_size", "reserve_pool_size"),
    ("reserve_used", "reserve_in_use"),
    ("evictions", "evictions"),
    ("reserve_acq", "reserve_opened"),
    ("exhaustions", "exhaustions"),
    ("waiting_users", "waiting_users"),
)


def pool_coordinator(snap: Snapshot) -> Table:
    """One row per database with max_db_connections: its servers against the limit."""
    columns = _typed("database", *(f"{column}:int" for column, _ in POOL_COORDINATOR_COLUMNS))
    rows: Rows = [
        [row["database"], *(row[key] for _, key in POOL_COORDINATOR_COLUMNS)]
        for row in sorted(snap["coordinator"], key=lambda row: row["database"])
    ]
    return columns, rows


def pool_scaling(snap: Snapshot) -> Table:
    """One row per pool: how it opened servers under pressure (`inflight`: opening now)."""
    columns = _typed("user", "database", "inflight:int", *(f"{k}:int" for k in SCALING_KEYS))
    rows: Rows = [
        [p["user"], p["database"], p["sv_login"], *(p[key] for key in SCALING_KEYS)]
        for p in snap["pools"]
    ]
    return columns, rows


def startup_parameters(snap: Snapshot) -> Table:
    """The parameters each pool's servers log in with, and where each comes from."""
    columns = _typed("user", "database", "parameter", "value", "source", "state")
    rows: Rows = sorted(snap["startup_parameters"], key=lambda row: (row[1], row[0], row[2]))
    return columns, rows


class TableUnavailable(Exception):
    """A SHOW table this system cannot produce (the console answers with an error)."""


def sockets(snap: Snapshot) -> Table:
    """One row: the pooler's sockets by kind and state (with workers: every process's)."""
    counts = snap["sockets"]
    if counts is None:
        raise TableUnavailable("SHOW SOCKETS needs /proc, which only Linux has")
    return _typed(*(f"{name}:int" for name in SOCKET_COLUMNS)), [
        [counts[name] for name in SOCKET_COLUMNS]
    ]


def connections(snap: Snapshot) -> Table:
    columns = _typed("total:int", "errors:int", "tls:int", "plain:int", "cancel:int")
    row = [
        snap["accepted"], snap["login_failures"], snap["tls"], snap["plain"],
        snap["cancel_requests"],
    ]  # fmt: skip
    return columns, [row]


def lists(snap: Snapshot) -> Table:
    states = [row[6] for row in snap["clients"]]
    free_servers = sum(p["sv_idle"] for p in snap["pools"])
    all_servers = len(snap["servers"])
    items = [
        ("databases", len({p["database"] for p in snap["pools"]})),
        ("users", len({p["user"] for p in snap["pools"]})),
        ("pools", len(snap["pools"])),
        ("free_clients", states.count("idle")),
        ("used_clients", states.count("active") + states.count("waiting")),
        ("login_clients", snap["login_clients"]),
        ("free_servers", free_servers),
        ("used_servers", all_servers - free_servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    return _typed("list", "items:int"), [list(item) for item in items]


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
    prefix: str, current: Any, defaults: Any, ignored: frozenset[str]
) -> Iterator[list[object]]:
    """One SHOW CONFIG row per key; keys ignored (not implemented yet, or without meaning
    here) are never `changeable`."""
    for field in dataclasses.fields(current):
        name = field.name
        if name in _NOT_SETTINGS:
            continue
        key = f"{prefix}.{name}"
        value = _format(getattr(current, name))
        default = _format(getattr(defaults, name))
        if name in _SECRET_KEYS:
            value = default = "********"
        elif name == "patroni_api_urls":
            urls = getattr(current, name)
            value = _format(None if urls is None else [redacted_url(url) for url in urls])
        changeable = key not in RESTART_REQUIRED and name not in ignored
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
