"""Configuration loading: formats, includes, validation errors and warnings, helpers."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest

from pg_doorman.config import (
    RESTART_REQUIRED,
    AuthQueryConfig,
    Config,
    ConfigError,
    GeneralConfig,
    PoolConfig,
    UserConfig,
    WebConfig,
    load_config,
    loader,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
MD5_ALICE = "md5" + "0" * 32


def base() -> dict[str, Any]:
    return {
        "general": {"host": "127.0.0.1", "port": 6432},
        "pools": {
            "mydb": {
                "server_port": 5432,
                "users": [{"username": "alice", "password": MD5_ALICE, "pool_size": 10}],
            }
        },
    }


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    """base() with ``overrides`` merged in (tables merge, everything else replaces)."""

    def merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    data = base()
    merge(data, overrides)
    return data


def pool_with(**settings: Any) -> dict[str, Any]:
    return merged({"pools": {"mydb": settings}})


def users(*entries: Any) -> dict[str, Any]:
    return pool_with(users=list(entries))


def user(**fields: Any) -> dict[str, Any]:
    return {"username": "alice", "password": "", **fields}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def expect_error(data: dict[str, Any], key_path: str, fragment: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    error = info.value
    assert error.key_path == key_path
    assert str(error).startswith(f"{key_path}: "), str(error)
    assert fragment in str(error), str(error)
    return error


# ---------------------------------------------------------------------------------------
# Defaults and the basic shape


def test_defaults_match_pgdoorman() -> None:
    config = parse_config({})
    g = config.general
    expected = {
        "host": "0.0.0.0",
        "port": 5432,
        "backlog": 0,
        "max_connections": 8192,
        "connect_timeout": 3000,
        "query_wait_timeout": 5000,
        "idle_timeout": 600_000,
        "server_lifetime": 1_200_000,
        "retain_connections_time": 30_000,
        "retain_connections_max": 3,
        "server_idle_check_timeout": 60_000,
        "shutdown_timeout": 10_000,
        "proxy_copy_data_timeout": 15_000,
        "tcp_keepalives_idle": 5,
        "tcp_keepalives_interval": 5,
        "tcp_keepalives_count": 5,
        "tcp_so_linger": 0,
        "tcp_no_delay": True,
        "tcp_user_timeout": 60,
        "tcp_socket_buffer_size": 0,
        "unix_socket_dir": None,
        "unix_socket_mode": "0600",
        "log_client_connections": True,
        "log_client_disconnections": True,
        "message_size_to_be_stream": 1 << 20,
        "max_memory_usage": 256 << 20,
        "max_concurrent_creates": 4,
        "server_round_robin": False,
        "sync_server_parameters": False,
        "pooler_check_query": ";",
        "admin_username": "admin",
        "admin_password": "admin",
        "prepared_statements": True,
        "prepared_statements_cache_size": 8192,
        "server_prepared_statements_cache_size": None,
        "client_anonymous_prepared_cache_size": 256,
        "pg_hba": None,
        "hba": [],
        "startup_parameters": {},
        "worker_threads": 4,
        "daemon_pid_file": "/tmp/pg_doorman.pid",
        "syslog_prog_name": None,
        "log_level": None,
        "server_tls_mode": "allow",
    }
    assert {key: getattr(g, key) for key in expected} == expected
    assert config.web == WebConfig()
    assert (config.web.enabled, config.web.host, config.web.port) == (False, "0.0.0.0", 9127)
    assert config.pools == {}
    assert config.warnings == ["pools: no pools configured; only the admin console is available"]
    assert config.source == "<memory>"


def test_client_login_timeout_is_a_duration_with_pgbouncers_default() -> None:
    """Not a PgDoorman key: PgBouncer's client_login_timeout, 60 s by default."""
    assert parse_config({}).general.client_login_timeout == 60_000
    general = parse_config({"general": {"client_login_timeout": "250ms"}}).general
    assert general.client_login_timeout == 250
    assert parse_config({"general": {"client_login_timeout": 0}}).general.client_login_timeout == 0
    expect_error({"general": {"client_login_timeout": "soon"}}, "general.client_login_timeout", "")


def test_log_min_duration_statement_is_a_duration_or_off() -> None:
    """Not a PgDoorman key: PostgreSQL's name and meaning (-1 off, 0 every request), in
    [general] and per pool."""
    from pg_doorman.app.pooler import pool_settings

    assert parse_config({}).general.log_min_duration_statement == -1
    for value, expected in [(250, 250), ("2s", 2000), (0, 0), (-1, -1), ("off", -1), ("-1", -1)]:
        general = parse_config({"general": {"log_min_duration_statement": value}}).general
        assert general.log_min_duration_statement == expected, value
    expect_error(
        {"general": {"log_min_duration_statement": -5}},
        "general.log_min_duration_statement",
        "or -1 (off)",
    )
    expect_error(
        pool_with(log_min_duration_statement="soon", users=[user()]),
        "pools.mydb.log_min_duration_statement",
        "a duration",
    )
    data = pool_with(users=[user()])
    data["general"]["log_min_duration_statement"] = "1s"
    config = parse_config(data)
    pool = config.pools["mydb"]
    assert pool_settings(config, "mydb", pool, pool.users[0]).slow_query_seconds == 1.0
    data["pools"]["mydb"]["log_min_duration_statement"] = "off"
    config = parse_config(data)
    pool = config.pools["mydb"]
    assert pool_settings(config, "mydb", pool, pool.users[0]).slow_query_seconds == -1.0
    data["pools"]["mydb"]["log_min_duration_statement"] = 0
    config = parse_config(data)
    pool = config.pools["mydb"]
    assert pool_settings(config, "mydb", pool, pool.users[0]).slow_query_seconds == 0.0


def test_minimal_pool_and_user_defaults() -> None:
    config = parse_config({"pools": {"db": {"users": [user(username="u")]}}})
    pool = config.pools["db"]
    assert pool.name == "db"
    assert (pool.server_host, pool.server_port, pool.pool_mode) == (
        "127.0.0.1",
        5432,
        "transaction",
    )
    assert pool.server_database is None and pool.server_database_name == "db"
    assert pool.cleanup_server_connections is True
    assert pool.log_client_parameter_status_changes is False
    u = pool.users[0]
    assert (u.username, u.password, u.pool_size, u.min_pool_size, u.pool_mode) == (
        "u",
        "",
        40,
        0,
        None,
    )
    assert config.warnings == []


