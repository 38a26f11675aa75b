"""SCRAM-SHA-256: RFC 7677 vectors, PostgreSQL's verifier format, passthrough, errors."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.auth import scram
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

b64 = base64.b64encode


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def reference_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) straight from RFC 5802."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return hmac256(salted, b"Client Key"), hmac256(salted, b"Server Key")


def reference_verifier(password: bytes, salt: bytes, iterations: int) -> str:
    client_key, server_key = reference_keys(password, salt, iterations)
    stored_key = hashlib.sha256(client_key).digest()
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def login(server: ScramServerSession, client: ScramClientSession) -> None:
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    final = server.handle_client_final(client.handle_server_first(first))
    client.handle_server_final(final)


def verifier_for(password: str, iterations: int = 4096) -> ScramVerifier:
    return ScramVerifier.parse(make_scram_verifier(password, iterations=iterations))


# ---- RFC 7677 section 3 ----------------------------------------------------------------

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT_B64 = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = f"n,,n=user,r={RFC_CLIENT_NONCE}"
RFC_SERVER_FIRST = f"r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},s={RFC_SALT_B64},i=4096"
RFC_CLIENT_FINAL = (
    f"c=biws,r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_verifier() -> ScramVerifier:
    salt = base64.b64decode(RFC_SALT_B64)
    return ScramVerifier.parse(make_scram_verifier("pencil", salt=salt, iterations=4096))


def test_rfc7677_client() -> None:
    client = ScramClientSession(password="pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first().decode() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST.encode()).decode() == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL.encode())  # verifies the signature


def test_rfc7677_server() -> None:
    server = ScramServerSession(rfc_verifier(), nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST.encode()).decode() == (
        RFC_SERVER_FIRST
    )
    assert server.handle_client_final(RFC_CLIENT_FINAL.encode()).decode() == RFC_SERVER_FINAL
    client_key, _ = reference_keys(b"pencil", base64.b64decode(RFC_SALT_B64), 4096)
    assert server.client_key == client_key


def test_rfc7677_passthrough_reproduces_the_proof() -> None:
    """With the recovered ClientKey (no password) the RFC's client-final comes out again."""
    server = ScramServerSession(rfc_verifier(), nonce=RFC_SERVER_NONCE)
    server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST.encode())
    server.handle_client_final(RFC_CLIENT_FINAL.encode())
    relay = ScramClientSession(
        client_key=server.client_key,
        server_key=rfc_verifier().server_key,
        nonce=RFC_CLIENT_NONCE,
        username="user",
    )
    assert relay.handle_server_first(RFC_SERVER_FIRST.encode()).decode() == RFC_CLIENT_FINAL
    relay.handle_server_final(RFC_SERVER_FINAL.encode())


# ---- verifiers ----------------------------------------------------------------------


def test_make_scram_verifier_fixed_salt() -> None:
    salt = b"0123456789abcdef"
    assert make_scram_verifier("secret", salt=salt) == reference_verifier(b"secret", salt, 4096)
    assert make_scram_verifier("secret", salt=salt, iterations=10) == reference_verifier(
        b"secret", salt, 10
    )


def test_make_scram_verifier_defaults() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("secret"))
    assert verifier.iterations == 4096
    assert len(verifier.salt) == 16
    assert verifier != ScramVerifier.parse(make_scram_verifier("secret"))  # fresh salt
    with pytest.raises(ValueError):
        make_scram_verifier("secret", iterations=0)
    with pytest.raises(ValueError):
        make_scram_verifier("secret", salt=b"")


