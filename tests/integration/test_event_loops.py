"""The pooler on asyncio's own event loop (`PG_DOORMAN_EVENT_LOOP=asyncio`).

The other integration tests run it on uvloop, the loop it picks where uvloop is installed. The
standard loop has transports of its own (no direct socket writes, its own buffered
reads and TLS), so the paths a client meets most are run through it here: the simple
and extended protocols, pipelines, COPY both ways, a result larger than the socket
buffers, prepared statements over a small pool, cancellation, a client that vanishes
mid-transaction, and TLS."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme

from helpers import SCRAM_USER, TRUST_USER, ExamplePostgres
from helpers.cancel import cancel_midway
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess

STANDARD_LOOP = {"PG_DOORMAN_EVENT_LOOP": "asyncio"}


def _asyncio_pooler(pooler: PoolerFactory, pool_mode: str = "transaction") -> PoolerProcess:
    """A pooler on the standard loop; its SCRAM user has a pool of two servers."""
    users = [{"username": SCRAM_USER, "pool_size": 2}]
    proc = pooler(pools={"example_db": {"pool_mode": pool_mode, "users": users}}, env=STANDARD_LOOP)
    proc.wait_for_log("asyncio event loop: PG_DOORMAN_EVENT_LOOP=asyncio")
    return proc


def test_the_startup_line_names_the_event_loop(pooler: PoolerFactory) -> None:
    pytest.importorskip("uvloop")
    proc = pooler()
    proc.wait_for_log("; uvloop)")


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_the_standard_loop_relays_both_protocols_copy_and_large_results(
    pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str
) -> None:
    proc = _asyncio_pooler(pooler, pool_mode)
    user = pg.scram_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as conn:
        with conn.transaction():
            conn.execute("create temp table t (id int, name text) on commit drop")
            with conn.cursor().copy("copy t from stdin") as copy:
                for i in range(5000):
                    copy.write_row((i, f"name {i}"))
            rows = conn.execute("select count(*), sum(id) from t where name like %s", ("name%",))
            assert rows.fetchone() == (5000, sum(range(5000)))
            out = bytearray()
            with conn.cursor().copy("copy (select id from t order by id) to stdout") as copy:
                for chunk in copy:
                    out += chunk
            assert out.decode().split() == [str(i) for i in range(5000)]
        # Several megabytes in one answer: the client side's writes back up.
        big = conn.execute("select repeat('x', 1000) from generate_series(1, 20000)").fetchall()
        assert len(big) == 20000 and all(row[0] == "x" * 1000 for row in big)
        conn.commit()
        with conn.pipeline():
            cursors = [conn.execute("select %s::int * 2", (i,)) for i in range(50)]
        assert [c.fetchone() for c in cursors] == [(i * 2,) for i in range(50)]
        conn.commit()
        with conn.cursor() as cur:
            cur.executemany("select %s::text", [(str(i),) for i in range(100)])
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


def test_the_standard_loop_shares_prepared_statements_over_a_small_pool(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = _asyncio_pooler(pooler)
    user = pg.scram_user

    async def client(n: int) -> list[int]:
        conn = await asyncpg.connect(proc.dsn(user.name, user.password))
        try:
            statement = await conn.prepare("select $1::int + $2::int")
            return [await statement.fetchval(n, i) for i in range(40)]
        finally:
            await conn.close()

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(client(n) for n in range(10)))

    results = asyncio.run(main())
    assert results == [[n + i for i in range(40)] for n in range(10)]
    servers = [row for row in admin_rows(proc, "servers") if row["user"] == SCRAM_USER]
    assert 1 <= len(servers) <= 2  # ten clients took turns on the pool's two servers
    # The statement was parsed once per server, then reused for the other clients.
    assert sum(int(row["prepare_cache_miss"] or 0) for row in servers) == len(servers)
    assert sum(int(row["prepare_cache_hit"] or 0) for row in servers) >= 10 - len(servers)
    pool = [row for row in admin_rows(proc, "pools") if row["user"] == SCRAM_USER]
    assert [(row["cl_waiting"], row["sv_active"]) for row in pool] == [("0", "0")]


def test_the_standard_loop_cancels_and_survives_a_vanished_client(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = _asyncio_pooler(pooler)
    user = pg.scram_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert cancel_midway(conn) < 10
        assert conn.execute("select 1").fetchone() == (1,)
    # A client gone in the middle of a transaction: its server is rolled back before
    # anyone else gets it, and the pool keeps serving.
    for _ in range(3):
        gone = psycopg.connect(dsn)
        gone.execute("create temp table half_done (x int)")
        # No Terminate: the socket just closes under the client.
        raw = socket.fromfd(gone.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
        gone.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(4):  # every server of the pool of two, twice
            with conn.transaction():
                state = conn.execute("select to_regclass('pg_temp.half_done') is null")
                assert state.fetchone() == (True,)


def test_the_standard_loop_speaks_tls(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    proc = pooler(
        general={"tls_certificate": str(cert_path), "tls_private_key": str(key_path)},
        env=STANDARD_LOOP,
    )
    proc.wait_for_log("asyncio event loop")
    user = pg.scram_user
    dsn = proc.dsn(user.name, user.password)
    with psycopg.connect(dsn, sslmode="verify-full", sslrootcert=str(ca_path)) as conn:
        assert conn.pgconn.ssl_in_use
        rows = conn.execute("select repeat('y', 500) from generate_series(1, 5000)").fetchall()
        assert len(rows) == 5000 and rows[-1] == ("y" * 500,)
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)


def test_an_unknown_event_loop_is_refused(pooler: PoolerFactory) -> None:
    proc = pooler(start=False, env={"PG_DOORMAN_EVENT_LOOP": "tokio"})
    proc.spawn()
    assert proc.wait_exit() == 2
    assert "PG_DOORMAN_EVENT_LOOP='tokio': expected one of auto, uvloop, asyncio" in proc.log_text()


def test_uvloop_asked_for_but_missing_is_refused_and_auto_falls_back(
    pooler: PoolerFactory, tmp_path: Path
) -> None:
    hidden = tmp_path / "hide_uvloop"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('not here')\n")
    without_uvloop = {"PYTHONPATH": str(hidden)}  # after the sources, before site-packages
    refused = pooler(start=False, env={**without_uvloop, "PG_DOORMAN_EVENT_LOOP": "uvloop"})
    refused.spawn()
    assert refused.wait_exit() == 2
    assert "PG_DOORMAN_EVENT_LOOP=uvloop, but uvloop is not installed" in refused.log_text()
    # Without the variable the standard loop runs, and says why.
    auto = pooler(env=without_uvloop)
    auto.wait_for_log("asyncio event loop: uvloop is not installed")
    with psycopg.connect(auto.dsn(TRUST_USER)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
