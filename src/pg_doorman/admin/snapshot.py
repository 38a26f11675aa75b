"""The pooler's state as plain data: what SHOW tables and /metrics are built from.

A snapshot holds only numbers, strings and lists, so that worker processes can send
theirs as JSON and `merge()` can add them up into one picture of the whole pooler.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pg_doorman.net.client import PIN_LISTEN, PIN_LOCKS
from pg_doorman.net.server import ServerConnection
from pg_doorman.stats.sockets import SocketCounts, add_up

if TYPE_CHECKING:
    from pg_doorman.app.auth_query_users import AuthQueryUsers
    from pg_doorman.app.pooler import PoolEntry, Pooler
    from pg_doorman.net.client import ClientConnection
    from pg_doorman.pool.fallback import Fallback
    from pg_doorman.pool.pool import Pool

Snapshot = dict[str, Any]
PoolData = dict[str, Any]

# How each pool grew under pressure (pool.ScalingStats), in SHOW POOL_SCALING's order.
SCALING_KEYS = (
    "creates", "gate_waits", "gate_budget_ex", "antic_notify", "antic_timeout",
    "create_fallback", "replenish_def",
)  # fmt: skip

# Per-pool numbers that add up across workers; the rest is taken as documented below.
_SUMMED = (
    "pool_size", "min_pool_size", "reserve_pool", "size", "clients", "cl_idle", "cl_active",
    "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login", "xact_count", "query_count",
    "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time", "wait_count",
    "client_named", "client_anonymous", "client_prepared_bytes", "hits", "misses",
    "tls_servers", "tls_handshakes", "tls_handshake_seconds", "tls_handshake_errors",
    "listen_clients", "listen_channels", "notifications", "pinned_listen", "pinned_locks",
    "slow_requests", *SCALING_KEYS,
)  # fmt: skip
_MAXED = ("paused", "fallback_active", "maxwait", "oldest_active")
_RATES = ("xact_count", "query_count", "received", "sent", "errors")
_HISTOGRAMS = ("query", "transaction", "wait")


def take(pooler: Pooler, sockets: SocketCounts | None) -> Snapshot:
    """This process's state; `sockets`: its sockets by kind and state (stats.sockets),
    None where they cannot be counted."""
    now = time.monotonic()
    by_pool: dict[Pool, list[ClientConnection]] = {}
    client_rows = []
    logging_in = 0
    for c in pooler.clients.values():
        if c.pool is not None:
            by_pool.setdefault(c.pool, []).append(c)
        state = c.state_name
        logging_in += state in ("startup", "login")
        wait = "idle"
        if c.write_paused:
            wait = "write"
        elif state in ("active", "waiting"):
            wait = "read"
        client_rows.append(
            [
                c.name, c.database, c.user, c.application_name, c.address or "unix",
                "true" if c.tls else "false", state, wait, c.transactions, c.queries, c.errors,
                int(now - c.connected_at), c.port,
            ]
        )  # fmt: skip
    server_rows = []
    pools = []
    parameter_rows: list[list[str]] = []
    for (database, user), entry in pooler.listed_entries():
        pool = entry.pool
        parameter_rows.extend(_startup_parameter_rows(pooler, database, user, entry))
        clients = by_pool.get(pool, [])
        data = _pool_data(database, user, pool, clients, now)
        fallback = pooler.fallbacks.get(database)
        data["fallback_active"] = int(fallback is not None and fallback.active(now))
        hub = pooler.listen_hubs.get(pool)
        data["listen_clients"] = len(hub.channels_of) if hub is not None else 0
        data["listen_channels"] = len(hub.subscribers) if hub is not None else 0
        data["notifications"] = pool.notifications_passed
        data["slow_requests"] = pool.slow_requests
        data["pinned_listen"] = sum(1 for c in clients if c.pinned_for & PIN_LISTEN)
        data["pinned_locks"] = sum(1 for c in clients if c.pinned_for & PIN_LOCKS)
        pools.append(data)
        for server in pool.servers:
            if not isinstance(server, ServerConnection):
                continue
            wait = "write" if server.relay_paused else "read" if server.client else "idle"
            server_rows.append(
                [
                    f"0x{server.server_id:08X}", server.backend_pid, database, user,
                    server.parameters.get("application_name", ""),
                    "true" if server.tls else "false", server.state_name,
                    wait, server.transactions, server.queries, server.bytes_sent,
                    server.bytes_received, int(now - server.created), server.statements.hits,
                    server.statements.misses, len(server.statements),
                ]
            )  # fmt: skip
        hub = pooler.listen_hubs.get(pool)
        if hub is not None and hub.connection is not None:
            # The pool's listening server (listen_fanout), outside the pool's servers.
            server_rows.append(
                [
                    f"0x{hub.server_id:08X}", hub.backend_pid, database, user,
                    hub.application_name, "true" if hub.tls else "false", "listen",
                    "read", 0, hub.statements_sent, hub.bytes_sent, hub.bytes_received,
                    int(now - hub.opened_at), 0, 0, 0,
                ]
            )  # fmt: skip
    return {
        "workers": 1,
        "memory": resident_memory(),
        "log_level": logging.getLogger().level,
        "accepted": pooler.accepted_total,
        "cancel_requests": pooler.cancel_requests,
        "tls": pooler.tls_sessions,
        "plain": pooler.accepted_total - pooler.cancel_requests - pooler.tls_sessions,
        "login_failures": pooler.login_failures,
        "connections": len(pooler.clients),
        # Open client connections per worker index: how evenly the workers share them.
        "worker_connections": {
            str(pooler.worker.index if pooler.worker is not None else 0): len(pooler.clients)
        },
        "login_clients": logging_in,
        "sockets": sockets,
        "clients": client_rows,
        "servers": server_rows,
        "pools": pools,
        "auth_query": [
            _auth_query_data(name, users) for name, users in pooler.auth_queries.items()
        ],
        "coordinator": [
            {
                "database": name,
                "max_db_connections": budget.limit,
                "current_connections": budget.count,
                "reserve_pool_size": budget.reserve,
                "reserve_in_use": max(budget.count - budget.limit, 0),
                "waiting_users": len(budget.starving),
                "evictions": budget.evictions,
                "reserve_opened": budget.reserve_opened,
                "exhaustions": budget.exhaustions,
            }
            for name, budget in pooler.budgets.items()
        ],
        "fallback": [
            _fallback_data(name, fallback, now) for name, fallback in pooler.fallbacks.items()
        ],
        "startup_parameters": parameter_rows,
        # [database, SQLSTATE, count]: server logins refused over a startup parameter.
        "startup_parameter_errors": [
            [database, code, count]
            for (database, code), count in pooler.startup_parameter_errors.items()
        ],
        # [database, reason, count]: looked-up startup parameters left out.
        "startup_parameters_dropped": [
            [database, reason, count]
            for database, users in pooler.auth_queries.items()
            for reason, count in users.lookup.stats.parameters_dropped.items()
        ],
    }


def _startup_parameter_rows(
    pooler: Pooler, database: str, user: str, entry: PoolEntry
) -> Iterator[list[str]]:
    """[user, database, parameter, value, source, state] of a pool's server logins."""
    pool_config = pooler.config.pools.get(database)
    configured = pool_config.startup_parameters if pool_config is not None else {}
    for key, value in entry.pool.settings.startup_parameters.items():
        if key in entry.looked_up_parameters:
            source = "auth_query"
        elif key in configured:
            source = "pool"
        else:
            source = "general"
        yield [user, database, key, value, source, "applied"]
    for key, value in entry.dropped_parameters.items():
        yield [user, database, key, value, "auth_query", "dropped_due_to_budget"]


