"""Passwords looked up in PostgreSQL at login (`[pools.<name>.auth_query]`).

A user who is not configured in a pool is looked up by running the pool's
`auth_query` with `$1` = the user name, on a few connections of its own logged in as
`auth_query.user`. The answer (an md5 hash or a SCRAM verifier) is cached:
`cache_ttl` for a user found, `cache_failure_ttl` for one not found. A failed password
exchange may fetch the user again, at most once per `min_interval`, so that a password
changed in PostgreSQL takes effect without waiting for the cache.

The lookup connections send nothing but the lookup: no client's startup parameters,
no SET (the CVE-2025-12819 pattern).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from pg_doorman.config.loader import startup_parameter_text
from pg_doorman.config.schema import AuthQueryConfig
from pg_doorman.net.server import ServerConnection
from pg_doorman.pool.pool import AcquireError, Pool
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import MessageBuffer
from pg_doorman.protocol.messages import ProtocolError

logger = logging.getLogger("pg_doorman.auth_query")

# Column names that hold the password, in the order they are looked for. Without one
# of them, a single column is the password, and of two the second (PgBouncer's
# `SELECT usename, passwd ...` convention).
PASSWORD_COLUMNS = ("passwd", "password", "rolpassword")
# An optional column: a JSON object of startup parameters for the user's own pool.
PARAMETERS_COLUMN = "startup_parameters"
# Users remembered per pool, found or not; past that the expired ones go, then the
# oldest half, so a scan of made-up user names can't grow the cache without bound.
MAX_CACHED_USERS = 10_000
# PostgreSQL keeps NAMEDATALEN - 1 bytes of a role name: a longer name, compared as
# `name` in the lookup, would find the role of its first 63 bytes (an alias of it).
ROLE_NAME_MAX: Final = 63


class AuthQueryError(Exception):
    """The lookup itself failed (not: the user does not exist)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def lookup_messages(query: str, user: str) -> bytes:
    """Parse, Bind ($1 = user, text), Describe, Execute and Sync for the unnamed
    statement: one round trip, answered by a single ReadyForQuery."""
    parse = messages.build(b"P", b"\x00" + messages.cstring(query) + b"\x00\x00")
    value = user.encode()
    bind_body = (
        b"\x00\x00"  # unnamed portal, unnamed statement
        + b"\x00\x00"  # parameter formats: all text
        + b"\x00\x01"
        + len(value).to_bytes(4, "big")
        + value
        + b"\x00\x00"  # result formats: all text
    )
    bind = messages.build(b"B", bind_body)
    describe = messages.build(b"D", b"P\x00")
    execute = messages.build(b"E", b"\x00\x00\x00\x00\x00")
    return parse + bind + describe + execute + messages.SYNC


def _column_names(body: bytes) -> list[str]:
    count = int.from_bytes(body[0:2], "big")
    names = []
    pos = 2
    for _ in range(count):
        name, pos = messages.read_cstring(body, pos)
        pos += 18  # table oid, column number, type oid, size, modifier, format
        names.append(name)
    return names


def password_column(names: list[str]) -> int:
    """Which column of the lookup's result holds the password."""
    lowered = [name.lower() for name in names]
    for wanted in PASSWORD_COLUMNS:
        if wanted in lowered:
            return lowered.index(wanted)
    # The startup_parameters column is never the password: count the others.
    others = [i for i, name in enumerate(lowered) if name != PARAMETERS_COLUMN]
    if len(others) == 1:
        return others[0]
    if len(others) == 2:
        return others[1]
    raise AuthQueryError(
        sqlstate.CONFIG_FILE_ERROR,
        f"auth_query returned columns {names}: name the password column "
        f"{' or '.join(PASSWORD_COLUMNS)}",
    )


@dataclass(frozen=True)
class LookedUp:
    """What the lookup found for one user."""

    found: bool
    # A NULL password is "": such a user can only log in by a `trust` rule.
    password: str = ""
    # The startup_parameters column as it came (JSON text), if the query has one.
    parameters: str | None = None


