"""Tokens as passwords through a real pooler: tokens the issuer's key signed that still
read more than one way are refused, weak keys are refused at start and at reload, and
a Talos clientId of any characters still logs in."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.pooler import PoolerFactory, PoolerProcess, Replace
from pg_doorman.auth.jwt import sign


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(key: rsa.RSAPrivateKey, claims: str, header: str = '{"alg":"RS256"}') -> str:
    """A token over these exact JSON texts (some of which no JSON encoder writes)."""
    head, body = b64(header.encode()), b64(claims.encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64(signature)}"


def respelt(token: str) -> str:
    """The same signature bytes, spelt with other unused bits in the last character."""
    head, body, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return f"{head}.{body}.{signature[:-1]}{alphabet[alphabet.index(signature[-1]) ^ 1]}"


def token_user_pooler(pooler: PoolerFactory, pg: ExamplePostgres, key_file: Path) -> PoolerProcess:
    """The trust user (trusted by PostgreSQL too) logs in to the pooler with a token."""
    return pooler(
        general={"pg_hba": "host all all 127.0.0.1/32 md5\n"},
        pools={
            EXAMPLE_DB: {
                "users": Replace(
                    [{"username": pg.trust_user.name, "password": f"jwt-pkey-fpath:{key_file}"}]
                )
            }
        },
    )


def logs_in(proc: PoolerProcess, user: str, token: str) -> bool:
    try:
        with psycopg.connect(proc.dsn(user, token), autocommit=True) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
            return True
    except psycopg.OperationalError as exc:
        assert f'password authentication failed for user "{user}"' in str(exc), exc
        return False


def test_signed_tokens_that_read_more_than_one_way_are_failed_passwords(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(public_pem(key))
    proc = token_user_pooler(pooler, pg, key_file)
    user = pg.trust_user.name
    valid_until = int(time.time()) + 300
    assert logs_in(
        proc, user, signed(key, f'{{"preferred_username":"{user}","exp":{valid_until}}}')
    )
    refused = {
        # NaN is no JSON number, and compares false with any time: it never expired.
        "the token's claims is not JSON": f'{{"preferred_username":"{user}","exp":NaN}}',
        # Too large for a float: the login failed with an internal error.
        "the token's exp claim is not a number": (
            f'{{"preferred_username":"{user}","exp":1{"0" * 400}}}'
        ),
        # Another reader may take the first name and see a token for "admin".
        "the token's claims has the member 'preferred_username' twice": (
            f'{{"preferred_username":"admin","preferred_username":"{user}","exp":{valid_until}}}'
        ),
    }
    for reason, claims in refused.items():
        assert not logs_in(proc, user, signed(key, claims)), reason
        proc.wait_for_log(f"token refused: {reason}")
    good = signed(key, f'{{"preferred_username":"{user}","exp":{valid_until}}}')
    assert not logs_in(proc, user, respelt(good))
    proc.wait_for_log("token refused: the token's signature is not canonical base64url")
    critical = signed(
        key,
        f'{{"preferred_username":"{user}","exp":{valid_until}}}',
        '{"alg":"RS256","crit":["b64"],"b64":false}',
    )
    assert not logs_in(proc, user, critical)
    proc.wait_for_log("token refused: the token's header has crit")
    assert "internal error" not in proc.log_text()
    assert logs_in(proc, user, good)


def write_key(path: Path, bits: int) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(public_pem(key))
    return key


def token(key: rsa.RSAPrivateKey, user: str) -> str:
    return sign(key, {"preferred_username": user, "exp": int(time.time()) + 300})


def test_an_rsa_key_below_2048_bits_is_refused_at_start_and_at_reload(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    user = pg.trust_user.name
    key_file = tmp_path / "issuer.pem"
    write_key(key_file, 1024)
    config = {
        "pools": {
            EXAMPLE_DB: {
                "users": Replace([{"username": user, "password": f"jwt-pkey-fpath:{key_file}"}])
            }
        }
    }
    weak = pooler(start=False, **config)
    weak.spawn()
    assert weak.wait_exit() == 2
    assert (
        f"pools.{EXAMPLE_DB}.users[0].password: {key_file} is a 1024-bit RSA key: "
        "at least 2048 bits are required" in weak.log_text()
    )
    # A key rotated on disk applies at the next reload.
    first = write_key(key_file, 2048)
    proc = token_user_pooler(pooler, pg, key_file)
    assert logs_in(proc, user, token(first, user))
    second = write_key(key_file, 2048)
    proc.reload_and_wait()
    assert logs_in(proc, user, token(second, user))
    assert not logs_in(proc, user, token(first, user))
    # A weak key, or none, fails the reload: the key in use stays.
    for bits, reason in (
        (1024, f"{key_file} is a 1024-bit RSA key"),
        (0, f"cannot read {key_file}"),
    ):
        if bits:
            replaced = write_key(key_file, bits)
        else:
            key_file.unlink()
        failures = proc.log_text().count("reload failed")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proc.log_text().count("reload failed") == failures:
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        failed = [line for line in proc.log_text().splitlines() if "reload failed" in line]
        assert f"pools.{EXAMPLE_DB}.users[0].password: {reason}" in failed[-1]
        assert logs_in(proc, user, token(second, user))
        if bits:
            assert not logs_in(proc, user, token(replaced, user))


def test_a_talos_client_id_with_control_characters_logs_in(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """The clientId is the session's application_name; a NUL in it broke the
    greeting's ParameterStatus, and libpq refused the login."""
    key = write_key(tmp_path / "issuer.pem", 2048)
    owner = {"username": "owner", "password": "", "server_username": pg.trust_user.name}
    proc = pooler(
        talos={"keys": [str(tmp_path / "issuer.pem")], "databases": [EXAMPLE_DB]},
        pools={EXAMPLE_DB: {"users": Replace([owner])}},
    )
    client_id = "billing\x00svc\n"
    claims = {
        "exp": int(time.time()) + 300,
        "clientId": client_id,
        "resource_access": {f"postgres.prod:{EXAMPLE_DB}": {"roles": ["owner"]}},
    }
    talos_token = sign(key, claims, {"alg": "RS256", "kid": "issuer"})
    with psycopg.connect(proc.dsn("talos", talos_token), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (pg.trust_user.name,)
        assert conn.info.parameter_status("application_name") == "billing?svc?"
    # The log keeps the clientId as the token says it, escaped.
    assert f"talos client {client_id!r} with role owner" in proc.log_text()