def _fallback_data(database: str, fallback: Fallback, now: float) -> dict[str, Any]:
    stats = fallback.stats
    member = fallback.member
    active = fallback.active(now)
    return {
        "database": database,
        "active": int(active),
        # Where new servers open now: [host, port], or None.
        "host": [member.host, member.port] if active and member is not None else None,
        "api_requests": stats.api_requests,
        "api_errors": stats.api_errors,
        "api_duration_counts": list(stats.api_duration_counts),
        "api_duration_over": stats.api_duration_over,
        "api_duration_sum": stats.api_duration_sum,
        "connections": stats.connections,
        "cache_hits": stats.cache_hits,
        "candidate_failures": dict(stats.candidate_failures),
    }


def _auth_query_data(database: str, users: AuthQueryUsers) -> dict[str, Any]:
    lookup = users.lookup
    stats = lookup.stats
    return {
        "database": database,
        "cache_entries": lookup.cache_entries,
        "cache_hits": stats.cache_hits,
        "cache_misses": stats.cache_misses,
        "cache_refetches": stats.cache_refetches,
        "cache_rate_limited": stats.cache_rate_limited,
        "auth_success": stats.auth_success,
        "auth_failure": stats.auth_failure,
        "executor_queries": lookup.connections.queries,
        "executor_errors": lookup.connections.errors,
        "dynamic_pools_current": 0 if users.shared is not None else len(users.users),
        "dynamic_pools_created": stats.dynamic_pools_created,
        "dynamic_pools_destroyed": stats.dynamic_pools_destroyed,
    }


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _pool_data(
    database: str,
    user: str,
    pool: Pool,
    clients: list[ClientConnection],
    now: float,
) -> PoolData:
    s = pool.settings
    st = pool.stats
    states = [c.state_name for c in clients]
    oldest = 0.0
    for server in pool.servers:
        if isinstance(server, ServerConnection) and server.client is not None:
            oldest = max(oldest, now - server.xact_started)
    used = sum(1 for server in pool.idle if server.checkout_state(now) == 2) + pool.probing
    named = anonymous = held_bytes = 0
    for client in clients:
        rewriter = client.rewriter
        if rewriter is None:
            continue
        named += len(rewriter.named)
        held_bytes += sum(len(e.parse_message) for e in rewriter.named.values())
        if rewriter.unnamed is not None:
            anonymous += 1
            held_bytes += len(rewriter.unnamed.parse_message)
    hits, misses = pool.prepared_hits_misses()
    tls_servers = sum(1 for sv in pool.servers if isinstance(sv, ServerConnection) and sv.tls)
    avg = st.averages
    windows = st.window_bases()
    return {
        "database": database,
        "user": user,
        "pool_mode": s.pool_mode,
        "server_host": s.server_host,
        "server_port": s.server_port,
        "server_database": s.server_database,
        "pool_size": s.pool_size,
        "min_pool_size": s.min_pool_size,
        "reserve_pool": pool.budget.reserve if pool.budget is not None else 0,
        "size": pool.size,
        "paused": int(pool.paused),
        "clients": len(clients),
        "cl_idle": states.count("idle"),
        "cl_active": states.count("active"),
        "cl_waiting": states.count("waiting"),
        "sv_active": pool.active,
        "sv_idle": len(pool.idle),
        "sv_used": used,
        "sv_login": pool.connecting,
        **{key: getattr(pool.scaling, key) for key in SCALING_KEYS},
        "maxwait": pool.oldest_wait(now),
        "oldest_active": oldest,
        "xact_count": st.xact_count,
        "query_count": st.query_count,
        "bytes_received": st.bytes_received,
        "bytes_sent": st.bytes_sent,
        "xact_time": st.xact_time,
        "query_time": st.query_time,
        "wait_time": st.wait_time,
        "wait_count": st.wait_count,
        "errors": dict(st.errors),
        "averages": {
            "xact_count": avg.xact_count,
            "query_count": avg.query_count,
            "received": avg.received,
            "sent": avg.sent,
            "errors": avg.errors,
            "xact_time": avg.xact_time,
            "query_time": avg.query_time,
            "wait_time": avg.wait_time,
        },
        "histograms": {
            "query": _histogram(st.query_histogram.counts, st.query_histogram.sum, windows[0]),
            "transaction": _histogram(st.xact_histogram.counts, st.xact_histogram.sum, windows[1]),
            "wait": _histogram(st.wait_histogram.counts, st.wait_histogram.sum, windows[2]),
        },
        "statements": _statements(pool),
        "client_named": named,
        "client_anonymous": anonymous,
        "client_prepared_bytes": held_bytes,
        "hits": hits,
        "misses": misses,
        "tls_servers": tls_servers,
        "tls_handshakes": pool.tls_handshakes,
        "tls_handshake_seconds": pool.tls_handshake_seconds,
        "tls_handshake_errors": pool.tls_handshake_errors,
    }


