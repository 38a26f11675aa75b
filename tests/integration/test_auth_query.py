"""auth_query: users not in the config are looked up in PostgreSQL at login.

The example cluster's md5 and SCRAM users are left out of the pooler's config here, so
only the lookup can let them in; the pooler reads their hashes from pg_shadow as the
superuser. Passwords changed by a test are put back in its teardown.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from helpers import EXAMPLE_DB, EXAMPLE_PASSWORD, ExamplePostgres, UserSpec
from helpers import pgwire as w
from helpers.console import admin_console, show_table
from helpers.metrics import scrape, value
from helpers.pooler import PoolerFactory, PoolerProcess, Replace
from pg_doorman.app.embedded_pg import free_port, quote_ident, quote_literal

LOOKUP = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"


def auth_query_pooler(
    pooler: PoolerFactory,
    pg: ExamplePostgres,
    *,
    general: dict[str, Any] | None = None,
    web: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    **auth_query: Any,
) -> PoolerProcess:
    """A pooler whose only configured user is the trust one; everyone else is looked up."""
    settings: dict[str, Any] = {"query": LOOKUP, "user": pg.superuser, "min_interval": "0"}
    settings.update(auth_query)
    pool_section: dict[str, Any] = {
        "users": Replace([{"username": pg.trust_user.name, "password": "", "pool_size": 2}]),
        "auth_query": settings,
    }
    pool_section.update(pool or {})
    sections: dict[str, Any] = {"pools": {EXAMPLE_DB: pool_section}}
    if general:
        sections["general"] = general
    if web:
        sections["web"] = web
    return pooler(**sections)


def current_user(proc: PoolerProcess, user: str, password: str) -> str:
    with psycopg.connect(proc.dsn(user, password), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select current_user").fetchone()
        assert row is not None
        return str(row[0])


def refused(proc: PoolerProcess, user: str, password: str) -> w.ServerError:
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, user, EXAMPLE_DB, password)
    return info.value


def auth_query_row(proc: PoolerProcess) -> dict[str, str | None]:
    console = admin_console(proc)
    try:
        rows = show_table(console, "AUTH_QUERY")
    finally:
        console.close()
    assert [row["database"] for row in rows] == [EXAMPLE_DB]
    return rows[0]


def pool_users(proc: PoolerProcess) -> list[str | None]:
    console = admin_console(proc)
    try:
        return sorted(str(row["user"]) for row in show_table(console, "POOLS"))
    finally:
        console.close()


@pytest.fixture
def restore_password(pg: ExamplePostgres) -> Iterator[list[UserSpec]]:
    """Users whose password a test changes get their stored hash back afterwards."""
    changed: list[UserSpec] = []
    yield changed
    for user in changed:
        encryption = "md5" if user.stored and user.stored.startswith("md5") else "scram-sha-256"
        pg.psql(
            f"SET password_encryption = {quote_literal(encryption)};\n"
            f"ALTER ROLE {quote_ident(user.name)} PASSWORD {quote_literal(user.stored or '')};"
        )


def set_password(pg: ExamplePostgres, user: UserSpec, password: str) -> None:
    encryption = "md5" if user.stored and user.stored.startswith("md5") else "scram-sha-256"
    pg.psql(
        f"SET password_encryption = {quote_literal(encryption)};\n"
        f"ALTER ROLE {quote_ident(user.name)} PASSWORD {quote_literal(password)};"
    )


# --- logins ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_a_looked_up_user_logs_in_and_reaches_the_server_as_itself(
    pg: ExamplePostgres, pooler: PoolerFactory, kind: str
) -> None:
    user = pg.md5_user if kind == "md5" else pg.scram_user
    proc = auth_query_pooler(pooler, pg)
    # Passthrough: the backend login uses the looked-up hash (md5) or the ClientKey of
    # this very SCRAM login.
    assert current_user(proc, user.name, user.password) == user.name
    assert user.name in pool_users(proc)
    row = auth_query_row(proc)
    assert row["auth_success"] == "1"
    assert row["executor_queries"] == "1"
    assert row["dynamic_pools_current"] == "1"
    assert row["dynamic_pools_created"] == "1"
    # A second login is answered from the cache.
    assert current_user(proc, user.name, user.password) == user.name
    row = auth_query_row(proc)
    assert (row["cache_hits"], row["executor_queries"]) == ("1", "1")


def setting(proc: PoolerProcess, user: UserSpec, name: str) -> str:
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        row = conn.execute(f"show {name}").fetchone()
        assert row is not None
        return str(row[0])


def test_a_startup_parameters_column_sets_startup_parameters_of_the_users_pool(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Over [general]'s and the pool's; reserved and oversized ones are left out."""
    md5, scram = pg.md5_user, pg.scram_user
    lookup = (
        "SELECT usename, passwd, CASE usename"
        f' WHEN {quote_literal(md5.name)} THEN \'{{"work_mem": "7MB", "role": "x"}}\''
        f" WHEN {quote_literal(scram.name)} THEN"
        "   '{\"search_path\": \"' || repeat('x', 9600) || '\", \"jit\": false}'"
        " END AS startup_parameters FROM pg_shadow WHERE usename = $1"
    )
    port = free_port()
    proc = auth_query_pooler(
        pooler,
        pg,
        query=lookup,
        general={"startup_parameters": {"lock_timeout": "3s"}},
        pool={"startup_parameters": {"work_mem": "5MB"}},
        web={"enabled": True, "host": "127.0.0.1", "port": port},
    )
    assert setting(proc, md5, "work_mem") == "7MB"
    assert setting(proc, md5, "lock_timeout") == "3s"
    assert setting(proc, scram, "work_mem") == "5MB"
    assert setting(proc, scram, "jit") == "off"
    assert setting(proc, scram, "search_path") == '"$user", public'
    log = proc.log_text()
    assert f"auth_query: user {md5.name!r}: startup parameter 'role' ignored: reserved" in log
    assert f"auth_query: user {scram.name!r}: startup parameters search_path left out" in log
    console = admin_console(proc)
    try:
        rows = show_table(console, "STARTUP_PARAMETERS")
    finally:
        console.close()
    shown = {
        (r["user"], r["parameter"]): (r["value"], r["source"], r["state"])
        for r in rows
        if r["database"] == EXAMPLE_DB
    }
    assert shown[(md5.name, "work_mem")] == ("7MB", "auth_query", "applied")
    assert shown[(md5.name, "lock_timeout")] == ("3s", "general", "applied")
    assert shown[(scram.name, "work_mem")] == ("5MB", "pool", "applied")
    assert shown[(scram.name, "jit")] == ("off", "auth_query", "applied")
    assert shown[(scram.name, "search_path")][1:] == ("auth_query", "dropped_due_to_budget")
    assert (md5.name, "role") not in shown

    # A reload keeps each user's own parameters over the pool's new ones.
    config = proc.config
    config["pools"][EXAMPLE_DB]["startup_parameters"] = {"work_mem": "6MB"}
    proc.reload_and_wait(config)
    assert setting(proc, md5, "work_mem") == "7MB"
    assert setting(proc, scram, "work_mem") == "6MB"
    assert setting(proc, scram, "jit") == "off"
    # Each looked-up row counted once, by why something was left out: neither the
    # logins from the cache nor the reload count it again.
    dropped = scrape(port)["pg_doorman_startup_parameters_dropped"]
    name = "pg_doorman_startup_parameters_dropped_total"
    pool = {"pool": EXAMPLE_DB}
    assert value(dropped, name, reason="auth_query_invalid_entry", **pool) == 1
    assert value(dropped, name, reason="auth_query_oversize", **pool) == 1
    assert len(dropped) == 2