def test_full_valid_config_values() -> None:
    config = parse_config(
        merged(
            {
                "general": {
                    "connect_timeout": "2s",
                    "idle_timeout": 1000,
                    "max_memory_usage": "64MB",
                    "message_size_to_be_stream": "512K",
                    "tcp_socket_buffer_size": 65536,
                    "unix_socket_dir": "/run/pg",
                    "unix_socket_mode": "0o660",
                    "log_level": "DEBUG",
                    "hba": ["10.0.0.0/8", "::1/128", "192.168.1.7/24"],
                    "startup_parameters": {"work_mem": "64MB", "auto_explain.log_min_duration": 5},
                },
                "pools": {
                    "mydb": {
                        "server_database": "real_db",
                        "application_name": "app",
                        "pool_mode": "Session",
                        "connect_timeout": "1s",
                        "idle_timeout": 50,
                        "server_lifetime": "1h",
                        "startup_parameters": {"work_mem": "8MB"},
                    }
                },
                "web": {"enabled": True, "port": 9999},
            }
        )
    )
    g = config.general
    assert (g.connect_timeout, g.idle_timeout) == (2000, 1000)
    assert (g.max_memory_usage, g.message_size_to_be_stream) == (64 << 20, 512 << 10)
    assert g.unix_socket_mode_bits == 0o660
    assert g.log_level == "debug"
    assert g.hba == ["10.0.0.0/8", "::1/128", "192.168.1.7/24"]
    assert g.startup_parameters == {"work_mem": "64MB", "auto_explain.log_min_duration": "5"}
    pool = config.pools["mydb"]
    assert pool.server_database_name == "real_db"
    assert pool.pool_mode == "session"
    assert (pool.connect_timeout, pool.idle_timeout, pool.server_lifetime) == (1000, 50, 3_600_000)
    assert config.web.enabled and config.web.port == 9999
    assert config.warnings == []


