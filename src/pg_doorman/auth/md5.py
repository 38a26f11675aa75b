"""MD5 password authentication, as PostgreSQL does it."""

from __future__ import annotations

import hashlib
import hmac
import re

_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")


def is_md5_hash(value: str) -> bool:
    return bool(_MD5_HASH.fullmatch(value))


def md5_password_hash(password: str, user: str) -> str:
    """What PostgreSQL stores: "md5" + hex(md5(password + user))."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_salted_response(stored_hash: str, salt: bytes) -> str:
    """The answer to an MD5 challenge, from the stored hash (pass-the-hash)."""
    return "md5" + hashlib.md5(stored_hash[3:].encode() + salt).hexdigest()


def md5_password_response(password: str, user: str, salt: bytes) -> str:
    return md5_salted_response(md5_password_hash(password, user), salt)


def verify_md5_response(stored_hash: str, salt: bytes, response: bytes | str) -> bool:
    if not is_md5_hash(stored_hash):
        return False
    if isinstance(response, str):
        response = response.encode()
    response = response.rstrip(b"\x00")
    expected = md5_salted_response(stored_hash, salt).encode()
    return hmac.compare_digest(expected, response)