# Stored by PostgreSQL 18 (password_encryption = scram-sha-256) for these passwords.
POSTGRES_VERIFIERS = [
    (
        "test",
        "SCRAM-SHA-256$4096:xSRfg5TKsu2CB9Fe60W8HQ==$Asoolp6s6VE4mdjKN0paa5u6dnuRAkcOp05fw6Acz8E="
        ":92CPFq53xttdrbIOXDYkwS+u/clxMNtstzb+X0zIwwA=",
    ),
    (
        "pässwörd",
        "SCRAM-SHA-256$4096:b5+76qcBKK0BTphNL2XR2A==$/aCLxLyRDSIoJac6cKrbVfJDYd7RxN8EbfJK/5UureI="
        ":GzFn2ZkVEfHG+GgUaCKhHFaMR/GV6wGmMGgeYE5pvBo=",
    ),
    (  # soft hyphen mapped to nothing, Roman numeral nine normalised to "IX"
        "I\u00adX\u2168",
        "SCRAM-SHA-256$4096:58Wm6YT8CLbVgzHlLgqXUA==$RPa05dEj39KfONaJNAC3XHTReiB4jE2NHMknxE+NSdo="
        ":ZxNmN/kxPRlo8JYMXzWjsHZ1l2RwZ7ceSE0os0kLHd4=",
    ),
    (  # no-break space mapped to a space
        "a\u00a0b",
        "SCRAM-SHA-256$4096:YJi1at0Tz/exLMMf4abrzA==$LB8DgnQc48UWqYkiOk01qNjB92NYJJ7BxLtRf8fWg4g="
        ":9DUsnRna7pnlLUebHMHROnaQitnpWpQw9wpsR9/bVj4=",
    ),
    (  # a control character: SASLprep fails, the raw bytes are used
        "a\u0007b\u00e9",
        "SCRAM-SHA-256$4096:2r3Fz6cmFDPIcnyB71BtXg==$dPdElnZSPUrinbCkRy8nyK9hAWN2nfphfd1yp2cwYDY="
        ":7ZznWwSLNHyUkfbGzvDvGEVrufcH3JR5cF7uC4TEI3M=",
    ),
    (  # right-to-left text ending in a left-to-right letter: bidi check fails, raw bytes
        "\u0627\u0644\u0639a",
        "SCRAM-SHA-256$4096:bZ21UUPlafh3kjzkFmEatg==$0mcpcyfkhTLmTsG3VA9XI4a/q/Swf4YkK1tIIpkP3X0="
        ":wGto2WIimDks09XJxf0yiwEJM+pZaEdHhmE6zND7P/s=",
    ),
    (  # only a soft hyphen: empty after mapping, raw bytes
        "\u00ad",
        "SCRAM-SHA-256$4096:MzVqR/D0R4bmTAK7XMh4wg==$o678B9s/1Yl+k8RrDko27IfUB8+xV4TJS87K6Ri/lQI="
        ":O+1RwoxJ+HkU8CXwjPVSxLOr3JK7iRN/VYXrP9mcMZ8=",
    ),
]


@pytest.mark.parametrize(("password", "stored"), POSTGRES_VERIFIERS)
def test_verifiers_match_postgres(password: str, stored: str) -> None:
    verifier = ScramVerifier.parse(stored)
    assert verifier.to_text() == stored
    mine = make_scram_verifier(password, salt=verifier.salt, iterations=verifier.iterations)
    assert mine == stored
    login(ScramServerSession(verifier), ScramClientSession(password=password))


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("a\u0007b", b"a\x07b"),  # ASCII is never touched
        ("I\u00adX", b"IX"),
        ("user\u00a0name", b"user name"),
        ("\u2168", b"IX"),
        ("\u00aa", b"a"),  # NFKC
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw
        # When SASLprep fails the raw bytes are used, so NFKC's effect on U+2168 and
        # U+FE8D (Arabic alef, isolated form) shows which way each case went.
        ("a\u0007\u2168", "a\u0007\u2168".encode()),  # control character
        ("\U000e0001x\u2168", "\U000e0001x\u2168".encode()),  # tagging character
        ("\u0221\u2168", "\u0221\u2168".encode()),  # unassigned in Unicode 3.2
        ("\ufe8d\u0644", "\u0627\u0644".encode()),  # right-to-left only: allowed
        ("\ufe8da\u0644", "\ufe8da\u0644".encode()),  # mixed directions
        ("\ufe8d\u06441", "\ufe8d\u06441".encode()),  # must end right-to-left
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "md5" + "0" * 32,
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$+1:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4_096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",  # empty salt
        "SCRAM-SHA-256$4096:c2FsdA$" + "A" * 43 + "=:" + "A" * 43 + "=",  # bad padding
        "SCRAM-SHA-256$4096:c2FsdA==$!!:!!",
        "SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==",  # keys of the wrong length
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=$x",
    ],
)
def test_bad_verifiers(bad: str) -> None:
    assert not is_scram_verifier(bad)
    with pytest.raises(ScramError):
        ScramVerifier.parse(bad)


