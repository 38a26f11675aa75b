"""Talos tokens: which key checks them, which roles count, which pool user they pick."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pg_doorman.auth.jwt import JwtError, sign
from pg_doorman.auth.talos import Talos, TalosKeyError, TalosToken
from pg_doorman.config.schema import TalosConfig


def new_key(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Talos, rsa.RSAPrivateKey, Path]:
    folder = tmp_path_factory.mktemp("talos")
    private = new_key(folder / "kid-1.pem")
    talos = Talos.load(TalosConfig(keys=[str(folder / "kid-1.pem")], databases=["billing", "crm"]))
    assert talos is not None
    return talos, private, folder


def token(key: rsa.RSAPrivateKey, kid: str = "kid-1", **claims: Any) -> str:
    body: dict[str, Any] = {"exp": int(time.time()) + 60, "clientId": "svc"}
    body.update(claims)
    return sign(key, body, {"alg": "RS256", "typ": "JWT", "kid": kid})


def access(**roles: list[str]) -> dict[str, dict[str, list[str]]]:
    return {f"postgres.prod:{db}": {"roles": granted} for db, granted in roles.items()}


def test_the_highest_role_on_the_configured_databases(
    keys: tuple[Talos, rsa.RSAPrivateKey, Path],
) -> None:
    talos, private, _ = keys
    signed = token(
        private,
        resource_access={
            **access(billing=["read_only"], crm=["read_write"], other=["owner"]),
            "no-colon": {"roles": ["owner"]},
        },
    )
    assert talos.read(signed) == TalosToken("svc", "read_write")


@pytest.mark.parametrize(
    ("claims", "kid", "reason"),
    [
        ({"resource_access": access(other=["owner"])}, "kid-1", "grants no role"),
        ({"resource_access": access(billing=["admin"])}, "kid-1", "unknown role 'admin'"),
        ({"resource_access": access(billing=["owner"]), "exp": 1}, "kid-1", "expired"),
        ({"resource_access": access(billing=["owner"])}, "kid-2", r"no \[talos\] key named"),
        ({"resource_access": {"x:billing": {"roles": "owner"}}}, "kid-1", "not a list"),
        ({"resource_access": access(billing=["owner"]), "clientId": 7}, "kid-1", "clientId"),
    ],
)
def test_refused_tokens(
    keys: tuple[Talos, rsa.RSAPrivateKey, Path], claims: dict[str, Any], kid: str, reason: str
) -> None:
    talos, private, _ = keys
    with pytest.raises(JwtError, match=reason):
        talos.read(token(private, kid, **claims))


def test_a_token_signed_by_another_key_is_refused(
    keys: tuple[Talos, rsa.RSAPrivateKey, Path], tmp_path: Path
) -> None:
    talos, _, _ = keys
    stranger = new_key(tmp_path / "kid-1.pem")
    with pytest.raises(JwtError, match="signature"):
        talos.read(token(stranger, resource_access=access(billing=["owner"])))
    header_without_kid = sign(stranger, {"exp": int(time.time()) + 60})
    with pytest.raises(JwtError, match="names no key"):
        talos.read(header_without_kid)


def test_the_pool_user_personal_then_service_then_role() -> None:
    users = {"alice", "srv-billing", "owner", "read_only"}
    pick = Talos.pool_user
    assert pick(TalosToken("alice", "owner"), users.__contains__) == ("alice", "personal")
    assert pick(TalosToken("billing", "owner"), users.__contains__) == ("srv-billing", "service")
    assert pick(TalosToken("bob", "read_only"), users.__contains__) == ("read_only", "role")
    assert pick(TalosToken("", "owner"), users.__contains__) == ("owner", "role")
    # A clientId with a control character never names a user.
    assert pick(TalosToken("alice\n", "owner"), lambda name: True) == ("owner", "role")


def test_keys_that_cannot_be_used_name_their_config_path(tmp_path: Path) -> None:
    assert Talos.load(TalosConfig()) is None
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(TalosKeyError) as caught:
        Talos.load(TalosConfig(keys=[str(tmp_path / "missing.pem"), str(tmp_path / "bad.pem")]))
    assert caught.value.key == "talos.keys[0]"
    new_key(tmp_path / "good.pem")
    with pytest.raises(TalosKeyError) as caught:
        Talos.load(TalosConfig(keys=[str(tmp_path / "good.pem"), str(tmp_path / "bad.pem")]))
    assert caught.value.key == "talos.keys[1]"