def test_config_is_frozen_and_hides_secrets() -> None:
    config = parse_config(merged({"general": {"admin_password": "s3cret"}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.general.port = 1  # type: ignore[misc]
    assert "s3cret" not in repr(config)
    assert MD5_ALICE not in repr(config)


@pytest.mark.parametrize(
    ("cls", "spec", "extra"),
    [
        (GeneralConfig, loader._GENERAL_SPEC, set()),
        (PoolConfig, loader._POOL_SPEC, {"name"}),
        (UserConfig, loader._USER_SPEC, set()),
        (WebConfig, loader._WEB_SPEC, set()),
        (AuthQueryConfig, loader._AUTH_QUERY_SPEC, set()),
    ],
)
def test_every_field_has_a_parser(cls: type, spec: dict[str, Any], extra: set[str]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert names == set(spec) | extra


# ---------------------------------------------------------------------------------------
# Users: both TOML forms and YAML


def test_toml_array_of_tables_users(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        """
[pools.db]
[[pools.db.users]]
username = "a"
password = ""
[[pools.db.users]]
username = "b"
password = ""
pool_size = 3
""",
    )
    pool = load_config(file).pools["db"]
    assert [(u.username, u.pool_size) for u in pool.users] == [("a", 40), ("b", 3)]


def test_toml_legacy_numbered_users_are_ordered_by_number(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        """
[pools.db.users.10]
username = "ten"
password = ""
[pools.db.users.2]
username = "two"
password = ""
[pools.db.users.0]
username = "zero"
password = ""
pasword = "typo"
""",
    )
    config = load_config(file)
    assert [u.username for u in config.pools["db"].users] == ["zero", "two", "ten"]
    assert config.warnings == ["pools.db.users.0.pasword: unknown key, ignored"]


def test_yaml_users_list(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.yaml",
        """
pools:
  db:
    users:
      - username: a
        password: ""
        pool_mode: session
      - {username: b, password: "", min_pool_size: 2, pool_size: 4}
""",
    )
    pool = load_config(file).pools["db"]
    assert [(u.username, u.pool_mode, u.min_pool_size) for u in pool.users] == [
        ("a", "session", 0),
        ("b", None, 2),
    ]
    assert pool.effective_pool_mode(pool.users[0]) == "session"
    assert pool.effective_pool_mode(pool.users[1]) == "transaction"


def test_legacy_users_key_must_be_numeric() -> None:
    expect_error(
        pool_with(users={"0": user(), "first": user(username="b")}),
        "pools.mydb.users.first",
        "user keys must be numbers",
    )


# ---------------------------------------------------------------------------------------
# Validation errors, each naming its key path

ERROR_CASES: list[tuple[dict[str, Any], str, str]] = [
    # [general] scalars
    (merged({"general": {"port": 0}}), "general.port", "expected a port number 1..65535, got 0"),
    (merged({"general": {"port": 70000}}), "general.port", "got 70000"),
    (merged({"general": {"port": "6432"}}), "general.port", "got '6432'"),
    (merged({"general": {"port": True}}), "general.port", "got true"),
    (merged({"general": {"host": ""}}), "general.host", "non-empty string"),
    (merged({"general": {"host": 1}}), "general.host", "expected a string, got 1"),
    (merged({"general": {"tcp_no_delay": "yes"}}), "general.tcp_no_delay", "true or false"),
    (merged({"general": {"log_client_connections": 1}}), "general.log_client_connections", "got 1"),
    (merged({"general": {"connect_timeout": "5x"}}), "general.connect_timeout", "a duration"),
    (merged({"general": {"idle_timeout": -1}}), "general.idle_timeout", "negative"),
    (merged({"general": {"server_lifetime": 1.5}}), "general.server_lifetime", "got 1.5"),
    (merged({"general": {"max_memory_usage": "1TB"}}), "general.max_memory_usage", "byte size"),
    (merged({"general": {"max_connections": 0}}), "general.max_connections", "positive integer"),
    (merged({"general": {"backlog": -1}}), "general.backlog", "non-negative integer"),
    (merged({"general": {"worker_threads": 0}}), "general.worker_threads", "positive"),
    (merged({"general": {"pooler_check_query": ""}}), "general.pooler_check_query", "non-empty"),
    (
        merged({"general": {"prepared_statements_cache_size": 0}}),
        "general.prepared_statements_cache_size",
        "greater than 0 while prepared_statements is true",
    ),
    (merged({"general": {"unix_socket_mode": "0800"}}), "general.unix_socket_mode", "octal"),
    (merged({"general": {"unix_socket_mode": ""}}), "general.unix_socket_mode", "octal"),
    (merged({"general": {"unix_socket_mode": "01777"}}), "general.unix_socket_mode", "0o777"),
    (merged({"general": {"unix_socket_mode": 384}}), "general.unix_socket_mode", "quoted"),
    (
        merged({"general": {"unix_socket_dir": "/tmp/" + "d" * 90, "port": 6432}}),
        "general.unix_socket_dir",
        "longer than the 107 bytes",
    ),
    (merged({"general": {"log_level": "verbose"}}), "general.log_level", "expected 'trace'"),
    (merged({"general": {"hba": "10.0.0.0/8"}}), "general.hba", "list of strings"),
    (merged({"general": {"hba": ["10.0.0.1"]}}), "general.hba[0]", "CIDR form"),
    (merged({"general": {"hba": ["10.0.0.0/8", "all"]}}), "general.hba[1]", "got 'all'"),
    (merged({"general": {"hba": ["10.0.0.0/33"]}}), "general.hba[0]", "CIDR"),
    (merged({"general": {"hba": [7]}}), "general.hba[0]", "expected a string"),
    (
        merged({"general": {"hba": ["10.0.0.0/8"], "pg_hba": "host all all 0.0.0.0/0 md5"}}),
        "general.hba",
        "cannot be combined with general.pg_hba",
    ),
    (merged({"general": {"pg_hba": 5}}), "general.pg_hba", "expected rule text"),
    (merged({"general": {"pg_hba": {}}}), "general.pg_hba", "exactly one of 'path' or 'content'"),
    (
        merged({"general": {"pg_hba": {"path": "x", "content": "y"}}}),
        "general.pg_hba",
        "exactly one",
    ),
    (merged({"general": {"pg_hba": {"content": 1}}}), "general.pg_hba.content", "a string"),
    (merged({"general": {"pg_hba": {"path": ""}}}), "general.pg_hba.path", "non-empty"),
    (
        merged({"general": {"pg_hba": {"path": "no-such-dir/hba.conf"}}}),
        "general.pg_hba.path",
        "cannot read",
    ),
    (
        merged(
            {
                "general": {
                    "client_prepared_statements_cache_size": 1,
                    "client_anonymous_prepared_cache_size": 2,
                }
            }
        ),
        "general.client_prepared_statements_cache_size",
        "set only one",
    ),
    (
        merged({"general": {"client_prepared_statements_cache_size": -1}}),
        "general.client_prepared_statements_cache_size",
        "non-negative",
    ),
    # startup_parameters
    (merged({"general": {"startup_parameters": "x"}}), "general.startup_parameters", "a table"),
    (
        merged({"general": {"startup_parameters": {"user": "x"}}}),
        "general.startup_parameters.user",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"Database": "x"}}}),
        "general.startup_parameters.Database",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"replication": "on"}}}),
        "general.startup_parameters.replication",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"options": "-c x=1"}}}),
        "general.startup_parameters.options",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"ROLE": "x"}}}),
        "general.startup_parameters.ROLE",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"session_authorization": "x"}}}),
        "general.startup_parameters.session_authorization",
        "reserved",
    ),
    (
        merged({"general": {"startup_parameters": {"_pq_.ext": "1"}}}),
        'general.startup_parameters."_pq_.ext"',
        "'_pq_.' prefix",
    ),
    (
        merged({"general": {"startup_parameters": {"bad name": "1"}}}),
        'general.startup_parameters."bad name"',
        "not a valid parameter name",
    ),
    (
        merged({"general": {"startup_parameters": {"1abc": "1"}}}),
        "general.startup_parameters.1abc",
        "not a valid parameter name",
    ),
    (
        merged({"general": {"startup_parameters": {"work-mem": "1"}}}),
        "general.startup_parameters.work-mem",
        "not a valid parameter name",
    ),
    (
        merged({"general": {"startup_parameters": {"work_mem": "64\0MB"}}}),
        "general.startup_parameters.work_mem",
        "NUL byte",
    ),
    (
        merged({"general": {"startup_parameters": {"work_mem": ["64MB"]}}}),
        "general.startup_parameters.work_mem",
        "expected a string, got a list",
    ),
    (
        merged({"general": {"startup_parameters": {f"k{i}": "v" * 1000 for i in range(10)}}}),
        "general.startup_parameters",
        "more than 9488",
    ),
    # TLS
    (
        merged({"general": {"tls_certificate": "c.pem"}}),
        "general.tls_certificate",
        "set without general.tls_private_key",
    ),
    (
        merged({"general": {"tls_private_key": "k.pem"}}),
        "general.tls_private_key",
        "set without general.tls_certificate",
    ),
    (merged({"general": {"tls_mode": "require"}}), "general.tls_mode", "needs tls_certificate"),
    (
        merged(
            {
                "general": {
                    "tls_mode": "verify-full",
                    "tls_certificate": "c",
                    "tls_private_key": "k",
                }
            }
        ),
        "general.tls_mode",
        "needs tls_ca_cert",
    ),
    (
        merged(
            {"general": {"tls_mode": "disable", "tls_certificate": "c", "tls_private_key": "k"}}
        ),
        "general.tls_mode",
        "'disable' cannot be combined",
    ),
    (merged({"general": {"tls_mode": "on"}}), "general.tls_mode", "expected 'allow'"),
    (
        merged({"general": {"tls_rate_limit_per_second": 50}}),
        "general.tls_rate_limit_per_second",
        "multiple of 100",
    ),
    (
        merged({"general": {"tls_rate_limit_per_second": 150}}),
        "general.tls_rate_limit_per_second",
        "multiple of 100",
    ),
    (
        merged({"general": {"server_tls_mode": "verify-ca"}}),
        "general.server_tls_mode",
        "needs server_tls_ca_cert",
    ),
    (merged({"general": {"server_tls_mode": "sometimes"}}), "general.server_tls_mode", "'prefer'"),
    (
        merged({"general": {"server_tls_certificate": "c"}}),
        "general.server_tls_certificate",
        "set without general.server_tls_private_key",
    ),
    (
        merged({"general": {"server_tls_private_key": "k"}}),
        "general.server_tls_private_key",
        "set without general.server_tls_certificate",
    ),
    # accepted-but-not-implemented keys are still validated
    (
        merged({"general": {"scaling_warm_pool_ratio": 101}}),
        "general.scaling_warm_pool_ratio",
        "0..100",
    ),
    (
        merged({"general": {"scaling_max_parallel_creates": 0}}),
        "general.scaling_max_parallel_creates",
        "positive",
    ),
    (
        merged({"general": {"query_interner_gc_interval_seconds": 0}}),
        "general.query_interner_gc_interval_seconds",
        "positive",
    ),
    (
        merged({"general": {"patroni_api_urls": ["patroni:8008"]}}),
        "general.patroni_api_urls[0]",
        "http:// or https://",
    ),
    # sections
    ({"general": []}, "general", "expected a table, got a list"),
    ({"pools": "mydb"}, "pools", "expected a table, got 'mydb'"),
    ({"pools": {"mydb": 5}}, "pools.mydb", "expected a table, got 5"),
    ({"pools": {"": {}}}, 'pools.""', "must not be empty"),
    ({"web": 5}, "web", "expected a table"),
    ({"web": {}, "prometheus": {}}, "prometheus", "set only one"),
    ({"web": {"port": 0}}, "web.port", "port number"),
    ({"prometheus": {"port": 0}}, "prometheus.port", "port number"),
    ({"web": {"enabled": "true"}}, "web.enabled", "true or false, got 'true'"),
    ({"web": {"trusted_proxies": ["10.1.1.1"]}}, "web.trusted_proxies[0]", "CIDR"),
    ({"web": {"sso_audience": "x"}}, "web.sso_audience", "list of strings"),
    ({"talos": {"keys": "k.pem"}}, "talos.keys", "list of strings"),
    ({"include": []}, "include", "expected a table"),
    ({"include": {"files": "a.toml"}}, "include.files", "list of strings"),
    ({"include": {"files": [1]}}, "include.files[0]", "expected a string"),
    # [pools.<name>]
    (pool_with(server_port=0), "pools.mydb.server_port", "port number"),
    (pool_with(server_host=""), "pools.mydb.server_host", "non-empty"),
    (pool_with(server_database=""), "pools.mydb.server_database", "non-empty"),
    (
        pool_with(pool_mode="statement"),
        "pools.mydb.pool_mode",
        "expected 'transaction' or 'session', got 'statement'",
    ),
    (pool_with(connect_timeout="soon"), "pools.mydb.connect_timeout", "a duration"),
    (pool_with(idle_timeout=-5), "pools.mydb.idle_timeout", "negative"),
    (
        pool_with(cleanup_server_connections="true"),
        "pools.mydb.cleanup_server_connections",
        "true or false",
    ),
    (pool_with(application_name=5), "pools.mydb.application_name", "a string"),
    (
        pool_with(prepared_statements_cache_size=0),
        "pools.mydb.prepared_statements_cache_size",
        "greater than 0",
    ),
    (
        pool_with(startup_parameters={"options": "-c x=1"}),
        "pools.mydb.startup_parameters.options",
        "reserved",
    ),
    (
        merged(
            {
                "general": {"startup_parameters": {"a": "x" * 5000}},
                "pools": {"mydb": {"startup_parameters": {"b": "y" * 5000}}},
            }
        ),
        "pools.mydb.startup_parameters",
        "with general.startup_parameters takes",
    ),
    (
        pool_with(
            max_db_connections=8,
            users=[
                user(username="a", pool_size=10, min_pool_size=5),
                user(username="b", pool_size=10, min_pool_size=5),
            ],
        ),
        "pools.mydb.max_db_connections",
        "less than the users' min_pool_size sum (10)",
    ),
    (pool_with(max_db_connections=-1), "pools.mydb.max_db_connections", "non-negative"),
    (pool_with(server_tls_mode="verify-full"), "pools.mydb.server_tls_mode", "server_tls_ca_cert"),
    (
        pool_with(server_tls_certificate="c"),
        "pools.mydb.server_tls_certificate",
        "set without pools.mydb.server_tls_private_key",
    ),
    (pool_with(patroni_api_urls=["x"]), "pools.mydb.patroni_api_urls[0]", "http"),
    ({"pools": {"my.db": {"server_port": 0}}}, 'pools."my.db".server_port', "port number"),
    # users
    (pool_with(users="alice"), "pools.mydb.users", "expected a list of users, got 'alice'"),
    (users(5), "pools.mydb.users[0]", "expected a table, got 5"),
    (users({"password": ""}), "pools.mydb.users[0].username", "required key is missing"),
    (users({"username": "a"}), "pools.mydb.users[0].password", "required key is missing"),
    (users(user(username="")), "pools.mydb.users[0].username", "non-empty"),
    (users(user(password=None)), "pools.mydb.users[0].password", "required key is missing"),
    (users(user(password=123)), "pools.mydb.users[0].password", "expected a string, got 123"),
    (
        users(user(), user(username="b", pool_size="abc")),
        "pools.mydb.users[1].pool_size",
        "expected a positive integer, got 'abc'",
    ),
    (users(user(pool_size=0)), "pools.mydb.users[0].pool_size", "positive integer, got 0"),
    (
        users(user(pool_size=2, min_pool_size=5)),
        "pools.mydb.users[0].min_pool_size",
        "5 is larger than pool_size 2",
    ),
    (
        users(user(), user(username="bob"), user()),
        "pools.mydb.users[2].username",
        "duplicate username 'alice' (also in pools.mydb.users[0])",
    ),
    (
        pool_with(users={"0": user(), "1": user()}),
        "pools.mydb.users.1.username",
        "duplicate username 'alice' (also in pools.mydb.users.0)",
    ),
    (users(user(pool_mode="statement")), "pools.mydb.users[0].pool_mode", "'transaction'"),
    (
        users(user(server_password="x")),
        "pools.mydb.users[0].server_password",
        "set without server_username",
    ),
    (users(user(server_lifetime="forever")), "pools.mydb.users[0].server_lifetime", "duration"),
    # auth_query
    (pool_with(auth_query="select"), "pools.mydb.auth_query", "expected a table"),
    (pool_with(auth_query={"user": "u"}), "pools.mydb.auth_query.query", "required key is missing"),
    (pool_with(auth_query={"query": "q"}), "pools.mydb.auth_query.user", "required key is missing"),
    (
        pool_with(auth_query={"query": "q", "user": "u", "workers": 0}),
        "pools.mydb.auth_query.workers",
        "positive",
    ),
    (
        pool_with(auth_query={"query": "q", "user": "u", "pool_size": 2, "min_pool_size": 3}),
        "pools.mydb.auth_query.min_pool_size",
        "3 is larger than pool_size 2",
    ),
    (
        pool_with(auth_query={"query": "q", "user": "u", "server_password": "p"}),
        "pools.mydb.auth_query.server_password",
        "set without server_user",
    ),
    (
        pool_with(auth_query={"query": "q", "user": "u", "cache_ttl": "1w"}),
        "pools.mydb.auth_query.cache_ttl",
        "duration",
    ),
]