def test_good_verifier_shape() -> None:
    good = "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "="
    assert is_scram_verifier(good)
    verifier = ScramVerifier.parse(good)
    assert (verifier.iterations, verifier.salt) == (4096, b"salt")
    assert verifier.stored_key == verifier.server_key == b"\x00" * 32


# ---- full exchanges ----------------------------------------------------------------


def test_password_login_and_passthrough() -> None:
    verifier = verifier_for("s3cret")
    first_server = ScramServerSession(verifier)
    login(first_server, ScramClientSession(password="s3cret"))
    # The pooler now logs in to another server holding the same verifier with the key only.
    key = first_server.client_key
    login(ScramServerSession(verifier), ScramClientSession(client_key=key))
    login(
        ScramServerSession(verifier),
        ScramClientSession(client_key=key, server_key=verifier.server_key),
    )


def test_passthrough_against_another_verifier_is_refused_by_the_server() -> None:
    original = verifier_for("s3cret")
    server = ScramServerSession(original)
    login(server, ScramClientSession(password="s3cret"))
    # Same password, different salt: the key no longer fits, as with a real backend.
    other = ScramServerSession(verifier_for("s3cret"))
    relay = ScramClientSession(client_key=server.client_key)
    first = other.handle_client_first("SCRAM-SHA-256", relay.client_first())
    with pytest.raises(AuthenticationFailed):
        other.handle_client_final(relay.handle_server_first(first))


def test_wrong_password() -> None:
    server = ScramServerSession(verifier_for("right"))
    client = ScramClientSession(password="wrong")
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(client.handle_server_first(first))
    with pytest.raises(ScramError):
        server.client_key  # noqa: B018 - nothing recovered from a failed login
    with pytest.raises(ScramError):
        server.handle_client_final(b"c=biws,r=x,p=" + b64(b"\x00" * 32))  # no retries


def test_y_flag_client_is_accepted() -> None:
    """A client that supports channel binding but wasn't offered it sends "y,,"."""
    salt = b"saltsaltsaltsalt"
    verifier = ScramVerifier.parse(make_scram_verifier("pw", salt=salt, iterations=4096))
    server = ScramServerSession(verifier, nonce="SERVER")
    first = server.handle_client_first("SCRAM-SHA-256", b"y,,n=,r=CLIENT").decode()
    assert first == f"r=CLIENTSERVER,s={b64(salt).decode()},i=4096"
    without_proof = f"c={b64(b'y,,').decode()},r=CLIENTSERVER"
    auth_message = f"n=,r=CLIENT,{first},{without_proof}".encode()
    client_key, server_key = reference_keys(b"pw", salt, 4096)
    signature = hmac256(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = server.handle_client_final(f"{without_proof},p={b64(proof).decode()}".encode())
    assert final == b"v=" + b64(hmac256(server_key, auth_message))
    assert server.client_key == client_key


def test_client_first_shape_and_username_escaping() -> None:
    first = ScramClientSession(password="x").client_first().decode()
    assert first.startswith("n,,n=,r=")
    nonce = first.removeprefix("n,,n=,r=")
    assert len(base64.b64decode(nonce)) == 18
    assert ScramClientSession(password="x", nonce="N", username="a,b=c").client_first() == (
        b"n,,n=a=2Cb=3Dc,r=N"
    )


def test_server_nonce_is_random_and_extends_the_client_nonce() -> None:
    verifier = verifier_for("x")
    firsts = [
        ScramServerSession(verifier).handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
        for _ in range(2)
    ]
    assert firsts[0] != firsts[1]
    nonce = firsts[0].decode().split(",")[0].removeprefix("r=")
    assert nonce.startswith("abc") and len(base64.b64decode(nonce[3:])) == 18


def test_user_name_in_client_first_is_ignored() -> None:
    verifier = verifier_for("pw")
    login(ScramServerSession(verifier), ScramClientSession(password="pw", username="whoever"))


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=30))
def test_any_password_round_trips(password: str) -> None:
    verifier = verifier_for(password, iterations=16)
    server = ScramServerSession(verifier)
    login(server, ScramClientSession(password=password))
    login(ScramServerSession(verifier), ScramClientSession(client_key=server.client_key))


