"""md5 and SCRAM-SHA-256 against known vectors, and the passthrough round trip."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pg_doorman.auth.md5 import (
    is_md5_hash,
    md5_password_hash,
    md5_password_response,
    md5_salted_response,
    verify_md5_response,
)
from pg_doorman.auth.scram import (
    AuthenticationFailed,
    ScramClientSession,
    ScramError,
    ScramServerSession,
    ScramVerifier,
    is_scram_verifier,
    make_scram_verifier,
    saslprep,
)

# ---- md5 -------------------------------------------------------------------


def test_md5_hash_matches_postgres_formula() -> None:
    expected = "md5" + hashlib.md5(b"secretpostgres").hexdigest()
    assert md5_password_hash("secret", "postgres") == expected
    assert is_md5_hash(expected)
    assert not is_md5_hash("md5xyz")
    assert not is_md5_hash("SCRAM-SHA-256$4096:aa$bb:cc")


def test_md5_challenge_response() -> None:
    salt = b"\x01\x02\x03\x04"
    stored = md5_password_hash("secret", "postgres")
    inner = hashlib.md5(b"secretpostgres").hexdigest().encode()
    expected = "md5" + hashlib.md5(inner + salt).hexdigest()
    assert md5_salted_response(stored, salt) == expected
    assert md5_password_response("secret", "postgres", salt) == expected
    assert verify_md5_response(stored, salt, expected.encode() + b"\x00")
    assert verify_md5_response(stored, salt, expected)
    assert not verify_md5_response(stored, salt, b"md5" + b"0" * 32)
    assert not verify_md5_response(stored, b"\x00\x00\x00\x00", expected)
    assert not verify_md5_response("", salt, expected)


# ---- SCRAM: RFC 7677 section 3 ------------------------------------------------

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FINAL = (
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_verifier() -> ScramVerifier:
    return ScramVerifier.parse(make_scram_verifier("pencil", salt=RFC_SALT, iterations=4096))


def test_rfc7677_client_side() -> None:
    client = ScramClientSession(password="pencil", nonce=RFC_CLIENT_NONCE)
    # PostgreSQL clients send an empty user name; the RFC vector names "user". The
    # proof covers client-first-bare, so rebuild it the RFC's way for this check.
    client._client_first_bare = f"n=user,r={RFC_CLIENT_NONCE}"
    server_first = f"r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    assert client.handle_server_first(server_first.encode()).decode() == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL.encode())


def test_rfc7677_server_side() -> None:
    server = ScramServerSession(rfc_verifier(), nonce=RFC_SERVER_NONCE)
    first = server.handle_client_first("SCRAM-SHA-256", f"n,,n=user,r={RFC_CLIENT_NONCE}".encode())
    assert first.decode() == (
        f"r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert server.handle_client_final(RFC_CLIENT_FINAL.encode()).decode() == RFC_SERVER_FINAL
    # ClientKey = HMAC(SaltedPassword, "Client Key")
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def test_verifier_format_and_parse_round_trip() -> None:
    text = make_scram_verifier("secret", salt=b"0123456789abcdef", iterations=4096)
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", b"0123456789abcdef", 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    expected = (
        f"SCRAM-SHA-256$4096:{b64(b'0123456789abcdef').decode()}"
        f"${b64(hashlib.sha256(client_key).digest()).decode()}:{b64(server_key).decode()}"
    )
    assert text == expected
    assert ScramVerifier.parse(text).to_text() == text
    assert is_scram_verifier(text)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$x:c2FsdA==$a:b",
        "SCRAM-SHA-256$4096:c2FsdA==$!!:!!",
        "SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==",  # keys of the wrong length
        "SCRAM-SHA-1$4096:c2FsdA==$YQ==:YQ==",
    ],
)
def test_bad_verifiers(bad: str) -> None:
    assert not is_scram_verifier(bad)
    with pytest.raises(ScramError):
        ScramVerifier.parse(bad)


def login(server: ScramServerSession, client: ScramClientSession) -> None:
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    final = server.handle_client_final(client.handle_server_first(first))
    client.handle_server_final(final)


def test_passthrough_with_recovered_client_key() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("s3cret"))
    first_server = ScramServerSession(verifier)
    login(first_server, ScramClientSession(password="s3cret"))
    # The pooler now logs in elsewhere with only the recovered key.
    relay = ScramClientSession(client_key=first_server.client_key, server_key=verifier.server_key)
    login(ScramServerSession(verifier), relay)


def test_wrong_password_fails() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("right"))
    server = ScramServerSession(verifier)
    client = ScramClientSession(password="wrong")
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(client.handle_server_first(first))


def test_client_detects_forged_server_signature() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("right"))
    server = ScramServerSession(verifier)
    client = ScramClientSession(password="right")
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    server.handle_client_final(client.handle_server_first(first))
    with pytest.raises(AuthenticationFailed):
        client.handle_server_final(b"v=" + base64.b64encode(b"\x00" * 32))
    with pytest.raises(AuthenticationFailed):
        client.handle_server_final(b"e=invalid-proof")


@pytest.mark.parametrize(
    ("mechanism", "first"),
    [
        ("SCRAM-SHA-1", b"n,,n=,r=abc"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"),
        ("SCRAM-SHA-256", b"x,,n=,r=abc"),
        ("SCRAM-SHA-256", b"n,,n=,m=ext,r=abc"),
        ("SCRAM-SHA-256", b"n,,r=abc"),
        ("SCRAM-SHA-256", b"n,,n=,r="),
        ("SCRAM-SHA-256", b"garbage"),
        ("SCRAM-SHA-256", b"\xff\xfe"),
    ],
)
def test_malformed_client_first(mechanism: str, first: bytes) -> None:
    server = ScramServerSession(ScramVerifier.parse(make_scram_verifier("x")))
    with pytest.raises(ScramError):
        server.handle_client_first(mechanism, first)


@pytest.mark.parametrize(
    "final",
    [
        b"c=biws,r=WRONGNONCE,p=" + base64.b64encode(b"\x00" * 32),
        b"c=eSws,r={nonce},p=" + base64.b64encode(b"\x00" * 32),  # "y,," for a "n,," login
        b"c=biws,r={nonce}",
        b"c=biws,r={nonce},p=!!!",
    ],
)
def test_malformed_client_final(final: bytes) -> None:
    server = ScramServerSession(ScramVerifier.parse(make_scram_verifier("x")), nonce="SRV")
    server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=CLI")
    with pytest.raises(ScramError):
        server.handle_client_final(final.replace(b"{nonce}", b"CLISRV"))


def test_client_rejects_server_nonce_not_extending_ours() -> None:
    client = ScramClientSession(password="x", nonce="abc")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=zzz,s=c2FsdA==,i=4096")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=abcdef,s=c2FsdA==,i=0")


def test_saslprep() -> None:
    assert saslprep("pencil") == b"pencil"
    assert saslprep("I\u00adX") == b"IX"  # soft hyphen maps to nothing
    assert saslprep("user\u00a0name") == b"user name"  # non-ASCII space maps to space
    assert saslprep("\u2168") == b"IX"  # NFKC
    assert saslprep("a\u0007b") == "a\u0007b".encode()  # prohibited: raw bytes, as PostgreSQL
