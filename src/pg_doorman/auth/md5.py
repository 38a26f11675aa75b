"""MD5 password authentication, as PostgreSQL does it.

The stored form is ``"md5" + hex(md5(password + user))``; the challenge answer is
``"md5" + hex(md5(hex_part_of_stored + salt))``. The answer only needs the stored hash,
which is what lets the pooler log in to a backend with the hash alone ("pass-the-hash").
"""

from __future__ import annotations

import hashlib
import hmac
import re

# PostgreSQL only recognises lower-case hex (isMD5 in its crypt code).
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")


def is_md5_hash(value: str) -> bool:
    return _MD5_HASH.fullmatch(value) is not None


def md5_password_hash(password: str, user: str) -> str:
    """What PostgreSQL stores: ``"md5" + hex(md5(password + user))``."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_salted_response(stored_hash: str, salt: bytes) -> str:
    """The answer to an MD5 challenge computed from the stored hash (pass-the-hash)."""
    if not is_md5_hash(stored_hash):
        raise ValueError("not an md5 password hash")
    return "md5" + hashlib.md5(stored_hash[3:].encode("ascii") + salt).hexdigest()


def md5_password_response(password: str, user: str, salt: bytes) -> str:
    """The answer to an MD5 challenge computed from a plaintext password."""
    return md5_salted_response(md5_password_hash(password, user), salt)


def verify_md5_response(stored_hash: str, salt: bytes, response: bytes | str) -> bool:
    """Check a client's PasswordMessage body against the stored hash, in constant time.

    The body is a C string, so one trailing NUL is tolerated.
    """
    if not is_md5_hash(stored_hash):
        return False
    if isinstance(response, str):
        response = response.encode("utf-8")
    response = response.removesuffix(b"\x00")
    expected = md5_salted_response(stored_hash, salt).encode("ascii")
    return hmac.compare_digest(expected, response)
