"""Talos: a client logs in as `talos` with a token, through libpq (psycopg), and its
session runs as the pool user the token picks; PostgreSQL says who that is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import ExamplePostgres
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess, Replace
from pg_doorman.auth.jwt import sign


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    """The token issuer's key; its public half is `[talos] keys` file `issuer.pem`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("talos") / "issuer.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, path


def token(key: rsa.RSAPrivateKey, client_id: str, roles: list[str], **claims: Any) -> str:
    body: dict[str, Any] = {
        "exp": int(time.time()) + 300,
        "clientId": client_id,
        "resource_access": {"postgres.prod:example_db": {"roles": roles}},
    }
    body.update(claims)
    return sign(key, body, {"alg": "RS256", "typ": "JWT", "kid": "issuer"})


def start(
    pg: ExamplePostgres, pooler: PoolerFactory, key_file: Path, **general: Any
) -> PoolerProcess:
    """example_db with users `owner` and `read_only` (servers as the trust user) and
    `srv-billing` (servers as the md5 user)."""
    trust, md5 = pg.trust_user.name, pg.md5_user
    users = [
        {"username": "owner", "password": "", "server_username": trust, "pool_size": 2},
        {"username": "read_only", "password": "", "server_username": trust, "pool_size": 2},
        {
            "username": "srv-billing",
            "password": "",
            "server_username": md5.name,
            "server_password": md5.password,
            "pool_size": 2,
        },
    ]
    return pooler(
        general=general,
        talos={"keys": [str(key_file)], "databases": ["example_db"]},
        pools={"example_db": {"users": Replace(users)}},
    )


def session(proc: PoolerProcess, password: str) -> tuple[str, str]:
    """current_user and application_name of a session logged in as `talos`."""
    with psycopg.connect(proc.dsn("talos", password), autocommit=True) as conn:
        row = conn.execute("select current_user, current_setting('application_name')").fetchone()
        assert row is not None
        return str(row[0]), str(conn.info.parameter_status("application_name"))


def test_the_token_picks_the_pool_user(
    pg: ExamplePostgres, pooler: PoolerFactory, issuer: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    key, key_file = issuer
    proc = start(pg, pooler, key_file)
    # A service with a pool user of its own (srv-<clientId>).
    user, application_name = session(proc, token(key, "billing", ["read_only"]))
    assert user == pg.md5_user.name
    assert application_name == "billing"
    # Else the highest role the token grants on the configured databases.
    user, _ = session(proc, token(key, "reporting", ["read_only", "owner"]))
    assert user == pg.trust_user.name
    log = proc.log_text()
    assert (
        "talos client 'billing' with role read_only runs as srv-billing@example_db (service)" in log
    )
    assert "talos client 'reporting' with role owner runs as owner@example_db (role)" in log
    # While connected, the session is listed under the user it runs as.
    with psycopg.connect(proc.dsn("talos", token(key, "reporting", ["read_only"]))) as conn:
        clients = [r for r in admin_rows(proc, "CLIENTS") if r["application_name"] == "reporting"]
        assert [r["user"] for r in clients] == ["read_only"]
        conn.execute("select 1")


@pytest.mark.parametrize(
    ("claims", "logged"),
    [
        ({"exp": 1}, "the token has expired"),
        (
            {"resource_access": {"postgres.prod:other_db": {"roles": ["owner"]}}},
            "the token grants no role on example_db",
        ),
    ],
)
def test_a_refused_token_is_a_failed_password(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    issuer: tuple[rsa.RSAPrivateKey, Path],
    claims: dict[str, Any],
    logged: str,
) -> None:
    key, key_file = issuer
    proc = start(pg, pooler, key_file)
    with pytest.raises(
        psycopg.OperationalError, match='password authentication failed for user "talos"'
    ):
        session(proc, token(key, "reporting", ["owner"], **claims))
    assert f"talos token refused: {logged}" in proc.log_text()
    # The pooler goes on serving valid tokens.
    assert session(proc, token(key, "reporting", ["owner"]))[0] == pg.trust_user.name


def test_pg_hba_applies_to_the_user_the_token_picks(
    pg: ExamplePostgres, pooler: PoolerFactory, issuer: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    key, key_file = issuer
    hba = "host all owner 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 md5\n"
    proc = start(pg, pooler, key_file, pg_hba=hba)
    with pytest.raises(psycopg.OperationalError, match='pg_hba rejects user "owner" \\(talos\\)'):
        session(proc, token(key, "reporting", ["owner"]))
    assert session(proc, token(key, "reporting", ["read_only"]))[0] == pg.trust_user.name
