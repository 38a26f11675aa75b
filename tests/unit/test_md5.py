"""MD5 password hashing and challenge responses, against independently computed values."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_doorman.auth.md5 import (
    is_md5_hash,
    md5_password_hash,
    md5_password_response,
    md5_salted_response,
    verify_md5_response,
)

SALT = b"\x01\x02\x03\x04"


def reference_hash(password: str, user: str) -> str:
    return "md5" + hashlib.md5(password.encode() + user.encode()).hexdigest()


def reference_response(password: str, user: str, salt: bytes) -> str:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


@pytest.mark.parametrize(
    ("password", "user"),
    [("secret", "postgres"), ("test", "example_user_md5"), ("", "u"), ("pässwörd", "jörg")],
)
def test_md5_password_hash(password: str, user: str) -> None:
    assert md5_password_hash(password, user) == reference_hash(password, user)


def test_md5_password_hash_known_value() -> None:
    # The hex part is md5('secretpostgres'), a fixed value to catch argument order.
    assert md5_password_hash("secret", "postgres") == "md5" + "53f48b7c4b76a86ce72276c5755f217d"
    assert hashlib.md5(b"secretpostgres").hexdigest() == "53f48b7c4b76a86ce72276c5755f217d"


def test_md5_salted_response_is_pass_the_hash() -> None:
    stored = md5_password_hash("secret", "postgres")
    expected = reference_response("secret", "postgres", SALT)
    assert md5_salted_response(stored, SALT) == expected
    assert md5_password_response("secret", "postgres", SALT) == expected
    assert md5_salted_response(stored, b"\xff\x00\xff\x00") != expected


def test_md5_salted_response_needs_an_md5_hash() -> None:
    with pytest.raises(ValueError):
        md5_salted_response("SCRAM-SHA-256$4096:c2FsdA==$a:b", SALT)


def test_verify_md5_response() -> None:
    stored = md5_password_hash("secret", "postgres")
    answer = reference_response("secret", "postgres", SALT)
    assert verify_md5_response(stored, SALT, answer)
    assert verify_md5_response(stored, SALT, answer.encode())
    assert verify_md5_response(stored, SALT, answer.encode() + b"\x00")  # C string body
    assert not verify_md5_response(stored, SALT, answer.encode() + b"\x00\x00")
    assert not verify_md5_response(stored, SALT, answer.upper())
    assert not verify_md5_response(stored, SALT, "md5" + "0" * 32)
    assert not verify_md5_response(stored, SALT, b"")
    assert not verify_md5_response(stored, b"\x00\x00\x00\x00", answer)  # other salt
    assert not verify_md5_response(md5_password_hash("other", "postgres"), SALT, answer)
    assert not verify_md5_response("", SALT, answer)  # no stored hash: never true
    assert not verify_md5_response("plaintext", SALT, answer)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("md5" + "0123456789abcdef" * 2, True),
        ("md5" + "0123456789ABCDEF" * 2, False),  # PostgreSQL only knows lower case
        ("md5" + "0" * 31, False),
        ("md5" + "0" * 33, False),
        ("md5" + "g" * 32, False),
        ("MD5" + "0" * 32, False),
        ("md5" + "0" * 32 + "\n", False),
        ("", False),
        ("SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==", False),
    ],
)
def test_is_md5_hash(value: str, expected: bool) -> None:
    assert is_md5_hash(value) is expected


@given(st.text(max_size=40), st.text(min_size=1, max_size=20), st.binary(min_size=4, max_size=4))
def test_round_trip_property(password: str, user: str, salt: bytes) -> None:
    stored = md5_password_hash(password, user)
    assert is_md5_hash(stored)
    answer = md5_password_response(password, user, salt)
    assert answer == reference_response(password, user, salt)
    assert verify_md5_response(stored, salt, answer.encode() + b"\x00")