@pytest.mark.parametrize(("data", "key_path", "fragment"), ERROR_CASES)
def test_validation_errors_name_the_key(data: dict[str, Any], key_path: str, fragment: str) -> None:
    expect_error(data, key_path, fragment)


def test_brief_example_message() -> None:
    error = expect_error(
        users(user(pool_size="abc")), "pools.mydb.users[0].pool_size", "positive integer"
    )
    assert str(error) == "pools.mydb.users[0].pool_size: expected a positive integer, got 'abc'"


def test_prepared_cache_size_zero_is_fine_when_prepared_statements_are_off() -> None:
    config = parse_config(
        merged(
            {
                "general": {"prepared_statements": False, "prepared_statements_cache_size": 0},
                "pools": {"mydb": {"prepared_statements_cache_size": 0}},
            }
        )
    )
    assert config.general.prepared_statements_cache_size == 0
    assert config.server_prepared_cache_size_for(config.pools["mydb"]) == 0


def test_tls_settings_that_fit_together_are_accepted() -> None:
    config = parse_config(
        merged(
            {
                "general": {
                    "tls_certificate": "c.pem",
                    "tls_private_key": "k.pem",
                    "tls_ca_cert": "ca.pem",
                    "tls_mode": "VERIFY-FULL",
                    "tls_rate_limit_per_second": 200,
                    "server_tls_mode": "verify-ca",
                    "server_tls_ca_cert": "sca.pem",
                },
                # the pool inherits the general CA
                "pools": {"mydb": {"server_tls_mode": "verify-full"}},
            }
        )
    )
    assert config.general.tls_mode == "verify-full"
    assert config.pools["mydb"].server_tls_mode == "verify-full"


# ---------------------------------------------------------------------------------------
# Warnings: unknown keys, deprecated names, accepted-but-not-implemented