def parse_lookup_reply(reply: bytes) -> LookedUp:
    """What the reply to lookup_messages() says of the user."""
    buffer = MessageBuffer()
    buffer.feed(reply)
    column = parameters_column = -1
    rows: list[list[str | None]] = []
    while True:
        try:
            message = buffer.next_message()
        except ProtocolError as exc:
            raise AuthQueryError(sqlstate.PROTOCOL_VIOLATION, str(exc)) from exc
        if message is None:
            break
        msg_type, body = message
        if msg_type == codes.ERROR_RESPONSE:
            fields = messages.parse_error_fields(body)
            raise AuthQueryError(
                fields.get("C", sqlstate.INTERNAL_ERROR),
                f"auth_query failed: {fields.get('M', 'error')}",
            )
        if msg_type == codes.ROW_DESCRIPTION:
            names = _column_names(body)
            column = password_column(names)
            lowered = [name.lower() for name in names]
            if PARAMETERS_COLUMN in lowered:
                parameters_column = lowered.index(PARAMETERS_COLUMN)
        elif msg_type == codes.DATA_ROW:
            rows.append(messages.parse_data_row(body))
    if not rows:
        return LookedUp(found=False)
    if len(rows) > 1:
        raise AuthQueryError(
            sqlstate.CARDINALITY_VIOLATION, f"auth_query returned {len(rows)} rows for one user"
        )
    row = rows[0]
    if column < 0 or column >= len(row):
        raise AuthQueryError(sqlstate.PROTOCOL_VIOLATION, "auth_query returned no columns")
    parameters = row[parameters_column] if 0 <= parameters_column < len(row) else None
    return LookedUp(found=True, password=row[column] or "", parameters=parameters)


# Why looked-up startup parameters were left out (PgDoorman's reason labels).
DROPPED_INVALID_JSON: Final = "auth_query_invalid_json"
DROPPED_INVALID_SHAPE: Final = "auth_query_invalid_shape"
DROPPED_INVALID_ENTRY: Final = "auth_query_invalid_entry"
DROPPED_DEDICATED_MODE: Final = "dedicated_mode"
DROPPED_OVERSIZE: Final = "auth_query_oversize"
DROPPED_OVERLAY_OVERSIZE: Final = "auth_query_overlay_oversize"


def parse_startup_parameters(
    text: str | None,
) -> tuple[dict[str, str], list[str], str | None]:
    """The startup parameters of a startup_parameters column (a JSON object; NULL or
    empty: none), what was wrong with those left out, and why anything was left out
    (the reason label of pg_doorman_startup_parameters_dropped_total), if it was."""
    if text is None or not text.strip():
        return {}, [], None
    try:
        document = json.loads(text)
    except ValueError as exc:
        return {}, [f"startup_parameters is not JSON ({exc}): all ignored"], DROPPED_INVALID_JSON
    if not isinstance(document, dict):
        return (
            {},
            ["startup_parameters is not a JSON object: all ignored"],
            DROPPED_INVALID_SHAPE,
        )
    parameters: dict[str, str] = {}
    problems = []
    for key, raw in document.items():
        try:
            parameters[key] = startup_parameter_text(key, raw)
        except ValueError as exc:
            problems.append(f"startup parameter {key!r} ignored: {exc}")
    return parameters, problems, DROPPED_INVALID_ENTRY if problems else None


OpenConnection = Callable[[Pool], Awaitable[ServerConnection]]


# How often a lookup waiting for RESUME looks whether the pool is still paused.
_PAUSED_POLL: Final = 0.05


