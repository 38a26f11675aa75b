"""Socket options on the connections the pooler accepts, seen from the kernel."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers.pooler import PoolerFactory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")

_ESTABLISHED = "01"
_KEEPALIVE_TIMER = "2"  # /proc/net/tcp "tr": the keepalive timer is armed


def accepted_timers(port: int) -> list[str]:
    """The timer kind of each established connection whose local port is `port`."""
    timers = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _ESTABLISHED:
                timers.append(fields[5].split(":")[0].lstrip("0") or "0")
    return timers


@pytest.mark.parametrize("workers", [1, 2])
def test_accepted_connections_have_keepalive_on(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """One process tunes its own listener; with workers, the supervisor's listener is
    tuned and the connections it passes on keep the options."""
    proc = pooler(general={"tcp_keepalives_idle": 30, "workers": workers})
    if workers > 1:
        proc.wait_for_log(f"all {workers} workers ready", timeout=30)
    user = pg.scram_user
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        # Right after a write the retransmit timer ("1") may be armed until the client's
        # (possibly delayed) ACK; once the connection is quiet the keepalive timer shows.
        deadline = time.monotonic() + 5
        while True:
            timers = accepted_timers(proc.port)
            assert timers, "the client connection was not found in /proc/net/tcp"
            if set(timers) == {_KEEPALIVE_TIMER} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert set(timers) == {_KEEPALIVE_TIMER}


def unix_buffer_sizes(pid: int) -> list[tuple[int, int]]:
    """(receive, send) buffer sizes of each connected Unix socket of process `pid`,
    as `ss` reports them."""
    out = subprocess.run(
        ["ss", "-x", "-m", "-p", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sizes = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            found = re.search(r"rb(\d+),t\d+,tb(\d+)", line)
            assert found is not None, line
            sizes.append((int(found[1]), int(found[2])))
    return sizes


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_connections_get_unix_socket_buffer_size(
    pg: ExamplePostgres, pooler: PoolerFactory, workers: int
) -> None:
    """Both ends the pooler holds over Unix sockets: the client on unix_socket_dir and
    the server reached through PostgreSQL's socket directory (Linux doubles 64 KiB)."""
    user = pg.md5_user
    with tempfile.TemporaryDirectory(prefix="pgd-sock-") as sockdir:
        proc = pooler(
            general={
                "unix_socket_dir": sockdir,
                "unix_socket_buffer_size": "64KB",
                "workers": workers,
                "pg_hba": "local all all md5\nhost all all 127.0.0.1/32 md5\n",
            },
            pools={EXAMPLE_DB: {"server_host": str(pg.socket_dir)}},
        )
        assert proc.pid is not None
        dsn = f"host={sockdir} port={proc.port} dbname={EXAMPLE_DB} user={user.name}"
        with psycopg.connect(dsn, password=user.password, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            # Read now: the worker that served the query is surely running.
            pids = [proc.pid, *child_pids(proc.pid)]
            sizes = [size for pid in pids for size in unix_buffer_sizes(pid)]
        # The client's connection and the server's, in the worker that serves them.
        assert sizes.count((131072, 131072)) >= 2, sizes


def child_pids(pid: int) -> list[int]:
    """The processes `pid`'s threads started (with workers: the workers)."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
