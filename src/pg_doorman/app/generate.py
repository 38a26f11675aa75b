"""`pg_doorman generate`: a configuration read from a running PostgreSQL.

One pool per database that accepts connections, and in each pool every role that can
log in with a password, its password being the hash PostgreSQL stores. Reading the
hashes (pg_shadow) needs a superuser. Without --password or PGPASSWORD the password
comes from libpq's password file (app/pgpass.py). With --reference, every key of the
configuration at its default instead (app/reference_config.py), PostgreSQL not asked.
The flags are PgDoorman's.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pg_doorman.app import pgpass
from pg_doorman.app.blocking_client import (
    BlockingConnection,
    ConnectError,
    ConnectParams,
    QueryError,
)
from pg_doorman.app.generated_config import FORMATS, GeneratedConfig, GeneratedUser, render
from pg_doorman.app.reference_config import render_reference
from pg_doorman.auth.md5 import is_md5_hash
from pg_doorman.auth.scram import is_scram_verifier

PROG = "pg_doorman generate"
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_POOL_SIZE = 40
INSUFFICIENT_PRIVILEGE = "42501"

DATABASES_SQL = (
    "SELECT datname FROM pg_catalog.pg_database "
    "WHERE NOT datistemplate AND datallowconn ORDER BY datname"
)
# pg_shadow lists the roles that can log in; only superusers may read it.
ROLES_SQL = "SELECT usename, passwd FROM pg_catalog.pg_shadow ORDER BY usename"


class GenerateError(Exception):
    """What stops the command, said in one line on stderr."""


def _env_port(name: str) -> int:
    value = os.environ.get(name)
    if not value:
        return 5432
    try:
        return int(value)
    except ValueError:
        raise GenerateError(f"{name}={value!r} is not a port number") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a pg_doorman configuration for a PostgreSQL server: a pool per "
        "database, its roles with their password hashes as users (needs a superuser). "
        "Connection flags default to PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE; "
        "without a password, ~/.pgpass (or PGPASSFILE) is read as libpq reads it.",
    )
    parser.add_argument("--host", help="PostgreSQL host or Unix socket directory (localhost)")
    parser.add_argument("-p", "--port", type=int, help="PostgreSQL port (5432)")
    parser.add_argument("-u", "--user", help="a superuser to connect as (the OS user name)")
    parser.add_argument("--password", help="its password; PGPASSWORD keeps it out of `ps`")
    parser.add_argument("-d", "--database", help="database to connect to (the user name)")
    parser.add_argument(
        "--ssl", action="store_true", help="connect over TLS (the certificate is not checked)"
    )
    parser.add_argument(
        "--pool-size", type=_positive, default=DEFAULT_POOL_SIZE, help="each user's pool_size (40)"
    )
    parser.add_argument(
        "-s", "--session-pool-mode", action="store_true", help="pool_mode = session"
    )
    parser.add_argument("-o", "--output", help="file to write (mode 0600); stdout without it")
    parser.add_argument("--server-host", help="server_host in the pools (the --host)")
    parser.add_argument("--no-comments", action="store_true", help="leave out the comments")
    parser.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        type=str.lower,
        help="output format; default: from the output file's extension (.yaml/.yml), else toml",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="write every configuration key at its default, with a comment each, "
        "without connecting to PostgreSQL (the connection and pool flags are ignored)",
    )
    # PgDoorman's Russian comments: refused below.
    parser.add_argument(
        "--ru", "--russian-comments", dest="ru", action="store_true", help=argparse.SUPPRESS
    )
    return parser


def _connect_params(args: argparse.Namespace) -> ConnectParams:
    user = args.user or os.environ.get("PGUSER") or getpass.getuser()
    # An empty password counts as none, as in libpq: the password file may give one.
    password = args.password if args.password is not None else os.environ.get("PGPASSWORD")
    return ConnectParams(
        host=args.host or os.environ.get("PGHOST") or "localhost",
        port=args.port if args.port is not None else _env_port("PGPORT"),
        user=user,
        database=args.database or os.environ.get("PGDATABASE") or user,
        password=password or None,
        tls=args.ssl,
    )


def _home_directory() -> str | None:
    home = os.path.expanduser("~")  # HOME, else the password database, as libpq
    return None if home == "~" else home


def password_from_file(params: ConnectParams) -> tuple[str, str] | None:
    """(password, the file it came from) for `params` from libpq's password file; None
    when there is no such file, no line matches, or the file may not be used (said on
    stderr, as libpq says it)."""
    path = pgpass.password_file_path(os.environ, _home_directory())
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # no file is the usual case: nothing to say
    problem = pgpass.file_problem(path, mode)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        print(f'{PROG}: WARNING: password file "{path}" ignored: {reason}', file=sys.stderr)
        return None
    password = pgpass.find_password(text, params.host, params.port, params.database, params.user)
    return (password, path) if password else None


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.output and Path(args.output).suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    return "toml"


def read_catalog(
    conn: BlockingConnection, user: str
) -> tuple[list[str], list[GeneratedUser], list[str]]:
    """(databases, users with a usable password, names of the roles left out)."""
    databases = [str(row[0]) for row in conn.query(DATABASES_SQL)]
    try:
        rows = conn.query(ROLES_SQL)
    except QueryError as exc:
        if exc.sqlstate == INSUFFICIENT_PRIVILEGE:
            raise GenerateError(
                f'user "{user}" may not read the password hashes in pg_shadow '
                f"({exc.message}): connect as a superuser with -u"
            ) from exc
        raise
    users: list[GeneratedUser] = []
    skipped: list[str] = []
    for name, stored in rows:
        if name is None:
            continue
        if stored is not None and (is_md5_hash(stored) or is_scram_verifier(stored)):
            users.append(GeneratedUser(name, stored))
        else:
            skipped.append(name)
    return databases, users, skipped


def write_private(path: str, text: str) -> None:
    """Replace `path` whole with `text`, mode 0600 whatever the umask (it holds
    password hashes); a reader never sees half a file."""
    target = Path(path)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def generate(args: argparse.Namespace) -> tuple[str, str]:
    """(the configuration text, a one-line summary for stderr)."""
    params = _connect_params(args)
    from_file = password_from_file(params) if params.password is None else None
    if from_file is not None:
        params = dataclasses.replace(params, password=from_file[0])
    try:
        with BlockingConnection.connect(params) as conn:
            databases, users, skipped = read_catalog(conn, params.user)
    except ConnectError as exc:
        # libpq's hint: a stale line in the file is the likely cause of a refusal.
        origin = ""
        if from_file is not None and exc.password_used:
            origin = f' (password from file "{from_file[1]}")'

        raise GenerateError(
            f'cannot log in to PostgreSQL at {params.where()} as "{params.user}": {exc}{origin}'
        ) from exc
    except QueryError as exc:
        raise GenerateError(f"reading the catalog failed: {exc.message}") from exc
    config = GeneratedConfig(
        source=params.where(),
        server_host=args.server_host or params.host,
        server_port=params.port,
        databases=tuple(databases),
        users=tuple(users),
        pool_mode="session" if args.session_pool_mode else "transaction",
        pool_size=args.pool_size,
        admin_password=secrets.token_urlsafe(18),
        server_tls=args.ssl,
    )
    summary = f"{len(databases)} pools, {len(users)} users each"
    if skipped:
        summary += f"; left out, no password: {', '.join(skipped)}"
    return render(config, output_format(args), comments=not args.no_comments), summary


def reference(args: argparse.Namespace) -> tuple[str, str]:
    """(every key at its default, a one-line summary); PostgreSQL is not asked."""
    text = render_reference(output_format(args), comments=not args.no_comments)
    return text, "reference configuration, every key at its default"


def generate_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.ru:
        print(
            f"{PROG}: --ru is not supported: the comments are in English only",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        text, summary = reference(args) if args.reference else generate(args)
        if args.output:
            write_private(args.output, text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except GenerateError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"{PROG}: cannot write {args.output or 'stdout'}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    where = args.output or "stdout"
    print(f"{PROG}: wrote {where}: {summary}", file=sys.stderr)
    return 0
