"""libpq's password file (`~/.pgpass`, or the file `PGPASSFILE` names), read as libpq
reads it: which file, whether its mode lets it be used, and the password of the first
line that matches a connection. No I/O here: the caller stats and reads the file.

A line is `hostname:port:database:username:password`. Each of the first four fields is
`*` (anything) or the value itself, with `\\:` and `\\\\` standing for `:` and `\\`; the
password runs to the end of the line or to an unescaped `:`. Lines starting with `#`
are comments.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

PASSWORD_FILE_VARIABLE = "PGPASSFILE"
DEFAULT_FILE_NAME = ".pgpass"
LOCALHOST = "localhost"
# libpq ignores the file if the group or others have any permission on it.
INSECURE_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO
_FIELDS_BEFORE_PASSWORD = 4


def password_file_path(environ: Mapping[str, str], home: str | None) -> str | None:
    """`PGPASSFILE` when set and not empty, else `.pgpass` in the home directory."""
    named = environ.get(PASSWORD_FILE_VARIABLE)
    if named:
        return named
    if home:
        return os.path.join(home, DEFAULT_FILE_NAME)
    return None


def file_problem(path: str, mode: int) -> str | None:
    """Why a file of this `st_mode` must not be used, in libpq's words; None if it may."""
    if not stat.S_ISREG(mode):
        return f'WARNING: password file "{path}" is not a plain file'
    if mode & INSECURE_MODE_BITS:
        return (
            f'WARNING: password file "{path}" has group or world access; '
            "permissions should be u=rw (0600) or less"
        )
    return None


def host_names(host: str) -> tuple[str, ...]:
    """The hostname fields that stand for `host`. A Unix socket directory is also
    `localhost`, as libpq takes it for its default socket directory (there is no
    default one here: a socket is always named by its directory)."""
    if host.startswith("/"):
        return (LOCALHOST, host)
    return (host,)


def _split_fields(line: str) -> tuple[list[str], str] | None:
    """The four raw fields before the password (escapes kept), and the raw rest;
    None when the line has fewer than four unescaped `:`."""
    fields: list[str] = []
    start = 0
    while len(fields) < _FIELDS_BEFORE_PASSWORD:
        index = start
        while index < len(line) and line[index] != ":":
            index += 2 if line[index] == "\\" else 1
        if index >= len(line):
            return None
        fields.append(line[start:index])
        start = index + 1
    return fields, line[start:]


def _unescape(raw: str) -> str:
    """A field with each backslash dropped and the character after it kept."""
    out: list[str] = []
    index = 0
    while index < len(raw):
        if raw[index] == "\\":
            index += 1
        out.append(raw[index])
        index += 1
    return "".join(out)


def _field_matches(raw: str, wanted: tuple[str, ...]) -> bool:
    return raw == "*" or _unescape(raw) in wanted


def _password(raw: str) -> str:
    """The password field: up to an unescaped `:`; a backslash at the very end stays."""
    out: list[str] = []
    index = 0
    while index < len(raw) and raw[index] != ":":
        if raw[index] == "\\" and index + 1 < len(raw):
            index += 1
        out.append(raw[index])
        index += 1
    return "".join(out)


def find_password(text: str, host: str, port: int, database: str, user: str) -> str | None:
    """The password of the first line of `text` that matches, None if none does.

    It may be "" (a matching line with an empty password), which libpq takes as no
    password, and so should the caller."""
    wanted = (host_names(host), (str(port),), (database,), (user,))
    # Lines end at "\n" only, whatever else str.splitlines() would split on.
    for line in text.split("\n"):
        line = line.rstrip("\r\n")
        if not line or line.startswith("#"):
            continue
        split = _split_fields(line)
        if split is None:
            continue
        fields, rest = split
        if all(_field_matches(raw, names) for raw, names in zip(fields, wanted, strict=True)):
            return _password(rest)
    return None
