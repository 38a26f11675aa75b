"""Recognise `DEALLOCATE name` / `DEALLOCATE ALL` sent as a simple query.

Drivers (pgx, for one) deallocate protocol-level statements with SQL. Behind the pooler
those names never existed on any server, so the pooler answers for them itself.
"""

from __future__ import annotations

import re

from pg_doorman.protocol import codes

_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(?:(all)|"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*',
    re.IGNORECASE,
)


def parse_deallocate(query: bytes) -> tuple[bool, bytes] | None:
    """(True, b"") for DEALLOCATE ALL, (False, name) for one statement, else None.

    `query` is the Query message body without its trailing NUL.
    """
    if len(query) >= codes.DEALLOCATE_MAX:
        return None
    match = _DEALLOCATE.fullmatch(query)
    if match is None:
        return None
    if match.group(1) is not None:
        return True, b""
    if match.group(2) is not None:
        return False, match.group(2).replace(b'""', b'"')
    return False, match.group(3).lower()  # unquoted identifiers fold to lower case
