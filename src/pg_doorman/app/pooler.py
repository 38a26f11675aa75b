"""The running pooler: pools built from the config, listeners, cancel routing, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pg_doorman import implementation
from pg_doorman.admin.snapshot import Snapshot, merge
from pg_doorman.admin.snapshot import take as take_snapshot
from pg_doorman.app import event_loop
from pg_doorman.app.auth_query_users import (
    AuthQueryUsers,
    LookedUpUser,
    lookup_settings,
    new_auth_query_users,
)
from pg_doorman.app.cluster import (
    Cluster,
    WorkerInfo,
    publish_pause_state,
    read_pause_state,
    run_control,
    share,
    write_config_snapshot,
)
from pg_doorman.app.dispatch import LoadBoard, Receiver, open_accepted
from pg_doorman.app.logsetup import apply_log_filter
from pg_doorman.app.migration import (
    Emigration,
    Immigration,
    PreviousProcessGone,
    refuse_moved,
    restore_credentials,
    send_cancel,
    unpack_arrival,
    wait_for_receipt,
)
from pg_doorman.app.socket_file import SocketFile, socket_files
from pg_doorman.app.upgrade import listeners_for
from pg_doorman.auth import pam
from pg_doorman.auth.auth_query import AuthQueryError
from pg_doorman.auth.hba import HbaRule, HbaRules, legacy_hba_allows, peer_address
from pg_doorman.auth.jwt import JwtError, TokenSigner, TokenVerifier
from pg_doorman.auth.md5 import is_md5_hash
from pg_doorman.auth.methods import (
    JWT_PRIVATE_KEY_PREFIX,
    JWT_PUBLIC_KEY_PREFIX,
    AuthDecision,
    ClientAuth,
    decide_client_auth,
)
from pg_doorman.auth.passthrough import keep_client_key
from pg_doorman.auth.scram import ScramVerifier, is_scram_verifier
from pg_doorman.auth.talos import Talos, TalosKeyError
from pg_doorman.config import (
    Config,
    ConfigError,
    GeneralConfig,
    PoolConfig,
    TalosConfig,
    UserConfig,
)
from pg_doorman.net.client import ClientConnection
from pg_doorman.net.ids import IdAllocator
from pg_doorman.net.listen_hub import ListenHub
from pg_doorman.net.server import BackendCredentials, ServerConnection, open_server
from pg_doorman.net.server_tls import SSL_REQUEST, ServerTls, server_tls_for
from pg_doorman.net.session_state import SessionState
from pg_doorman.net.sockopts import (
    INHERITS_SOCKET_OPTIONS,
    apply_socket_options,
    options_key,
    set_buffer_sizes,
)
from pg_doorman.net.tls import (
    HandshakeLimiter,
    TlsSetupError,
    client_tls_context,
    client_tls_identity,
    tls_required,
)
from pg_doorman.pool.fallback import Fallback, FallbackSettings
from pg_doorman.pool.pool import AcquireError, DatabaseBudget, Pool, PoolSettings
from pg_doorman.protocol import messages, sqlstate
from pg_doorman.protocol.startup import StartupError
from pg_doorman.stats.counters import STATS_PERIOD
from pg_doorman.stats.sockets import add_up
from pg_doorman.stats.sockets import counted as counted_sockets

if TYPE_CHECKING:
    from pg_doorman.web.server import WebServer

logger = logging.getLogger("pg_doorman")
KeyT = TypeVar("KeyT")

# Distinct (database, user, address, ...) logins whose auth verdicts are remembered;
# past that the memo starts over, so a scan from many addresses can't grow it.
_AUTH_CACHE_SIZE = 4096
# Session parameters a client sets at startup that change query results; they follow
# the client from server to server. application_name joins them on request.
SYNCED_PARAMETERS = (
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
)


class MemoryBudget:
    """Global cap on bytes of client messages held in memory (max_memory_usage)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def add(self, delta: int) -> bool:
        """Account delta bytes; False if a growth would exceed the limit (not applied)."""
        if delta > 0 and self.limit and self.used + delta > self.limit:
            return False
        self.used += delta
        return True


@dataclass
class PoolEntry:
    """Everything the pooler keeps for one (database, user) pair."""

    pool: Pool
    user: UserConfig
    password: str
    credentials: BackendCredentials
    scram_verifier: ScramVerifier | None = None
    # password = "jwt-pkey-fpath:...": the key that checks the client's token.
    token_verifier: TokenVerifier | None = None
    # A passthrough auth_query user's startup parameters: those its pool's servers get
    # (over [general]'s and the pool's), and those left out for want of room.
    looked_up_parameters: dict[str, str] = field(default_factory=dict)
    dropped_parameters: dict[str, str] = field(default_factory=dict)


def _ms(value: int | None, default: int) -> float:
    return (default if value is None else value) / 1000.0


def _seconds_or_off(ms: int) -> float:
    return -1.0 if ms < 0 else ms / 1000.0


def pool_settings(
    config: Config,
    name: str,
    pool: PoolConfig,
    user: UserConfig,
    worker: tuple[int, int] = (0, 1),
) -> PoolSettings:
    """Settings of one pool; with several workers, this worker's share of its sizes."""
    general = config.general
    mode = user.pool_mode or pool.pool_mode
    index, count = worker
    return PoolSettings(
        database=name,
        user=user.username,
        pool_size=share(user.pool_size, index, count, at_least_one=True),
        min_pool_size=share(user.min_pool_size or 0, index, count),
        pool_mode=mode,
        query_wait_timeout=general.query_wait_timeout / 1000.0,
        connect_timeout=_ms(pool.connect_timeout, general.connect_timeout),
        server_lifetime=_ms(
            user.server_lifetime if user.server_lifetime is not None else pool.server_lifetime,
            general.server_lifetime,
        ),
        idle_timeout=_ms(pool.idle_timeout, general.idle_timeout),
        idle_check_timeout=general.server_idle_check_timeout / 1000.0,
        round_robin=general.server_round_robin,
        cleanup_server_connections=pool.cleanup_server_connections,
        pin_on_listen=pool.pin_on_listen,
        pin_on_advisory_lock=pool.pin_on_advisory_lock,
        listen_fanout=pool.listen_fanout,
        slow_query_seconds=_seconds_or_off(config.pool_setting(pool, "log_min_duration_statement")),
        log_parameter_changes=pool.log_client_parameter_status_changes,
        max_concurrent_creates=max(
            min(general.max_concurrent_creates, general.scaling_max_parallel_creates), 1
        ),
        warm_pool_ratio=(
            pool.scaling_warm_pool_ratio
            if pool.scaling_warm_pool_ratio is not None
            else general.scaling_warm_pool_ratio
        ),
        retain_max=general.retain_connections_max,
        server_host=pool.server_host,
        server_port=pool.server_port,
        server_database=pool.server_database or name,
        server_user=user.server_username or user.username,
        application_name=pool.application_name or "pg_doorman",
        startup_parameters={**general.startup_parameters, **pool.startup_parameters},
        tcp_keepalive=(
            general.tcp_keepalives_idle,
            general.tcp_keepalives_interval,
            general.tcp_keepalives_count,
        ),
        tcp_socket_buffer_size=general.tcp_socket_buffer_size,
        unix_socket_buffer_size=general.unix_socket_buffer_size,
        prepared_statements=general.prepared_statements and mode == "transaction",
        statements_cache_size=max(config.pool_setting(pool, "prepared_statements_cache_size"), 1),
        server_statements_cache_size=_server_statements_cache_size(pool, general),
        server_tls=_server_tls(general, pool, name),
    )


def fallback_settings(general: GeneralConfig, pool: PoolConfig) -> FallbackSettings | None:
    """The pool's Patroni fallback settings (its own, else [general]'s); None: off."""
    urls = pool.patroni_api_urls if pool.patroni_api_urls is not None else general.patroni_api_urls
    if not urls:
        return None

    def ms(name: str, default: int) -> int:
        value: int | None = getattr(pool, name)
        if value is None:
            value = getattr(general, name)
        return default if value is None else value

    cooldown = ms("fallback_cooldown", 30_000)
    return FallbackSettings(
        urls=tuple(urls),
        cooldown=cooldown / 1000.0,
        api_timeout=ms("patroni_api_timeout", 5_000) / 1000.0,
        connect_timeout=ms("fallback_connect_timeout", 5_000) / 1000.0,
        lifetime=ms("fallback_lifetime", cooldown) / 1000.0,
    )


