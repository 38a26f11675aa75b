"""The pool's counts across the orderings of callbacks that once lost track of them.

Driven on a real event loop with real Pool and ServerConnection objects; only the
transport under a server is a stand-in (the integration tests cover real sockets).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from helpers.implementation import expect_compiled
from pg_doorman.net.server import IDLE, ServerConnection
from pg_doorman.pool.pool import DatabaseBudget, Pool, PoolSettings


class StandInTransport:
    """Accepts writes; closing it reports connection_lost on the next loop turn."""

    def __init__(self, server: ServerConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.server.connection_lost, None)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return self.closing


async def open_idle_server(pool: Pool) -> ServerConnection:
    loop = asyncio.get_running_loop()
    server = ServerConnection(pool, 1, loop)
    server.connection_made(StandInTransport(server, loop))  # type: ignore[arg-type]
    server.mode = IDLE
    return server


async def never_opens(pool: Pool) -> ServerConnection:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


class Waiter:
    def __init__(self) -> None:
        self.wait_started = 0.0
        self.server: ServerConnection | None = None
        self.error: str | None = None

    def on_server(self, server: ServerConnection, now: float) -> None:
        self.server = server

    def on_acquire_error(self, code: str, message: str) -> None:
        self.error = code


def budget_of(loop: asyncio.AbstractEventLoop, limit: int, min_lifetime: float) -> DatabaseBudget:
    budget = DatabaseBudget(loop)
    budget.configure(
        limit=limit, reserve=0, reserve_timeout=3, min_lifetime=min_lifetime, guaranteed=0
    )
    return budget


def test_a_connect_cancelled_before_it_started_gives_its_slot_back() -> None:
    """A pool closed in the same loop turn that it began opening a server (a reload
    retiring it while refilling min_pool_size): the never-started connect leaves no
    size, and no slot of the database's max_db_connections, behind."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        budget = budget_of(loop, limit=2, min_lifetime=0)
        retired = Pool(PoolSettings("db", "a", pool_size=5, min_pool_size=1), never_opens, loop)
        retired.join_budget(budget)
        other = Pool(PoolSettings("db", "b", pool_size=5, min_pool_size=2), never_opens, loop)
        other.join_budget(budget)
        retired.retain(None)  # opens one server for the minimum
        assert retired.connecting == 1 and budget.count == 1
        retired.close("retired by a reload")
        await asyncio.sleep(0.05)
        assert (retired.size, retired.connecting) == (0, 0)
        assert budget.count == 0 and retired not in budget.pools
        # The other user of the database gets both slots.
        other.retain(None)
        assert other.connecting == 2 and budget.count == 2
        other.close("done")
        await asyncio.sleep(0.05)
        assert budget.count == 0

    asyncio.run(main())


@pytest.mark.skipif(
    expect_compiled(), reason="stand-in waiters need the interpreted Pool (compiled: clients only)"
)
def test_retain_goes_on_when_another_pool_evicts_its_idle_servers() -> None:
    """retain() closing one expired idle server frees a slot of the database's budget;
    a pool starving for one may then evict this pool's next idle server. retain()
    carries on rather than failing (which stopped the maintenance loop)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        budget = budget_of(loop, limit=2, min_lifetime=30)
        keeper = Pool(
            PoolSettings("db", "r", pool_size=5, idle_timeout=0.05), open_idle_server, loop
        )
        keeper.join_budget(budget)
        starving = Pool(PoolSettings("db", "p", pool_size=5), never_opens, loop)
        starving.join_budget(budget)
        for _ in range(2):
            keeper.acquire(Waiter(), time.monotonic())
        await asyncio.sleep(0.05)
        for server in list(keeper.servers):
            server.served_clients = 1
            keeper.release(server, time.monotonic())
        assert len(keeper.idle) == 2
        starving.acquire(Waiter(), time.monotonic())
        starving.acquire(Waiter(), time.monotonic())
        assert starving in budget.starving  # keeper's servers are too young to evict
        budget.min_lifetime = 0.0  # they come of age before the budget's timer fires
        await asyncio.sleep(0.1)  # and pass keeper's idle_timeout
        closed = keeper.retain(None)
        assert closed == 1  # the other one was evicted for the starving pool
        assert keeper.idle == [] and keeper.size == 0
        assert starving.connecting == 2 and budget.count == 2
        keeper.close("done")
        starving.close("done")

    asyncio.run(main())
