"""Users with an `auth_pam_service`: the password goes to PAM (the system's libpam, a
service file of the test's own running pam_exec), and to the server when the user has
no server_password."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pam import pam_checks, pam_service
from helpers.pooler import PoolerFactory, PoolerProcess, Replace


def pam_pooler(pooler: PoolerFactory, users: list[dict[str, Any]], **general: Any) -> PoolerProcess:
    return pooler(general=general, pools={EXAMPLE_DB: {"users": Replace(users)}})


def md5_user_pam_pooler(
    pg: ExamplePostgres, pooler: PoolerFactory, directory: Path, *, delay: float = 0.0
) -> PoolerProcess:
    """The md5 user, checked by a PAM service that takes its PostgreSQL password."""
    md5 = pg.md5_user
    service = pam_service(directory, {md5.name: md5.password}, delay=delay)
    return pam_pooler(
        pooler, [{"username": md5.name, "password": "", "auth_pam_service": str(service)}]
    )


def send_password(proc: PoolerProcess, user: str, password: str) -> w.PgWire:
    """A raw login that has sent its cleartext password and reads nothing more."""
    conn = w.PgWire(proc.host, proc.port)
    conn.send_raw(w.startup_message({"user": user, "database": EXAMPLE_DB}))
    conn.read_message()  # AuthenticationCleartextPassword
    conn.send_raw(w.password_message(password))
    return conn


def test_pam_decides_and_the_password_reaches_the_server(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """Passthrough: PostgreSQL checks the same password again for the pool's servers."""
    md5 = pg.md5_user
    proc = md5_user_pam_pooler(pg, pooler, tmp_path / "pam")
    with psycopg.connect(proc.dsn(md5.name, md5.password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (md5.name,)

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(proc.dsn(md5.name, md5.password))
        try:
            assert await conn.fetchval("select 41 + 1") == 42
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(proc.dsn(md5.name, "wrong"))

    asyncio.run(with_asyncpg())
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, md5.name, EXAMPLE_DB, "wrong")
    assert (info.value.sqlstate, info.value.severity) == ("28P01", "FATAL")
    assert f"PAM refused user {md5.name!r}" in proc.log_text()
    # Each login asked PAM once, with the client's address.
    assert pam_checks(tmp_path / "pam") == [f"{md5.name}|127.0.0.1|auth"] * 4


def test_pam_with_server_credentials_and_pg_hba(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """A PAM user that is no PostgreSQL role logs in to the server as server_username;
    a pg_hba scram-sha-256 line refuses PAM users (their password travels in clear)."""
    scram = pg.scram_user
    service = pam_service(tmp_path / "pam", {"app": "app pass"})
    app = {
        "username": "app",
        "password": "",
        "auth_pam_service": str(service),
        "server_username": scram.name,
        "server_password": scram.password,
    }
    proc = pam_pooler(
        pooler,
        [app],
        pg_hba="host all app 127.0.0.2/32 scram-sha-256\nhost all all 127.0.0.1/32 md5\n",
    )
    with psycopg.connect(proc.dsn("app", "app pass"), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (scram.name,)
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, "app", EXAMPLE_DB, "not it")
    assert info.value.sqlstate == "28P01"

    config = proc.config
    config["general"]["pg_hba"] = "host all all 127.0.0.1/32 scram-sha-256\n"
    proc.reload_and_wait(config)
    with pytest.raises(w.ServerError) as info:
        w.PgWire.connect(proc.host, proc.port, "app", EXAMPLE_DB, "app pass")
    assert info.value.sqlstate == "28P01"
    assert "requires scram-sha-256 but the password is checked by PAM" in proc.log_text()
    assert len(pam_checks(tmp_path / "pam")) == 2  # not asked then


def test_a_client_that_leaves_during_a_pam_check_harms_nobody(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    """A slow PAM module: clients that vanish while it runs, then others that wait for it."""
    md5 = pg.md5_user
    proc = md5_user_pam_pooler(pg, pooler, tmp_path / "pam", delay=0.5)
    for _ in range(3):
        send_password(proc, md5.name, md5.password).close_socket()
    for _ in range(2):
        with psycopg.connect(proc.dsn(md5.name, md5.password), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert "Traceback" not in proc.log_text()


def test_the_pooler_stops_while_a_pam_check_hangs(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    md5 = pg.md5_user
    proc = md5_user_pam_pooler(pg, pooler, tmp_path / "pam", delay=30)
    conn = send_password(proc, md5.name, md5.password)
    deadline = time.monotonic() + 10
    while not pam_checks(tmp_path / "pam") and time.monotonic() < deadline:
        time.sleep(0.05)  # the check has started (and sleeps)
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 10
    conn.close_socket()
