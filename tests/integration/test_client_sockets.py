"""Socket options on the connections the pooler accepts, seen from the kernel."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psycopg
import pytest

from helpers import ExamplePostgres
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