class LookupConnections:
    """Up to `workers` connections that run lookups one at a time each.

    They belong to a Pool object of their own (settings, TLS, bookkeeping) that is
    never offered to clients.
    """

    def __init__(
        self, pool: Pool, open_connection: OpenConnection, pause_patience: float = 5.0
    ) -> None:
        self.pool = pool
        self._open_connection = open_connection
        self._slots = asyncio.Semaphore(pool.settings.pool_size)
        # While the database is paused (PAUSE, KILL) a lookup waits this long for
        # RESUME, as a queued client does (query_wait_timeout).
        self.pause_patience = pause_patience
        self.queries = 0
        self.errors = 0  # counted by AuthQuery, which also sees errors in the replies

    async def run(self, message: bytes) -> bytes:
        """Send one lookup and return its whole reply (through ReadyForQuery)."""
        async with self._slots:
            await self._unpaused()
            self.queries += 1
            return await self._run(message)

    async def _unpaused(self) -> None:
        """Return once the pool is not paused: no lookup reaches a paused database."""
        pool = self.pool
        deadline = time.monotonic() + self.pause_patience
        while pool.paused and not pool.closed:
            if time.monotonic() >= deadline:
                raise AuthQueryError(
                    sqlstate.CANNOT_CONNECT_NOW,
                    "the database is paused (PAUSE) and was not resumed within "
                    f"query_wait_timeout ({self.pause_patience:g}s)",
                )
            await asyncio.sleep(_PAUSED_POLL)

    async def _run(self, message: bytes) -> bytes:
        server = self._idle_connection()
        if server is not None:
            reply = await self._capture(server, message)
            if reply is not None:
                return reply
            # The server had closed it while idle: one more try on a new connection.
        server = await self._open()
        reply = await self._capture(server, message)
        if reply is None:
            raise AuthQueryError(
                sqlstate.CONNECTION_FAILURE,
                "auth_query failed: the lookup connection broke or timed out",
            )
        return reply

    def _idle_connection(self) -> ServerConnection | None:
        pool = self.pool
        now = time.monotonic()
        while pool.idle:
            server = pool.idle.pop()
            if server.is_usable(now):
                return server
            pool.discard(server, "lifetime reached")
        return None

    async def _open(self) -> ServerConnection:
        pool = self.pool
        if pool.closed:
            raise AuthQueryError(sqlstate.ADMIN_SHUTDOWN, "auth_query is shutting down")
        pool.size += 1
        pool.connecting += 1
        try:
            server = await self._open_connection(pool)
        except BaseException:
            pool.size -= 1
            raise
        finally:
            pool.connecting -= 1
        if server.closed:  # it went away right after its login: it never joined
            pool.size -= 1
            raise AuthQueryError(
                sqlstate.CONNECTION_FAILURE,
                "auth_query failed: the lookup connection closed after login",
            )
        pool.servers.add(server)
        return server

    async def _capture(self, server: ServerConnection, message: bytes) -> bytes | None:
        done: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

        def finished(_: ServerConnection, reply: bytes | None) -> None:
            if not done.done():
                done.set_result(reply)

        server.capture_query(message, finished, "auth_query lookup")
        reply = await done
        if reply is not None:
            if self.pool.closed:
                self.pool.discard(server, "auth_query closed")
            else:
                server.mark_idle(time.monotonic())
                self.pool.idle.append(server)
        return reply

    def close(self, reason: str) -> None:
        self.pool.close(reason)
        for server in list(self.pool.servers):
            self.pool.discard(server, reason)


@dataclass
class _Cached:
    found: bool
    password: str
    parameters: dict[str, str]
    fetched_at: float
    expires_at: float

    @property
    def user(self) -> User:
        return self.found, self.password, self.parameters


# A looked-up user: found, its stored password, its startup parameters.
User = tuple[bool, str, dict[str, str]]


@dataclass
class AuthQueryStats:
    cache_hits: int = 0
    cache_misses: int = 0
    cache_refetches: int = 0
    cache_rate_limited: int = 0
    auth_success: int = 0
    auth_failure: int = 0
    dynamic_pools_created: int = 0
    dynamic_pools_destroyed: int = 0
    # Looked-up rows whose startup parameters were (partly) left out, by reason.
    parameters_dropped: dict[str, int] = field(default_factory=dict)

    def count_dropped(self, reason: str) -> None:
        self.parameters_dropped[reason] = self.parameters_dropped.get(reason, 0) + 1