def _statements(pool: Pool) -> list[list[Any]]:
    """[name, query, hits, misses, kinds, bytes] of each statement the pool knows."""
    return [
        [e.name.decode(), e.query.decode("utf-8", "replace"), e.hits, e.misses, e.kinds,
         len(e.parse_message)]
        for e in pool.statements.entries()
    ]  # fmt: skip


def _histogram(counts: list[int], total: float, base: list[int]) -> dict[str, Any]:
    return {"counts": list(counts), "sum": total, "base": list(base)}


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """One snapshot for the whole pooler: counts add up, lists are joined, the largest
    wait and age win, and rate averages add while duration averages are weighted."""
    if len(snapshots) == 1:
        return snapshots[0]
    out: Snapshot = {
        "workers": sum(s["workers"] for s in snapshots),
        "clients": [row for s in snapshots for row in s["clients"]],
        "servers": [row for s in snapshots for row in s["servers"]],
    }
    for key in (
        "memory", "accepted", "cancel_requests", "tls", "plain", "login_failures",
        "connections",
        "login_clients",
    ):  # fmt: skip
        out[key] = sum(s[key] for s in snapshots)
    out["log_level"] = min(s["log_level"] for s in snapshots)
    out["sockets"] = add_up(s["sockets"] for s in snapshots)
    out["worker_connections"] = {
        index: count for s in snapshots for index, count in s["worker_connections"].items()
    }
    pools: dict[tuple[str, str], PoolData] = {}
    for snapshot in snapshots:
        for data in snapshot["pools"]:
            pool_key = (data["database"], data["user"])
            if pool_key in pools:
                _merge_pool(pools[pool_key], data)
            else:
                pools[pool_key] = _copy_pool(data)
    out["pools"] = list(pools.values())
    out["auth_query"] = _summed_by_database(snapshots, "auth_query")
    # Each worker holds its share of a database's budget: the shares add up.
    out["coordinator"] = _summed_by_database(snapshots, "coordinator")
    out["fallback"] = _merged_fallbacks(snapshots)
    # Each worker builds the same pools from the same config and lookups.
    seen: dict[tuple[str, str, str], list[str]] = {}
    for snapshot in snapshots:
        for row in snapshot["startup_parameters"]:
            seen.setdefault((row[0], row[1], row[2]), row)
    out["startup_parameters"] = list(seen.values())
    for what in ("startup_parameter_errors", "startup_parameters_dropped"):
        counts: dict[tuple[str, str], int] = {}
        for snapshot in snapshots:
            for database, label, count in snapshot[what]:
                counts[database, label] = counts.get((database, label), 0) + count
        out[what] = [[database, label, count] for (database, label), count in counts.items()]
    return out


