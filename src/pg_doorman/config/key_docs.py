"""One line on what each configuration key does, for `pg_doorman generate --reference`.

Keyed by section and by the field names of the dataclasses in schema.py, whose defaults
the reference shows. A key unset by default (None) is shown commented out with
`example`. Whether a key is not implemented, ignored, or needs a restart is added from
the loader's and the schema's own sets, so it is said nowhere here. The full story of
each key is docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SECTION_DOCS", "KeyDoc"]

Example = str | int | bool | list[str] | dict[str, str] | None


@dataclass(frozen=True, slots=True)
class KeyDoc:
    text: str
    example: Example = None


def _override(name: str, example: Example) -> KeyDoc:
    return KeyDoc(f"This pool's {name}; unset: [general]'s.", example)


INCLUDE = {
    "files": KeyDoc(
        "Files merged after this one, in order, relative to this file: tables merge key "
        "by key, lists are concatenated, other values of a later file win."
    ),
}

GENERAL = {
    "host": KeyDoc(
        "Listen address: an IPv4 or IPv6 literal, or a name (every address it resolves to)."
    ),
    "port": KeyDoc("Listen port (PgDoorman's samples use 6432)."),
    "backlog": KeyDoc("Listen backlog; 0: max_connections (at most 4096)."),
    "max_connections": KeyDoc("Most client connections at once; more get SQLSTATE 53300."),
    "unix_socket_dir": KeyDoc(
        "Also listen on the Unix socket <dir>/.s.PGSQL.<port>.", "/var/run/pg_doorman"
    ),
    "unix_socket_mode": KeyDoc("Permissions of that socket file, an octal string."),
    "connect_timeout": KeyDoc(
        "Time limit for connecting and logging in to PostgreSQL, and for the liveness "
        "probe (ms; above 0)."
    ),
    "query_wait_timeout": KeyDoc(
        "How long a client waits for a server connection before it gets SQLSTATE 53300 "
        "(ms; above 0)."
    ),
    "idle_timeout": KeyDoc("Close server connections idle this long (ms; 0: never)."),
    "server_lifetime": KeyDoc(
        "Close server connections this old when they are idle (ms; 0: never)."
    ),
    "retain_connections_time": KeyDoc(
        "Period of the loop that closes idle server connections and refills min_pool_size (ms)."
    ),
    "retain_connections_max": KeyDoc(
        "Most idle server connections that loop closes per round; 0: no limit."
    ),
    "server_idle_check_timeout": KeyDoc(
        "Probe a server connection idle longer than this before handing it out (ms; 0: never)."
    ),
    "shutdown_timeout": KeyDoc("How long a graceful shutdown waits for clients (ms)."),
    "proxy_copy_data_timeout": KeyDoc(
        "Drop a client that takes nothing of a server message of at least "
        "message_size_to_be_stream bytes for this long (ms; 0: no limit)."
    ),
    "client_login_timeout": KeyDoc(
        "How long a new client may take to log in (ms; 0: no limit). pg_doorman only."
    ),
    "tcp_keepalives_idle": KeyDoc(
        "TCP keepalive idle time of client and server connections, seconds."
    ),
    "tcp_keepalives_interval": KeyDoc("TCP keepalive probe interval, seconds."),
    "tcp_keepalives_count": KeyDoc("TCP keepalive probes before a connection is dropped."),
    "tcp_so_linger": KeyDoc("SO_LINGER of client sockets, seconds; 0: none set."),
    "tcp_no_delay": KeyDoc("TCP_NODELAY on every connection."),
    "tcp_user_timeout": KeyDoc("TCP_USER_TIMEOUT of client sockets (Linux), seconds; 0: off."),
    "tcp_socket_buffer_size": KeyDoc(
        "SO_RCVBUF/SO_SNDBUF of TCP connections, bytes; 0: the kernel's autotuning."
    ),
    "log_level": KeyDoc(
        "Log level when neither -l nor LOG_LEVEL is given: trace, debug, info, warn, "
        "error or off. pg_doorman only.",
        "info",
    ),
    "log_client_connections": KeyDoc("Log each client login."),
    "log_client_disconnections": KeyDoc("Log each client logout."),
    "log_min_duration_statement": KeyDoc(
        "Log each request that took at least this long, with its statement (ms; 0: every "
        "request; -1: none). pg_doorman only."
    ),
    "syslog_prog_name": KeyDoc(
        "Log to the local syslog socket with this program name instead of stderr.", "pg_doorman"
    ),
    "daemon_pid_file": KeyDoc("Where a daemon (-d) writes its PID."),
    "worker_threads": KeyDoc("PgDoorman's thread count (workers sets processes here)."),
    "workers": KeyDoc("Worker processes; 0: one per CPU core. pg_doorman only."),
    "message_size_to_be_stream": KeyDoc(
        "Server messages of at least this many bytes are those proxy_copy_data_timeout "
        "watches (every message is streamed)."
    ),
    "max_memory_usage": KeyDoc(
        "Cap on buffered client message bytes; past it clients get SQLSTATE 53200."
    ),
    "max_concurrent_creates": KeyDoc(
        "Server connections a pool may be opening at once (the lower of this and "
        "scaling_max_parallel_creates)."
    ),
    "server_round_robin": KeyDoc(
        "false: hand out the most recently used idle server connection; true: the oldest."
    ),
    "sync_server_parameters": KeyDoc(
        "On each checkout, set the client's parameters (application_name, ...) on the server."
    ),
    "pooler_check_query": KeyDoc("A query the pooler answers itself, for health checks."),
    "admin_username": KeyDoc("User of the admin console (database pgdoorman or pgbouncer)."),
    "admin_password": KeyDoc("Its password, in plain text: change it anywhere but a demo."),
    "prepared_statements": KeyDoc(
        "Share protocol-level prepared statements across clients in transaction mode."
    ),
    "prepared_statements_cache_size": KeyDoc(
        "Prepared statements remembered per pool; above 0 while prepared_statements is on."
    ),
    "server_prepared_statements_cache_size": KeyDoc(
        "Statements kept prepared per server connection; unset: 256; 0: no limit.", 256
    ),
    "client_anonymous_prepared_cache_size": KeyDoc(
        "No effect: a client has one unnamed statement at a time, as in PostgreSQL."
    ),
    "pg_hba": KeyDoc(
        "Client authentication rules in pg_hba.conf syntax: the rule text, or a table "
        "with path (a file, relative to this one) or content. Unset: a user logs in "
        "with the method its password implies.",
        {"path": "pg_hba.conf"},
    ),
    "hba": KeyDoc(
        "Legacy allow-list of client networks in CIDR form; empty: everyone. Not with pg_hba."
    ),
    "startup_parameters": KeyDoc(
        "Parameters (GUCs) sent in every server login, name to value (work_mem, ...)."
    ),
    "unix_socket_buffer_size": KeyDoc(
        "SO_RCVBUF/SO_SNDBUF of Unix-socket connections, bytes; 0: the kernel's default."
    ),
    "tls_certificate": KeyDoc(
        "The pooler's certificate (PEM) for TLS with clients; set with tls_private_key.",
        "server.crt",
    ),
    "tls_private_key": KeyDoc("Its private key (PEM).", "server.key"),
    "tls_ca_cert": KeyDoc(
        "CA bundle client certificates must chain to (tls_mode verify-full).", "ca.crt"
    ),
    "tls_mode": KeyDoc(
        "TLS with clients. Unset or allow: offered; require: plain TCP logins refused; "
        "verify-full: and a client certificate required; disable: none.",
        "require",
    ),
    "tls_rate_limit_per_second": KeyDoc(
        "Most TLS handshakes started per second: 0 (no limit) or a multiple of 100."
    ),
    "server_tls_mode": KeyDoc(
        "TLS to PostgreSQL, as libpq's sslmode: disable, allow, prefer, require, "
        "verify-ca or verify-full."
    ),
    "server_tls_ca_cert": KeyDoc(
        "CA bundle (PEM) for server_tls_mode verify-ca and verify-full.", "root.crt"
    ),
    "server_tls_certificate": KeyDoc(
        "Certificate (PEM) for a PostgreSQL that asks for one; set with server_tls_private_key.",
        "client.crt",
    ),
    "server_tls_private_key": KeyDoc("Its private key (PEM).", "client.key"),
    "scaling_warm_pool_ratio": KeyDoc(
        "Percent of pool_size below which a queued client gets a new server connection at "
        "once; above it, it first waits a little for one to come back."
    ),
    "scaling_fast_retries": KeyDoc("PgDoorman's threads spin this many times for a server."),
    "scaling_max_parallel_creates": KeyDoc("Server connections a pool may be opening at once."),
    "patroni_api_urls": KeyDoc(
        "Patroni REST API URLs: when the pool's server is unreachable, new server "
        "connections open on another member of the cluster. Unset: off.",
        ["http://127.0.0.1:8008"],
    ),
    "fallback_cooldown": KeyDoc(
        "How long an unreachable server is left aside (ms; unset: 30000).", 30_000
    ),
    "patroni_api_timeout": KeyDoc(
        "Time limit of each request to Patroni (ms; unset: 5000).", 5_000
    ),
    "fallback_connect_timeout": KeyDoc(
        "Time limit of each login to a member, and how long a failed member is skipped "
        "(ms; unset: 5000).",
        5_000,
    ),
    "fallback_lifetime": KeyDoc(
        "Lifetime of a server connection opened on a member (ms; unset: fallback_cooldown; "
        "0: server_lifetime).",
        30_000,
    ),
    "worker_cpu_affinity_pinning": KeyDoc("PgDoorman pins its worker threads to CPU cores."),
    "worker_stack_size": KeyDoc("Stack size of PgDoorman's worker threads, bytes.", 8_388_608),
    "max_blocking_threads": KeyDoc("Size of PgDoorman's blocking thread pool.", 512),
    "tokio_global_queue_interval": KeyDoc("Tokio's global queue interval.", 31),
    "tokio_event_interval": KeyDoc("Tokio's event interval.", 61),
    "query_interner_gc_interval_seconds": KeyDoc(
        "Period of PgDoorman's query text interner cleanup, seconds."
    ),
    "query_interner_anon_idle_ttl_seconds": KeyDoc(
        "How long PgDoorman's interner keeps an unnamed statement's text, seconds."
    ),
}

POOL = {
    "server_host": KeyDoc("PostgreSQL host; starting with /: a Unix socket directory."),
    "server_port": KeyDoc("PostgreSQL port."),
    "server_database": KeyDoc(
        "The database's name on the server; unset: the pool's name.", "exampledb_production"
    ),
    "pool_mode": KeyDoc(
        "transaction: a client holds a server connection for one transaction; session: "
        "for as long as it stays connected."
    ),
    "application_name": KeyDoc(
        "application_name sent to PostgreSQL; unset: pg_doorman.", "pg_doorman"
    ),
    "connect_timeout": _override("connect_timeout", 3_000),
    "idle_timeout": _override("idle_timeout", 600_000),
    "server_lifetime": _override("server_lifetime", 1_200_000),
    "cleanup_server_connections": KeyDoc(
        "Undo the session state (SET, PREPARE, LISTEN, ...) a transaction-mode client "
        "leaves on its server before the next client gets it."
    ),
    "pin_on_listen": KeyDoc(
        "Transaction mode: a client that ran LISTEN keeps its server until it disconnects."
    ),
    "pin_on_advisory_lock": KeyDoc(
        "Transaction mode: a client holding session-level advisory locks keeps its server "
        "until it releases them; false: they are released when its transaction ends."
    ),
    "listen_fanout": KeyDoc(
        "Transaction mode: a plain LISTEN runs on one server connection of the pool that "
        "listens for all its clients."
    ),
    "log_client_parameter_status_changes": KeyDoc(
        "Log each parameter change (ParameterStatus) a server reports to a client."
    ),
    "log_min_duration_statement": _override("log_min_duration_statement (-1: off)", 1_000),
    "prepared_statements_cache_size": _override("prepared_statements_cache_size", 8_192),
    "server_prepared_statements_cache_size": _override(
        "server_prepared_statements_cache_size", 256
    ),
    "startup_parameters": KeyDoc(
        "This pool's parameters for server logins, over [general]'s name by name."
    ),
    "max_db_connections": KeyDoc(
        "Server connections all users of this pool hold together; unset or 0: no limit.", 100
    ),
    "min_connection_lifetime": KeyDoc(
        "With max_db_connections: a server connection younger than this is not closed for "
        "another user's clients (ms; unset: 30000).",
        30_000,
    ),
    "reserve_pool_size": KeyDoc(
        "With max_db_connections: server connections over the limit for clients that "
        "waited reserve_pool_timeout; unset: 0.",
        5,
    ),
    "reserve_pool_timeout": KeyDoc(
        "How long a client waits before the reserve opens for it (ms; unset: 3000).", 3_000
    ),
    "min_guaranteed_pool_size": KeyDoc(
        "With max_db_connections: server connections of each user never closed for another "
        "user's clients; unset: 0.",
        2,
    ),
    "scaling_warm_pool_ratio": _override("scaling_warm_pool_ratio", 20),
    "scaling_fast_retries": KeyDoc("PgDoorman's threads spin this many times for a server.", 10),
    "scaling_cooldown_sleep": KeyDoc(
        "PgDoorman's threads sleep this long between looks at a full burst gate (ms).", 10
    ),
    "server_tls_mode": _override("server_tls_mode", "require"),
    "server_tls_ca_cert": _override("server_tls_ca_cert", "root.crt"),
    "server_tls_certificate": _override("server_tls_certificate", "client.crt"),
    "server_tls_private_key": _override("server_tls_private_key", "client.key"),
    "patroni_api_urls": _override("patroni_api_urls", ["http://127.0.0.1:8008"]),
    "fallback_cooldown": _override("fallback_cooldown", 30_000),
    "patroni_api_timeout": _override("patroni_api_timeout", 5_000),
    "fallback_connect_timeout": _override("fallback_connect_timeout", 5_000),
    "fallback_lifetime": _override("fallback_lifetime", 30_000),
}

USER = {
    "username": KeyDoc("The user name clients log in with; unique within the pool."),
    "password": KeyDoc(
        "What the client's password is checked against, and what picks the method: an "
        "md5 hash (md5 of the password and the user name), a SCRAM-SHA-256 verifier as "
        'PostgreSQL stores it, jwt-pkey-fpath:<public key file>, or "" (trust rules only). '
        "This one is the md5 hash of the password example_password."
    ),
    "pool_size": KeyDoc("Most server connections of this user in this pool."),
    "min_pool_size": KeyDoc("Server connections kept open; at most pool_size."),
    "pool_mode": KeyDoc("This user's pool_mode; unset: the pool's.", "session"),
    "server_username": KeyDoc("Log in to PostgreSQL as this role instead.", "example_owner"),
    "server_password": KeyDoc(
        "Plain-text password of server_username (or jwt-priv-key-fpath:<file>); unset: "
        "log in with what the client's own login proved.",
        "owner-password",
    ),
    "server_lifetime": KeyDoc("This user's server_lifetime (ms); unset: the pool's.", 1_200_000),
    "auth_pam_service": KeyDoc(
        "Check the client's password, sent in clear, with this PAM service.", "pg_doorman"
    ),
}

AUTH_QUERY = {
    "query": KeyDoc(
        "SQL returning the password of user $1 (a column passwd, password or rolpassword).",
        "SELECT usename, passwd FROM pgdoorman.lookup($1)",
    ),
    "user": KeyDoc("Role the lookup connections log in as.", "pgdoorman_auth"),
    "password": KeyDoc('Its plain-text password ("": none, for trust).'),
    "database": KeyDoc(
        "Database the lookups run in; unset: the pool's server database.", "postgres"
    ),
    "workers": KeyDoc("Lookup connections."),
    "server_user": KeyDoc(
        "Every looked-up user shares one pool logged in as this role; unset: each logs in "
        "as itself with the looked-up hash.",
        "example_shared",
    ),
    "server_password": KeyDoc("Plain-text password of server_user.", "shared-password"),
    "pool_size": KeyDoc("Server connections of each looked-up user's pool (or the shared one)."),
    "min_pool_size": KeyDoc("Server connections kept open in each of those pools."),
    "cache_ttl": KeyDoc("How long a user found is remembered (ms)."),
    "cache_failure_ttl": KeyDoc("How long a user not found is remembered (ms)."),
    "min_interval": KeyDoc("A failed password looks the user up again at most this often (ms)."),
}

WEB = {
    "enabled": KeyDoc("Serve Prometheus metrics on /metrics and liveness on /health."),
    "host": KeyDoc("Listen address of /metrics."),
    "port": KeyDoc("Listen port of /metrics."),
    "ui": KeyDoc("PgDoorman's web UI."),
    "ui_anonymous": KeyDoc("Its pages without a login."),
    "log_tap_max_entries": KeyDoc("Log lines its log view keeps."),
    "sso_enabled": KeyDoc("Single sign-on for it."),
    "sso_proxy_url": KeyDoc("URL of the SSO proxy.", "https://sso.example.com"),
    "sso_public_key_file": KeyDoc("Public key that checks SSO tokens.", "sso.pub"),
    "sso_audience": KeyDoc("Accepted token audiences."),
    "sso_allowed_users": KeyDoc("Users let in by SSO."),
    "trusted_proxies": KeyDoc("Networks (CIDR) of proxies whose forwarded addresses count."),
    "sso_groups_claim": KeyDoc("Token claim that lists a user's groups."),
    "sso_admin_groups": KeyDoc("Groups with admin rights."),
    "sso_require_https": KeyDoc("Refuse SSO over plain HTTP."),
}

TALOS = {
    "keys": KeyDoc(
        "RSA public keys (PEM files) that check the tokens of clients logging in as talos; "
        "a token's kid names one by its file name without extension."
    ),
    "databases": KeyDoc("The databases whose roles in a token's resource_access count."),
}

SECTION_DOCS: dict[str, dict[str, KeyDoc]] = {
    "include": INCLUDE,
    "general": GENERAL,
    "web": WEB,
    "talos": TALOS,
    "pool": POOL,
    "user": USER,
    "auth_query": AUTH_QUERY,
}