# ---- malformed input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "message", "reason"),
    [
        ("SCRAM-SHA-1", b"n,,n=,r=abc", "unsupported SASL mechanism"),
        ("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        ("SCRAM-SHA-256", b"x,,n=,r=abc", "channel binding flag"),
        ("SCRAM-SHA-256", b"n,a=admin,n=,r=abc", "authorization identit"),
        ("SCRAM-SHA-256", b"n,,m=ext,n=,r=abc", "extensions"),
        ("SCRAM-SHA-256", b"n,,r=abc", "n="),
        ("SCRAM-SHA-256", b"n,,n=", "r="),
        ("SCRAM-SHA-256", b"n,,r=abc,n=", "n="),
        ("SCRAM-SHA-256", b"n,,n=,r=", "nonce"),
        ("SCRAM-SHA-256", b"n,,n=,r=a b", "nonce"),
        ("SCRAM-SHA-256", "n,,n=,r=\u00e9".encode(), "nonce"),
        ("SCRAM-SHA-256", b"n,,n=,r=abc,junk", "malformed attribute"),
        ("SCRAM-SHA-256", b"garbage", "malformed"),
        ("SCRAM-SHA-256", b"", "empty"),
        ("SCRAM-SHA-256", b"n,,n=,r=abc\x00", "NUL"),
    ],
)
def test_malformed_client_first(mechanism: str, message: bytes, reason: str) -> None:
    server = ScramServerSession(verifier_for("x"))
    with pytest.raises(ScramError, match=reason):
        server.handle_client_first(mechanism, message)


def test_client_first_extensions_after_the_nonce_are_ignored() -> None:
    server = ScramServerSession(verifier_for("x"), nonce="S")
    assert server.handle_client_first("SCRAM-SHA-256", b"n,,n=u,r=C,x=ext").startswith(b"r=CS,")


PROOF = b64(b"\x00" * 32).decode()


@pytest.mark.parametrize(
    ("final", "reason"),
    [
        (f"c=biws,r=CLIWRONG,p={PROOF}", "nonce mismatch"),
        (f"c=biws,r=CLI,p={PROOF}", "nonce mismatch"),  # the server's part missing
        (f"c=eSws,r=CLISRV,p={PROOF}", "channel binding"),  # "y,," after "n,,"
        (f"c=!!!!,r=CLISRV,p={PROOF}", "base64"),
        ("c=biws,r=CLISRV", "p="),
        ("c=biws,r=CLISRV,p=!!!", "base64"),
        (f"c=biws,r=CLISRV,p={b64(b'short').decode()}", "32 bytes"),
        (f"r=CLISRV,c=biws,p={PROOF}", "c="),
        (f"c=biws,p={PROOF}", "r="),
        (f"c=biws,r=CLISRV,p={PROOF},x=1", "p="),
        (f"c=biws,r=CLISRV,,p={PROOF}", "malformed attribute"),
        ("", "empty"),
    ],
)
def test_malformed_client_final(final: str, reason: str) -> None:
    server = ScramServerSession(verifier_for("x"), nonce="SRV")
    server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=CLI")
    with pytest.raises(ScramError, match=reason):
        server.handle_client_final(final.encode())


def test_server_session_order() -> None:
    server = ScramServerSession(verifier_for("x"))
    with pytest.raises(ScramError):
        server.handle_client_final(b"c=biws,r=x,p=" + b64(b"\x00" * 32))
    with pytest.raises(ScramError):
        server.client_key  # noqa: B018
    server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        ScramServerSession(verifier_for("x"), nonce="has,comma")


