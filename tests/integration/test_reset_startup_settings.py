"""What one client leaves on a shared server connection, as the next client sees it."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from helpers import ExamplePostgres
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory

DEFAULT_SEARCH_PATH = '"$user", public'
# Startup settings the pooler applies for a client in transaction mode: search_path
# (reported by PostgreSQL 18: followed when changed) and statement_timeout (never
# reported).
STARTUP_SETTINGS = {"search_path": "pg_catalog,public", "statement_timeout": "7s"}


@pytest.mark.parametrize(
    "reset",
    [
        "reset all",
        "reset statement_timeout",
        "reset search_path",
        "discard all",
    ],
)
def test_a_clients_reset_leaves_the_next_client_its_startup_settings(
    pg: ExamplePostgres, pooler: PoolerFactory, reset: str
) -> None:
    """A client's RESET or DISCARD ALL undoes the startup settings the pooler applied
    for it on the server: the pooler must not take the server as still holding them
    and skip applying them for the next client that asked for the same."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=1))
    user = pg.md5_user
    dsn = proc.dsn(user.name, user.password)
    options = " ".join(f"-c {name}={value}" for name, value in STARTUP_SETTINGS.items())
    with psycopg.connect(dsn, autocommit=True, options=options) as a:
        a.execute(reset)
        own_next_transaction = a.execute("show statement_timeout").fetchone()

    async def next_client() -> tuple[str, str]:
        conn = await asyncpg.connect(dsn, server_settings=STARTUP_SETTINGS)
        try:
            row = await conn.fetchrow(
                "select current_setting('search_path'), current_setting('statement_timeout')"
            )
            assert row is not None
            return row[0], row[1]
        finally:
            await conn.close()

    search_path, timeout = asyncio.run(next_client())
    assert (search_path, timeout) == (STARTUP_SETTINGS["search_path"], "7s")
    # As after its SET, the client's startup values are back in its next transaction.
    assert own_next_transaction == ("7s",)
    # A client without them gets the server's defaults.
    with psycopg.connect(dsn, autocommit=True) as b:
        assert b.execute("show search_path").fetchone() == (DEFAULT_SEARCH_PATH,)
        assert b.execute("show statement_timeout").fetchone() == ("0",)
