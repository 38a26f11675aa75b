"""Session mode: a client keeps its server for its whole session, so a DISCARD ALL or
RESET of its own must leave its startup settings in place, as PostgreSQL would (they
are the defaults of a session of its own), with no checkout to set them again."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg

from helpers import ExamplePostgres
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess

SETTINGS = "select current_setting('statement_timeout'), current_setting('lock_timeout')"


def session_dsn(proc: PoolerProcess, pg: ExamplePostgres, options: str = "") -> str:
    dsn = proc.dsn(pg.md5_user.name, pg.md5_user.password)
    return dsn + "&options=" + options.replace(" ", "%20").replace("=", "%3D") if options else dsn


def test_startup_settings_outlive_the_sessions_own_discard_all_and_reset(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=md5_user_pool(pg, pool_size=1, pool_mode="session"))
    options = "-c statement_timeout=1234 -c lock_timeout=777"
    with psycopg.connect(session_dsn(proc, pg, options), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
        conn.execute("discard all")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
        conn.execute("set statement_timeout = 5000")
        conn.execute("reset all")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
        # What the client SETs itself after a RESET stays as it set it.
        conn.execute("reset all; set lock_timeout = 9")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "9ms")
        conn.execute("reset statement_timeout")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "9ms")
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
    # The session's end still leaves nothing of them to the next client.
    with psycopg.connect(session_dsn(proc, pg), autocommit=True) as other:
        assert other.execute("select pg_backend_pid()").fetchone() == pid
        assert other.execute(SETTINGS).fetchone() == ("0", "0")


def test_asyncpg_pool_server_settings_survive_its_reset_on_release(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """asyncpg's pool runs RESET ALL each time a connection is released."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=1, pool_mode="session"))

    async def main() -> list[str]:
        pool = await asyncpg.create_pool(
            session_dsn(proc, pg),
            min_size=1,
            max_size=1,
            server_settings={"statement_timeout": "4321"},
        )
        seen = []
        try:
            for _ in range(3):
                async with pool.acquire() as conn:
                    seen.append(await conn.fetchval("show statement_timeout"))
                    await conn.execute("set work_mem = '5MB'")
        finally:
            await pool.close()
        return seen

    assert asyncio.run(main()) == ["4321ms"] * 3


def test_a_client_pinned_by_its_locks_keeps_its_startup_settings_after_a_reset(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Transaction mode, a client that keeps its server for its advisory locks: a RESET
    in the transaction whose lock call is checked leaves its startup settings in place
    whether the check keeps it pinned or lets the server go (the next checkout then
    sets them, and another client with the same settings finds them too)."""
    proc = pooler(pools=md5_user_pool(pg, pool_size=1))
    options = "-c statement_timeout=1234 -c lock_timeout=777"
    with psycopg.connect(session_dsn(proc, pg, options), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(4301)")
        conn.execute("reset statement_timeout; select pg_advisory_lock(4302)")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
        conn.execute("reset all; select pg_advisory_unlock_all()")
        assert conn.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
    with psycopg.connect(session_dsn(proc, pg, options), autocommit=True) as other:
        assert other.execute(SETTINGS).fetchone() == ("1234ms", "777ms")
    with psycopg.connect(session_dsn(proc, pg), autocommit=True) as plain:
        assert plain.execute(SETTINGS).fetchone() == ("0", "0")
