"""The validated configuration, as plain frozen dataclasses.

Secrets (passwords) are left out of ``repr`` so a logged config does not leak them.

Field names are PgDoorman's key names. Durations are int milliseconds and byte sizes int
bytes, whatever spelling the file used. Defaults here are the defaults of the whole
program: the loader only overrides what the file sets. See docs/configuration.md for the
meaning of every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ADMIN_DATABASES",
    "POOL_MODES",
    "RESTART_REQUIRED",
    "AuthQueryConfig",
    "Config",
    "GeneralConfig",
    "PoolConfig",
    "PoolOverride",
    "UserConfig",
    "WebConfig",
]

KIB = 1024
MIB = 1024 * KIB

POOL_MODES = ("transaction", "session")

# Database names that reach the admin console instead of a pool.
ADMIN_DATABASES = frozenset({"pgdoorman", "pgbouncer"})

# Settings a SIGHUP reload cannot apply (listening sockets, process setup): the reload
# keeps the running value and should say so.
RESTART_REQUIRED = frozenset(
    {
        "general.host",
        "general.port",
        "general.backlog",
        "general.unix_socket_dir",
        "general.unix_socket_mode",
        "general.worker_threads",
        "general.workers",
        "general.daemon_pid_file",
        "general.syslog_prog_name",
        "web.enabled",
        "web.host",
        "web.port",
    }
)

# Pool keys that fall back to the [general] key of the same name when unset.
PoolOverride = Literal[
    "connect_timeout",
    "idle_timeout",
    "server_lifetime",
    "prepared_statements_cache_size",
    "log_min_duration_statement",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneralConfig:
    # Listener.
    host: str = "0.0.0.0"
    port: int = 5432
    backlog: int = 0
    max_connections: int = 8192
    unix_socket_dir: str | None = None
    unix_socket_mode: str = "0600"

    # Timeouts, milliseconds.
    connect_timeout: int = 3_000
    query_wait_timeout: int = 5_000
    idle_timeout: int = 600_000
    server_lifetime: int = 1_200_000
    retain_connections_time: int = 30_000
    retain_connections_max: int = 3
    server_idle_check_timeout: int = 60_000
    shutdown_timeout: int = 10_000
    proxy_copy_data_timeout: int = 15_000
    # Startup and authentication of a client (pg_doorman only; PgBouncer's key); 0 = none.
    client_login_timeout: int = 60_000

    # Sockets; keepalive, linger and user timeout are in seconds as in PgDoorman.
    tcp_keepalives_idle: int = 5
    tcp_keepalives_interval: int = 5
    tcp_keepalives_count: int = 5
    tcp_so_linger: int = 0
    tcp_no_delay: bool = True
    tcp_user_timeout: int = 60
    tcp_socket_buffer_size: int = 0

    # Logging and process.
    log_level: str | None = None
    log_client_connections: bool = True
    log_client_disconnections: bool = True
    # Requests that take at least this long (ms) are logged with their statement; -1: off.
    log_min_duration_statement: int = -1
    syslog_prog_name: str | None = None
    daemon_pid_file: str = "/tmp/pg_doorman.pid"
    worker_threads: int = 4
    # Worker processes (pg_doorman only); 0 = one per CPU core.
    workers: int = 1

    # Memory.
    message_size_to_be_stream: int = 1 * MIB
    max_memory_usage: int = 256 * MIB

    # Pool behaviour.
    max_concurrent_creates: int = 4
    server_round_robin: bool = False
    sync_server_parameters: bool = False
    pooler_check_query: str = ";"

    # Admin console.
    admin_username: str = "admin"
    admin_password: str = field(default="admin", repr=False)

    # Prepared statements.
    prepared_statements: bool = True
    prepared_statements_cache_size: int = 8192
    server_prepared_statements_cache_size: int | None = None
    client_anonymous_prepared_cache_size: int = 256

    # Client authentication: pg_hba rule text, or the legacy CIDR allow-list.
    pg_hba: str | None = None
    hba: list[str] = field(default_factory=list)

    # Extra GUCs sent in every backend StartupMessage.
    startup_parameters: dict[str, str] = field(default_factory=dict)

    # SO_SNDBUF/SO_RCVBUF of Unix-socket connections, clients' and servers'.
    unix_socket_buffer_size: int = 1 * MIB

    # TLS with clients and with servers.
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    tls_ca_cert: str | None = None
    tls_mode: str | None = None
    tls_rate_limit_per_second: int = 0
    server_tls_mode: str = "allow"
    server_tls_ca_cert: str | None = None
    server_tls_certificate: str | None = None
    server_tls_private_key: str | None = None

    # Pool pressure (scaling_fast_retries is PgDoorman thread tuning, warned about when set).
    scaling_warm_pool_ratio: int = 20
    scaling_fast_retries: int = 10
    scaling_max_parallel_creates: int = 2

    # Patroni-assisted fallback defaults for every pool (ms; None: 30 s, 5 s, 5 s, cooldown).
    patroni_api_urls: list[str] | None = None
    fallback_cooldown: int | None = None
    patroni_api_timeout: int | None = None
    fallback_connect_timeout: int | None = None
    fallback_lifetime: int | None = None

    # PgDoorman runtime internals with no meaning here: warned about unless left at the default.
    worker_cpu_affinity_pinning: bool = False
    worker_stack_size: int | None = None
    max_blocking_threads: int | None = None
    tokio_global_queue_interval: int | None = None
    tokio_event_interval: int | None = None
    query_interner_gc_interval_seconds: int = 60
    query_interner_anon_idle_ttl_seconds: int = 60

    @property
    def unix_socket_mode_bits(self) -> int:
        """``unix_socket_mode`` as a number for ``os.chmod`` (validated by the loader)."""
        text = self.unix_socket_mode.strip().lower().removeprefix("0o")
        return int(text, 8)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserConfig:
    username: str
    # md5 hash, SCRAM-SHA-256 verifier, "jwt-pkey-fpath:..." or "" (trust only).
    password: str = field(repr=False)
    pool_size: int = 40
    min_pool_size: int = 0
    pool_mode: str | None = None  # None: the pool's mode
    server_username: str | None = None
    server_password: str | None = field(default=None, repr=False)
    server_lifetime: int | None = None  # None: the pool's, then general's
    auth_pam_service: str | None = None  # PAM checks the password (auth/pam.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthQueryConfig:
    """``[pools.<name>.auth_query]``: users looked up in PostgreSQL (auth/auth_query.py)."""

    query: str
    user: str
    password: str = field(default="", repr=False)
    database: str | None = None
    workers: int = 2
    server_user: str | None = None
    server_password: str | None = field(default=None, repr=False)
    pool_size: int = 40
    min_pool_size: int = 0
    cache_ttl: int = 3_600_000
    cache_failure_ttl: int = 30_000
    min_interval: int = 1_000


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    name: str  # the database name clients use
    server_host: str = "127.0.0.1"
    server_port: int = 5432
    server_database: str | None = None  # None: same as name
    pool_mode: str = "transaction"
    application_name: str | None = None
    connect_timeout: int | None = None
    idle_timeout: int | None = None
    server_lifetime: int | None = None
    cleanup_server_connections: bool = True
    pin_on_listen: bool = False
    pin_on_advisory_lock: bool = True
    listen_fanout: bool = False
    log_client_parameter_status_changes: bool = False
    log_min_duration_statement: int | None = None  # None: the [general] value
    prepared_statements_cache_size: int | None = None
    server_prepared_statements_cache_size: int | None = None
    startup_parameters: dict[str, str] = field(default_factory=dict)
    users: list[UserConfig] = field(default_factory=list)

    # max_db_connections and what goes with it (ms for the durations; see pool.DatabaseBudget).
    max_db_connections: int | None = None
    min_connection_lifetime: int | None = None
    reserve_pool_size: int | None = None
    reserve_pool_timeout: int | None = None
    min_guaranteed_pool_size: int | None = None
    # Pool pressure; None: the [general] value. The last two are PgDoorman thread tuning
    # with no meaning here (the loader warns when they are set).
    scaling_warm_pool_ratio: int | None = None
    scaling_fast_retries: int | None = None
    scaling_cooldown_sleep: int | None = None
    # Backend TLS; None: the [general] value.
    server_tls_mode: str | None = None
    server_tls_ca_cert: str | None = None
    server_tls_certificate: str | None = None
    server_tls_private_key: str | None = None
    # Patroni-assisted fallback; None: the [general] value.
    patroni_api_urls: list[str] | None = None
    fallback_cooldown: int | None = None
    patroni_api_timeout: int | None = None
    fallback_connect_timeout: int | None = None
    fallback_lifetime: int | None = None
    auth_query: AuthQueryConfig | None = None

    @property
    def server_database_name(self) -> str:
        """The database name sent to PostgreSQL."""
        return self.server_database if self.server_database is not None else self.name

    def effective_pool_mode(self, user: UserConfig) -> str:
        return user.pool_mode if user.pool_mode is not None else self.pool_mode

    def find_user(self, username: str) -> UserConfig | None:
        for user in self.users:
            if user.username == username:
                return user
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class WebConfig:
    """``[web]`` (legacy name ``[prometheus]``): the HTTP listener for /metrics."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = 9127
    # Web UI and SSO: accepted, not implemented; warned about unless left at the default.
    ui: bool = False
    ui_anonymous: bool = False
    log_tap_max_entries: int = 8192
    sso_enabled: bool = False
    sso_proxy_url: str | None = None
    sso_public_key_file: str | None = None
    sso_audience: list[str] = field(default_factory=list)
    sso_allowed_users: list[str] = field(default_factory=lambda: ["*"])
    trusted_proxies: list[str] = field(default_factory=list)
    sso_groups_claim: str = "groups"
    sso_admin_groups: list[str] = field(default_factory=list)
    sso_require_https: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TalosConfig:
    """`[talos]`: logins as user `talos` with a token naming a client and its roles."""

    # RSA public keys (PEM files); a token's `kid` names one by its file name stem.
    keys: list[str] = field(default_factory=list)
    # The databases whose roles in a token's resource_access count.
    databases: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    web: WebConfig = field(default_factory=WebConfig)
    talos: TalosConfig = field(default_factory=TalosConfig)
    # Everything the loader accepted but wants an operator to see; log them at start/reload.
    warnings: list[str] = field(default_factory=list)
    source: str = "<memory>"

    def pool_setting(self, pool: PoolConfig, name: PoolOverride) -> int:
        """The pool's value of ``name`` if set, else the ``[general]`` one."""
        value: int | None = getattr(pool, name)
        if value is None:
            general_value: int = getattr(self.general, name)
            return general_value
        return value

    def server_prepared_cache_size_for(self, pool: PoolConfig) -> int:
        """Per-backend prepared statement LRU size: pool, general, else the pool cache size.

        0 when prepared statements are off.
        """
        if not self.general.prepared_statements:
            return 0
        for value in (
            pool.server_prepared_statements_cache_size,
            self.general.server_prepared_statements_cache_size,
        ):
            if value is not None:
                return value
        return self.pool_setting(pool, "prepared_statements_cache_size")

    def server_lifetime_for(self, pool: PoolConfig, user: UserConfig) -> int:
        """Backend lifetime in ms for one user: user value, else pool, else general."""
        if user.server_lifetime is not None:
            return user.server_lifetime
        if pool.server_lifetime is not None:
            return pool.server_lifetime
        return self.general.server_lifetime

    def startup_parameters_for(self, pool: PoolConfig) -> dict[str, str]:
        """General startup_parameters overlaid with the pool's, key by key."""
        return {**self.general.startup_parameters, **pool.startup_parameters}

    def restart_required_changes(self, new: Config) -> list[str]:
        """Keys in :data:`RESTART_REQUIRED` whose value differs in ``new``."""
        changed = []
        for key in sorted(RESTART_REQUIRED):
            section, name = key.split(".", 1)
            if getattr(getattr(self, section), name) != getattr(getattr(new, section), name):
                changed.append(key)
        return changed
