"""Tokens as passwords, end to end: clients log in with an RS256 token
(`jwt-pkey-fpath:`), and a pooler logs in to another pooler with tokens it signs
(`jwt-priv-key-fpath:`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess, Replace
from pg_doorman.auth.jwt import sign


@dataclass(frozen=True)
class KeyPair:
    key: rsa.RSAPrivateKey
    public: Path
    private: Path

    def token(self, user: str, **claims: object) -> str:
        return sign(self.key, {"preferred_username": user, "exp": time.time() + 300, **claims})


def key_pair(directory: Path, name: str) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = directory / f"{name}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private = directory / f"{name}.key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return KeyPair(key, public, private)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPair, KeyPair]:
    directory = tmp_path_factory.mktemp("jwt-keys")
    return key_pair(directory, "issuer"), key_pair(directory, "stranger")


def token_pooler(pooler: PoolerFactory, pg: ExamplePostgres, keys: KeyPair) -> PoolerProcess:
    """The trust user (trusted by PostgreSQL too) logs in to the pooler with a token."""
    user = pg.trust_user.name
    return pooler(
        general={"pg_hba": "host all all 127.0.0.1/32 md5\n"},
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [
                        {"username": user, "password": f"jwt-pkey-fpath:{keys.public}"},
                        {"username": pg.md5_user.name, "password": pg.md5_user.pooler_password},
                    ]
                )
            }
        },
    )


def refused(proc: PoolerProcess, user: str, password: str) -> w.ServerError:
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user, EXAMPLE_DB, password)
    return info.value


def test_a_client_logs_in_with_a_token(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    issuer, _ = keys
    proc = token_pooler(pooler, pg, issuer)
    user = pg.trust_user.name
    with psycopg.connect(proc.dsn(user, issuer.token(user)), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)

    async def main() -> str:
        conn = await asyncpg.connect(proc.dsn(user, issuer.token(user)))
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    assert asyncio.run(main()) == user
    # The pooler asked for a cleartext password: the token.
    conn = w.PgWire(proc.host, proc.port)
    try:
        received = conn.startup(user, EXAMPLE_DB, issuer.token(user))
        codes = [int.from_bytes(p[:4], "big") for t, p in received if t == b"R"]
        assert codes == [w.AUTH_CLEARTEXT, w.AUTH_OK]
    finally:
        conn.close()


def loads_cryptography(proc: PoolerProcess) -> bool:
    """Whether the pooler process has cryptography's compiled library mapped."""
    return "/cryptography/" in Path(f"/proc/{proc.pid}/maps").read_text()


def test_cryptography_is_loaded_only_by_a_pooler_with_a_token_key(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    """cryptography adds about 7 MiB to each pooler process: a configuration without a
    token key never loads it, one with a key loads it to read the key."""
    plain = pooler()
    user = pg.scram_user
    with psycopg.connect(plain.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert not loads_cryptography(plain)
    issuer, _ = keys
    with_key = token_pooler(pooler, pg, issuer)
    assert loads_cryptography(with_key)


def test_tokens_that_are_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    issuer, stranger = keys
    proc = token_pooler(pooler, pg, issuer)
    user = pg.trust_user.name
    bad = {
        "another user's": issuer.token(pg.md5_user.name),
        "expired": issuer.token(user, exp=time.time() - 3600),
        "not yet valid": issuer.token(user, nbf=time.time() + 3600),
        "signed by another key": stranger.token(user),
        "not a token": "password",
    }
    for what, token in bad.items():
        error = refused(proc, user, token)
        assert (error.sqlstate, error.severity) == ("28P01", "FATAL"), what
        assert error.message == f'password authentication failed for user "{user}"', what
    log = proc.log_text()
    for reason in ("not for", "expired", "not valid yet", "signature does not match", "not a JWT"):
        assert reason in log
    # The pooler serves everyone else meanwhile.
    md5 = pg.md5_user
    with psycopg.connect(proc.dsn(md5.name, md5.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_pooler_logs_in_to_another_pooler_with_tokens_it_signs(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    """Front pooler -> back pooler -> PostgreSQL. The front answers the back's cleartext
    request with a token for server_username signed by its private key."""
    issuer, _ = keys
    back = token_pooler(pooler, pg, issuer)
    md5 = pg.md5_user
    front = pooler(
        pools={
            EXAMPLE_DB: {
                "server_host": back.host,
                "server_port": back.port,
                "users": Replace(
                    [
                        {
                            "username": md5.name,
                            "password": md5.pooler_password,
                            "server_username": pg.trust_user.name,
                            "server_password": f"jwt-priv-key-fpath:{issuer.private}",
                        }
                    ]
                ),
            }
        },
    )
    with psycopg.connect(front.dsn(md5.name, md5.password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (pg.trust_user.name,)


def test_a_token_key_under_a_scram_only_pg_hba_line_is_refused(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    issuer, _ = keys
    user = pg.trust_user.name
    proc = pooler(
        general={"pg_hba": "host all all 127.0.0.1/32 scram-sha-256\n"},
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [{"username": user, "password": f"jwt-pkey-fpath:{issuer.public}"}]
                )
            }
        },
    )
    assert refused(proc, user, issuer.token(user)).sqlstate == "28P01"
    assert "requires scram-sha-256" in proc.log_text()


@pytest.mark.parametrize("kind", ["missing", "not a key"])
def test_unusable_key_files_are_config_errors(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "key.pem"
    if kind == "not a key":
        path.write_text("hello\n")
    proc = pooler(
        start=False,
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [{"username": pg.trust_user.name, "password": f"jwt-pkey-fpath:{path}"}]
                )
            }
        },
    )
    proc.spawn()
    assert proc.wait_exit() == 2
    assert f"pools.{EXAMPLE_DB}.users[0].password: " in proc.log_text()


def test_a_key_of_the_wrong_half_is_a_config_error(
    pg: ExamplePostgres, pooler: PoolerFactory, keys: tuple[KeyPair, KeyPair]
) -> None:
    issuer, _ = keys
    users = {
        "password": {
            "username": pg.trust_user.name,
            "password": f"jwt-priv-key-fpath:{issuer.private}",
        },
        "server_password": {
            "username": pg.md5_user.name,
            "password": pg.md5_user.pooler_password,
            "server_username": pg.trust_user.name,
            "server_password": f"jwt-pkey-fpath:{issuer.public}",
        },
    }
    for key, user in users.items():
        proc = pooler(start=False, pools={EXAMPLE_DB: {"users": Replace([user])}})
        proc.spawn()
        assert proc.wait_exit() == 2
        hint = "jwt-pkey-fpath:<file>" if key == "password" else "jwt-priv-key-fpath:<file>"
        assert f"pools.{EXAMPLE_DB}.users[0].{key}: " in proc.log_text()
        assert hint in proc.log_text()
