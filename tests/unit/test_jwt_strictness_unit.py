"""The token verifier reads a token one way only: what it refuses that a lenient
reader would take (auth/jwt.py, auth/talos.py)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pg_doorman.auth.jwt import JwtError, TokenSigner, TokenVerifier
from pg_doorman.auth.talos import Talos
from pg_doorman.config.schema import TalosConfig

NOW = 1_800_000_000.0
HEADER = b'{"alg":"RS256","typ":"JWT"}'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("jwt") / "issuer.pem"
    path.write_bytes(public_pem(key))
    return key, path


def signed(key: rsa.RSAPrivateKey, claims: bytes, header: bytes = HEADER) -> str:
    """A token over these exact JSON bytes (a JSON encoder would not write them all)."""
    head, body = b64(header), b64(claims)
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64(signature)}"


def alice(exp: str, extra: str = "") -> bytes:
    return f'{{"preferred_username":"alice","exp":{exp}{extra}}}'.encode()


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        # Python's json reads these; JSON has no such numbers. NaN compares false with
        # everything: as exp or nbf it never expired and was always valid.
        (alice("NaN"), "claims is not JSON"),
        (alice("Infinity"), "claims is not JSON"),
        (alice("1900000000", ',"nbf":NaN'), "claims is not JSON"),
        (alice("1900000000", ',"nbf":-Infinity'), "claims is not JSON"),
        # A float's range ends: 1e400 reads as infinity, a longer integer did not fit.
        (alice("1e400"), "exp claim is not a number"),
        (alice("1" + "0" * 400), "exp claim is not a number"),
        (alice("1900000000", ',"nbf":-1e400'), "nbf claim is not a number"),
    ],
)
def test_exp_and_nbf_must_be_finite_json_numbers(
    issuer: tuple[rsa.RSAPrivateKey, Path], claims: bytes, reason: str
) -> None:
    key, path = issuer
    with pytest.raises(JwtError, match=reason):
        TokenVerifier.load(str(path)).check(signed(key, claims), "alice", NOW)


def test_a_member_named_twice_refuses_the_token(issuer: tuple[rsa.RSAPrivateKey, Path]) -> None:
    """Readers differ on which of two members counts: such a token reads one way here
    and another way elsewhere, so it reads no way at all."""
    key, path = issuer
    verifier = TokenVerifier.load(str(path))
    twice = b'{"preferred_username":"admin","preferred_username":"alice","exp":1900000000}'
    with pytest.raises(JwtError, match="claims has the member 'preferred_username' twice"):
        verifier.check(signed(key, twice), "alice", NOW)
    header = b'{"alg":"none","alg":"RS256"}'
    with pytest.raises(JwtError, match="header has the member 'alg' twice"):
        verifier.check(signed(key, alice("1900000000"), header), "alice", NOW)


def respelt(token: str) -> str:
    """The token with its signature spelt another way: 256 signature bytes take 342
    characters, whose last one carries 4 unused bits (16 spellings of one signature)."""
    head, body, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(other + "==") == base64.urlsafe_b64decode(signature + "==")
    return f"{head}.{body}.{other}"


def test_a_signature_spelt_another_way_is_refused(issuer: tuple[rsa.RSAPrivateKey, Path]) -> None:
    """Only the canonical spelling is the token the issuer signed."""
    key, path = issuer
    verifier = TokenVerifier.load(str(path))
    token = signed(key, alice("1900000000"))
    verifier.check(token, "alice", NOW)
    with pytest.raises(JwtError, match="signature is not canonical base64url"):
        verifier.check(respelt(token), "alice", NOW)


def test_a_critical_header_extension_refuses_the_token(
    issuer: tuple[rsa.RSAPrivateKey, Path],
) -> None:
    key, path = issuer
    header = b'{"alg":"RS256","crit":["exp"],"exp":1}'
    with pytest.raises(JwtError, match="crit"):
        TokenVerifier.load(str(path)).check(signed(key, alice("1900000000"), header), "alice", NOW)


def test_rsa_keys_below_2048_bits_are_refused(tmp_path: Path) -> None:
    """A modulus this small is within reach of factoring: its tokens could be anyone's.
    (1024 bits is the smallest key cryptography still generates.)"""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = tmp_path / "private.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "public.pem"
    public.write_bytes(public_pem(key))
    with pytest.raises(JwtError, match=f"{public} is a 1024-bit RSA key: at least 2048 bits"):
        TokenVerifier.load(str(public))
    with pytest.raises(JwtError, match=f"{private} is a 1024-bit RSA key: at least 2048 bits"):
        TokenSigner.load(str(private))


def test_the_log_quotes_an_unverified_header_value_shortly(
    issuer: tuple[rsa.RSAPrivateKey, Path],
) -> None:
    """Anyone can send a 16 KiB header: the reason logged for it stays one short line."""
    _, path = issuer
    verifier = TokenVerifier.load(str(path))
    long_alg = b64(json.dumps({"alg": "x" * 12_000}).encode())
    with pytest.raises(JwtError) as refused:
        verifier.check(f"{long_alg}.e30.e30", "alice", NOW)
    assert len(str(refused.value)) < 120
    assert str(refused.value).startswith("the token's algorithm is 'xxx")


def talos_token(key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    body: dict[str, Any] = {
        "exp": int(time.time()) + 60,
        "clientId": "svc",
        "resource_access": {"postgres.prod:billing": {"roles": ["read_only"]}},
    }
    body.update(claims)
    header = json.dumps({"alg": "RS256", "kid": kid}, separators=(",", ":")).encode()
    return signed(key, json.dumps(body).encode(), header)


def test_talos_tokens_get_the_same_checks(issuer: tuple[rsa.RSAPrivateKey, Path]) -> None:
    key, path = issuer
    talos = Talos.load(TalosConfig(keys=[str(path)], databases=["billing"]))
    assert talos is not None
    assert talos.read(talos_token(key, "issuer")).role == "read_only"
    with pytest.raises(JwtError, match="claims is not JSON"):
        talos.read(talos_token(key, "issuer", exp=float("nan")))
    with pytest.raises(JwtError, match=r"no \[talos\] key named 'kkkk") as unknown:
        talos.read(talos_token(key, "k" * 5_000))
    assert len(str(unknown.value)) < 120
    with pytest.raises(JwtError, match="signature is not canonical base64url"):
        talos.read(respelt(talos_token(key, "issuer")))


def test_a_client_id_with_control_characters_is_a_printable_application_name() -> None:
    from pg_doorman.auth.talos import session_application_name

    assert session_application_name("billing-svc") == "billing-svc"
    assert session_application_name("a\x00b\nc\x7fé") == "a?b?c?é"
