"""Test helpers: the example PostgreSQL cluster, the pooler process, a raw protocol client.

The example cluster mirrors the fixture of PgDoorman's own test-suite: database
`example_db` and users with password "test", authenticated by md5, SCRAM-SHA-256 and trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pg_doorman.app.embedded_pg import LocalPostgres, free_port, quote_ident, quote_literal

from .pgwire import md5_password_hash, scram_verifier

EXAMPLE_DB = "example_db"
EXAMPLE_PASSWORD = "test"
MD5_USER = "example_user_md5"
SCRAM_USER = "example_user_scram"
TRUST_USER = "example_user_trust"
# A NOLOGIN role owning the database and its objects; every example user is a member.
OWNER_ROLE = "example_owner"
ITEMS_ROWS = 100


@dataclass(frozen=True)
class UserSpec:
    """One example user as PostgreSQL knows it."""

    name: str
    password: str  # the plaintext a client sends
    method: str  # how PostgreSQL authenticates it over TCP: md5, scram-sha-256 or trust
    stored: str | None  # rolpassword in pg_authid (md5 hash / SCRAM verifier); None if unset

    @property
    def pooler_password(self) -> str:
        """The value for the pooler config's `password`: passthrough auth needs exactly
        what PostgreSQL stores; trust users get ""."""
        return self.stored or ""


def example_hba_lines(superuser: str = "postgres") -> list[str]:
    lines = ["local all all trust"]
    for cidr in ("127.0.0.1/32", "::1/128"):
        lines += [
            f"host all {superuser} {cidr} trust",
            f"host all {TRUST_USER} {cidr} trust",
            f"host all {MD5_USER} {cidr} md5",
            f"host all all {cidr} scram-sha-256",
        ]
    return lines


class ExamplePostgres(LocalPostgres):
    """LocalPostgres plus the example database and users (see start_example_postgres)."""

    database = EXAMPLE_DB
    users: dict[str, UserSpec]

    @property
    def md5_user(self) -> UserSpec:
        return self.users[MD5_USER]

    @property
    def scram_user(self) -> UserSpec:
        return self.users[SCRAM_USER]

    @property
    def trust_user(self) -> UserSpec:
        return self.users[TRUST_USER]

    def user_dsn(
        self, user: str | UserSpec, password: str | None = None, database: str = EXAMPLE_DB
    ) -> str:
        """DSN for an example user, with its real password unless one is given."""
        spec = user if isinstance(user, UserSpec) else self.users[user]
        return self.dsn(spec.name, spec.password if password is None else password, database)


def start_example_postgres(
    root: Path, *, port: int | None = None, bin_dir: Path | None = None
) -> ExamplePostgres:
    """initdb + start a cluster under `root` and create the example objects.

    `bin_dir` defaults to find_pg_bin(), which honours PG_DOORMAN_TEST_PG_BIN.
    """
    server = ExamplePostgres(
        root / "data",
        port=port or free_port(),
        bin_dir=bin_dir,
        hba_lines=example_hba_lines(),
    )
    try:
        server.init()
        server.start()
        _create_example_objects(server)
    except BaseException:
        server.cleanup()
        raise
    return server


def _create_example_objects(server: ExamplePostgres) -> None:
    md5_hash = md5_password_hash(EXAMPLE_PASSWORD, MD5_USER)
    verifier = scram_verifier(EXAMPLE_PASSWORD)
    server.create_role(OWNER_ROLE, login=False)
    server.create_role(MD5_USER, password=md5_hash)
    server.create_role(SCRAM_USER, password=verifier)
    server.create_role(TRUST_USER)
    server.create_database(EXAMPLE_DB, owner=OWNER_ROLE)
    members = ", ".join(quote_ident(u) for u in (MD5_USER, SCRAM_USER, TRUST_USER))
    server.psql(f"GRANT {quote_ident(OWNER_ROLE)} TO {members};")
    server.psql(
        f"SET ROLE {quote_ident(OWNER_ROLE)};\n"
        "CREATE TABLE items (id int PRIMARY KEY, name text);\n"
        f"INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, {ITEMS_ROWS}) g;\n",
        database=EXAMPLE_DB,
    )
    names = ", ".join(quote_literal(u) for u in (MD5_USER, SCRAM_USER, TRUST_USER))
    out = server.psql(f"SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ({names})")
    stored: dict[str, str | None] = {}
    for line in out.splitlines():
        name, _, password = line.partition("|")
        stored[name] = password or None
    # PostgreSQL keeps pre-hashed values as they are; anything else means our math is off.
    assert stored[MD5_USER] == md5_hash, stored
    assert stored[SCRAM_USER] == verifier, stored
    server.users = {
        MD5_USER: UserSpec(MD5_USER, EXAMPLE_PASSWORD, "md5", stored[MD5_USER]),
        SCRAM_USER: UserSpec(SCRAM_USER, EXAMPLE_PASSWORD, "scram-sha-256", stored[SCRAM_USER]),
        TRUST_USER: UserSpec(TRUST_USER, EXAMPLE_PASSWORD, "trust", stored[TRUST_USER]),
    }
