"""The pool's counts across the orderings of callbacks that once lost track of them.

Driven on a real event loop with real Pool and ServerConnection objects; only the
transport under a server is a stand-in (the integration tests cover real sockets).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.implementation import expect_compiled
from pg_doorman.net.server import ACTIVE, IDLE, ServerConnection
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


# The stand-in Waiter above is not a ClientConnection, which the compiled Pool accepts.
needs_stand_in_waiters = pytest.mark.skipif(
    expect_compiled(), reason="stand-in waiters need the interpreted Pool (compiled: clients only)"
)


@contextmanager
def loop_free_pool(pool_size: int, *, paused: bool = False) -> Iterator[Pool]:
    """A pool on an event loop that never runs (its timers never fire); `paused`: no
    server ever opens, so the wait queue alone is under test."""
    loop = asyncio.new_event_loop()
    try:
        pool = Pool(PoolSettings("db", "u", pool_size=pool_size), never_opens, loop)
        pool.paused = paused
        yield pool
        if pool._wait_timer is not None:
            pool._wait_timer.cancel()
    finally:
        loop.close()


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


@needs_stand_in_waiters
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
    with loop_free_pool(6) as pool:
        servers = [ServerConnection(pool, i, pool._loop) for i in range(6)]
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


def test_idle_servers_let_go_of_servers_taken_out() -> None:
    """A slot kept for reuse does not keep the server that was in it alive (counted
    in references: a weak reference to a compiled object is unsafe, mypyc#1102)."""
    with loop_free_pool(2) as pool:
        idle = IdleServers()
        server = ServerConnection(pool, 1, pool._loop)
        alone = sys.getrefcount(server)
        idle.append(server)
        assert sys.getrefcount(server) == alone + 1
        assert idle.pop() is server
        assert sys.getrefcount(server) == alone
        idle.append(server)
        other = ServerConnection(pool, 2, pool._loop)
        idle.append(other)
        idle.remove(server)
        assert sys.getrefcount(server) == alone
        assert idle.popleft() is other and not idle


WAIT_OPS = st.lists(
    st.tuples(st.sampled_from(["queue", "cancel", "next"]), st.integers(0, 7)),
    max_size=120,
)


@needs_stand_in_waiters
@settings(max_examples=300, deadline=None)
@given(WAIT_OPS)
def test_the_wait_queue_serves_in_order_of_arrival(ops: list[tuple[str, int]]) -> None:
    """Whatever the order of arrivals, cancellations and hand-overs (the queue is a
    list read from a moving head, compacted now and then), clients come out in the
    order they came in, a cancelled one never, and `waiting` and `oldest_wait`
    follow."""
    with loop_free_pool(5, paused=True) as pool:
        clients = [Waiter() for _ in range(8)]
        model: list[Waiter] = []
        clock = 0.0
        for op, which in ops:
            client = clients[which]
            clock += 1.0
            if op == "queue":
                if client in model:
                    continue  # a client waits once at most
                assert pool.acquire(client, clock) is None  # type: ignore[arg-type]
                model.append(client)
            elif op == "cancel":
                pool.cancel_wait(client)  # type: ignore[arg-type]
                if client in model:
                    model.remove(client)
            else:
                expected = model.pop(0) if model else None
                assert pool._next_waiter(force=True) is expected
            assert pool.waiting == len(model)
            assert pool._waiters[pool._head :] == model
            assert pool.oldest_wait(clock) == (clock - model[0].wait_started if model else 0.0)
        pool.fail_waiters("57P01", "done")
        assert [client.error for client in model] == ["57P01"] * len(model)
        assert pool.waiting == 0


@needs_stand_in_waiters
def test_a_queue_that_never_empties_is_compacted_in_order() -> None:
    """Clients outnumbering servers for good (the queue never empties, so its head
    moves on until the list is compacted): still served in order of arrival."""
    with loop_free_pool(5, paused=True) as pool:
        clients = [Waiter() for _ in range(8)]
        model = list(clients)
        for number, client in enumerate(clients):
            pool.acquire(client, float(number))  # type: ignore[arg-type]
        for turn in range(300):  # each served client queues again at once
            served = pool._next_waiter(force=True)
            assert served is model.pop(0)
            pool.acquire(served, 10.0 + turn)  # type: ignore[arg-type]
            model.append(served)
            assert pool.waiting == 8 and len(pool._waiters) < 8 + 128
        assert pool._waiters[pool._head :] == model


def test_a_server_that_speaks_between_two_clients_is_closed_when_given_back() -> None:
    """Handed on by the pool to a login that attaches it only on the next loop turn,
    a server that sends something meanwhile (a notice, a FATAL) is not relayed to
    anyone, and is closed, not reused, once given back."""

    async def main() -> None:
        pool = Pool(PoolSettings("db", "u", pool_size=1), never_opens, asyncio.get_running_loop())
        server = await open_idle_server(pool)
        pool.servers.add(server)
        pool.size = 1
        server.mode = ACTIVE  # as between the hand-over and the login's attach
        server.data_received(b"N\x00\x00\x00\x04")
        assert server.spoiled
        server.finish(time.monotonic())
        await asyncio.sleep(0)  # the transport's close reports connection_lost
        assert server.closed
        assert pool.size == 0 and not pool.idle
        pool.close("done")

    asyncio.run(main())