def test_unknown_keys_warn_with_full_path() -> None:
    data = merged(
        {
            "colour": "blue",
            "general": {"foo": 1, "pg_hba": {"content": "host all all ::1/128 trust", "x": 1}},
            "pools": {
                "mydb": {
                    "colour": "red",
                    "users": [user(), user(username="bob", pasword="typo")],
                    "auth_query": {"query": "q", "user": "u", "extra": True},
                },
                "my db": {"users": [user()], "bogus": 1},
            },
            "web": {"bogus": 1},
            "talos": {"nope": 1},
            "include": {"other": 1},
        }
    )
    warnings = parse_config(data).warnings
    for expected in [
        "colour: unknown key, ignored",
        "general.foo: unknown key, ignored",
        "general.pg_hba.x: unknown key, ignored",
        "pools.mydb.colour: unknown key, ignored",
        "pools.mydb.users[1].pasword: unknown key, ignored",
        "pools.mydb.auth_query.extra: unknown key, ignored",
        'pools."my db".bogus: unknown key, ignored',
        "web.bogus: unknown key, ignored",
        "talos.nope: unknown key, ignored",
        "include.other: unknown key, ignored",
    ]:
        assert expected in warnings


# Client TLS is implemented: these keys load without a warning.
CLIENT_TLS = (
    "tls_certificate",
    "tls_private_key",
    "tls_ca_cert",
    "tls_mode",
    "tls_rate_limit_per_second",
)
SERVER_TLS = (
    "server_tls_mode",
    "server_tls_ca_cert",
    "server_tls_certificate",
    "server_tls_private_key",
)
DATABASE_BUDGET = (
    "max_db_connections",
    "min_connection_lifetime",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "min_guaranteed_pool_size",
)
PATRONI_FALLBACK = (
    "patroni_api_urls",
    "fallback_cooldown",
    "patroni_api_timeout",
    "fallback_connect_timeout",
    "fallback_lifetime",
)
POOL_PRESSURE = ("scaling_warm_pool_ratio", "scaling_max_parallel_creates")
# PgDoorman thread tuning: warned about as without meaning here (see below).
THREAD_TUNING = ("scaling_fast_retries", "scaling_cooldown_sleep")
IMPLEMENTED = (
    *CLIENT_TLS,
    *SERVER_TLS,
    *DATABASE_BUDGET,
    *PATRONI_FALLBACK,
    *POOL_PRESSURE,
    "unix_socket_buffer_size",
    "proxy_copy_data_timeout",
)


def test_not_implemented_keys_warn_when_set() -> None:
    data = merged(
        {
            "general": {
                "worker_threads": 8,
                "unix_socket_buffer_size": "2MB",
                "proxy_copy_data_timeout": "1s",
                "tls_certificate": "c.pem",
                "tls_private_key": "k.pem",
                "tls_ca_cert": "ca.pem",
                "tls_mode": "verify-full",
                "tls_rate_limit_per_second": 100,
                "server_tls_mode": "verify-full",
                "server_tls_ca_cert": "ca.pem",
                "server_tls_certificate": "sc.pem",
                "server_tls_private_key": "sk.pem",
                "scaling_warm_pool_ratio": 50,
                "scaling_fast_retries": 3,
                "scaling_max_parallel_creates": 4,
                "patroni_api_urls": ["http://patroni:8008"],
                "fallback_cooldown": "30s",
                "patroni_api_timeout": "5s",
                "fallback_connect_timeout": "5s",
                "fallback_lifetime": "30s",
            },
            "pools": {
                "mydb": {
                    "max_db_connections": 20,
                    "min_connection_lifetime": 30000,
                    "reserve_pool_size": 2,
                    "reserve_pool_timeout": "3s",
                    "min_guaranteed_pool_size": 1,
                    "scaling_warm_pool_ratio": 10,
                    "scaling_fast_retries": 1,
                    "scaling_cooldown_sleep": "10ms",
                    "server_tls_mode": "require",
                    "server_tls_ca_cert": "ca.pem",
                    "server_tls_certificate": "c.pem",
                    "server_tls_private_key": "k.pem",
                    "patroni_api_urls": ["https://p:8008"],
                    "fallback_cooldown": 1,
                    "patroni_api_timeout": 1,
                    "fallback_connect_timeout": 1,
                    "fallback_lifetime": 1,
                    "auth_query": {
                        "query": "SELECT passwd FROM pg_shadow WHERE usename=$1",
                        "user": "x",
                    },
                    "users": [user(auth_pam_service="login")],
                }
            },
            "web": {
                "ui": True,
                "ui_anonymous": True,
                "log_tap_max_entries": 10,
                "sso_enabled": True,
                "sso_proxy_url": "https://sso",
                "sso_public_key_file": "k.pem",
                "sso_audience": ["a"],
                "sso_allowed_users": ["bob"],
                "trusted_proxies": ["10.0.0.0/8"],
                "sso_groups_claim": "roles",
                "sso_admin_groups": ["admins"],
                "sso_require_https": True,
            },
            "talos": {"keys": ["k.pem"], "databases": ["db"]},
        }
    )
    config = parse_config(data)
    suffix = ": not implemented yet, ignored"
    flagged = {w.removesuffix(suffix) for w in config.warnings if w.endswith(suffix)}
    expected = (
        {
            f"general.{key}"
            for key in data["general"]
            if key not in ("host", "port", *IMPLEMENTED, *THREAD_TUNING)
        }
        | {
            f"pools.mydb.{key}"
            for key in data["pools"]["mydb"]
            if key not in ("server_port", "users", "auth_query", *SERVER_TLS, *DATABASE_BUDGET)
            and key not in (*PATRONI_FALLBACK, *POOL_PRESSURE, *THREAD_TUNING)
        }
        | {f"web.{key}" for key in data["web"]}
    )
    assert flagged == expected
    not_applicable = {w for w in config.warnings if w.endswith("no meaning here, ignored")}
    assert {w.split(":")[0] for w in not_applicable} == {
        "general.scaling_fast_retries",
        "pools.mydb.scaling_fast_retries",
        "pools.mydb.scaling_cooldown_sleep",
    }
    # Nothing else to say about this config.
    assert len(config.warnings) == len(expected) + len(not_applicable)
    assert not any(
        w.startswith((f"general.{key}:", f"pools.mydb.{key}:"))
        for w in config.warnings
        for key in IMPLEMENTED
    )
    # Still stored, so the features can be built on them.
    assert config.general.tls_mode == "verify-full"
    assert config.pools["mydb"].max_db_connections == 20
    assert config.pools["mydb"].reserve_pool_timeout == 3000
    assert config.pools["mydb"].auth_query is not None
    assert config.pools["mydb"].auth_query.workers == 2


def test_runtime_tuning_keys_warn_as_not_applicable() -> None:
    config = parse_config(
        merged(
            {
                "general": {
                    "worker_cpu_affinity_pinning": True,
                    "worker_stack_size": "8MB",
                    "max_blocking_threads": 4,
                    "tokio_global_queue_interval": 61,
                    "tokio_event_interval": 61,
                    "query_interner_gc_interval_seconds": 30,
                    "query_interner_anon_idle_ttl_seconds": 0,
                }
            }
        )
    )
    assert len(config.warnings) == 7
    assert all("no meaning here, ignored" in w for w in config.warnings)
    assert config.general.worker_stack_size == 8 << 20


