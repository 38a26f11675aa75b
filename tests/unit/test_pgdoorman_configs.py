"""PgDoorman's own configuration files (samples, demos, test configs, documentation
examples) load here and mean what they mean to PgDoorman.

The files are in data/pgdoorman_configs, each naming where it comes from. Paths they name
(certificates, key files, pg_hba files) are made in a temporary directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from pg_doorman.app.cli import load_checked_config
from pg_doorman.auth.hba import HbaRules
from pg_doorman.config import Config, GeneralConfig, WebConfig, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent / "data" / "pgdoorman_configs"
MIB = 1 << 20
SAMPLE_MD5 = "md5dd9a0f26a4302744db881776a09bbfad"


def without_source(config: Config) -> Config:
    return dataclasses.replace(config, source="")


def write_tls_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as PEM files in ``directory``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def write_rsa_pair(directory: Path) -> None:
    """public.pem and private.pem, the key files of PgDoorman's JWT test users."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "private.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "public.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def check_with_cli(config_file: Path, cwd: Path) -> None:
    """``pg_doorman -t`` accepts the file, run from ``cwd`` as PgDoorman would be."""
    run = subprocess.run(
        [sys.executable, "-m", "pg_doorman", "-t", str(config_file)],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is valid" in run.stdout


def fill_placeholders(template: Path, target: Path, values: dict[str, str]) -> Path:
    """A BDD feature's config with its ${NAME} placeholders filled in."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text
    target.write_text(text)
    return target


# ---------------------------------------------------------------------------------------
# The annotated samples (pg_doorman.toml / pg_doorman.yaml at PgDoorman's root)


def test_pgdoorman_sample_toml_spells_out_our_defaults(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "sample.toml")
    assert config.warnings == []
    # Every [general] line of the sample is PgDoorman's default; the only values that
    # differ from an empty [general] are the ones the sample changes.
    assert config.general == dataclasses.replace(GeneralConfig(), port=6432, tls_mode="allow")
    g = config.general
    assert (g.connect_timeout, g.idle_timeout, g.server_lifetime) == (3000, 600_000, 1_200_000)
    assert (g.unix_socket_buffer_size, g.max_memory_usage) == (MIB, 256 * MIB)
    assert g.client_anonymous_prepared_cache_size == 256
    assert config.web == WebConfig()  # [prometheus], all defaults
    assert config.talos.keys == [] and config.talos.databases == []
    (pool,) = config.pools.values()
    assert (pool.name, pool.server_host, pool.server_port, pool.pool_mode) == (
        "exampledb",
        "127.0.0.1",
        5432,
        "transaction",
    )
    assert pool.cleanup_server_connections is True
    assert pool.auth_query is None
    (user,) = pool.users
    assert (user.username, user.password, user.pool_size, user.min_pool_size) == (
        "app_user",
        SAMPLE_MD5,
        40,
        0,
    )
    assert user.pool_mode is None and user.server_username is None
    # An already-parsed mapping means the same as the file.
    parsed = parse_config(
        tomllib.loads((CONFIGS / "sample.toml").read_text()), source=config.source
    )
    assert parsed == config
    check_with_cli(CONFIGS / "sample.toml", tmp_path)


def test_pgdoorman_sample_yaml_means_the_same_as_the_toml(tmp_path: Path) -> None:
    """Durations as "3s"/"10m", sizes as "1MB"/"256MB", `include:` with only comments
    (a YAML null), users as a YAML list: the same configuration as the TOML sample."""
    yaml_config = load_config(CONFIGS / "sample.yaml")
    toml_config = load_config(CONFIGS / "sample.toml")
    assert yaml_config.warnings == []
    assert without_source(yaml_config) == without_source(toml_config)
    check_with_cli(CONFIGS / "sample.yaml", tmp_path)


# ---------------------------------------------------------------------------------------
# PgDoorman's integration test config: include, legacy users map, TLS and JWT files


@pytest.fixture
def pgdoorman_checkout(tmp_path: Path) -> Path:
    """tests.toml where PgDoorman runs it from (its repository root, the working
    directory its relative paths mean), with the files it names."""
    shutil.copy(CONFIGS / "tests" / "tests.toml", tmp_path / "tests.toml")
    (tmp_path / "tests").mkdir()
    shutil.copy(CONFIGS / "tests" / "my_hba.toml", tmp_path / "tests" / "my_hba.toml")
    write_tls_pair(tmp_path / "tests" / "data" / "ssl")
    write_rsa_pair(tmp_path / "tests" / "data" / "jwt")
    return tmp_path


def test_pgdoorman_test_config_with_include_and_numbered_users(
    pgdoorman_checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pgdoorman_checkout)
    config = load_checked_config("tests.toml")
    # Old pgcat keys PgDoorman ignores too; worker_threads is PgDoorman's thread count.
    assert config.warnings == [
        "general.virtual_pool_count: unknown key, ignored",
        "general.worker_threads: not implemented yet, ignored",
        "general.default_tcp_so_linger: unknown key, ignored",
        "general.max_message_size: unknown key, ignored",
        "pools.example_db_auth.pool_size: unknown key, ignored",
    ]
    g = config.general
    assert g.hba == ["10.0.0.0/8", "192.168.0.0/16", "127.0.0.1/32", "172.0.0.0/8"]
    assert (g.host, g.port) == ("0.0.0.0", 6433)
    assert (g.admin_username, g.admin_password) == ("doorman_admin", "doorman_admin_password")
    assert g.prepared_statements and g.prepared_statements_cache_size == 10_000
    assert (g.tls_certificate, g.tls_private_key) == (
        "./tests/data/ssl/server.crt",
        "./tests/data/ssl/server.key",
    )
    assert (g.tcp_keepalives_idle, g.tcp_keepalives_count, g.tcp_keepalives_interval) == (1, 5, 5)
    assert (config.web.enabled, config.web.port) == (True, 9127)

    assert list(config.pools) == [
        "example_db",
        "example_db_alias",
        "example_db_auth",
        "unknown_database",
    ]
    db = config.pools["example_db"]
    assert (db.pool_mode, db.idle_timeout, db.application_name) == (
        "transaction",
        40_000,
        "doorman_example_user_1",
    )
    assert db.log_client_parameter_status_changes is True
    assert [(u.username, u.pool_size, u.min_pool_size, u.pool_mode) for u in db.users] == [
        ("example_user_1", 40, 0, "transaction"),
        ("example_user_2", 20, 0, None),
        ("example_user_jwt", 20, 0, None),
        ("example_user_3", 1, 1, "session"),
        ("example_user_rollback", 40, 0, "session"),
        ("example_user_nopassword", 40, 0, "session"),
        ("example_user_disconnect", 40, 0, "transaction"),
        ("example_user_prometheus", 40, 0, "transaction"),
    ]
    assert db.users[1].password.startswith("SCRAM-SHA-256$4096:p2j/1lMdQF6r1dD9I9f7PQ==$")
    assert db.users[2].password == "jwt-pkey-fpath:./tests/data/jwt/public.pem"
    assert (db.users[3].server_username, db.users[3].server_password) == ("example_user_1", "test")
    assert db.users[5].password == ""
    assert db.effective_pool_mode(db.users[1]) == "transaction"

    alias = config.pools["example_db_alias"]
    assert (alias.name, alias.server_database_name) == ("example_db_alias", "example_db")
    auth = config.pools["example_db_auth"]
    assert auth.server_port == 6433
    assert auth.users[2].server_password == "jwt-priv-key-fpath:./tests/data/jwt/private.pem"
    unknown = config.pools["unknown_database"]
    assert (unknown.server_host, unknown.idle_timeout) == ("1.1.1.1", None)
    assert config.pool_setting(unknown, "idle_timeout") == g.idle_timeout == 600_000

    check_with_cli(pgdoorman_checkout / "tests.toml", pgdoorman_checkout)


# ---------------------------------------------------------------------------------------
# example/pg_doorman: auth_query, pg_hba from a file, client TLS


@pytest.mark.parametrize("name", ["pg_doorman.toml", "pg_doorman.yaml"])
def test_pgdoorman_auth_query_example(tmp_path: Path, name: str) -> None:
    cert, key = write_tls_pair(tmp_path)
    hba = tmp_path / "pg_hba.conf"
    hba.write_text("host all all 0.0.0.0/0 scram-sha-256\n")
    text = (CONFIGS / "example" / name).read_text()
    text = text.replace("/etc/pg_doorman/pg_hba.conf", str(hba))
    text = text.replace("/etc/pg_doorman/server.crt", str(cert))
    text = text.replace("/etc/pg_doorman/server.key", str(key))
    file = tmp_path / name
    file.write_text(text)

    config = load_checked_config(str(file))
    # Not a key of PgDoorman's auth_query either (it ignores it without a word).
    assert config.warnings == ["pools.exampledb.auth_query.default_pool_size: unknown key, ignored"]
    assert config.general.pg_hba == "host all all 0.0.0.0/0 scram-sha-256\n"
    assert (config.general.tls_certificate, config.general.tls_private_key) == (str(cert), str(key))
    pool = config.pools["exampledb"]
    assert (pool.server_host, pool.server_port, pool.pool_mode, pool.users) == (
        "postgres",
        5432,
        "transaction",
        [],
    )
    auth_query = pool.auth_query
    assert auth_query is not None
    assert auth_query.query == "SELECT passwd FROM pg_shadow WHERE usename = $1"
    assert (auth_query.user, auth_query.password, auth_query.server_user) == ("postgres", "", None)
    assert (auth_query.pool_size, auth_query.min_pool_size, auth_query.workers) == (2, 0, 2)
    assert (auth_query.cache_ttl, auth_query.cache_failure_ttl, auth_query.min_interval) == (
        300_000,
        30_000,
        1_000,
    )
    assert auth_query.database is None
    check_with_cli(file, tmp_path)


# ---------------------------------------------------------------------------------------
# Demos: Grafana (pg_hba content, [prometheus], coordinator, auth_query), SSO ([web])


def test_pgdoorman_grafana_demo(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "grafana_demo.toml")
    # PgDoorman ignores a pool_mode in [general] as well; the warning says where it goes.
    assert config.warnings == [
        "general.pool_mode: unknown key, ignored; pool_mode belongs in [pools.<name>] or a user"
    ]
    assert config.general.pg_hba == "host all all 0.0.0.0/0 trust"
    assert config.general.shutdown_timeout == 10_000
    assert (config.web.enabled, config.web.host, config.web.port) == (True, "0.0.0.0", 9127)
    pool = config.pools["app_db"]
    assert pool.pool_mode == "transaction"  # PgDoorman's default, not [general]'s key
    assert pool.max_db_connections == 15
    assert [(u.username, u.password, u.pool_size) for u in pool.users] == [
        ("app_user", "md51eb270aee6c83fc6a7a27519d5fa0c9e", 10),
        ("app_user_2", "md5a05c39aae7f2198b1f06c4291434ee85", 10),
    ]
    assert pool.patroni_api_urls is None
    auth_query = pool.auth_query
    assert auth_query is not None
    assert (auth_query.user, auth_query.password, auth_query.database) == (
        "doorman_auth",
        "auth_secret",
        "app_db",
    )
    assert (auth_query.workers, auth_query.cache_ttl) == (2, 60_000)
    assert (auth_query.cache_failure_ttl, auth_query.pool_size) == (30_000, 40)
    check_with_cli(CONFIGS / "grafana_demo.toml", tmp_path)


def test_pgdoorman_sso_demo() -> None:
    config = load_config(CONFIGS / "sso_demo.toml")
    # The web UI and its SSO are PgDoorman features not implemented here.
    assert config.warnings == [
        f"web.{key}: not implemented yet, ignored"
        for key in (
            "ui",
            "log_tap_max_entries",
            "sso_enabled",
            "sso_proxy_url",
            "sso_public_key_file",
            "sso_audience",
        )
    ]
    assert (config.web.enabled, config.web.host, config.web.port) == (True, "0.0.0.0", 9127)
    assert config.web.sso_audience == ["pg_doorman"]
    assert config.general.admin_password == "admin-demo"
    (user,) = config.pools["demo"].users
    assert (user.username, user.password, user.pool_size) == ("demo", "demo", 5)


# ---------------------------------------------------------------------------------------
# BDD feature configs and documentation examples


def test_pgdoorman_bdd_config_with_dotted_pg_hba_content(tmp_path: Path) -> None:
    file = fill_placeholders(
        CONFIGS / "bdd_config_test.toml",
        tmp_path / "pg_doorman.toml",
        {"DOORMAN_PORT": "16432", "PG_PORT": "15432"},
    )
    config = load_config(file)
    assert config.warnings == [
        "general.pool_mode: unknown key, ignored; pool_mode belongs in [pools.<name>] or a user"
    ]
    assert config.general.pg_hba == "host all all 127.0.0.1/32 trust"
    assert (config.general.host, config.general.port) == ("127.0.0.1", 16432)
    pool = config.pools["example_db"]
    assert (pool.server_host, pool.server_port, pool.pool_mode) == (
        "127.0.0.1",
        15432,
        "transaction",
    )
    (user,) = pool.users
    assert (user.username, user.password, user.pool_size) == ("example_user_1", "", 1)
    check_with_cli(file, tmp_path)


def test_pgdoorman_bdd_config_with_pg_hba_file_and_tls(tmp_path: Path) -> None:
    cert, key = write_tls_pair(tmp_path / "ssl")
    hba = tmp_path / "doorman_hba.conf"
    hba.write_text(
        "hostnossl all example_user_nopassword 127.0.0.1/32 reject\n"
        "hostssl all example_user_nopassword 127.0.0.1/32 trust\n"
    )
    file = fill_placeholders(
        CONFIGS / "bdd_hba.toml",
        tmp_path / "pg_doorman.toml",
        {
            "DOORMAN_PORT": "16432",
            "PG_PORT": "15432",
            "DOORMAN_HBA_FILE": str(hba),
            "DOORMAN_SSL_KEY": str(key),
            "DOORMAN_SSL_CERT": str(cert),
        },
    )
    config = load_checked_config(str(file))
    assert config.warnings == []
    assert config.general.pg_hba == hba.read_text()
    assert (config.general.tls_certificate, config.general.tls_private_key) == (str(cert), str(key))
    assert config.general.tls_mode is None  # PgDoorman's unset mode: TLS offered, not required
    pool = config.pools["example_db"]
    assert (pool.pool_mode, pool.server_port) == ("session", 15432)
    (user,) = pool.users
    assert (user.username, user.password, user.pool_size) == ("example_user_nopassword", "", 40)
    check_with_cli(file, tmp_path)


def test_pgdoorman_reference_inline_pg_hba_and_numbered_user() -> None:
    config = load_config(CONFIGS / "reference_pg_hba_string.toml")
    assert config.warnings == []
    assert config.general.pg_hba is not None
    rules = [line.split() for line in config.general.pg_hba.splitlines() if line.strip()]
    assert rules[1:] == [
        ["host", "all", "all", "10.0.0.0/8", "md5"],
        ["hostssl", "all", "all", "0.0.0.0/0", "scram-sha-256"],
        ["hostnossl", "all", "all", "192.168.1.0/24", "trust"],
    ]
    HbaRules.parse(config.general.pg_hba)  # the rule text is valid
    (user,) = config.pools["exampledb"].users
    assert (user.username, user.pool_size) == ("doorman", 40)
    assert user.password == "SCRAM-SHA-256$4096:6nD+Ppi9rgaNyP7...MBiTld7xJipwG/X4="


def test_pgdoorman_talos_config() -> None:
    config = load_config(CONFIGS / "talos.yaml")
    assert config.warnings == []
    assert config.talos.keys == [
        "/etc/pg_doorman/talos/keys/abc123.pem",
        "/etc/pg_doorman/talos/keys/def456.pem",
    ]
    assert config.talos.databases == ["billing", "inventory"]
    pool = config.pools["billing"]
    assert [(u.username, u.server_username, u.pool_size) for u in pool.users] == [
        ("owner", "billing_owner", 20),
        ("read_write", "billing_app", 40),
        ("read_only", "billing_ro", 60),
    ]


def test_talos_nested_in_general_as_pgdoorman_documents_it_warns_where_it_belongs() -> None:
    """PgDoorman's talos page puts `talos` in `general`, where PgDoorman's code never
    looks; the warning says where the section goes."""
    config = parse_config(
        {
            "general": {"talos": {"keys": ["k.pem"], "databases": ["billing"]}},
            "pools": {"billing": {"users": [{"username": "owner", "password": ""}]}},
        }
    )
    assert config.talos.keys == []
    assert config.warnings == [
        "general.talos: unknown key, ignored; [talos] is a top-level section"
    ]