@pytest.mark.parametrize(
    ("server_first", "reason"),
    [
        ("r=zzzSRV,s=c2FsdA==,i=4096", "does not extend"),
        ("r=abc,s=c2FsdA==,i=4096", "does not extend"),  # nothing added by the server
        ("r=abcSRV,s=c2FsdA==,i=0", "iteration"),
        ("r=abcSRV,s=c2FsdA==,i=-1", "iteration"),
        ("r=abcSRV,s=c2FsdA==,i=many", "iteration"),
        ("r=abcSRV,s=c2FsdA==,i=", "iteration"),
        ("r=abcSRV,s=!!,i=4096", "base64"),
        ("r=abcSRV,s=,i=4096", "salt"),
        ("r=abcSRV,i=4096,s=c2FsdA==", "s="),
        ("r=abcSRV,s=c2FsdA==", "i="),
        ("s=c2FsdA==,r=abcSRV,i=4096", "r="),
        ("m=ext,r=abcSRV,s=c2FsdA==,i=4096", "extensions"),
        ("r=abc SRV,s=c2FsdA==,i=4096", "nonce"),
        ("", "empty"),
    ],
)
def test_malformed_server_first(server_first: str, reason: str) -> None:
    client = ScramClientSession(password="x", nonce="abc")
    with pytest.raises(ScramError, match=reason):
        client.handle_server_first(server_first.encode())


def started_client(**kwargs: object) -> tuple[ScramServerSession, ScramClientSession, bytes]:
    verifier = verifier_for("right")
    server = ScramServerSession(verifier)
    client = ScramClientSession(**kwargs)  # type: ignore[arg-type]
    first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    return server, client, client.handle_server_first(first)


def test_server_final_errors() -> None:
    _, client, _ = started_client(password="right")
    with pytest.raises(AuthenticationFailed, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")
    for bad, error in [
        (b"v=" + b64(b"\x00" * 32), AuthenticationFailed),  # forged signature
        (b"v=!!", ScramError),
        (b"v=" + b64(b"short"), ScramError),
        (b"x=1", ScramError),
        (b"v=" + b64(b"\x00" * 32) + b",x=1", ScramError),
    ]:
        _, client, _ = started_client(password="right")
        with pytest.raises(error):
            client.handle_server_final(bad)


def test_client_session_order() -> None:
    client = ScramClientSession(password="x", nonce="abc")
    with pytest.raises(ScramError):
        client.handle_server_final(b"v=" + b64(b"\x00" * 32))
    client.handle_server_first(b"r=abcdef,s=c2FsdA==,i=1")
    with pytest.raises(ScramError):
        client.handle_server_first(b"r=abcdef,s=c2FsdA==,i=1")


def test_passthrough_without_server_key_still_checks_the_format() -> None:
    server = ScramServerSession(verifier_for("right"))
    login(server, ScramClientSession(password="right"))
    _, relay, _ = started_client(client_key=server.client_key)
    relay.handle_server_final(b"v=" + b64(b"\x00" * 32))  # nothing to verify it with
    _, relay, _ = started_client(client_key=server.client_key)
    with pytest.raises(ScramError):
        relay.handle_server_final(b"v=nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"password": "x", "client_key": b"\x00" * 32},
        {"password": "x", "server_key": b"\x00" * 32},
        {"client_key": b"\x00" * 31},
        {"client_key": b"\x00" * 32, "server_key": b"\x00"},
        {"password": "x", "nonce": "a,b"},
    ],
)
def test_client_session_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises((ValueError, ScramError)):
        ScramClientSession(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 200])
def test_hmac_matches_hmac_sha256(key_length: int) -> None:
    key = bytes(range(key_length % 256)) * (key_length // 256 + 1)
    key = key[:key_length]
    for data in (b"", b"n=,r=abc", b"x" * 1000):
        expected = hmac.digest(key, data, "sha256")
        assert scram._hmac(key, data) == expected
        assert scram._hmac(key, data) == expected  # again, from the cached pads