def test_default_values_do_not_warn() -> None:
    assert parse_config(base()).warnings == []


def test_deprecated_client_prepared_statements_cache_size_alias() -> None:
    config = parse_config(merged({"general": {"client_prepared_statements_cache_size": 64}}))
    assert config.general.client_anonymous_prepared_cache_size == 64
    assert config.warnings == [
        "general.client_prepared_statements_cache_size: deprecated name, "
        "use client_anonymous_prepared_cache_size"
    ]
    new = parse_config(merged({"general": {"client_anonymous_prepared_cache_size": 0}}))
    assert new.general.client_anonymous_prepared_cache_size == 0
    assert new.warnings == []


def test_unix_socket_path_of_the_longest_size_loads() -> None:
    directory = "/tmp/" + "d" * 88  # + "/.s.PGSQL.6432": 107 bytes
    config = parse_config(merged({"general": {"unix_socket_dir": directory, "port": 6432}}))
    assert len(f"{config.general.unix_socket_dir}/.s.PGSQL.6432") == 107


def test_prometheus_is_read_as_web() -> None:
    config = parse_config(
        merged({"prometheus": {"enabled": True, "host": "127.0.0.1", "port": 9100}})
    )
    assert (config.web.enabled, config.web.host, config.web.port) == (True, "127.0.0.1", 9100)
    assert config.warnings == []  # PgDoorman's own sample still uses [prometheus]


def test_pgdoorman_file_spelling_out_defaults_loads_quietly(tmp_path: Path) -> None:
    file = write(
        tmp_path / "pg_doorman.toml",
        """
[include]
# files = ["/etc/pg_doorman/pools.toml"]

[general]
host = "0.0.0.0"
port = 6432
connect_timeout = 3000
server_idle_check_timeout = 60000
unix_socket_buffer_size = 1048576
unix_socket_mode = "0600"
max_memory_usage = 268435456
scaling_warm_pool_ratio = 20
scaling_fast_retries = 10
scaling_max_parallel_creates = 2
worker_threads = 4
worker_cpu_affinity_pinning = false
client_anonymous_prepared_cache_size = 256
admin_username = "admin"
admin_password = "admin"
tls_mode = "allow"
tls_rate_limit_per_second = 0
server_tls_mode = "allow"
hba = []

[prometheus]
enabled = false
host = "0.0.0.0"
port = 9127

[talos]
keys = []
databases = []

[pools.exampledb]
server_host = "127.0.0.1"
server_port = 5432
pool_mode = "transaction"
max_db_connections = 0

[pools.exampledb.users.0]
username = "example_user_1"
password = "md5dd9a0f26a4302744db881776a09bbfad"
pool_size = 40
""",
    )
    config = load_config(file)
    assert config.warnings == []
    assert config.general.client_anonymous_prepared_cache_size == 256


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"tls_mode": "disable"}, False),
        ({"server_tls_mode": "disable"}, False),
        ({"server_tls_mode": "prefer"}, False),  # implemented: nothing to warn about
        ({"worker_threads": 4}, False),
        ({"worker_threads": 2}, True),
        ({"query_interner_anon_idle_ttl_seconds": 60}, False),
        ({"query_interner_anon_idle_ttl_seconds": 0}, True),
    ],
)
def test_unimplemented_keys_warn_only_when_they_would_change_something(
    settings: dict[str, Any], warned: bool
) -> None:
    config = parse_config(merged({"general": settings}))
    assert bool(config.warnings) == warned


def test_pool_named_like_the_admin_database_warns() -> None:
    config = parse_config({"pools": {"pgdoorman": {"users": [user()]}}})
    assert config.warnings == [
        "pools.pgdoorman: this database name reaches the admin console, never this pool"
    ]


def test_pool_without_users_warns_unless_auth_query() -> None:
    config = parse_config({"pools": {"a": {}}})
    assert config.warnings == ["pools.a.users: no users configured, so no client can use this pool"]
    config = parse_config({"pools": {"a": {"auth_query": {"query": "q", "user": "u"}}}})
    assert config.warnings == []


def test_dedicated_auth_query_user_must_not_be_a_static_user() -> None:
    expect_error(
        pool_with(
            users=[user(username="app")],
            auth_query={"query": "q", "user": "u", "server_user": "app"},
        ),
        "pools.mydb.auth_query.server_user",
        "also a user of this pool",
    )


def test_pg_hba_without_rules_is_an_error() -> None:
    for text in ("# nothing yet\n\n", ""):
        expect_error(merged({"general": {"pg_hba": text}}), "general.pg_hba", "contains no rules")


def test_log_level_is_accepted() -> None:
    config = parse_config(merged({"general": {"log_level": "Warn"}}))
    assert config.general.log_level == "warn"
    assert config.warnings == []


# ---------------------------------------------------------------------------------------
# pg_hba forms

HBA = "host all all 127.0.0.1/32 scram-sha-256\n"


def test_pg_hba_string() -> None:
    assert parse_config(merged({"general": {"pg_hba": HBA}})).general.pg_hba == HBA


def test_pg_hba_content_table() -> None:
    data = merged({"general": {"pg_hba": {"content": HBA}}})
    assert parse_config(data).general.pg_hba == HBA


def test_pg_hba_path_relative_to_base_dir(tmp_path: Path) -> None:
    write(tmp_path / "hba" / "rules.conf", HBA)
    data = merged({"general": {"pg_hba": {"path": "hba/rules.conf"}}})
    assert parse_config(data, base_dir=tmp_path).general.pg_hba == HBA


def test_pg_hba_path_relative_to_config_file_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "etc" / "pg_hba.conf", HBA)
    config_file = write(
        tmp_path / "etc" / "pg_doorman.toml", '[general]\npg_hba = { path = "pg_hba.conf" }\n'
    )
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc") / "pg_doorman.toml").general.pg_hba == HBA
    assert load_config(config_file).general.pg_hba == HBA


def test_pg_hba_path_absolute(tmp_path: Path) -> None:
    rules = write(tmp_path / "abs.conf", HBA)
    data = merged({"general": {"pg_hba": {"path": str(rules)}}})
    assert parse_config(data, base_dir=Path("/nonexistent")).general.pg_hba == HBA


def test_pg_hba_path_missing_file(tmp_path: Path) -> None:
    data = merged({"general": {"pg_hba": {"path": "missing.conf"}}})
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path)
    assert info.value.key_path == "general.pg_hba.path"
    assert "missing.conf" in str(info.value)


def test_pg_hba_path_is_reread_on_each_load(tmp_path: Path) -> None:
    rules = write(tmp_path / "pg_hba.conf", HBA)
    config_file = write(tmp_path / "c.toml", '[general]\npg_hba = {path = "pg_hba.conf"}\n')
    assert load_config(config_file).general.pg_hba == HBA
    rules.write_text("host all all ::1/128 trust\n", encoding="utf-8")
    assert load_config(config_file).general.pg_hba == "host all all ::1/128 trust\n"