@pytest.mark.parametrize("kind", ["md5", "scram"])
def test_a_wrong_password_and_an_unknown_user_are_refused_alike(
    pg: ExamplePostgres, pooler: PoolerFactory, kind: str
) -> None:
    user = pg.md5_user if kind == "md5" else pg.scram_user
    proc = auth_query_pooler(pooler, pg)
    wrong = refused(proc, user.name, "wrong")
    nobody = refused(proc, "no_such_user", "wrong")
    for error, name in ((wrong, user.name), (nobody, "no_such_user")):
        assert (error.sqlstate, error.severity) == ("28P01", "FATAL")
        assert error.message == f'password authentication failed for user "{name}"'
    row = auth_query_row(proc)
    assert row["auth_failure"] == "2"
    assert row["auth_success"] == "0"
    # The wrong password fetched the user again (min_interval is 0 here).
    assert (row["executor_queries"], row["cache_refetches"]) == ("3", "1")
    # The trust user from the config is unaffected and needs no lookup.
    assert current_user(proc, pg.trust_user.name, "") == pg.trust_user.name
    assert auth_query_row(proc)["executor_queries"] == "3"


def test_configured_users_take_priority_over_the_lookup(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = pooler(
        pools={
            EXAMPLE_DB: {
                "auth_query": {"query": LOOKUP, "user": pg.superuser},
            }
        }
    )
    assert current_user(proc, user.name, user.password) == user.name
    row = auth_query_row(proc)
    assert (row["executor_queries"], row["cache_misses"], row["auth_success"]) == ("0", "0", "0")


def test_concurrent_logins_of_one_user_share_one_lookup(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.scram_user
    proc = auth_query_pooler(pooler, pg, pool_size=4)

    async def main() -> list[str]:
        async def one() -> str:
            conn = await asyncpg.connect(proc.dsn(user.name, user.password))
            try:
                return str(await conn.fetchval("select current_user"))
            finally:
                await conn.close()

        return await asyncio.gather(*(one() for _ in range(12)))

    assert asyncio.run(main()) == [user.name] * 12
    row = auth_query_row(proc)
    assert row["executor_queries"] == "1"
    assert row["auth_success"] == "12"


def test_pg_hba_refuses_before_any_lookup(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    user = pg.md5_user
    hba = (
        f"host all {user.name} 127.0.0.1/32 reject\n"
        "host all all 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    proc = auth_query_pooler(pooler, pg, general={"pg_hba": hba})
    error = refused(proc, user.name, user.password)
    assert error.sqlstate == "28000"
    assert error.message.startswith("pg_hba.conf rejects connection for host")
    assert "rejected by pg_hba line 1" in proc.log_text()
    assert auth_query_row(proc)["executor_queries"] == "0"
    # Others still look up and log in.
    assert current_user(proc, pg.scram_user.name, pg.scram_user.password) == pg.scram_user.name


def test_a_user_without_a_password_cannot_log_in(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    name = f"aq_nopass_{uuid.uuid4().hex[:8]}"
    pg.create_role(name)
    try:
        proc = auth_query_pooler(pooler, pg)
        error = refused(proc, name, "anything")
        assert error.sqlstate == "28P01"
        row = auth_query_row(proc)
        assert (row["executor_queries"], row["auth_failure"]) == ("1", "1")
    finally:
        pg.psql(f"DROP ROLE {quote_ident(name)}")


def test_the_documented_security_definer_lookup(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """docs/configuration.md's function, called by an unprivileged role; it also turns
    an expired password (VALID UNTIL in the past) into NULL."""
    suffix = uuid.uuid4().hex[:8]
    schema, lookup_user, expired = f"aq_{suffix}", f"aq_lookup_{suffix}", f"aq_old_{suffix}"
    pg.create_role(lookup_user, password="lookup-secret")
    pg.create_role(expired, password=EXAMPLE_PASSWORD)
    pg.psql(f"ALTER ROLE {quote_ident(expired)} VALID UNTIL '2001-01-01'")
    function = f"""
        CREATE SCHEMA {schema};
        CREATE FUNCTION {schema}.lookup(username name)
        RETURNS TABLE (usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
          SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
          FROM pg_authid WHERE rolname = username AND rolcanlogin $$;
        REVOKE ALL ON FUNCTION {schema}.lookup(name) FROM PUBLIC;
        GRANT USAGE ON SCHEMA {schema} TO {lookup_user};
        GRANT EXECUTE ON FUNCTION {schema}.lookup(name) TO {lookup_user};
    """
    pg.psql(function, database=EXAMPLE_DB)
    try:
        proc = auth_query_pooler(
            pooler,
            pg,
            query=f"SELECT usename, passwd FROM {schema}.lookup($1)",
            user=lookup_user,
            password="lookup-secret",
        )
        user = pg.scram_user
        assert current_user(proc, user.name, user.password) == user.name
        assert refused(proc, expired, EXAMPLE_PASSWORD).sqlstate == "28P01"
        row = auth_query_row(proc)
        assert (row["auth_success"], row["auth_failure"], row["executor_errors"]) == (
            "1",
            "1",
            "0",
        )
    finally:
        for started in pooler.processes:  # its lookup connection is the role's session
            started.stop()
        pg.psql(f"DROP SCHEMA {schema} CASCADE", database=EXAMPLE_DB)
        pg.psql(f"DROP ROLE {quote_ident(lookup_user)}; DROP ROLE {quote_ident(expired)};")


def test_a_looked_up_password_never_names_a_key_file(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Token keys come from the config only: the database can't make the pooler open a
    file of its choosing."""
    proc = auth_query_pooler(
        pooler, pg, query="SELECT 'jwt-pkey-fpath:/etc/hostname' AS passwd WHERE $1 <> ''"
    )
    error = refused(proc, pg.md5_user.name, "anything")
    assert error.sqlstate == "28P01"
    proc.wait_for_log("a looked-up password names a JWT key")
    assert auth_query_row(proc)["auth_failure"] == "1"


# --- the cache ---------------------------------------------------------------------------------


def test_a_changed_md5_password_works_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory, restore_password: list[UserSpec]
) -> None:
    """The cached hash fails the new password; the same answer is checked against a
    fresh copy, so the first login with the new password succeeds."""
    user = pg.md5_user
    proc = auth_query_pooler(pooler, pg)
    assert current_user(proc, user.name, user.password) == user.name
    restore_password.append(user)
    set_password(pg, user, "changed-1")
    assert current_user(proc, user.name, "changed-1") == user.name
    assert refused(proc, user.name, user.password).sqlstate == "28P01"
    row = auth_query_row(proc)
    assert row["cache_refetches"] == "2"  # the new password's login, the old one's
    assert (row["auth_success"], row["auth_failure"]) == ("2", "1")


def test_a_changed_scram_password_works_from_the_next_attempt(
    pg: ExamplePostgres, pooler: PoolerFactory, restore_password: list[UserSpec]
) -> None:
    """A SCRAM proof is bound to the salt the client was sent, so the attempt that
    meets the stale verifier fails; it fetches the new one for the next attempt."""
    user = pg.scram_user
    proc = auth_query_pooler(pooler, pg)
    assert current_user(proc, user.name, user.password) == user.name
    restore_password.append(user)
    set_password(pg, user, "changed-2")
    assert refused(proc, user.name, "changed-2").sqlstate == "28P01"
    assert current_user(proc, user.name, "changed-2") == user.name
    assert auth_query_row(proc)["cache_refetches"] == "1"


def test_refetches_are_rate_limited_by_min_interval(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(pooler, pg, min_interval="1h")
    assert current_user(proc, user.name, user.password) == user.name
    for _ in range(3):
        assert refused(proc, user.name, "wrong").sqlstate == "28P01"
    row = auth_query_row(proc)
    assert (row["cache_refetches"], row["cache_rate_limited"]) == ("0", "3")
    assert row["executor_queries"] == "1"


def test_a_user_not_found_is_remembered_for_cache_failure_ttl(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    name = f"aq_late_{uuid.uuid4().hex[:8]}"
    proc = auth_query_pooler(pooler, pg, cache_failure_ttl="3s")
    assert refused(proc, name, EXAMPLE_PASSWORD).sqlstate == "28P01"
    started = time.monotonic()
    pg.create_role(name, password=EXAMPLE_PASSWORD)
    try:
        error = refused(proc, name, EXAMPLE_PASSWORD)
        assert time.monotonic() - started < 3, "too slow to see the negative cache"
        assert error.sqlstate == "28P01"
        assert auth_query_row(proc)["executor_queries"] == "1"
        time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        assert current_user(proc, name, EXAMPLE_PASSWORD) == name
        assert auth_query_row(proc)["executor_queries"] == "2"
    finally:
        pg.psql(f"DROP ROLE {quote_ident(name)}")


# --- dedicated mode ----------------------------------------------------------------------------


def test_dedicated_mode_shares_one_pool_logged_in_as_server_user(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    server_user = pg.md5_user
    port = free_port()
    proc = auth_query_pooler(
        pooler,
        pg,
        # Users' own startup parameters can't apply to servers every user shares.
        query=LOOKUP.replace(" FROM", """, '{"work_mem": "9MB"}' AS startup_parameters FROM"""),
        server_user=server_user.name,
        server_password=server_user.password,
        pool_size=1,
        web={"enabled": True, "host": "127.0.0.1", "port": port},
    )
    # Listed before any login: its login is known, so min_pool_size could be opened.
    assert pool_users(proc) == sorted([pg.trust_user.name, server_user.name])
    pids = set()
    for user in (pg.scram_user, pg.scram_user):
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
            row = conn.execute("select current_user, pg_backend_pid()").fetchone()
            assert row is not None
            assert row[0] == server_user.name
            pids.add(row[1])
    assert len(pids) == 1  # one server, shared
    assert setting(proc, pg.scram_user, "work_mem") != "9MB"
    dropped = scrape(port)["pg_doorman_startup_parameters_dropped"]
    name = "pg_doorman_startup_parameters_dropped_total"
    assert value(dropped, name, pool=EXAMPLE_DB, reason="dedicated_mode") == 1  # one lookup
    assert f"auth_query: user {pg.scram_user.name!r}: startup_parameters ignored" in (
        proc.log_text()
    )
    assert refused(proc, pg.scram_user.name, "wrong").sqlstate == "28P01"
    row = auth_query_row(proc)
    assert (row["auth_success"], row["auth_failure"]) == ("3", "1")
    assert row["dynamic_pools_current"] == "0"
    assert pool_users(proc) == sorted([pg.trust_user.name, server_user.name])


# --- failures ----------------------------------------------------------------------------------


def test_a_failing_lookup_says_so_and_the_pooler_serves_the_rest(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = auth_query_pooler(pooler, pg, query="SELECT passwd FROM no_such_table WHERE u = $1")
    error = refused(proc, pg.md5_user.name, pg.md5_user.password)
    assert error.sqlstate == "08006"
    assert f'could not look up user "{pg.md5_user.name}"' in error.message
    assert "no_such_table" in error.message
    proc.wait_for_log("auth_query for user")
    assert current_user(proc, pg.trust_user.name, "") == pg.trust_user.name
    row = auth_query_row(proc)
    assert (row["executor_queries"], row["executor_errors"]) == ("1", "1")
    # Errors are not cached: the next login asks again.
    refused(proc, pg.md5_user.name, pg.md5_user.password)
    assert auth_query_row(proc)["executor_queries"] == "2"


def test_a_lookup_user_the_server_refuses(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = auth_query_pooler(pooler, pg, user=pg.scram_user.name, password="wrong")
    error = refused(proc, pg.md5_user.name, pg.md5_user.password)
    assert error.sqlstate == "08006"
    assert "auth_query could not connect" in error.message
    assert current_user(proc, pg.trust_user.name, "") == pg.trust_user.name


def test_a_lookup_server_that_is_down(
    pg: ExamplePostgres, pooler: PoolerFactory, refused_port: Callable[[], int]
) -> None:
    proc = auth_query_pooler(
        pooler, pg, pool={"server_port": refused_port(), "connect_timeout": 2000}
    )
    error = refused(proc, pg.md5_user.name, pg.md5_user.password)
    assert error.sqlstate == "08006"
    assert "cannot connect to server" in error.message


SLOW_LOOKUP = "SELECT usename, passwd FROM pg_shadow, pg_sleep(1) WHERE usename = $1"


def test_clients_that_leave_during_a_lookup_harm_nobody(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(pooler, pg, query=SLOW_LOOKUP)
    for _ in range(3):
        gone = w.PgWire(proc.host, proc.port)
        gone.send_raw(w.startup_message({"user": user.name, "database": EXAMPLE_DB}))
        gone.close_socket()
    # The lookup they started goes on and serves the next login of the same user.
    assert current_user(proc, user.name, user.password) == user.name
    row = auth_query_row(proc)
    assert row["executor_queries"] == "1"
    assert row["auth_success"] == "1"


def test_a_reload_that_removes_auth_query_stops_a_lookup_in_flight(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(
        pooler,
        pg,
        query=SLOW_LOOKUP.replace("pg_sleep(1)", "pg_sleep(5)"),
        pool={"connect_timeout": 10_000},
    )
    conn = w.PgWire(proc.host, proc.port)
    try:
        conn.send_raw(w.startup_message({"user": user.name, "database": EXAMPLE_DB}))
        deadline = time.monotonic() + 5
        while auth_query_row(proc)["executor_queries"] != "1":  # the lookup is running
            assert time.monotonic() < deadline, "the lookup never started"
            time.sleep(0.05)
        config = dict(proc.config)
        del config["pools"][EXAMPLE_DB]["auth_query"]
        proc.reload(config)
        kind, payload = conn.read_message()
        assert kind == b"E"
        fields = w.error_fields(payload)
        assert (fields["C"], fields["M"]) == ("57P03", "the user lookup was stopped")
    finally:
        conn.close_socket()
    assert current_user(proc, pg.trust_user.name, "") == pg.trust_user.name


# --- lifecycle ---------------------------------------------------------------------------------


def test_an_unused_passthrough_pool_is_closed_after_idle_timeout(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(
        pooler,
        pg,
        general={"retain_connections_time": 100},
        pool={"idle_timeout": 500},
    )
    assert current_user(proc, user.name, user.password) == user.name
    deadline = time.monotonic() + 10
    while user.name in pool_users(proc):
        assert time.monotonic() < deadline, "the looked-up user's pool was never closed"
        time.sleep(0.1)
    row = auth_query_row(proc)
    assert (row["dynamic_pools_current"], row["dynamic_pools_destroyed"]) == ("0", "1")
    # The next login builds it again, from the cache.
    assert current_user(proc, user.name, user.password) == user.name
    row = auth_query_row(proc)
    assert (row["dynamic_pools_created"], row["executor_queries"]) == ("2", "1")


def test_pause_resume_and_reconnect_reach_looked_up_pools(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.scram_user
    proc = auth_query_pooler(pooler, pg)
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        before = conn.execute("select pg_backend_pid()").fetchone()
        console = admin_console(proc)
        try:
            assert w.first_error(console.simple_query(f"RECONNECT {EXAMPLE_DB}")) is None
        finally:
            console.close()
        after = conn.execute("select pg_backend_pid()").fetchone()
    assert before != after


def test_reload_keeps_the_cache_unless_auth_query_changes(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(pooler, pg)
    assert current_user(proc, user.name, user.password) == user.name
    config = dict(proc.config)
    config["general"] = {**config["general"], "query_wait_timeout": 4000}
    proc.reload(config)
    proc.wait_for_log("configuration reloaded")
    assert current_user(proc, user.name, user.password) == user.name
    assert auth_query_row(proc)["executor_queries"] == "1"

    aq = config["pools"][EXAMPLE_DB]["auth_query"]
    aq["query"] = LOOKUP + " AND passwd IS NOT NULL"
    proc.reload(config)
    proc.wait_for_log(f"pool {EXAMPLE_DB}: auth_query changed")
    assert current_user(proc, user.name, user.password) == user.name
    assert auth_query_row(proc)["executor_queries"] == "1"  # a new lookup, counted anew

    del config["pools"][EXAMPLE_DB]["auth_query"]
    proc.reload(config)
    proc.wait_for_log(f"pool {EXAMPLE_DB}: auth_query removed")
    assert refused(proc, user.name, user.password).sqlstate == "28P01"


def test_with_two_workers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = auth_query_pooler(pooler, pg, general={"workers": 2})
    for _ in range(4):
        for user in (pg.md5_user, pg.scram_user):
            assert current_user(proc, user.name, user.password) == user.name
    row = auth_query_row(proc)
    assert row["auth_success"] == "8"
    assert int(row["executor_queries"] or 0) in (2, 3, 4)  # one per user and worker at most


def test_show_config_lists_the_auth_query_settings(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = auth_query_pooler(pooler, pg, password="lookup-secret", cache_ttl="5m")
    console = admin_console(proc)
    try:
        rows = {row["key"]: row for row in show_table(console, "CONFIG")}
    finally:
        console.close()
    prefix = f"pools.{EXAMPLE_DB}.auth_query"
    assert rows[f"{prefix}.query"]["value"] == LOOKUP
    assert rows[f"{prefix}.user"]["value"] == pg.superuser
    assert rows[f"{prefix}.password"]["value"] == "********"
    assert (rows[f"{prefix}.cache_ttl"]["value"], rows[f"{prefix}.cache_ttl"]["default"]) == (
        "300000",
        "3600000",
    )
    assert rows[f"{prefix}.workers"]["changeable"] == "yes"
    assert "lookup-secret" not in str(rows)


def test_metrics(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    port = free_port()
    proc = auth_query_pooler(pooler, pg, web={"enabled": True, "host": "127.0.0.1", "port": port})
    assert current_user(proc, pg.md5_user.name, pg.md5_user.password) == pg.md5_user.name
    refused(proc, "no_such_user", "x")
    families = scrape(port)
    db = {"database": EXAMPLE_DB}
    assert (
        value(
            families["pg_doorman_auth_query_cache_entries"],
            "pg_doorman_auth_query_cache_entries",
            **db,
        )
        == 2
    )
    cache = families["pg_doorman_auth_query_cache"]
    assert value(cache, "pg_doorman_auth_query_cache_total", result="miss", **db) == 2
    auth = families["pg_doorman_auth_query_auth"]
    assert value(auth, "pg_doorman_auth_query_auth_total", result="success", **db) == 1
    assert value(auth, "pg_doorman_auth_query_auth_total", result="failure", **db) == 1
    executor = families["pg_doorman_auth_query_executor"]
    assert value(executor, "pg_doorman_auth_query_executor_total", result="ok", **db) == 2
    pools = families["pg_doorman_auth_query_dynamic_pools"]
    assert value(pools, "pg_doorman_auth_query_dynamic_pools_total", event="created", **db) == 1
    current = families["pg_doorman_auth_query_dynamic_pools_current"]
    assert value(current, "pg_doorman_auth_query_dynamic_pools_current", **db) == 1
    # PgDoorman's gauges of the same numbers, by `type` (`result` for auth).
    assert value(cache, "pg_doorman_auth_query_cache", type="entries", **db) == 2
    assert value(cache, "pg_doorman_auth_query_cache", type="misses", **db) == 2
    assert value(auth, "pg_doorman_auth_query_auth", result="success", **db) == 1
    assert value(executor, "pg_doorman_auth_query_executor", type="queries", **db) == 2
    assert value(pools, "pg_doorman_auth_query_dynamic_pools", type="current", **db) == 1


def test_looked_up_users_share_max_db_connections_with_configured_ones(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A looked-up user's pool counts in the database's limit: with a limit of 1, the
    configured user's idle server is closed for it, and the other way round."""
    proc = auth_query_pooler(
        pooler, pg, pool={"max_db_connections": 1, "min_connection_lifetime": 0}
    )
    trust = pg.trust_user
    user = pg.md5_user
    names = f"'{trust.name}', '{user.name}'"

    def backends() -> list[str]:
        out = pg.psql(
            f"select usename from pg_stat_activity where usename in ({names}) "
            "and backend_type = 'client backend'"
        )
        return out.split()

    def settled_backends(expected: list[str]) -> list[str]:
        """backends(), read again until they are `expected` (at most 5 s): an evicted
        server leaves pg_stat_activity only once its backend has exited, which may come
        after the client it made room for has its answer."""
        deadline = time.monotonic() + 5
        found = backends()
        while found != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            found = backends()
        return found

    with psycopg.connect(proc.dsn(trust.name, ""), autocommit=True) as configured:
        assert configured.execute("select current_user").fetchone() == (trust.name,)
        assert current_user(proc, user.name, user.password) == user.name
        assert settled_backends([user.name]) == [user.name]
        assert configured.execute("select current_user").fetchone() == (trust.name,)
        assert settled_backends([trust.name]) == [trust.name]
    console = admin_console(proc)
    try:
        (row,) = show_table(console, "POOL_COORDINATOR")
    finally:
        console.close()
    assert row["max_db_conn"] == "1" and int(row["evictions"] or 0) >= 2