def _talos(config: TalosConfig) -> Talos | None:
    try:
        return Talos.load(config)
    except TalosKeyError as exc:
        # load_checked_config found the files usable; they changed since.
        raise ConfigError(exc.key, str(exc)) from exc


def _server_tls(general: GeneralConfig, pool: PoolConfig, name: str) -> ServerTls:
    try:
        return server_tls_for(general, pool, f"pools.{name}")
    except TlsSetupError as exc:
        # load_checked_config found the files usable; they changed since.
        raise ConfigError(exc.key, str(exc)) from exc


# Per-server statement LRU when not configured. PgDoorman uses the pool size, which
# makes a server re-prepare as soon as a client uses more statements than that.
DEFAULT_SERVER_STATEMENTS = 256


def _server_statements_cache_size(pool: PoolConfig, general: GeneralConfig) -> int:
    for value in (
        pool.server_prepared_statements_cache_size,
        general.server_prepared_statements_cache_size,
    ):
        if value is not None:
            return value
    return DEFAULT_SERVER_STATEMENTS


def _same_kind(a: PoolSettings, b: PoolSettings) -> bool:
    """Whether a pool can take new settings in place: clients depend on these two."""
    return a.pool_mode == b.pool_mode and a.prepared_statements == b.prepared_statements


def _backend_identity(s: PoolSettings) -> tuple[object, ...]:
    """What a server connection was opened with: a change needs new servers."""
    return (
        s.server_host,
        s.server_port,
        s.server_database,
        s.server_user,
        s.application_name,
        sorted(s.startup_parameters.items()),
        s.server_tls,
    )


def _keep_running_values(running: Config, new: Config, keys: list[str]) -> Config:
    """`new` with the running values of keys only a restart can change, so that what
    SHOW CONFIG reports is what is in effect."""
    kept: dict[str, dict[str, Any]] = {"general": {}, "web": {}}
    for key in keys:
        section, name = key.split(".", 1)
        kept[section][name] = getattr(getattr(running, section), name)
    return replace(
        new,
        general=replace(new.general, **kept["general"]),
        web=replace(new.web, **kept["web"]),
    )


async def _all_of(deliveries: list[Awaitable[None]]) -> None:
    await asyncio.gather(*deliveries)


async def _unix_server(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], ClientConnection],
    sock: socket.socket,
    backlog: int,
) -> asyncio.Server:
    """Serve a Unix listening socket. Python 3.13's own event loop removes the socket
    file when the server closes, which would cut off the process an upgrade handed the
    socket to: told not to where it can be."""
    try:
        return await loop.create_unix_server(
            factory,
            sock=sock,
            backlog=backlog,
            cleanup_socket=False,  # type: ignore[call-arg,unused-ignore]
        )
    except TypeError:  # no such argument: nothing is removed
        return await loop.create_unix_server(factory, sock=sock, backlog=backlog)


class UnknownDatabase(Exception):
    def __init__(self, database: str) -> None:
        super().__init__(f'No pool for database "{database}"')
        self.database = database


def _token_key(load: Callable[[str], KeyT], value: str, prefix: str) -> KeyT:
    try:
        return load(value.removeprefix(prefix))
    except JwtError as exc:
        # load_checked_config found the file usable; it changed since.
        raise ConfigError("", str(exc)) from exc


def backend_credentials(user: UserConfig) -> BackendCredentials:
    server_user = user.server_username or user.username
    if user.server_password and user.server_password.startswith(JWT_PRIVATE_KEY_PREFIX):
        signer = _token_key(TokenSigner.load, user.server_password, JWT_PRIVATE_KEY_PREFIX)
        return BackendCredentials(user=server_user, token_signer=signer)
    if user.server_password:
        return BackendCredentials(user=server_user, password=user.server_password)
    password = user.password
    if is_md5_hash(password):
        return BackendCredentials(user=server_user, md5_hash=password)
    if is_scram_verifier(password):
        return BackendCredentials(user=server_user, scram_verifier=ScramVerifier.parse(password))
    return BackendCredentials(user=server_user)


def _lookup_failed(user: str, exc: AuthQueryError) -> StartupError:
    # The reason is in the log; the client learns the login could not be checked.
    return StartupError(
        sqlstate.CONNECTION_FAILURE, f'could not look up user "{user}": {exc.message}'
    )