class AuthQuery:
    """The password lookup of one pool, with its cache."""

    def __init__(
        self,
        config: AuthQueryConfig,
        connections: LookupConnections,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.connections = connections
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Task[_Cached]] = {}
        self.stats = AuthQueryStats()

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    async def user(self, user: str) -> User:
        """A user as looked up, from the cache while it is fresh. A name longer than
        PostgreSQL keeps is nobody, without a lookup (and without a cache entry)."""
        if len(user.encode()) > ROLE_NAME_MAX:
            return False, "", {}
        cached = self._cache.get(user)
        if cached is not None and cached.expires_at > self._clock():
            self.stats.cache_hits += 1
            return cached.user
        self.stats.cache_misses += 1
        fetched = await self._fetch(user)
        return fetched.user

    async def refetch(self, user: str) -> User | None:
        """After a failed password exchange: the user fetched anew, or None when it
        was fetched less than min_interval ago (or is unchanged)."""
        cached = self._cache.get(user)
        if (
            cached is not None
            and self._clock() - cached.fetched_at < self.config.min_interval / 1000
        ):
            self.stats.cache_rate_limited += 1
            return None
        self.stats.cache_refetches += 1
        fetched = await self._fetch(user)
        if cached is not None and fetched.user == cached.user:
            return None
        return fetched.user

    def forget(self) -> None:
        self._cache.clear()

    def drop_expired(self) -> int:
        """Forget the users whose cached answer has expired; how many went. Run from the
        pooler's periodic sweep: names tried once (a scan of made-up users) leave the
        cache after their ttl instead of staying until it is full."""
        now = self._clock()
        cache = self._cache
        expired = [name for name, entry in cache.items() if entry.expires_at <= now]
        for name in expired:
            del cache[name]
        return len(expired)

    async def _fetch(self, user: str) -> _Cached:
        # Logins of one user at the same moment share one lookup, which runs as a task
        # of its own: a client that gives up waiting does not cancel it for the others.
        task = self._inflight.get(user)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(user))
            self._inflight[user] = task
            task.add_done_callback(functools.partial(self._lookup_done, user))
        return await asyncio.shield(task)

    def _lookup_done(self, user: str, task: asyncio.Task[_Cached]) -> None:
        if self._inflight.get(user) is task:
            del self._inflight[user]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _lookup(self, user: str) -> _Cached:
        try:
            reply = await self.connections.run(lookup_messages(self.config.query, user))
            looked_up = parse_lookup_reply(reply)
        except AcquireError as exc:
            self.connections.errors += 1
            error = AuthQueryError(exc.code, f"auth_query could not connect: {exc.message}")
            logger.warning("auth_query for user %r failed: %s", user, error.message)
            raise error from None
        except AuthQueryError as exc:
            self.connections.errors += 1
            logger.warning("auth_query for user %r failed: %s", user, exc.message)
            raise
        parameters, problems, dropped = parse_startup_parameters(looked_up.parameters)
        for problem in problems:
            logger.warning("auth_query: user %r: %s", user, problem)
        if dropped is not None:
            self.stats.count_dropped(dropped)
        if parameters and self.config.server_user is not None:
            logger.warning(
                "auth_query: user %r: startup_parameters ignored: in dedicated mode every "
                "user shares the servers of server_user",
                user,
            )
            self.stats.count_dropped(DROPPED_DEDICATED_MODE)
            parameters = {}
        now = self._clock()
        found = looked_up.found
        ttl = self.config.cache_ttl if found else self.config.cache_failure_ttl
        cached = _Cached(found, looked_up.password, parameters, now, now + ttl / 1000)
        self._remember(user, cached, now)
        return cached

    def _remember(self, user: str, cached: _Cached, now: float) -> None:
        cache = self._cache
        cache.pop(user, None)
        if len(cache) >= MAX_CACHED_USERS:
            for name in [name for name, entry in cache.items() if entry.expires_at <= now]:
                del cache[name]
            if len(cache) >= MAX_CACHED_USERS:
                for name in list(cache)[: len(cache) // 2]:
                    del cache[name]
        cache[user] = cached

    def close(self, reason: str) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self.connections.close(reason)