# ---------------------------------------------------------------------------------------
# Files: formats, syntax errors, includes


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key_path == ""
    assert "nope.toml" in str(info.value)
    assert "No such file" in str(info.value)


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = write(tmp_path / "bad.toml", '[general]\nport = 6432\nhost = "x\n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    message = str(info.value)
    assert str(file) in message and "TOML syntax error" in message and "line 3" in message


def test_toml_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    file = write(tmp_path / "dup.toml", "[general]\nport = 1\nport = 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(file)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = write(tmp_path / "bad.yaml", "general:\n  port: 6432\n  host: [oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    message = str(info.value)
    assert str(file) in message and "YAML syntax error at line" in message


def test_yaml_duplicate_keys_are_refused(tmp_path: Path) -> None:
    file = write(tmp_path / "dup.yml", "general:\n  port: 6432\n  port: 6433\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert "duplicate key 'port'" in str(info.value)
    assert "line 3" in str(info.value)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    file = write(
        tmp_path / "anchors.yaml",
        """
defaults: &defaults {server_port: 5433, pool_mode: session}
pools:
  a: {<<: *defaults, users: [{username: u, password: ""}]}
""",
    )
    config = load_config(file)
    assert config.pools["a"].server_port == 5433
    assert config.warnings == ["defaults: unknown key, ignored"]


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    file = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got a list"):
        load_config(file)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "empty.yaml", "# nothing\n"))
    assert config.general == GeneralConfig()


def test_not_utf8(tmp_path: Path) -> None:
    file = tmp_path / "latin1.toml"
    file.write_bytes('[general]\nhost = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(file)


def test_format_by_extension(tmp_path: Path) -> None:
    yaml_text = "general:\n  port: 7000\n"
    assert load_config(write(tmp_path / "a.yml", yaml_text)).general.port == 7000
    assert load_config(write(tmp_path / "b.YAML", yaml_text)).general.port == 7000
    toml_text = "[general]\nport = 7001\n"
    assert load_config(write(tmp_path / "c.conf", toml_text)).general.port == 7001
    config = load_config(write(tmp_path / "d", toml_text))
    assert config.source == str(tmp_path / "d")


def test_yaml_nulls_mean_unset_and_scalars_become_parameter_text(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.yaml",
        """
general:
  tls_mode: ~
  syslog_prog_name: null
  startup_parameters:
    jit: off
    statement_timeout: 5000
    work_mem: 64MB
""",
    )
    config = load_config(file)
    assert config.general.tls_mode is None
    assert config.general.startup_parameters == {
        "jit": "off",
        "statement_timeout": "5000",
        "work_mem": "64MB",
    }


def test_yaml_unquoted_octal_mode_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path / "c.yaml", "general:\n  unix_socket_mode: 0600\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert info.value.key_path == "general.unix_socket_mode"
    assert "quoted" in str(info.value)


def test_include_files_merge_in_order(tmp_path: Path) -> None:
    main = write(
        tmp_path / "pg_doorman.toml",
        """
include.files = ["conf.d/pools.toml", "overrides.yaml"]

[general]
port = 6432
connect_timeout = 1000
hba = ["10.0.0.0/8"]

[pools.a]
server_port = 5432
[[pools.a.users]]
username = "u1"
password = ""
""",
    )
    write(
        tmp_path / "conf.d" / "pools.toml",
        """
include.files = ["users.toml"]   # relative to conf.d/

[general]
port = 7000
hba = ["192.168.0.0/16"]

[pools.b]
server_host = "db-b"
""",
    )
    write(
        tmp_path / "conf.d" / "users.toml",
        """
[[pools.a.users]]
username = "u2"
password = ""

[[pools.b.users]]
username = "b1"
password = ""
""",
    )
    write(
        tmp_path / "overrides.yaml",
        """
general:
  port: 7100          # the last file wins
  connect_timeout: ~  # null: keeps the earlier value
pools:
  a:
    pool_mode: session
""",
    )
    config = load_config(main)
    assert config.general.port == 7100
    assert config.general.connect_timeout == 1000
    assert config.general.hba == ["10.0.0.0/8", "192.168.0.0/16"]  # lists concatenate
    assert [u.username for u in config.pools["a"].users] == ["u1", "u2"]
    assert config.pools["a"].pool_mode == "session"
    assert config.pools["a"].server_port == 5432
    assert config.pools["b"].server_host == "db-b"
    assert [u.username for u in config.pools["b"].users] == ["b1"]
    assert config.warnings == []


def test_include_can_replace_a_value_of_another_type(tmp_path: Path) -> None:
    main = write(
        tmp_path / "m.toml",
        'include = { files = ["i.toml"] }\n[general]\nidle_timeout = 5000\n',
    )
    write(tmp_path / "i.toml", '[general]\nidle_timeout = "1m"\n')
    assert load_config(main).general.idle_timeout == 60_000


def test_parse_config_includes_relative_to_base_dir(tmp_path: Path) -> None:
    write(tmp_path / "inc.toml", "[general]\nport = 7777\n")
    config = parse_config({"include": {"files": ["inc.toml"]}}, base_dir=tmp_path)
    assert config.general.port == 7777


def test_include_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "ok.toml", "")
    main = write(tmp_path / "m.toml", 'include.files = ["ok.toml", "gone.toml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key_path == "include.files[1]"
    assert str(info.value).startswith("include.files[1]: cannot read ")
    assert "gone.toml" in str(info.value)


def test_include_syntax_error_names_include_and_line(tmp_path: Path) -> None:
    write(tmp_path / "broken.toml", "[general]\nport = \n")
    main = write(tmp_path / "m.toml", 'include.files = ["broken.toml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key_path == "include.files[0]"
    assert "broken.toml" in str(info.value) and "line 2" in str(info.value)


def test_include_yaml_syntax_error(tmp_path: Path) -> None:
    write(tmp_path / "broken.yaml", "general:\n  port: [\n")
    main = write(tmp_path / "m.toml", 'include.files = ["broken.yaml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key_path == "include.files[0]"
    assert "YAML syntax error at line" in str(info.value)


def test_nested_include_error_says_where_it_was_included(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "a.toml", 'include.files = ["missing.toml"]\n')
    main = write(tmp_path / "m.toml", 'include.files = ["sub/a.toml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key_path == "include.files[0]"
    message = str(info.value)
    assert str(tmp_path / "sub" / "missing.toml") in message
    assert f"(in {tmp_path / 'sub' / 'a.toml'})" in message


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path / "b.toml", 'include.files = ["a.toml"]\n')
    main = write(tmp_path / "a.toml", 'include.files = ["b.toml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key_path == "include.files[0]"
    assert "include cycle" in str(info.value)


# ---------------------------------------------------------------------------------------
# Helpers the pooler uses


def helper_config() -> Config:
    return parse_config(
        {
            "general": {
                "connect_timeout": 3000,
                "idle_timeout": 600_000,
                "server_lifetime": 1_200_000,
                "startup_parameters": {"work_mem": "4MB", "jit": "off"},
            },
            "pools": {
                "plain": {"users": [user(username="u")]},
                "tuned": {
                    "connect_timeout": 500,
                    "idle_timeout": "1m",
                    "server_lifetime": "1h",
                    "pool_mode": "session",
                    "prepared_statements_cache_size": 100,
                    "startup_parameters": {"work_mem": "64MB"},
                    "users": [
                        user(username="short", server_lifetime="5m", pool_mode="transaction"),
                        user(username="plain"),
                    ],
                },
            },
        }
    )


def test_pool_setting_falls_back_to_general() -> None:
    config = helper_config()
    plain, tuned = config.pools["plain"], config.pools["tuned"]
    assert config.pool_setting(plain, "connect_timeout") == 3000
    assert config.pool_setting(tuned, "connect_timeout") == 500  # honoured, unlike PgDoorman
    assert config.pool_setting(plain, "idle_timeout") == 600_000
    assert config.pool_setting(tuned, "idle_timeout") == 60_000
    assert config.pool_setting(tuned, "server_lifetime") == 3_600_000
    assert config.pool_setting(plain, "prepared_statements_cache_size") == 8192
    assert config.pool_setting(tuned, "prepared_statements_cache_size") == 100


def test_user_server_lifetime_overrides_pool_and_general() -> None:
    config = helper_config()
    tuned, plain = config.pools["tuned"], config.pools["plain"]
    short, normal = tuned.users
    assert config.server_lifetime_for(tuned, short) == 300_000
    assert config.server_lifetime_for(tuned, normal) == 3_600_000
    assert config.server_lifetime_for(plain, plain.users[0]) == 1_200_000


def test_effective_pool_mode_and_find_user() -> None:
    tuned = helper_config().pools["tuned"]
    short = tuned.find_user("short")
    plain = tuned.find_user("plain")
    assert short is not None and plain is not None
    assert tuned.effective_pool_mode(short) == "transaction"
    assert tuned.effective_pool_mode(plain) == "session"
    assert tuned.find_user("nobody") is None


def test_startup_parameters_overlay() -> None:
    config = helper_config()
    assert config.startup_parameters_for(config.pools["tuned"]) == {
        "work_mem": "64MB",
        "jit": "off",
    }
    assert config.startup_parameters_for(config.pools["plain"]) == {"work_mem": "4MB", "jit": "off"}


def test_server_prepared_cache_size() -> None:
    config = helper_config()
    assert config.server_prepared_cache_size_for(config.pools["plain"]) == 8192
    assert config.server_prepared_cache_size_for(config.pools["tuned"]) == 100
    config = parse_config(
        {
            "general": {"server_prepared_statements_cache_size": 50},
            "pools": {
                "a": {"users": [user()]},
                "b": {"server_prepared_statements_cache_size": 7, "users": [user()]},
            },
        }
    )
    assert config.server_prepared_cache_size_for(config.pools["a"]) == 50
    assert config.server_prepared_cache_size_for(config.pools["b"]) == 7


def test_restart_required_changes() -> None:
    old = parse_config(base())
    new = parse_config(merged({"general": {"port": 7000, "idle_timeout": 1}, "web": {"port": 1}}))
    assert old.restart_required_changes(new) == ["general.port", "web.port"]
    assert old.restart_required_changes(old) == []
    for key in RESTART_REQUIRED:
        section, name = key.split(".")
        assert hasattr(getattr(old, section), name)


@pytest.mark.parametrize(("mode", "bits"), [("0600", 0o600), ("660", 0o660), ("0o777", 0o777)])
def test_unix_socket_mode_bits(mode: str, bits: int) -> None:
    config = parse_config(merged({"general": {"unix_socket_mode": mode}}))
    assert config.general.unix_socket_mode_bits == bits


# ---------------------------------------------------------------------------------------
# The sample configs at the repository root


def scram_verifier(password: bytes, salt: bytes, iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def test_scram_formula_matches_rfc7677() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    _, stored_key, server_key = scram_verifier(b"pencil", salt).replace("$", ":").split(":")[2:]
    auth_message = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,"
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    signature = hmac.new(base64.b64decode(server_key), auth_message, "sha256").digest()
    assert base64.b64encode(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert len(base64.b64decode(stored_key)) == 32


def test_samples_are_equivalent_and_fit_the_demo() -> None:
    toml_config = load_config(REPO / "pg_doorman.toml")
    yaml_config = load_config(REPO / "pg_doorman.yaml")
    assert toml_config.warnings == [] and yaml_config.warnings == []
    assert dataclasses.replace(toml_config, source="") == dataclasses.replace(
        yaml_config, source=""
    )

    g = toml_config.general
    assert (g.host, g.port) == ("127.0.0.1", 6432)
    assert (g.admin_username, g.admin_password) == ("admin", "admin")
    assert g.pg_hba is not None
    rules = [line.split() for line in g.pg_hba.splitlines() if line.strip()]
    assert rules == [
        ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
        ["host", "all", "all", "::1/128", "scram-sha-256"],
    ]
    assert list(toml_config.pools) == ["demo"]
    pool = toml_config.pools["demo"]
    assert (pool.server_host, pool.server_port, pool.server_database_name) == (
        "127.0.0.1",
        55432,
        "demo",
    )
    assert pool.pool_mode == "transaction"
    (doorman,) = pool.users
    assert (doorman.username, doorman.pool_size) == ("doorman", 20)
    assert doorman.password == scram_verifier(b"doorman", b"pg_doorman-demo!")


def test_talos_keys_without_databases_warn() -> None:
    config = parse_config(merged({"talos": {"keys": ["k.pem"]}}))
    assert config.talos.keys == ["k.pem"]
    assert config.warnings == ["talos.databases: empty: every talos token will be refused"]
    config = parse_config(merged({"talos": {"databases": ["db"]}}))
    assert config.warnings == ["talos.keys: empty: every talos token will be refused"]


def test_auth_pam_service(tmp_path: Path) -> None:
    """A name is looked up by PAM in /etc/pam.d; a path is relative to the config file
    and must name a file."""
    service = tmp_path / "pam" / "pooler"
    service.parent.mkdir()
    service.write_text("auth required pam_permit.so\n")

    def users_pam(value: str) -> Any:
        return parse_config(users(user(auth_pam_service=value)), base_dir=tmp_path)

    assert users_pam("login").pools["mydb"].users[0].auth_pam_service == "login"
    config = users_pam("pam/pooler")
    assert config.pools["mydb"].users[0].auth_pam_service == str(service)
    assert not config.warnings
    with pytest.raises(ConfigError) as info:
        users_pam("pam/absent")
    assert info.value.key_path == "pools.mydb.users[0].auth_pam_service"
    assert "no PAM service file" in str(info.value)
