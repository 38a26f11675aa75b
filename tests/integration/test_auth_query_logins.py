"""auth_query: what a login that fails may leave behind, and what it may reveal."""

from __future__ import annotations

import uuid

from test_auth_query import auth_query_pooler, auth_query_row, current_user, pool_users, refused

from helpers import EXAMPLE_DB, EXAMPLE_PASSWORD, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import quote_ident

# PostgreSQL keeps NAMEDATALEN - 1 bytes of a role name and truncates longer ones.
ROLE_NAME_MAX = 63


def first_auth_request(proc: PoolerProcess, user: str) -> int:
    """The authentication request code the pooler answers a StartupMessage with."""
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": user, "database": EXAMPLE_DB}))
        msg_type, payload = conn.read_message()
    finally:
        conn.close_socket()
    assert msg_type == b"R"
    return int.from_bytes(payload[:4], "big")


def test_failed_logins_of_looked_up_users_open_no_pool(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A pool (and its min_pool_size servers) is for a user that logged in, not for a
    name that merely exists in PostgreSQL."""
    no_password = f"aq_nopass_{uuid.uuid4().hex[:8]}"
    pg.create_role(no_password)
    try:
        proc = auth_query_pooler(pooler, pg, min_pool_size=1)
        for user in (pg.md5_user, pg.scram_user):
            assert refused(proc, user.name, "wrong").sqlstate == "28P01"
        assert refused(proc, no_password, "").sqlstate == "28P01"
        row = auth_query_row(proc)
        assert (row["auth_failure"], row["auth_success"]) == ("3", "0")
        assert (row["dynamic_pools_created"], row["dynamic_pools_current"]) == ("0", "0")
        assert pool_users(proc) == [pg.trust_user.name]
        # The first login that succeeds opens the user's pool, once.
        user = pg.scram_user
        assert current_user(proc, user.name, user.password) == user.name
        assert current_user(proc, user.name, user.password) == user.name
        assert pool_users(proc) == sorted([pg.trust_user.name, user.name])
        assert auth_query_row(proc)["dynamic_pools_created"] == "1"
    finally:
        for started in pooler.processes:
            started.stop()
        pg.psql(f"DROP ROLE {quote_ident(no_password)}")


def test_unknown_and_passwordless_users_are_asked_for_scram_as_postgresql_asks(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PostgreSQL's mock authentication for a role that does not exist (or has no
    password) is a SCRAM exchange (its default password_encryption): an MD5 challenge
    would set such names apart from the SCRAM roles of the database."""
    no_password = f"aq_nopass_{uuid.uuid4().hex[:8]}"
    pg.create_role(no_password)
    try:
        proc = auth_query_pooler(pooler, pg)
        scram_request = first_auth_request(proc, pg.scram_user.name)
        assert scram_request == w.AUTH_SASL
        assert first_auth_request(proc, f"aq_nobody_{uuid.uuid4().hex[:8]}") == scram_request
        assert first_auth_request(proc, no_password) == scram_request
        # The whole exchange runs, and ends as a wrong password does.
        for name in (f"aq_nobody_{uuid.uuid4().hex[:8]}", no_password, pg.scram_user.name):
            error = refused(proc, name, "wrong")
            assert (error.sqlstate, error.message) == (
                "28P01",
                f'password authentication failed for user "{name}"',
            )
    finally:
        for started in pooler.processes:
            started.stop()
        pg.psql(f"DROP ROLE {quote_ident(no_password)}")


def test_a_name_postgresql_would_truncate_is_not_looked_up(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Compared as `name`, a longer user name would find the role of its first 63
    bytes: every such alias would log in as that role with a pool of its own."""
    role = ("aq_long_" + uuid.uuid4().hex).ljust(ROLE_NAME_MAX, "x")
    assert len(role) == ROLE_NAME_MAX
    pg.create_role(role, password=EXAMPLE_PASSWORD)
    try:
        proc = auth_query_pooler(pooler, pg)
        for suffix in ("a", "b"):
            error = refused(proc, role + suffix, EXAMPLE_PASSWORD)
            assert error.sqlstate == "28P01"
        row = auth_query_row(proc)
        assert (row["executor_queries"], row["dynamic_pools_created"]) == ("0", "0")
        assert current_user(proc, role, EXAMPLE_PASSWORD) == role
        assert pool_users(proc) == sorted([pg.trust_user.name, role])
    finally:
        for started in pooler.processes:
            started.stop()
        pg.psql(f"DROP ROLE {quote_ident(role)}")