class Pooler:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        ids: IdAllocator | None = None,
        worker: WorkerInfo | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.ids = ids or IdAllocator(worker.index if worker is not None else 0)
        # Several workers: this one's index and their count; budgets are split by it.
        self.worker = worker
        self.cluster = Cluster(self, worker) if worker is not None and worker.count > 1 else None
        self.memory = MemoryBudget(self._share(config.general.max_memory_usage))
        self.clients: dict[int, ClientConnection] = {}
        # Clients not yet logged in, oldest first, with when they connected (monotonic).
        self.logging_in: dict[ClientConnection, float] = {}
        self.entries: dict[tuple[str, str], PoolEntry] = {}
        # max_db_connections: one budget per database (pool name) that sets it.
        self.budgets: dict[str, DatabaseBudget] = {}
        # Patroni-assisted fallback: one per database (pool name) with patroni_api_urls.
        self.fallbacks: dict[str, Fallback] = {}
        # [talos]: logins as user `talos` with a token (None: no keys configured).
        self.talos = _talos(config.talos)
        # Pools with an auth_query: their looked-up users, by pool name.
        self.auth_queries: dict[str, AuthQueryUsers] = {}
        # PAUSE / KILL: a state of the pooler rather than of the pools that exist, so
        # that a pool a reload adds or replaces, or one created for a user first seen
        # later, starts paused too. `paused_all`: PAUSE (or KILL) without a database.
        self.paused_all = False
        self.paused_databases: set[str] = set()
        if self.cluster is not None:
            # A worker restarted after a crash: paused as its siblings are.
            self.paused_all, self.paused_databases = read_pause_state(self.cluster.info.rundir)
        # Empty rule text is still pg_hba (an error), never "no pg_hba".
        self.hba: HbaRules | None = (
            HbaRules.parse(config.general.pg_hba) if config.general.pg_hba is not None else None
        )
        self.shutting_down = False
        self.accepted_total = 0
        self.cancel_requests = 0
        self.login_failures = 0
        # Server logins PostgreSQL refused over a configured startup parameter, by
        # (database, SQLSTATE).
        self.startup_parameter_errors: dict[tuple[str, str], int] = {}
        self.pam_checks = pam.PamChecks()
        # Client TLS: None when not offered; rebuilt by a reload that changes it.
        self.tls_context = client_tls_context(config.general)
        self._tls_identity = client_tls_identity(config.general)
        self.tls_required = tls_required(config.general)
        # The login sweep cuts a handshake at client_login_timeout; this is a backstop.
        login_timeout = config.general.client_login_timeout / 1000.0
        self.tls_handshake_timeout = 2 * login_timeout if login_timeout > 0 else 60.0
        rate = config.general.tls_rate_limit_per_second
        self.tls_limiter = HandshakeLimiter(rate) if rate else None
        # TLS connections that became sessions (a CancelRequest inside TLS is a cancel).
        self.tls_sessions = 0
        # Backend login of each pool, kept apart so a reload can change it in place.
        self._credentials: dict[Pool, BackendCredentials] = {}
        # listen_fanout: each pool's one listening server, while its clients LISTEN.
        self.listen_hubs: dict[Pool, ListenHub] = {}
        # Set by whoever runs the pooler: what the admin SHUTDOWN command triggers.
        self.on_shutdown_request: Callable[[], None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._login_sweep_task: asyncio.Task[None] | None = None
        self.web: WebServer | None = None
        self._servers: list[asyncio.Server] = []
        # The listening sockets themselves: an upgrade hands them to a new process.
        self.listeners: list[socket.socket] = []
        # The Unix socket file of those, removed at exit unless an upgrade took it over.
        self.socket_files: list[SocketFile] = []
        # Whether each accepted client socket needs its options set (see _tune_listeners).
        self.tune_each_client = True
        # With workers: the supervisor accepts and sends connections here.
        self.receiver: Receiver | None = None
        # Binary upgrade: where this process's clients go (the old process), where the
        # old process's clients come from (the new one). See app.migration.
        self.emigration: Emigration | None = None
        self.immigration: Immigration | None = None
        # The channel to the process this one replaced, while it drains: cancel
        # requests for clients still there go back over it.
        self.previous_process: socket.socket | None = None
        # A worker whose supervisor took clients over from an upgrade's old process:
        # those may sit in any worker, whatever worker their ids name.
        self.moved_in_cluster = False
        # ... from listeners it tuned with these options.
        self._dispatched_options: tuple[object, ...] | None = None
        self._retain_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()
        # decide_auth's verdicts, valid for one (pg_hba, pools) pair.
        self._auth_cache: dict[tuple[str, str, str, bool, bool], AuthDecision] = {}
        self._auth_cache_hba: HbaRules | None = None
        self._auth_cache_entries: dict[tuple[str, str], PoolEntry] | None = None
        self._build_pools()

    def _share(self, total: int) -> int:
        if self.worker is None:
            return total
        return share(total, self.worker.index, self.worker.count, at_least_one=True)

    # ---- pools --------------------------------------------------------------

    def _build_pools(self) -> None:
        for key, entry in self._entries_from(self.config).items():
            self.entries[key] = entry
        for name, pool_config in self.config.pools.items():
            if pool_config.auth_query is not None:
                self.auth_queries[name] = new_auth_query_users(self, self.config, name, pool_config)

    def settings_for(
        self, config: Config, name: str, pool_config: PoolConfig, user: UserConfig
    ) -> PoolSettings:
        worker = (0, 1) if self.worker is None else (self.worker.index, self.worker.count)
        return pool_settings(config, name, pool_config, user, worker)

    def lookup_pool_settings(
        self, config: Config, name: str, pool_config: PoolConfig
    ) -> PoolSettings:
        """Settings of a pool's auth_query lookup connections (this worker's share)."""
        auth_query = pool_config.auth_query
        assert auth_query is not None
        template = self.settings_for(
            config, name, pool_config, UserConfig(username=auth_query.user, password="")
        )
        settings = lookup_settings(template, auth_query)
        settings.pool_size = self._share(settings.pool_size)
        return settings

    def set_credentials(self, pool: Pool, credentials: BackendCredentials) -> None:
        self._credentials[pool] = credentials

    def forget_credentials(self, pool: Pool) -> None:
        self._credentials.pop(pool, None)

    @staticmethod
    def scram_verifier_of(password: str) -> ScramVerifier | None:
        return ScramVerifier.parse(password) if is_scram_verifier(password) else None

    def _entries_from(self, config: Config) -> dict[tuple[str, str], PoolEntry]:
        """Pool entries for a config: existing pools reused where their kind matches."""
        entries: dict[tuple[str, str], PoolEntry] = {}
        for name, pool_config in config.pools.items():
            for user in pool_config.users:
                key = (name, user.username)
                entries[key] = self.pool_entry_for(
                    config, name, pool_config, user, self.entries.get(key)
                )
        return entries

    def pool_entry_for(
        self,
        config: Config,
        name: str,
        pool_config: PoolConfig,
        user: UserConfig,
        entry: PoolEntry | None,
        looked_up: Mapping[str, str] | None = None,
    ) -> PoolEntry:
        """The entry of one user's pool: `entry` updated in place when its pool can take
        the new settings, else a new pool (the caller retires the old one). `looked_up`:
        startup parameters of an auth_query user, over the configured ones."""
        settings = self.settings_for(config, name, pool_config, user)
        if looked_up:
            settings.startup_parameters = {**settings.startup_parameters, **looked_up}
        credentials = backend_credentials(user)
        verifier = self.scram_verifier_of(user.password)
        token_verifier = None
        if user.password.startswith(JWT_PUBLIC_KEY_PREFIX):
            token_verifier = _token_key(TokenVerifier.load, user.password, JWT_PUBLIC_KEY_PREFIX)
        if entry is not None and _same_kind(entry.pool.settings, settings):
            learnt = user.auth_pam_service is not None and entry.user.auth_pam_service is not None
            credentials = self._update_pool(entry.pool, settings, credentials, learnt)
            entry.user = user
            entry.password = user.password
            entry.credentials = credentials
            entry.scram_verifier = verifier
            entry.token_verifier = token_verifier
        else:
            if entry is not None:
                # A pool replaced by a reload (its pool_mode changed, say) hands on
                # what passthrough learnt: the new one can open its min_pool_size
                # servers before anyone logs in again.
                keep_client_key(credentials, entry.credentials.scram_client_key)
            pool = Pool(settings, self.connect_server, self.loop)
            # PAUSE (or KILL) stays in force until RESUME: a replacement or a new
            # user's pool opens no server meanwhile.
            if self.database_paused(name):
                pool.pause()
            self._credentials[pool] = credentials
            entry = PoolEntry(
                pool=pool,
                user=user,
                password=user.password,
                credentials=credentials,
                scram_verifier=verifier,
                token_verifier=token_verifier,
            )
        pool = entry.pool
        pool.join_budget(self._budget_for(name, pool_config))
        self._fallback_for(config, name, pool_config)
        check_query = messages.query(config.general.pooler_check_query)
        if pool.check_query != check_query:
            pool.check_query_response = None
        pool.check_query = check_query
        synced: tuple[str, ...] = SYNCED_PARAMETERS
        if config.general.sync_server_parameters:
            synced += ("application_name",)
        pool.set_synced_parameters(synced)
        return entry

    def database_paused(self, database: str) -> bool:
        """Whether PAUSE or KILL holds the database's pools until RESUME."""
        return self.paused_all or database in self.paused_databases

    def _budget_for(self, name: str, pool_config: PoolConfig) -> DatabaseBudget | None:
        """The database's max_db_connections budget (this worker's share), if it has one."""
        limit = pool_config.max_db_connections or 0
        if limit == 0:
            self.budgets.pop(name, None)
            return None
        budget = self.budgets.get(name)
        if budget is None:
            budget = self.budgets[name] = DatabaseBudget(self.loop)
        index, count = (0, 1) if self.worker is None else (self.worker.index, self.worker.count)
        budget.configure(
            limit=share(limit, index, count, at_least_one=True),
            reserve=share(pool_config.reserve_pool_size or 0, index, count),
            reserve_timeout=_ms(pool_config.reserve_pool_timeout, 3000),
            min_lifetime=_ms(pool_config.min_connection_lifetime, 30000),
            guaranteed=share(pool_config.min_guaranteed_pool_size or 0, index, count),
        )
        return budget

    def _update_pool(
        self,
        pool: Pool,
        settings: PoolSettings,
        credentials: BackendCredentials,
        pam_password: bool = False,
    ) -> BackendCredentials:
        """Apply reloaded settings to a kept pool; returns the credentials now in use.
        `pam_password`: a password learnt from a PAM login may be in use (passthrough)."""
        old_credentials = self._credentials[pool]
        # A ClientKey learnt from a client's SCRAM login stays valid for the same verifier,
        # and a password PAM accepted for the same server login.
        learnt = replace(old_credentials, scram_client_key=None)
        if pam_password and credentials.password is None:
            learnt = replace(learnt, password=None)
        same_login = learnt == credentials
        if same_login:
            credentials = old_credentials
        if settings == pool.settings and same_login:
            return credentials
        reconnect = not same_login or _backend_identity(settings) != _backend_identity(
            pool.settings
        )
        self._credentials[pool] = credentials
        pool.update_settings(settings)
        if reconnect:
            logger.info("pool %s: backend settings changed, reconnecting", pool.name)
            pool.reconnect("backend settings changed by a reload")
            self._reconnect_listen_hub(pool, "backend settings changed by a reload")
        else:
            logger.info("pool %s: settings changed", pool.name)
        return credentials

    async def connect_server(self, pool: Pool) -> ServerConnection:
        try:
            return await self._connect_server(pool)
        except AcquireError as refused:
            self._note_startup_parameter_error(pool, refused)
            raise

    def _note_startup_parameter_error(self, pool: Pool, refused: AcquireError) -> None:
        """Count and log a server login PostgreSQL refused over one of the configured
        startup parameters (it names the parameter in its message). Shutdowns and
        recovery (57P) are the server's state, not the parameter's."""
        if refused.code.startswith("57P"):
            return
        message = refused.message.lower()
        settings = pool.settings
        for name in settings.startup_parameters:
            if f'"{name.lower()}"' in message:
                key = (settings.database, refused.code)
                errors = self.startup_parameter_errors
                errors[key] = errors.get(key, 0) + 1
                logger.warning(
                    "pool %s@%s: PostgreSQL refused the startup parameter %s=%r: %s (SQLSTATE %s)",
                    settings.user,
                    settings.database,
                    name,
                    settings.startup_parameters[name],
                    refused.message,
                    refused.code,
                )
                return

    async def _connect_server(self, pool: Pool) -> ServerConnection:
        credentials = self._credentials[pool]
        fallback = self.fallbacks.get(pool.settings.database)
        if fallback is None:
            return await open_server(pool, self.ids.next_server_id(), credentials, self.loop)
        settings = fallback.settings

        def open_local() -> Awaitable[ServerConnection]:
            return open_server(pool, self.ids.next_server_id(), credentials, self.loop)

        def open_at(host: str, port: int) -> Awaitable[ServerConnection]:
            return open_server(
                pool,
                self.ids.next_server_id(),
                credentials,
                self.loop,
                at=(host, port),
                timeout=settings.connect_timeout,
                lifetime=settings.lifetime or None,  # 0: the pool's server_lifetime
            )

        return await fallback.connect(open_local, open_at)

    def pool_entry(self, database: str, user: str) -> PoolEntry | None:
        return self.entries.get((database, user))

    def looks_up_users(self, database: str) -> bool:
        """Whether users not configured in this pool are looked up by auth_query."""
        return database in self.auth_queries

    async def looked_up_user(self, database: str, user: str) -> LookedUpUser | None:
        """What a login of a user the pool's auth_query looks up is checked against
        (None: no such user); StartupError when the lookup itself fails."""
        try:
            return await self.auth_queries[database].find(user)
        except AuthQueryError as exc:
            raise _lookup_failed(user, exc) from None

    async def looked_up_entry(self, database: str, user: str) -> PoolEntry | None:
        """The entry of a looked-up user who has already logged in (a client handed
        over by a binary upgrade's old process); None: no such user."""
        try:
            return await self.auth_queries[database].entry(user)
        except AuthQueryError as exc:
            raise _lookup_failed(user, exc) from None

    async def looked_up_again(self, database: str, user: str) -> LookedUpUser | None:
        """After a failed password: the user fetched anew if allowed and changed."""
        users = self.auth_queries.get(database)
        if users is None:
            return None
        try:
            return await users.find_again(user)
        except AuthQueryError:
            return None  # logged by the lookup; the login fails as it would have

    def admit_looked_up(self, database: str, user: str, looked_up: LookedUpUser) -> PoolEntry:
        """The entry (and pool) of a looked-up user whose login has just succeeded."""
        users = self.auth_queries.get(database)
        if users is None:  # a reload removed the lookup during the password exchange
            raise StartupError(sqlstate.CANNOT_CONNECT_NOW, "the user lookup was stopped")
        return users.admit(user, looked_up)

    def count_looked_up_login(self, database: str, ok: bool) -> None:
        users = self.auth_queries.get(database)
        if users is not None:
            if ok:
                users.lookup.stats.auth_success += 1
            else:
                users.lookup.stats.auth_failure += 1

    def listed_entries(self) -> list[tuple[tuple[str, str], PoolEntry]]:
        """Every pool's entry: the configured users', then those found by auth_query."""
        listed = list(self.entries.items())
        for users in self.auth_queries.values():
            listed.extend(users.listed())
        return listed

    @property
    def pools(self) -> Iterable[Pool]:
        return (entry.pool for _, entry in self.listed_entries())

    # ---- operations (admin console, signals) ----------------------------------

    def entries_of(self, database: str | None) -> list[PoolEntry]:
        """The pools of one database (all when None); UnknownDatabase if it has none."""
        if database is None:
            return [entry for _, entry in self.listed_entries()]
        found = [entry for (db, _), entry in self.listed_entries() if db == database]
        if not found and database not in self.auth_queries:
            raise UnknownDatabase(database)
        return found

    def clients_of(self, pool: Pool) -> list[ClientConnection]:
        return [client for client in self.clients.values() if client.pool is pool]

    def pools_of(self, database: str | None) -> list[Pool]:
        """The pools PAUSE, RESUME and KILL act on: the users' pools of one database (all
        when None) and the connections its auth_query looks users up on."""
        pools = [entry.pool for entry in self.entries_of(database)]
        for name, users in self.auth_queries.items():
            if database in (None, name):
                pools.append(users.lookup.connections.pool)
        return pools

    def pause(self, database: str | None) -> list[Pool]:
        """Queue new transactions of these pools; returns them for wait_paused()."""
        pools = self.pools_of(database)
        self._hold(database)
        for pool in pools:
            pool.pause()
        return pools

    def _hold(self, database: str | None) -> None:
        """Record a PAUSE or KILL: pools created from now on start paused too."""
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        self._publish_pause_state()

    def _publish_pause_state(self) -> None:
        if self.cluster is None:
            return
        try:
            publish_pause_state(self.cluster.info.rundir, self.paused_all, self.paused_databases)
        except OSError as exc:
            logger.warning("cannot keep the pause state for a restarted worker: %s", exc)

    async def wait_paused(self, pools: list[Pool], *, poll: float = 0.02) -> None:
        """Return once no server of `pools` is busy, then close their servers, as
        PgBouncer does, so the database can be restarted underneath.

        Servers being opened or checked count as busy: one that logged in after the
        idle ones were closed would stay connected throughout the pause."""
        while any(pool.paused and pool.unsettled > 0 for pool in pools):
            await asyncio.sleep(poll)
        for pool in pools:
            if pool.paused:
                pool.close_idle("database paused")

    def resume(self, database: str | None) -> None:
        """Undo PAUSE and KILL: of every database when None (the pooler's own pause
        included), else of that database, unless the whole pooler is paused."""
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        self._publish_pause_state()
        for pool in self.pools_of(database):
            if not self.database_paused(pool.settings.database):
                pool.resume()

    def reconnect(self, database: str | None) -> None:
        for entry in self.entries_of(database):
            entry.pool.reconnect("RECONNECT by admin")
            self._reconnect_listen_hub(entry.pool, "RECONNECT by admin")

    def kill(self, database: str | None) -> int:
        """Disconnect the clients and servers of these pools, which stay paused until
        RESUME (as in PgBouncer). Returns how many clients were disconnected."""
        pools = self.pause(database)
        killed = 0
        # Clients of a pool a reload retired (a session that keeps its old pool)
        # belong to the database as well.
        for client in list(self.clients.values()):
            own = client.pool
            if own is not None and database in (None, own.settings.database):
                client.fail(sqlstate.ADMIN_SHUTDOWN, "database killed by the administrator")
                killed += 1
        for pool in pools:
            pool.fail_waiters(sqlstate.ADMIN_SHUTDOWN, "database killed by the administrator")
            pool.close_all("KILL by admin")
        return killed

    def _fallback_for(self, config: Config, name: str, pool_config: PoolConfig) -> None:
        """Keep the database's Fallback (with its state) in step with its settings."""
        settings = fallback_settings(config.general, pool_config)
        if settings is None:
            self.fallbacks.pop(name, None)
            return
        fallback = self.fallbacks.get(name)
        if fallback is None:
            self.fallbacks[name] = Fallback(name, settings)
        else:
            fallback.settings = settings

    def reload(self, config: Config) -> list[str]:
        """Apply a new, already validated config to the running pooler.

        Pools whose settings changed are updated in place (a change of backend address,
        database, user or password replaces their servers as RECONNECT does); pools that
        are gone, or whose pool_mode or prepared_statements changed, are retired: their
        idle clients are disconnected at once and the rest after their transaction.
        Returns one line per change that the operator should know about.
        """
        restart_keys = self.config.restart_required_changes(config)
        notes = [f"{key} changed: needs a restart, the running value stays" for key in restart_keys]
        config = _keep_running_values(self.config, config, restart_keys)
        old = self.config.general
        new = config.general
        # First, so that certificate files that turned unusable fail the whole reload.
        notes.extend(self._reload_client_tls(old, new))
        if new.log_level and new.log_level != old.log_level:
            apply_log_filter(new.log_level)
            notes.append(f"log level set to {new.log_level}")
        self.hba = HbaRules.parse(new.pg_hba) if new.pg_hba is not None else None
        talos = _talos(config.talos)
        if talos != self.talos:
            self.talos = talos
            notes.append("[talos] keys or databases changed")
        self.memory.limit = self._share(new.max_memory_usage)
        previous = self.entries
        self.config = config
        if self.paused_databases - config.pools.keys():
            # A database that is gone can't be resumed by name: its pause goes with it.
            self.paused_databases &= config.pools.keys()
            self._publish_pause_state()
        self.entries = self._entries_from(config)
        for key, entry in previous.items():
            current = self.entries.get(key)
            if current is None or current.pool is not entry.pool:
                notes.append(f"pool {entry.pool.name} retired")
                self.retire_pool(entry.pool)
        for database, user in self.entries.keys() - previous.keys():
            notes.append(f"pool {user}@{database} added")
        for name in self.fallbacks.keys() - config.pools.keys():
            del self.fallbacks[name]
        # A database gone, or without max_db_connections now: its budget leaves SHOW
        # POOL_COORDINATOR and /metrics (retired pools keep their own reference to it
        # until their last server closes).
        for name in list(self.budgets):
            kept = config.pools.get(name)
            if kept is None or not kept.max_db_connections:
                del self.budgets[name]
        notes.extend(self._reload_auth_queries(config))
        for _, entry in self.listed_entries():
            entry.pool.retain(0)  # opens min_pool_size servers of new pools
        self._tune_listeners()
        return notes

    def _reload_client_tls(self, old: GeneralConfig, new: GeneralConfig) -> list[str]:
        """New TLS handshakes use the new settings and files; sessions already in TLS
        keep theirs. A file that cannot be used raises ConfigError naming its key."""
        notes = []
        identity = client_tls_identity(new)
        if identity != self._tls_identity:
            try:
                context = client_tls_context(new)
            except TlsSetupError as exc:
                raise ConfigError(f"general.{exc.key}", str(exc)) from exc
            self.tls_context = context
            self._tls_identity = identity
            notes.append("client TLS settings or files changed: new connections use them")
        self.tls_required = tls_required(new)
        rate = new.tls_rate_limit_per_second
        if rate != old.tls_rate_limit_per_second:
            self.tls_limiter = HandshakeLimiter(rate) if rate else None
        return notes

    def _reload_auth_queries(self, config: Config) -> list[str]:
        """Keep each pool's lookup, cache and looked-up users' pools while the lookup
        is unchanged; otherwise start them afresh (their pools are retired)."""
        notes = []
        previous = self.auth_queries
        self.auth_queries = {}
        for name, pool_config in config.pools.items():
            auth_query = pool_config.auth_query
            if auth_query is None:
                continue
            old = previous.pop(name, None)
            settings = self.lookup_pool_settings(config, name, pool_config)
            if old is not None and old.same_lookup(auth_query, settings):
                old.reload(config, pool_config)
                self.auth_queries[name] = old
                continue
            if old is not None:
                old.close("auth_query changed by a configuration reload", retire=True)
                notes.append(f"pool {name}: auth_query changed, its users' pools retired")
            else:
                notes.append(f"pool {name}: auth_query enabled")
            self.auth_queries[name] = new_auth_query_users(self, config, name, pool_config)
        for name, old in previous.items():
            old.close("auth_query removed by a configuration reload", retire=True)
            notes.append(f"pool {name}: auth_query removed, its users' pools retired")
        return notes

    def listen_hub(self, pool: Pool) -> ListenHub:
        """The pool's listening server, opened for its first LISTEN (listen_fanout)."""
        hub = self.listen_hubs.get(pool)
        if hub is None:
            hub = self.listen_hubs[pool] = ListenHub(self, pool)
        return hub

    def listen_hub_closed(self, hub: ListenHub) -> None:
        if self.listen_hubs.get(hub.pool) is hub:
            del self.listen_hubs[hub.pool]

    def _reconnect_listen_hub(self, pool: Pool, reason: str) -> None:
        """The pool's servers are being replaced: its listening one goes too, and the
        clients listening through it are told to reconnect and LISTEN again."""
        hub = self.listen_hubs.get(pool)
        if hub is not None:
            hub.lost(reason)

    def _close_listen_hub(self, pool: Pool, reason: str) -> None:
        hub = self.listen_hubs.get(pool)
        if hub is not None:
            hub.close(reason)

    def drop_pool(self, pool: Pool, reason: str) -> None:
        """Close a pool no client uses (an idle looked-up user's)."""
        self._close_listen_hub(pool, reason)
        pool.close(reason)
        self._credentials.pop(pool, None)

    def retire_pool(self, pool: Pool) -> None:
        message = "this pool was removed or changed by a configuration reload; reconnect"
        for client in self.clients_of(pool):
            if client.server is None or client.pinned_between_transactions():
                client.fail(sqlstate.ADMIN_SHUTDOWN, message)
            elif not pool.settings.session_mode:
                # A session-mode client keeps its retired pool until it disconnects
                # (docs/admin.md): only a shutdown ends its session after a transaction.
                client.closing_after_transaction = message
        self._close_listen_hub(pool, message)
        pool.close(message)
        self._credentials.pop(pool, None)

    def reload_file(self) -> list[str]:
        """Reread the config file this pooler was started with and apply it."""
        return self.apply_config(self.read_config_file())

    def read_config_file(self) -> Config:
        """The config file this pooler was started with, loaded and checked."""
        from pg_doorman.app.cli import load_checked_config

        if self.config.source == "<memory>":
            raise ConfigError("", "the configuration did not come from a file")
        config = load_checked_config(self.config.source)
        for warning in config.warnings:
            logger.warning("config: %s", warning)
        return config

    def apply_config(self, config: Config) -> list[str]:
        notes = self.reload(config)
        # The changes first: the closing line tells a reader (and a script tailing the
        # log) that everything the reload did is already written.
        for note in notes:
            logger.info("reload: %s", note)
        logger.info("configuration reloaded from %s", config.source)
        return notes

    async def reload_everywhere(self) -> list[dict[str, Any]]:
        """The admin console's RELOAD: the file read once, here, and applied by every
        worker (the replies of run_control's "reload", this worker's first)."""
        if self.cluster is None:
            return [await run_control(self, {"op": "reload"})]
        try:
            config = self.read_config_file()
        except ConfigError as exc:
            return [{"error": str(exc)}]
        path = write_config_snapshot(self.cluster.info.rundir, config)
        return await self.everywhere({"op": "reload", "snapshot": path})

    async def cluster_snapshot(self, sockets: bool = True) -> Snapshot:
        """The state of the whole pooler, every worker process included; its sockets
        counted only with `sockets` (SHOW SOCKETS, /metrics): a /proc scan is not free."""
        local = take_snapshot(self, await counted_sockets() if sockets else None)
        if self.cluster is None:
            return local
        others = await self.cluster.others({"op": "snapshot", "sockets": sockets})
        merged = merge([local, *others])
        if sockets:
            # The supervisor's (the listeners, /metrics) belong to the pooler too.
            supervisor = await counted_sockets(os.getppid())
            merged["sockets"] = add_up([merged["sockets"], supervisor])
        return merged

    async def everywhere(
        self, payload: dict[str, Any], timeout: float | None = 10.0
    ) -> list[dict[str, Any]]:
        """Carry out a control request in this worker and in every other one."""
        if self.cluster is None:
            return [await run_control(self, payload)]
        local, others = await asyncio.gather(
            run_control(self, payload), self.cluster.others(payload, timeout)
        )
        return [local, *others]

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task referenced until done; cancelled at shutdown."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_upgrade(self) -> bool:
        """The admin console's UPGRADE: SIGUSR2 to whoever owns the listening sockets."""
        os.kill(os.getppid() if self.cluster is not None else os.getpid(), signal.SIGUSR2)
        return True

    def request_shutdown(self) -> bool:
        if self.cluster is not None:
            # The supervisor stops every worker.
            os.kill(os.getppid(), signal.SIGTERM)
            return True
        if self.on_shutdown_request is None:
            return False
        self.on_shutdown_request()
        return True

    async def _stats_loop(self) -> None:
        last = self.loop.time()
        while True:
            await asyncio.sleep(STATS_PERIOD)
            now = self.loop.time()
            for pool in self.pools:
                pool.stats.close_period(now - last)
            logger.debug("stats period closed after %.1fs", now - last)
            last = now

    async def _login_sweep_loop(self) -> None:
        while True:
            # Read each time: a reload may change it. Sweeping four times per timeout
            # cuts a login between 1 and 1.25 timeouts after it began.
            timeout = self.config.general.client_login_timeout / 1000.0
            await asyncio.sleep(min(max(timeout / 4, 0.05), 1.0) if timeout > 0 else 1.0)
            self.sweep_logins()

    def sweep_logins(self) -> None:
        """Disconnect the clients still logging in after client_login_timeout."""
        timeout = self.config.general.client_login_timeout / 1000.0
        if timeout <= 0 or not self.logging_in:
            return
        began_before = time.monotonic() - timeout
        late = []
        for client, began in self.logging_in.items():
            if began > began_before:
                break  # the rest came later
            late.append(client)
        for client in late:
            del self.logging_in[client]
            client.login_timed_out()

    # ---- authentication -----------------------------------------------------

    def decide_auth(
        self, database: str, user: str, *, address: str, unix: bool, ssl: bool
    ) -> AuthDecision:
        """How this login must authenticate. `address` is the peer's text form ("" on a
        Unix socket). The verdict depends only on the config, so it is remembered per
        login identity until a reload replaces pg_hba or the pools."""
        if self._auth_cache_hba is not self.hba or self._auth_cache_entries is not self.entries:
            self._auth_cache_hba, self._auth_cache_entries = self.hba, self.entries
            self._auth_cache.clear()
        key = (database, user, address, unix, ssl)
        decision = self._auth_cache.get(key)
        if decision is None:
            if len(self._auth_cache) >= _AUTH_CACHE_SIZE:
                self._auth_cache.clear()
            entry = self.entries.get((database, user))
            decision = self._decide_auth(
                database,
                user,
                entry.password if entry is not None else "",
                address=None if unix else peer_address(address),
                unix=unix,
                ssl=ssl,
                pam=entry is not None and entry.user.auth_pam_service is not None,
            )
            self._auth_cache[key] = decision
        return decision

    def decide_looked_up_auth(
        self, database: str, user: str, stored: str, *, address: str, unix: bool, ssl: bool
    ) -> AuthDecision:
        """decide_auth for a user found by auth_query, whose password is not in the
        config (not remembered: the lookup's cache has its own lifetime). A refusal
        for want of a usable password fakes a SCRAM exchange, as PostgreSQL (whose
        default password_encryption is SCRAM) does for a role that does not exist or
        has no password: an MD5 challenge would set such names apart from SCRAM roles."""
        decision = self._decide_auth(
            database,
            user,
            stored,
            address=None if unix else peer_address(address),
            unix=unix,
            ssl=ssl,
        )
        if decision.method == ClientAuth.REJECT and not decision.by_hba:
            return AuthDecision(ClientAuth.REJECT, decision.reason, mock=ClientAuth.SCRAM)
        return decision

    def _decide_auth(
        self,
        database: str,
        user: str,
        stored: str,
        *,
        address: IPv4Address | IPv6Address | None,
        unix: bool,
        ssl: bool,
        pam: bool = False,
    ) -> AuthDecision:
        general = self.config.general
        if self.hba is not None:
            rule = self._hba_rule(self.hba, database, user, address, unix, ssl)
            decision = decide_client_auth(rule, True, stored, pam=pam)
        else:
            if general.hba and not legacy_hba_allows(general.hba, None if unix else address):
                return AuthDecision(ClientAuth.REJECT, "address not allowed by hba", by_hba=True)
            decision = decide_client_auth(None, False, stored, pam=pam)
        return decision

    async def pam_refusal(self, entry: PoolEntry, password: str, address: str) -> str | None:
        """Check a password with the user's auth_pam_service, in a thread: None
        when PAM accepts it, else PAM's reason. An accepted password also logs the
        pool in to its server when the user has no server_password (passthrough)."""
        service = entry.user.auth_pam_service
        assert service is not None
        user = entry.user.username
        refusal = await self.pam_checks.check(service, user, password, address or None)
        credentials = entry.credentials
        if refusal is None and not entry.user.server_password:
            credentials.password = password
        return refusal

    @staticmethod
    def _hba_rule(
        hba: HbaRules,
        database: str,
        user: str,
        address: IPv4Address | IPv6Address | None,
        unix: bool,
        ssl: bool,
    ) -> HbaRule | None:
        return hba.match(
            conn_type="local" if unix else "host",
            ssl=ssl,
            database=database,
            user=user,
            address=address,
        )

    def hba_permits(self, database: str, user: str, *, address: str, unix: bool, ssl: bool) -> bool:
        """Whether pg_hba (or the legacy hba list) lets `user` in at all, whatever
        the method: for a Talos login, whose token stands for every method."""
        peer = None if unix else peer_address(address)
        if self.hba is not None:
            rule = self._hba_rule(self.hba, database, user, peer, unix, ssl)
            return rule is not None and rule.method != "reject"
        general = self.config.general
        return not general.hba or legacy_hba_allows(general.hba, peer)

    def admin_auth_method(
        self,
        database: str,
        user: str,
        *,
        address: IPv4Address | IPv6Address | None,
        unix: bool,
        ssl: bool,
    ) -> ClientAuth | None:
        """How an admin console login authenticates; None when no pg_hba line matches.

        Without pg_hba it is MD5, as in PgDoorman; with pg_hba the matching line's method
        applies (the pooler knows the admin password, so it can also run SCRAM).
        """
        if self.hba is None:
            if self.config.general.hba and not legacy_hba_allows(
                self.config.general.hba, None if unix else address
            ):
                return ClientAuth.REJECT
            return ClientAuth.MD5
        rule = self._hba_rule(self.hba, database, user, address, unix, ssl)
        if rule is None:
            return None
        return {
            "trust": ClientAuth.TRUST,
            "reject": ClientAuth.REJECT,
            "scram-sha-256": ClientAuth.SCRAM,
        }.get(rule.method, ClientAuth.MD5)

    # ---- clients ------------------------------------------------------------

    def register_client(self, client: ClientConnection) -> bool:
        """Track a new client; False if it exceeds max_connections."""
        self.accepted_total += 1
        self.clients[client.client_id] = client
        return len(self.clients) <= self._share(self.config.general.max_connections)

    def unregister_client(self, client: ClientConnection) -> None:
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        if self.receiver is not None:
            self.receiver.client_closed()
        if self.shutting_down and not self.clients:
            self._drained.set()

    def tune_client_socket(self, sock: socket.socket) -> None:
        """Client socket options for one accepted connection: only where the listening
        socket's options are not inherited, or TCP_NODELAY must be turned off."""
        apply_socket_options(sock, self.config.general)

    def tune_unix_client_socket(self, sock: socket.socket | None) -> None:
        """unix_socket_buffer_size for a client on the Unix socket (a Unix listener's
        buffer sizes are not copied to the connections it accepts)."""
        size = self.config.general.unix_socket_buffer_size
        if size and sock is not None:
            set_buffer_sizes(sock, size)

    def _tune_listeners(self) -> None:
        """Give the TCP listening sockets the client socket options. On Linux every
        accepted connection inherits them (keepalive, user timeout, linger, buffer
        sizes), which saves several setsockopt calls per connection; a reload applies
        new values to the connections accepted after it."""
        general = self.config.general
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    apply_socket_options(sock, general)
        if self.web is not None:
            self.web.set_buffer_size(general.tcp_socket_buffer_size)
        self._set_client_tuning()

    def _set_client_tuning(self) -> None:
        """Whether each accepted client needs the tcp_* options set on it, because
        the listener's cannot stand for them."""
        general = self.config.general
        self.tune_each_client = (
            not INHERITS_SOCKET_OPTIONS
            or not general.tcp_no_delay
            # The supervisor's listeners keep the options they started with.
            or (
                self._dispatched_options is not None
                and options_key(general) != self._dispatched_options
            )
        )

    # ---- cancel -------------------------------------------------------------

    def handle_cancel(self, pid: int, secret: int) -> asyncio.Task[None] | None:
        """Forward a CancelRequest to the backend the client holds right now, if any;
        returns the task still delivering it, if any: to PostgreSQL, or to the worker
        that owns the client. The cancel connection should stay open until it is done:
        PostgreSQL closes it only after signalling the backend, and a client may send
        its next query as soon as it closes (asyncpg does), which a cancel still on its
        way would then hit."""
        self.cancel_requests += 1
        owner = self.ids.owner_of(pid)
        if self.cluster is not None:
            # An id from an upgrade's old process may name a worker beyond this count.
            owner %= self.cluster.info.count
            if owner != self.cluster.info.index:
                return self.cluster.forward_cancel(owner, pid, secret)
        return self.cancel_here(pid, secret)

    def cancel_here(
        self, pid: int, secret: int, *, search: bool = True
    ) -> asyncio.Task[None] | None:
        """Cancel for a client of this worker; returns the task still delivering it,
        if any: to PostgreSQL, or to the processes that may have the client (the
        previous process's receipt, the other workers' answers). `search`: a client
        this worker doesn't have may be one an upgrade brought to another worker, or
        one still on the old process: the request goes to each of them (only the owner
        of the key acts)."""
        client = self.clients.get(pid)
        if client is None and search:
            passed_to = []
            deliveries: list[Awaitable[None]] = []
            previous = self.previous_process
            if previous is not None:
                try:
                    receipt = send_cancel(previous, pid, secret)
                except PreviousProcessGone:
                    previous.close()
                    self.previous_process = None
                else:
                    passed_to.append("the previous process")
                    if receipt is not None:
                        deliveries.append(wait_for_receipt(self.loop, receipt))
            if self.cluster is not None and self.moved_in_cluster:
                for index in range(self.cluster.info.count):
                    if index != self.cluster.info.index:
                        deliveries.append(
                            self.cluster.forward_cancel(index, pid, secret, search=False)
                        )
                passed_to.append("the other workers")
            if passed_to:
                logger.debug("cancel request for client id %d: to %s", pid, " and ".join(passed_to))
                if not deliveries:
                    return None
                task = self.loop.create_task(_all_of(deliveries))
                self.track(task)
                return task
        if client is None or client.secret != secret:
            logger.info("cancel request for unknown client id %d or wrong secret: ignored", pid)
            return None
        if client.on_cancel is not None:
            client.on_cancel()
            return None
        server = client.server
        if server is None and client.cancel_waiting():
            logger.debug("client %s: canceled while waiting for a server", client.name)
            return None
        if server is None or server.closed:
            logger.debug("cancel request for idle client %s: nothing to cancel", client.name)
            return None
        # A cancel may still be in flight when the transaction ends: never reuse it.
        server.spoiled = "a cancel request was forwarded to it"
        if server.sync_pending:
            # The pooler's SET of the client's parameters runs ahead of the client's
            # query: a cancel now would interrupt it instead (and lose the client's
            # parameters). It goes once the SET is answered.
            synced: asyncio.Future[None] = self.loop.create_future()
            server.cancels_after_sync.append(synced)
            task = self.loop.create_task(self._send_cancel_after_sync(server, synced))
        else:
            task = self.loop.create_task(self._send_cancel(server))
        self.track(task)
        return task

    async def _send_cancel_after_sync(
        self, server: ServerConnection, synced: asyncio.Future[None]
    ) -> None:
        # Bounded: a SET that never ends is left to the cancel after all.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(synced, server.pool.settings.connect_timeout)
        if not server.closed:
            await self._send_cancel(server)

    async def _send_cancel(self, server: ServerConnection) -> None:
        settings = server.pool.settings
        # Where the server was opened: a Patroni fallback member is not the pool's host.
        host, port = server.address
        try:
            async with asyncio.timeout(settings.connect_timeout):
                if host.startswith("/"):
                    path = f"{host.rstrip('/')}/.s.PGSQL.{port}"
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    reader, writer = await asyncio.open_connection(host, port)
                tls = cast("ServerTls | None", settings.server_tls)
                if server.tls and tls is not None and tls.context is not None:
                    # The cancel key travels as securely as the session it cancels.
                    writer.write(SSL_REQUEST)
                    if await reader.readexactly(1) == b"S":
                        await writer.start_tls(tls.context, server_hostname=host)
                writer.write(messages.cancel_request(server.backend_pid, server.backend_secret))
                await writer.drain()
                # Close with FIN after PostgreSQL hangs up, so nobody sees a reset.
                await reader.read()
                writer.close()
        except (OSError, TimeoutError) as exc:
            logger.warning("could not forward cancel to server %d: %s", server.server_id, exc)

    # ---- lifecycle ----------------------------------------------------------

    async def start(self, dispatch: socket.socket | None = None) -> None:
        """Listen and open min_pool_size servers. `dispatch`: a worker's channel, over
        which the supervisor sends the connections it accepted, instead of listening."""
        general = self.config.general
        # Metrics first: once clients can connect, the pooler can also be observed.
        web = self.config.web
        if web.enabled and self.worker is None:  # with workers, the supervisor serves it
            from pg_doorman.web.server import WebServer

            self.web = WebServer(
                self.cluster_snapshot,
                lambda: not self.shutting_down,
                web.host,
                web.port,
                general.tcp_socket_buffer_size,
            )
            try:
                await self.web.start()
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot listen for metrics on {web.host}:{web.port}: {exc.strerror}"
                ) from exc
        if dispatch is not None:
            assert self.worker is not None
            board = LoadBoard(os.path.join(self.worker.rundir, "load"), self.worker.count)
            self.receiver = Receiver(
                self.loop,
                dispatch,
                board,
                self.worker.index,
                self._adopt,
                self._adopt_moved,
                self._successor_channel,
            )
            self._dispatched_options = options_key(general)
            self._set_client_tuning()
            self.receiver.start()
        else:
            await self._listen()
        self._retain_task = self.loop.create_task(self._retain_loop())
        self._stats_task = self.loop.create_task(self._stats_loop())
        self._login_sweep_task = self.loop.create_task(self._login_sweep_loop())
        if self.cluster is not None:
            # Last: the supervisor takes an answering control socket for "listening".
            await self.cluster.start()
        for _, entry in self.listed_entries():
            entry.pool.retain(0)  # closes nothing, opens min_pool_size servers
        logger.info(
            "pg_doorman listening on %s:%d (%d pools; %s; %s)",
            general.host,
            general.port,
            len(self.entries),
            implementation.describe(),
            event_loop.describe(self.loop),
        )

    async def _listen(self) -> None:
        general = self.config.general
        backlog = general.backlog or min(general.max_connections, 4096)

        # Partials, not closures: each accepted connection then goes straight to the
        # (compiled) class without an interpreted frame.
        factory = functools.partial(ClientConnection, self)
        unix_factory = functools.partial(ClientConnection, self, unix=True)

        # The same listening sockets the supervisor binds with workers; the TCP ones
        # already carry the client socket options.
        self.listeners = listeners_for(general)
        self.socket_files = socket_files(self.listeners)
        for sock in self.listeners:
            if sock.family == socket.AF_UNIX:
                server = await _unix_server(self.loop, unix_factory, sock, backlog)
            else:
                server = await self.loop.create_server(factory, sock=sock, backlog=backlog)
            self._servers.append(server)
        self._set_client_tuning()

    def _adopt(self, fd: int, family: int) -> None:
        """Serve a connection the supervisor accepted and sent to this worker."""
        client = ClientConnection(self, unix=family == socket.AF_UNIX)
        open_accepted(self.loop, client, fd, family, self._not_adopted)

    def _adopt_moved(self, fd: int, state: bytes) -> None:
        """Serve a client an old process handed over, which the supervisor sent here."""
        arrival = unpack_arrival(fd, state)
        if arrival is None:
            self._moved_client_closed()
            return
        self._arrived(fd, *arrival)

    def _moved_client_closed(self) -> None:
        if self.receiver is not None:
            self.receiver.client_closed()  # never registered, so never unregistered

    def _successor_channel(self, fd: int) -> None:
        """This worker's process is being upgraded: its clients leave over `fd`."""
        self.emigrate_to(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd))

    def _not_adopted(self, client: ClientConnection, exc: Exception) -> None:
        logger.warning("a connection from the supervisor could not be opened: %s", exc)
        if client.transport is None and self.receiver is not None:
            self.receiver.client_closed()  # never registered, so never unregistered

    async def _retain_loop(self) -> None:
        while True:
            # Read each time: a reload may change it.
            await asyncio.sleep(max(self.config.general.retain_connections_time, 100) / 1000.0)
            self.retain_once()

    def retain_once(self) -> None:
        """One retain cycle: at most retain_connections_max idle servers closed in all."""
        limit = self.config.general.retain_connections_max
        remaining: int | None = limit if limit > 0 else None
        pools = list(self.pools)
        random.shuffle(pools)  # no pool is always first in line
        for pool in pools:
            closed = pool.retain(remaining)
            if remaining is not None:
                remaining = max(remaining - closed, 0)
        if self.auth_queries:
            self.sweep_looked_up_users(time.monotonic())

    def sweep_looked_up_users(self, now: float) -> None:
        in_use: set[Pool] = set()
        logged_in: dict[str, set[str]] = {}
        for client in self.clients.values():
            if client.pool is not None:
                in_use.add(client.pool)
                logged_in.setdefault(client.database, set()).add(client.user)
        for name, users in self.auth_queries.items():
            users.sweep(in_use, logged_in.get(name, set()), now)

    # ---- binary upgrade: clients move between processes ------------------------

    def emigrate_to(self, channel: socket.socket) -> None:
        """An upgrade's new process serves: the clients go there as shutdown() lets
        them go (instead of being disconnected)."""
        self.emigration = Emigration(self.loop, channel, self.handle_cancel)

    def immigrate_from(self, channel: socket.socket) -> None:
        """Take the clients of the process this one replaces, as it sends them."""
        self.immigration = Immigration(self.loop, channel, self._arrived)
        self.immigration.start()
        self.previous_process = channel

    def _arrived(self, fd: int, family: int, session: SessionState) -> None:
        entry = self.pool_entry(session.database, session.user)
        if entry is None and self.looks_up_users(session.database):
            self.track(self.loop.create_task(self._arrived_looked_up(fd, family, session)))
            return
        self._place(fd, family, session, entry)

    async def _arrived_looked_up(self, fd: int, family: int, session: SessionState) -> None:
        try:
            entry = await self.looked_up_entry(session.database, session.user)
        except StartupError as exc:
            refuse_moved(fd, exc.message)
            self._moved_client_closed()
            return
        except BaseException:
            os.close(fd)
            self._moved_client_closed()
            raise
        self._place(fd, family, session, entry)

    def _place(self, fd: int, family: int, session: SessionState, entry: PoolEntry | None) -> None:
        """Serve a client the old process handed over, as the session it had."""
        if entry is None:
            why = f'no pool for database "{session.database}" and user "{session.user}"'
        elif entry.pool.settings.session_mode:
            why = "its pool uses session pooling now"
        elif session.named and not entry.pool.settings.prepared_statements:
            why = "its pool no longer keeps prepared statements"
        elif session.client_id in self.clients:
            why = "its connection id is taken"
        elif self.shutting_down:
            why = "the pooler is shutting down"
        else:
            why = ""
        if entry is None or why:
            refuse_moved(fd, why)
            self._moved_client_closed()
            return
        restore_credentials(entry, session)
        client = ClientConnection(self, unix=family == socket.AF_UNIX)
        client.restore_session(session, entry)
        open_accepted(self.loop, client, fd, family, self._not_restored)

    def _not_restored(self, client: ClientConnection, exc: Exception) -> None:
        logger.warning("a client from the previous process could not be opened: %s", exc)
        if client.transport is None:
            self._moved_client_closed()

    async def shutdown(
        self, timeout: float | None = None, *, immediate: asyncio.Event | None = None
    ) -> None:
        """Stop accepting, let transactions finish, then close everything. During an
        upgrade, clients that can move to the new process go there instead. Once
        `immediate` is set, running transactions are no longer waited for."""
        if timeout is None:
            timeout = self.config.general.shutdown_timeout / 1000.0
        self.shutting_down = True
        for server in self._servers:
            server.close()
        if self.receiver is not None:
            # The channel to an upgrade's new process may be waiting here (a worker is
            # told of it just before it is told to stop).
            self.receiver.drain()
        if self.immigration is not None:
            self.immigration.stop()
        clients = list(self.clients.values())
        for client in clients:
            client.closing_after_transaction = "pooler is shut down now"
        emigration = self.emigration
        for client in clients:
            # A session-mode client cannot move (move_blocker): between transactions
            # it is told at once, as an idle one is; in one, when it ends (net/server.py).
            between = client.server is None or client.pinned_between_transactions(session_too=True)
            if between and (emigration is None or not emigration.take(client)):
                client.fail(sqlstate.ADMIN_SHUTDOWN, "pooler is shutting down")
        if self.clients and (immediate is None or not immediate.is_set()):
            logger.info("waiting up to %.0fs for %d clients to finish", timeout, len(self.clients))
            waits = [asyncio.ensure_future(self._drained.wait())]
            if immediate is not None:
                waits.append(asyncio.ensure_future(immediate.wait()))
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        if emigration is not None:
            emigration.close()
            await emigration.delivered()
        if self.previous_process is not None:
            self.previous_process.close()
        if self.receiver is not None:
            self.receiver.drain()
            self.receiver.stop()
        # Connections accepted or received until now get their connection_made (a loop
        # turn away), so that they are told below rather than closed unanswered.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for client in list(self.clients.values()):
            client.fail(sqlstate.ADMIN_SHUTDOWN, "pooler is shutting down")
        for hub in list(self.listen_hubs.values()):
            hub.close("pooler is shutting down")
        for pool in self.pools:
            # Servers still in a transaction (timeout, immediate stop) get a Terminate
            # now, as idle ones do: PostgreSQL rolls back rather than seeing a reset.
            pool.close_all("pooler is shutting down")
            pool.close("pooler is shutting down")
        for users in self.auth_queries.values():
            users.close("pooler is shutting down", retire=False)
        if self.cluster is not None:
            self.cluster.close()
        if self.web is not None:
            # Open until here: /health says 503 and /metrics still serve while draining.
            self.web.close()
        for task in (self._retain_task, self._stats_task, self._login_sweep_task):
            if task is not None:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
