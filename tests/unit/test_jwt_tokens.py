"""Tokens as passwords: what the pooler accepts and signs (auth/jwt.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pg_doorman.auth.jwt import (
    LEEWAY,
    SERVER_TOKEN_LIFETIME,
    JwtError,
    TokenSigner,
    TokenVerifier,
    sign,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path, Path]:
    """An RSA key pair: the key, its public PEM file and its private PEM file."""
    directory = tmp_path_factory.mktemp("jwt")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = directory / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private = directory / "private.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, public, private


def claims(**overrides: object) -> dict[str, object]:
    return {"preferred_username": "alice", "exp": NOW + 60, **overrides}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_valid_token(keys: tuple[rsa.RSAPrivateKey, Path, Path]) -> None:
    key, public, _ = keys
    verifier = TokenVerifier.load(str(public))
    verifier.check(sign(key, claims()), "alice", NOW)
    verifier.check(sign(key, claims(nbf=NOW - 1, iat=NOW - 1)), "alice", NOW)


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(preferred_username="bob"), "for 'bob', not for 'alice'"),
        ({"preferred_username": "alice"}, "no exp claim"),
        (claims(exp="tomorrow"), "exp claim is not a number"),
        (claims(exp=NOW - LEEWAY - 1), "expired"),
        (claims(nbf=NOW + LEEWAY + 1), "not valid yet"),
        (claims(nbf="soon"), "nbf claim is not a number"),
    ],
)
def test_claims_that_refuse(
    keys: tuple[rsa.RSAPrivateKey, Path, Path], token_claims: dict[str, object], reason: str
) -> None:
    key, public, _ = keys
    with pytest.raises(JwtError, match=reason):
        TokenVerifier.load(str(public)).check(sign(key, token_claims), "alice", NOW)


def test_the_clock_leeway(keys: tuple[rsa.RSAPrivateKey, Path, Path]) -> None:
    key, public, _ = keys
    verifier = TokenVerifier.load(str(public))
    verifier.check(sign(key, claims(exp=NOW - LEEWAY + 1)), "alice", NOW)
    verifier.check(sign(key, claims(nbf=NOW + LEEWAY - 1)), "alice", NOW)


def test_another_key_and_a_changed_payload_are_refused(
    keys: tuple[rsa.RSAPrivateKey, Path, Path],
) -> None:
    key, public, _ = keys
    verifier = TokenVerifier.load(str(public))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(JwtError, match="signature does not match"):
        verifier.check(sign(other, claims()), "alice", NOW)
    head, _, signature = sign(key, claims()).split(".")
    forged = b64(json.dumps(claims(preferred_username="alice", exp=NOW + 10**6)).encode())
    with pytest.raises(JwtError, match="signature does not match"):
        verifier.check(f"{head}.{forged}.{signature}", "alice", NOW)


def test_the_header_cannot_choose_the_algorithm(
    keys: tuple[rsa.RSAPrivateKey, Path, Path],
) -> None:
    _, public, _ = keys
    verifier = TokenVerifier.load(str(public))
    body = b64(json.dumps(claims()).encode())
    none_head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    with pytest.raises(JwtError, match="'none', not RS256"):
        verifier.check(f"{none_head}.{body}.", "alice", NOW)
    # HS256 keyed with the public key's PEM: the classic confusion attack.
    hs_head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    mac = hmac.new(public.read_bytes(), f"{hs_head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(JwtError, match="'HS256', not RS256"):
        verifier.check(f"{hs_head}.{body}.{b64(mac)}", "alice", NOW)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "three dot-separated parts"),
        ("a.b", "three dot-separated parts"),
        ("!!!.e30.x", "header is not base64url"),
        (b64(b"not json") + ".e30.x", "header is not JSON"),
        (b64(b"[1]") + ".e30.x", "header is not a JSON object"),
        ("x" * 20_000, "too long"),
    ],
)
def test_malformed_tokens(
    keys: tuple[rsa.RSAPrivateKey, Path, Path], token: str, reason: str
) -> None:
    _, public, _ = keys
    with pytest.raises(JwtError, match=reason):
        TokenVerifier.load(str(public)).check(token, "alice", NOW)


def test_signed_tokens_verify_for_two_minutes(keys: tuple[rsa.RSAPrivateKey, Path, Path]) -> None:
    _, public, private = keys
    signer = TokenSigner.load(str(private))
    verifier = TokenVerifier.load(str(public))
    token = signer.token_for("svc", NOW)
    verifier.check(token, "svc", NOW)
    verifier.check(token, "svc", NOW + SERVER_TOKEN_LIFETIME)
    with pytest.raises(JwtError, match="expired"):
        verifier.check(token, "svc", NOW + SERVER_TOKEN_LIFETIME + LEEWAY + 1)
    assert signer.token_for("svc") != token  # issued now, not at NOW
    assert (
        abs(
            json.loads(base64.urlsafe_b64decode(signer.token_for("svc").split(".")[1] + "==="))[
                "iat"
            ]
            - time.time()
        )
        < 5
    )


def test_keys_compare_by_content(
    keys: tuple[rsa.RSAPrivateKey, Path, Path], tmp_path: Path
) -> None:
    _, public, private = keys
    assert TokenVerifier.load(str(public)) == TokenVerifier.load(str(public))
    copy = tmp_path / "copy.pem"
    copy.write_bytes(public.read_bytes())
    assert TokenVerifier.load(str(copy)).digest == TokenVerifier.load(str(public)).digest
    assert TokenSigner.load(str(private)) == TokenSigner.load(str(private))


def test_unusable_key_files(keys: tuple[rsa.RSAPrivateKey, Path, Path], tmp_path: Path) -> None:
    _, public, private = keys
    with pytest.raises(JwtError, match="cannot read"):
        TokenVerifier.load(str(tmp_path / "missing.pem"))
    with pytest.raises(JwtError, match="not a PEM public key"):
        TokenVerifier.load(str(private))
    with pytest.raises(JwtError, match="not an unencrypted PEM private key"):
        TokenSigner.load(str(public))
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(JwtError, match="not an RSA public key"):
        TokenVerifier.load(str(ec_file))
