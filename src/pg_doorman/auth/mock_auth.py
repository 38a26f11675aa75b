"""The secret behind the salts of mock SCRAM exchanges (users that do not exist).

PostgreSQL derives a mock salt from the user name and a random value of its cluster
(`mock_auth_nonce`), so that a name gets the same salt at every attempt, as a real
user does, and nobody can compute it. Here the random value is made by the first
pooler process and handed down through the environment: workers and the process a
binary upgrade starts inherit it, so every process offers a name the same salt. An
operator may set it (any string) to keep the salts across restarts too.
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Final

MOCK_AUTH_SECRET_ENV: Final = "PG_DOORMAN_MOCK_AUTH_SECRET"

_secret: bytes | None = None


def mock_auth_secret() -> bytes:
    """The secret: from the environment, or made now and put there for the processes
    this one starts."""
    global _secret
    if _secret is None:
        text = os.environ.get(MOCK_AUTH_SECRET_ENV)
        if not text:
            text = secrets.token_hex(32)
            os.environ[MOCK_AUTH_SECRET_ENV] = text
        _secret = text.encode("utf-8")
    return _secret


def mock_salt(user: str, length: int) -> bytes:
    """The salt a mock SCRAM exchange offers `user`: the same at every attempt."""
    digest = hmac.digest(mock_auth_secret(), b"pg_doorman mock salt\0" + user.encode(), "sha256")
    return digest[:length]