def _merged_fallbacks(snapshots: list[Snapshot]) -> list[dict[str, Any]]:
    """Each worker falls back on its own: counters add up; active if any worker is,
    at the host one of them uses."""
    rows: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for row in snapshot["fallback"]:
            known = rows.get(row["database"])
            if known is None:
                rows[row["database"]] = {
                    **row,
                    "api_duration_counts": list(row["api_duration_counts"]),
                    "candidate_failures": dict(row["candidate_failures"]),
                }
                continue
            known["active"] = max(known["active"], row["active"])
            known["host"] = known["host"] or row["host"]
            for key in (
                "api_requests", "api_errors", "api_duration_over", "api_duration_sum",
                "connections", "cache_hits",
            ):  # fmt: skip
                known[key] += row[key]
            counts = zip(known["api_duration_counts"], row["api_duration_counts"], strict=True)
            known["api_duration_counts"] = [a + b for a, b in counts]
            for reason, count in row["candidate_failures"].items():
                failures = known["candidate_failures"]
                failures[reason] = failures.get(reason, 0) + count
    return list(rows.values())


def _summed_by_database(snapshots: list[Snapshot], what: str) -> list[dict[str, Any]]:
    """The rows of `what` (one per database and worker), one per database, summed."""
    rows: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for row in snapshot[what]:
            known = rows.get(row["database"])
            if known is None:
                rows[row["database"]] = dict(row)
            else:
                for key, value in row.items():
                    if key != "database":
                        known[key] += value
    return list(rows.values())


def _copy_pool(data: PoolData) -> PoolData:
    copy = dict(data)
    copy["errors"] = dict(data["errors"])
    copy["averages"] = dict(data["averages"])
    copy["histograms"] = {
        name: {"counts": list(h["counts"]), "sum": h["sum"], "base": list(h["base"])}
        for name, h in data["histograms"].items()
    }
    copy["statements"] = [list(row) for row in data["statements"]]
    return copy


def _merge_pool(into: PoolData, data: PoolData) -> None:
    for key in _SUMMED:
        into[key] += data[key]
    for key in _MAXED:
        into[key] = max(into[key], data[key])
    for label, count in data["errors"].items():
        into["errors"][label] = into["errors"].get(label, 0) + count
    mine, theirs = into["averages"], data["averages"]
    for time_key, weight_key in (
        ("xact_time", "xact_count"),
        ("query_time", "query_count"),
    ):
        weight = mine[weight_key] + theirs[weight_key]
        if weight:
            mine[time_key] = (
                mine[time_key] * mine[weight_key] + theirs[time_key] * theirs[weight_key]
            ) // weight
        else:
            mine[time_key] = max(mine[time_key], theirs[time_key])
    mine["wait_time"] = max(mine["wait_time"], theirs["wait_time"])
    for key in _RATES:
        mine[key] += theirs[key]
    for name in _HISTOGRAMS:
        a, b = into["histograms"][name], data["histograms"][name]
        a["counts"] = [x + y for x, y in zip(a["counts"], b["counts"], strict=True)]
        a["base"] = [x + y for x, y in zip(a["base"], b["base"], strict=True)]
        a["sum"] += b["sum"]
    statements = {row[0]: row for row in into["statements"]}
    for row in data["statements"]:
        known = statements.get(row[0])
        if known is None:
            row = list(row)
            into["statements"].append(row)
            statements[row[0]] = row
        else:
            known[2] += row[2]
            known[3] += row[3]
            known[4] |= row[4]
