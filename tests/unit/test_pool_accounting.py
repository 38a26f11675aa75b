"""The pool's counts across the orderings of callbacks that once lost track of them.

Driven on a real event loop with real Pool and ServerConnection objects; only the
transport under a server is a stand-in (the integration tests cover real sockets).
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.implementation import expect_compiled
from pg_doorman.net.server import IDLE, ServerConnection
from pg_doorman.pool.pool import DatabaseBudget, IdleServers, Pool, PoolSettings


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
        assert len(keeper.idle) == 0 and not keeper.idle and keeper.size == 0
        assert starving.connecting == 2 and budget.count == 2
        keeper.close("done")
        starving.close("done")

    asyncio.run(main())


# One operation on the idle list: (name, which server) for append, remove and `in`.
IDLE_OPS = st.lists(
    st.tuples(
        st.sampled_from(["append", "pop", "popleft", "remove", "contains"]),
        st.integers(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(IDLE_OPS)
def test_idle_servers_behave_as_a_list(ops: list[tuple[str, int]]) -> None:
    """IdleServers keeps its memory where a list would shrink; to its users it is the
    list it replaced: the same servers in the same order after any sequence of
    operations, and the same errors (IndexError from an empty one, ValueError for a
    server that is not in it)."""
    loop = asyncio.new_event_loop()
    try:
        pool = Pool(PoolSettings("db", "u", pool_size=6), never_opens, loop)
        servers = [ServerConnection(pool, i, loop) for i in range(6)]
        idle = IdleServers()
        model: list[ServerConnection] = []
        for op, which in ops:
            server = servers[which]
            if op == "append":
                if server in model:
                    continue  # a server is idle once at most
                idle.append(server)
                model.append(server)
            elif op == "pop" or op == "popleft":
                if not model:
                    with pytest.raises(IndexError):
                        idle.pop() if op == "pop" else idle.popleft()
                    continue
                got = idle.pop() if op == "pop" else idle.popleft()
                assert got is (model.pop() if op == "pop" else model.pop(0))
            elif op == "remove":
                if server not in model:
                    with pytest.raises(ValueError):
                        idle.remove(server)
                    continue
                idle.remove(server)
                model.remove(server)
            else:
                assert (server in idle) == (server in model)
            assert list(idle) == model and idle.servers() == model
            assert len(idle) == len(model) and bool(idle) == bool(model)
    finally:
        loop.close()


def test_idle_servers_let_go_of_servers_taken_out() -> None:
    """A slot kept for reuse does not keep the server that was in it alive (counted
    in references: a weak reference to a compiled object is unsafe, mypyc#1102)."""
    loop = asyncio.new_event_loop()
    try:
        pool = Pool(PoolSettings("db", "u", pool_size=2), never_opens, loop)
        idle = IdleServers()
        server = ServerConnection(pool, 1, loop)
        alone = sys.getrefcount(server)
        idle.append(server)
        assert sys.getrefcount(server) == alone + 1
        assert idle.pop() is server
        assert sys.getrefcount(server) == alone
        idle.append(server)
        other = ServerConnection(pool, 2, loop)
        idle.append(other)
        idle.remove(server)
        assert sys.getrefcount(server) == alone
        assert idle.popleft() is other and not idle
    finally:
        loop.close()
