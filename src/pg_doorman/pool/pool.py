"""One pool of backend connections per (database, user).

The pool knows nothing about sockets: it keeps idle servers, a FIFO of waiting
clients, and the count of servers it owns, and asks an injected connector to open new
ones. A server returned while clients wait goes straight to the oldest waiter, never
through the idle list.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pg_doorman.memo import remember
from pg_doorman.prepared.registry import PoolStatements
from pg_doorman.protocol import sqlstate
from pg_doorman.stats.counters import PoolStats

if TYPE_CHECKING:
    from mypy_extensions import i64  # a machine integer when compiled (see framing)

    # The clients that queue for a server and the servers the pool hands out, typed
    # with the classes themselves rather than Protocols so that the compiled build
    # calls them natively: checkout and check-in run once per transaction, and when
    # clients outnumber servers every transaction is handed over through on_server().
    # Of the client the pool calls on_server() and on_acquire_error() and keeps
    # `wait_started` (when it joined the queue, time.monotonic()); of the server
    # only its pool-facing part: `server_id`, `closed`, `epoch` (the pool's epoch when
    # opened), `created` (when it was opened, time.monotonic()), `discarded` (set by
    # the pool, once), `statements`, and is_usable(), checkout_state(), probe(),
    # close(), mark_idle().
    from pg_doorman.net.client import ClientConnection as Waiter
    from pg_doorman.net.server import ServerConnection as PooledServer

logger: Final = logging.getLogger("pg_doorman.pool")


class AcquireError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectTimeout(AcquireError):
    """No server login within the connect timeout (as opposed to a refusal)."""


class LoginRefused(AcquireError):
    """PostgreSQL's own ErrorResponse to a server login, as opposed to a login the
    pooler gave up itself (no credentials that answer the server's request, say)."""


@dataclass
class PoolSettings:
    """Effective settings of one (database, user) pool, resolved from the config."""

    database: str
    user: str
    pool_size: int
    min_pool_size: int = 0
    pool_mode: str = "transaction"
    query_wait_timeout: float = 5.0
    connect_timeout: float = 3.0
    server_lifetime: float = 1200.0
    idle_timeout: float = 600.0
    idle_check_timeout: float = 60.0
    round_robin: bool = False
    cleanup_server_connections: bool = True
    # A transaction-mode client that ran LISTEN keeps its server until it disconnects.
    pin_on_listen: bool = False
    # A transaction-mode client holding session-level advisory locks keeps its server.
    pin_on_advisory_lock: bool = True
    # A transaction-mode client's plain LISTEN goes through the pool's one listening
    # server (net/listen_hub.py).
    listen_fanout: bool = False
    # Requests that take at least this long (seconds) are logged with their statement
    # (net/slow_queries.py); negative: off.
    slow_query_seconds: float = -1.0
    # Log each session parameter a server reports changed to its client
    # (log_client_parameter_status_changes).
    log_parameter_changes: bool = False
    # Servers the pool may be opening at once (the lower of max_concurrent_creates and
    # scaling_max_parallel_creates).
    max_concurrent_creates: int = 4
    # scaling_warm_pool_ratio: below this share of pool_size (percent), a queued client
    # gets a new server at once; above, it first waits a little for one to come back.
    warm_pool_ratio: int = 100
    retain_max: int = 3
    server_host: str = "127.0.0.1"
    server_port: int = 5432
    server_database: str = ""
    server_user: str = ""
    application_name: str = "pg_doorman"
    startup_parameters: dict[str, str] = field(default_factory=dict)
    # TCP keepalive of servers reached over TCP: idle, interval (seconds), probes.
    tcp_keepalive: tuple[int, int, int] = (5, 5, 5)
    # SO_SNDBUF/SO_RCVBUF of servers reached over TCP (0: the kernel's autotuning).
    tcp_socket_buffer_size: int = 0
    # SO_SNDBUF/SO_RCVBUF of servers reached over a Unix socket (0: the kernel's).
    unix_socket_buffer_size: int = 0
    # Protocol-level prepared statements shared across clients (transaction mode).
    prepared_statements: bool = True
    statements_cache_size: int = 8192
    server_statements_cache_size: int = 256
    # How server connections use TLS (a net.server_tls.ServerTls; None: never).
    server_tls: Any = None
    # Derived from pool_mode once: it is read at the end of every transaction.
    session_mode: bool = field(init=False)
    # Derived from pool_size and warm_pool_ratio.
    warm_threshold: int = field(init=False)

    def __post_init__(self) -> None:
        self.session_mode = self.pool_mode == "session"
        self.warm_threshold = self.pool_size * self.warm_pool_ratio // 100


class ScalingStats:
    """How a pool grew under pressure (SHOW POOL_SCALING)."""

    __slots__ = (
        "antic_notify",
        "antic_timeout",
        "create_fallback",
        "creates",
        "gate_budget_ex",
        "gate_waits",
        "replenish_def",
    )

    def __init__(self) -> None:
        # Servers opening started.
        self.creates = 0
        # Times queued clients wanted more servers opening than the pool may open at once.
        self.gate_waits = 0
        # Clients that reached query_wait_timeout while the pool opened all it may at once.
        self.gate_budget_ex = 0
        # Clients that queued above the warm threshold and got a server that came back.
        self.antic_notify = 0
        # Times queued clients were found past their patience (servers then open for
        # them, as far as pool_size and the parallel limit allow).
        self.antic_timeout = 0
        # Servers opened for clients whose patience ran out.
        self.create_fallback = 0
        # min_pool_size refills put off because the pool was opening all it may.
        self.replenish_def = 0


Connector = Callable[["Pool"], Awaitable["PooledServer"]]

# Backend errors that no retry will fix: tell waiting clients at once. 22023 and 55P02
# (with 42501 and 42704) are PostgreSQL refusing a configured startup parameter.
_PERMANENT_LOGIN_ERRORS: Final = frozenset(
    ("28P01", "28000", "3D000", "42501", "42704", "0A000", "22023", "55P02")
)
_JITTER: Final = 0.2
# How long a client queued above the warm threshold waits for a server to come back
# before one opens for it: twice the pool's p99 transaction time within these bounds,
# this long before the pool has timed enough transactions to tell (see
# PoolStats.current_xact_p99), and never within the last half second of
# query_wait_timeout (then ±_JITTER, so that clients queued together do not all give up
# at once).
_PATIENCE_COLD: Final = 0.1
_PATIENCE_MIN: Final = 0.005
_PATIENCE_MAX: Final = 0.5
_PATIENCE_RESERVE: Final = 0.5
_EXPIRED: Final = 1  # PooledServer.checkout_state()
_NEEDS_PROBE: Final = 2
# Distinct client parameter sets a pool shares one object for; past that a client
# keeps its own, which still compares equal.
_SHARED_FINGERPRINTS: Final = 1024
# Distinct startup values whose server spelling a pool remembers (see canonical_parameter).
_CANONICAL_VALUES: Final = 1024
# Distinct startup packets whose settings a pool remembers (see login_parameters).
_LOGIN_PARAMETERS: Final = 256
_LOGIN_PARAMETERS_REMEMBERED: Final = 2048  # longest encoded settings kept
# Bound once: compiled, `time.monotonic()` is a module attribute lookup per call, and
# random.uniform is interpreted Python; both ran at every queued transaction.
_now: Final = time.monotonic
_random: Final = random.random


def _jittered(value: float) -> float:
    """`value` times a random factor in [1 - _JITTER, 1 + _JITTER)."""
    return value * (1.0 - _JITTER + 2.0 * _JITTER * _random())


class LoginParameters:
    """What one set of startup settings comes to in a pool: the parameters the greeting
    reports (and its ParameterStatus run), those set on each server, the ones still in
    the client's own spelling, the application_name the client is shown, and its
    planning context once asked for. Shared by the logins that send the same settings:
    each takes copies of the dicts."""

    __slots__ = ("application_name", "extra", "planning_context", "raw", "reported", "statuses")

    def __init__(
        self,
        reported: dict[str, str],
        extra: dict[str, str],
        raw: tuple[str, ...],
        application_name: str | None,
        statuses: bytes,
    ) -> None:
        self.reported = reported
        self.extra = extra
        self.raw = raw
        self.application_name = application_name  # None: the login's own stands
        self.statuses = statuses
        self.planning_context: bytes | None = None


class IdleServers:
    """A pool's idle servers, oldest first: a list whose memory stays allocated.

    `list.pop()` hands memory back once the list falls under half its capacity, and
    `append` asks for it again, so with one or two clients on a pool (the list going
    from one server to none and back at every transaction) a plain list reallocates
    twice per transaction. Here the slots past the count stay, holding None; the list
    never holds more than the pool's size."""

    __slots__ = ("_count", "_slots")

    def __init__(self) -> None:
        self._slots: list[PooledServer | None] = []
        self._count: i64 = 0

    def __len__(self) -> int:
        return int(self._count)

    def __bool__(self) -> bool:
        return self._count > 0

    def __contains__(self, server: PooledServer) -> bool:
        return self._index(server) >= 0

    def __iter__(self) -> Iterator[PooledServer]:
        return iter(self.servers())

    def servers(self) -> list[PooledServer]:
        """The idle servers, oldest first (a new list)."""
        found: list[PooledServer] = []
        slots = self._slots
        for i in range(self._count):
            server = slots[i]
            assert server is not None
            found.append(server)
        return found

    def append(self, server: PooledServer) -> None:
        slots = self._slots
        count = self._count
        if count < len(slots):
            slots[count] = server
        else:
            slots.append(server)
        self._count = count + 1

    def pop(self) -> PooledServer:
        """The server that came back last."""
        count = self._count - 1
        if count < 0:
            raise IndexError("no idle server")
        slots = self._slots
        server = slots[count]
        assert server is not None
        slots[count] = None
        self._count = count
        return server

    def popleft(self) -> PooledServer:
        """The server idle the longest."""
        if not self._count:
            raise IndexError("no idle server")
        server = self._slots.pop(0)
        assert server is not None
        self._count -= 1
        return server

    def remove(self, server: PooledServer) -> None:
        """Take `server` out; ValueError if it is not idle (as list.remove)."""
        index = self._index(server)
        if index < 0:
            raise ValueError("server is not idle")
        del self._slots[index]
        self._count -= 1

    def _index(self, server: PooledServer) -> int:
        slots = self._slots
        for i in range(self._count):
            if slots[i] is server:
                return i
        return -1


class Pool:
    def __init__(
        self,
        settings: PoolSettings,
        connector: Connector,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.settings = settings
        self._connector = connector
        self._loop = loop
        self.idle = IdleServers()
        # Every logged-in server this pool owns, in any state (for SHOW SERVERS & co).
        self.servers: set[PooledServer] = set()
        # The FIFO of waiting clients: a list read from _head (popping from the front
        # of a list is O(n), a deque's methods are generic calls in the compiled
        # build), compacted as the read position moves on. The clients themselves,
        # not an entry object per wait: a client is in the queue at most once, a
        # client that stops waiting is removed at once, and each keeps the time it
        # joined in `wait_started`.
        self._waiters: list[Waiter] = []
        self._head = 0
        # One timer for the whole queue: waiters share query_wait_timeout and are served
        # in order, so the oldest always times out first.
        self._wait_timer: asyncio.Handle | None = None
        # Armed while queued clients wait for a server to come back (see _grow).
        self._patience_timer: asyncio.TimerHandle | None = None
        # The backed-off retry after a failed connect, while clients wait.
        self._retry_timer: asyncio.TimerHandle | None = None
        # Servers this pool owns in any state: idle, active, cleaning, connecting.
        self.size = 0
        self.connecting = 0
        self.probing = 0
        self.closed = False
        self.paused = False
        self.listen_warned = False  # the log has said once that LISTEN here is undone
        # Bumped by reconnect(): servers of an older epoch are closed instead of reused.
        self.epoch = 0
        self.last_connect_error: AcquireError | None = None
        # TLS handshakes with servers: completed, their total seconds, failed.
        self.tls_handshakes = 0
        self.tls_handshake_seconds = 0.0
        self.tls_handshake_errors = 0
        # listen_fanout: notifications passed on to clients (one per client reached).
        self.notifications_passed = 0
        # log_min_duration_statement: requests logged as slow (net/slow_queries.py).
        self.slow_requests = 0
        self.server_parameters: dict[str, str] | None = None
        # Kept here rather than on the pooler's entry for this pool, which is not
        # compiled: clients read both once per transaction.
        # The pooler_check_query as a Query message, and its answer once known.
        self.check_query = b""
        self.check_query_response: bytes | None = None
        # Session parameters that follow a client from server to server (see
        # set_synced_parameters), and what is derived from them: the clients' values
        # (see shared_fingerprint) and the map of names (see parameter_names).
        self.synced_parameters: tuple[str, ...] = ()
        self._fingerprints: dict[tuple[object, ...], tuple[object, ...]] = {}
        self._parameter_names: dict[str, str] | None = None
        self._canonical: dict[tuple[str, str, str], str] = {}
        # Startup settings already worked out, by the packet's encoded settings; valid
        # for the `server_parameters` object they were worked out from (see
        # login_parameters).
        self._login_parameters: dict[bytes, LoginParameters] = {}
        self._login_parameters_basis: dict[str, str] | None = None
        self._connect_failures = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # max_db_connections: shared with the other user pools of the database.
        self.budget: DatabaseBudget | None = None
        self.stats = PoolStats()
        self.scaling = ScalingStats()
        self.statements = PoolStatements(settings.statements_cache_size)

    # ---- acquire / release --------------------------------------------------

    # Methods run per transaction take `now` (time.monotonic()) from their caller,
    # which reads the clock once per event for everything that follows from it.

    def acquire(self, waiter: Waiter, now: float) -> PooledServer | None:
        """An idle server now, or None after queueing the waiter (answered later)."""
        if not self.paused and not self.waiting:
            server = self._pop_idle(now)
            if server is not None:
                self.stats.record_no_wait()
                return server
        waiter.wait_started = now
        self._waiters.append(waiter)
        if self._wait_timer is None:
            self._wait_timer = self._loop.call_later(
                self.settings.query_wait_timeout, self._expire_waiters
            )
        self._grow(now)
        return None

    def cancel_wait(self, waiter: Waiter) -> None:
        """Take a client out of the queue (it left, or its request was cancelled)."""
        waiters = self._waiters
        for i in range(self._head, len(waiters)):
            if waiters[i] is waiter:
                del waiters[i]
                return

    @property
    def waiting(self) -> int:
        """Clients in the queue."""
        return len(self._waiters) - self._head

    def _next_waiter(self, *, force: bool = False) -> Waiter | None:
        """The longest-waiting client, taken out of the queue."""
        if self.paused and not force:
            return None
        waiters = self._waiters
        head = self._head
        if head == len(waiters):
            return None
        waiter = waiters[head]
        head += 1
        if head == len(waiters):
            waiters.clear()
            head = 0
        elif head >= 64 and head * 2 >= len(waiters):
            del waiters[:head]
            head = 0
        self._head = head
        return waiter

    def release(self, server: PooledServer, now: float, *, fresh: bool = False) -> None:
        """Take back a clean, idle server (`fresh`: just opened, serve it once anyway)."""
        if self.closed or server.epoch != self.epoch or self.size > self.settings.pool_size:
            self.discard(server, "pool closed, reconnected or shrunk")
            return
        if not fresh and not server.is_usable(now):
            self.discard(server, "lifetime reached")
            return
        budget = self.budget
        if not fresh and budget is not None and self.waiting:
            reason = budget.reason_to_close(self, server, now)
            if reason is not None:
                # Its slot goes to the database's other users (freed, feed) before this
                # pool's own queue asks for one again (discard, _grow).
                self.discard(server, reason)
                return
        waiter = self._next_waiter()
        if waiter is not None:
            if not fresh and self.size >= self.settings.warm_threshold:
                self.scaling.antic_notify += 1
            self._hand_over(waiter, server, now)
            return
        if budget is not None and budget.count > budget.limit:
            # Opened from the reserve (or the limit was lowered): not kept idle.
            self.discard(server, "over max_db_connections")
            return
        server.mark_idle(now)
        self.idle.append(server)
        if budget is not None and budget.starving:
            budget.feed()  # another user's clients may take it

    def discard(self, server: PooledServer, reason: str) -> None:
        """Forget a server (closing it if needed) and refill for waiting clients.

        Only a server in `servers` holds a slot: one whose login failed, timed out or
        lost a fallback race never joined, and its socket closing gives nothing back
        (else `size` would sink below the servers really open, and the pool would open
        ever more of them to reach its minimum)."""
        if server.discarded:
            return
        server.discarded = True
        if not server.closed:
            server.close(reason)
        if server not in self.servers:
            return
        self.servers.remove(server)
        self.statements.closed_hits += server.statements.hits
        self.statements.closed_misses += server.statements.misses
        self.size -= 1
        if self.budget is not None:
            self.budget.freed(self)
        if self.waiting or self.size < self.settings.min_pool_size:
            self._grow()

    def _pop_idle(self, now: float) -> PooledServer | None:
        idle = self.idle
        while idle:
            server = idle.popleft() if self.settings.round_robin else idle.pop()
            state = server.checkout_state(now)
            # No epoch check: reconnect() empties the idle list, release() screens.
            if not state:
                return server
            if state == _EXPIRED:
                self.discard(server, "lifetime or idle timeout reached")
            elif state == _NEEDS_PROBE:
                self._probe(server)
            else:
                self.discard(server, "server sent data while idle")
        return None

    def _probe(self, server: PooledServer) -> None:
        self.probing += 1

        def done(ok: bool) -> None:
            self.probing -= 1
            if ok:
                self.release(server, _now())
            else:
                self.discard(server, "idle check failed")

        server.probe(done)

    def _hand_over(self, waiter: Waiter, server: PooledServer, now: float) -> None:
        self.stats.record_wait(now - waiter.wait_started)
        waiter.on_server(server, now)

    def _expire_waiters(self) -> None:
        """Fail the waiters whose query_wait_timeout passed; re-arm for the next one."""
        self._wait_timer = None
        now = _now()
        timeout = self.settings.query_wait_timeout
        waiters = self._waiters
        while self._head < len(waiters):
            deadline = waiters[self._head].wait_started + timeout
            if deadline > now:
                self._wait_timer = self._loop.call_later(deadline - now, self._expire_waiters)
                return
            waiter = self._next_waiter(force=True)
            assert waiter is not None
            if self.connecting >= self.settings.max_concurrent_creates:
                self.scaling.gate_budget_ex += 1
            self._fail_waiter(waiter)

    def _fail_waiter(self, waiter: Waiter) -> None:
        err = self.last_connect_error
        if err is not None and self.size == self.connecting:  # no server yet: say why
            waiter.on_acquire_error(err.code, err.message)
            return
        waiter.on_acquire_error(
            sqlstate.TOO_MANY_CONNECTIONS,
            "could not get a database connection from the pool within "
            f"query_wait_timeout ({self.settings.query_wait_timeout:g}s); "
            "please try again later",
        )

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.waiting and self.idle:
            now = _now()
            server = self._pop_idle(now)
            if server is None:
                break
            waiter = self._next_waiter()
            assert waiter is not None  # not paused, and the queue is not empty
            self._hand_over(waiter, server, now)
        self._grow()

    # ---- growing ------------------------------------------------------------

    def _grow(self, now: float = -1.0) -> None:
        """Open servers for queued clients (and the minimum), within the limits.

        Below the warm threshold every queued client not already covered by a server
        being opened or probed gets one at once. Above it, a client first waits its
        patience (see _patience) for a server to come back, which it gets directly
        (release), and a server opens for it only if none did; a timer looks again
        when the next client's patience runs out. `now`: time.monotonic() if the
        caller has read it, else negative (read here when needed).
        """
        if self.closed or self.paused:  # paused: no server connections until RESUME
            return
        if self._retry_timer is not None:
            # Backing off after a failed opening: the retry grows the pool. Clients
            # queueing meanwhile must not each start an opening of their own.
            return
        s = self.settings
        room = s.pool_size - self.size
        if room <= 0:
            return
        coming = self.connecting + self.probing
        wanted = self.waiting - coming
        impatient = 0
        # Above the threshold, and only while a server is out with a client: with
        # none, nothing can come back to wait for.
        if wanted > 0 and self.active > 0:
            cold = s.warm_threshold - self.size
            if wanted > cold and cold < room:
                if now < 0.0:
                    now = _now()
                wanted, impatient = self._impatient(wanted, cold, coming, room, now)
        below_minimum = s.min_pool_size - self.size
        if below_minimum > wanted:
            wanted = below_minimum
        parallel = s.max_concurrent_creates - self.connecting
        count = wanted
        if room < count:
            count = room
        if parallel < count:
            count = parallel
            self.scaling.gate_waits += 1
        budget = self.budget
        if budget is not None and count > 0 and now < 0.0:
            now = _now()
        for _ in range(count):
            if budget is not None and not budget.take(self, now):
                break
            self.size += 1
            self.connecting += 1
            self.scaling.creates += 1
            if impatient > 0:
                impatient -= 1
                self.scaling.create_fallback += 1
            task = self._loop.create_task(self._connect_one())
            self._tasks.add(task)
            task.add_done_callback(self._connect_task_done)

    def _impatient(
        self, uncovered: int, cold: int, coming: int, room: int, now: float
    ) -> tuple[int, int]:
        """Above the warm threshold: how many servers to open now for the `uncovered`
        queued clients (those past their patience, or `cold` more to reach the
        threshold), and how many of those are for clients past their patience."""
        patience = self._patience()
        waiters = self._waiters
        head = self._head
        # Clients are queued in order of arrival: the impatient ones come first. Only
        # as many as could get a server matter. While the first has waited less than
        # the shortest patience the jitter can draw, none is due whatever it draws:
        # no random number then (this runs at every queued transaction).
        due = 0
        if now - waiters[head].wait_started >= patience * (1.0 - _JITTER):
            cutoff = now - _jittered(patience)
            for i in range(head, head + min(self.waiting, coming + room)):
                if waiters[i].wait_started > cutoff:
                    break
                due += 1
        impatient = due - coming
        if impatient > 0:
            self.scaling.antic_timeout += 1
        allowed = impatient if impatient > cold else cold
        if allowed < 0:
            allowed = 0
        if allowed < uncovered and allowed < room and self._patience_timer is None:
            next_due = waiters[head + coming + allowed].wait_started + _jittered(patience)
            self._patience_timer = self._loop.call_later(
                max(next_due - now, 0.0), self._patience_over
            )
        wanted = allowed if allowed < uncovered else uncovered
        return wanted, (impatient if impatient < wanted else wanted)

    def _patience(self) -> float:
        """How long a queued client waits for a server to come back, before jitter."""
        p99 = self.stats.current_xact_p99()
        if p99 <= 0.0:
            patience = _PATIENCE_COLD
        else:
            patience = min(max(2.0 * p99, _PATIENCE_MIN), _PATIENCE_MAX)
        return min(patience, self.settings.query_wait_timeout - _PATIENCE_RESERVE)

    def _patience_over(self) -> None:
        self._patience_timer = None
        self._grow()

    async def _connect_one(self) -> None:
        try:
            server = await self._connector(self)
        except AcquireError as err:
            self.connecting -= 1
            self.size -= 1
            self._connect_failed(err)
            return
        except Exception as exc:  # unexpected: keep the pool alive, tell waiters
            logger.exception("pool %s: unexpected error opening a server", self.name)
            self.connecting -= 1
            self.size -= 1
            self._connect_failed(AcquireError(sqlstate.INTERNAL_ERROR, str(exc)))
            return
        self.connecting -= 1
        if server.closed:  # it went away between its login and now: it never joined
            self.size -= 1
            self._connect_failed(
                AcquireError(
                    sqlstate.CONNECTION_FAILURE, "server closed the connection after login"
                )
            )
            return
        self._connect_failures = 0
        self.last_connect_error = None
        if self._retry_timer is not None:  # the server is reachable: no more waiting
            self._retry_timer.cancel()
            self._retry_timer = None
        self.servers.add(server)
        self.release(server, _now(), fresh=True)
        if self.waiting or self.size < self.settings.min_pool_size:
            self._grow()  # a slot to open servers in is free again

    def _connect_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            # close(): the server never counts. Here rather than in _connect_one, which
            # never runs at all when cancelled before its first step.
            self.connecting -= 1
            self.size -= 1
            if self.budget is not None:
                self.budget.freed(self)

    def _connect_failed(self, err: AcquireError) -> None:
        self.last_connect_error = err
        self._connect_failures += 1
        if self.budget is not None:
            self.budget.freed(self)
        logger.warning("pool %s: cannot connect to server: %s", self.name, err.message)
        if err.code in _PERMANENT_LOGIN_ERRORS:
            # Retrying can't help; fail everyone who waits now, with the real reason.
            self.fail_waiters(err.code, err.message)
            return
        if self.waiting and self._retry_timer is None:
            # Back off a little so a down server isn't hammered; waiters keep their
            # own query_wait_timeout. One retry pending at a time: failures that
            # each scheduled their own would undo the backoff.
            delay = min(0.05 * (2 ** min(self._connect_failures, 5)), 1.0)
            self._retry_timer = self._loop.call_later(delay, self._retry_connect)

    def _retry_connect(self) -> None:
        self._retry_timer = None
        self._grow()

    # ---- maintenance --------------------------------------------------------

    def retain(self, budget: int | None) -> int:
        """Close expired idle servers (at most `budget`; None = no limit) and refill the
        minimum. Returns how many were closed."""
        closed = 0
        now = _now()
        for server in self.idle.servers():  # a copy: discarding changes the list
            if budget is not None and closed >= budget:
                break
            # Discarding one may let another pool evict the next (budget.feed).
            if server in self.idle and server.checkout_state(now) == _EXPIRED:
                self.idle.remove(server)
                self.discard(server, "lifetime or idle timeout reached")
                closed += 1
        if self.size < self.settings.min_pool_size:
            if self.connecting >= self.settings.max_concurrent_creates:
                self.scaling.replenish_def += 1
            self._grow()
        return closed

    def lifetime_deadline(self, now: float) -> float:
        lifetime = self.settings.server_lifetime
        if lifetime <= 0:
            return float("inf")
        return now + _jittered(lifetime)

    def idle_limit(self) -> float:
        timeout = self.settings.idle_timeout
        if timeout <= 0:
            return float("inf")
        return _jittered(timeout)

    def close_idle(self, reason: str) -> None:
        while self.idle:
            self.discard(self.idle.pop(), reason)

    def reconnect(self, reason: str) -> None:
        """Replace every server: idle ones close now, busy ones when given back."""
        self.epoch += 1
        self.close_idle(reason)
        if self.size < self.settings.min_pool_size or self.waiting:
            self._grow()

    def close_all(self, reason: str) -> None:
        """Close every server at once, busy ones included (KILL)."""
        self.epoch += 1
        self.close_idle(reason)
        for server in list(self.servers):
            self.discard(server, reason)

    def fail_waiters(self, code: str, message: str) -> None:
        while True:
            waiter = self._next_waiter(force=True)
            if waiter is None:
                return
            waiter.on_acquire_error(code, message)

    def update_settings(self, settings: PoolSettings) -> None:
        """Apply reloaded settings that need no new servers (sizes, timeouts).

        A smaller pool_size closes idle servers above it at once (oldest first), as
        PgBouncer does: kept idle they would be handed out again, so more than
        pool_size transactions could hold a server at a time. Busy ones above it close
        when they are released."""
        self.settings = settings
        self.statements.capacity = settings.statements_cache_size
        while self.idle and self.size > settings.pool_size:
            self.discard(self.idle.popleft(), "pool_size lowered by a reload")
        if self._wait_timer is not None:
            # Waiters' deadlines follow the new query_wait_timeout: check them anew.
            self._wait_timer.cancel()
            self._wait_timer = self._loop.call_soon(self._expire_waiters)
        self._grow()  # a larger pool may serve queued clients now

    def join_budget(self, budget: DatabaseBudget | None) -> None:
        """Count this pool's servers in `budget` (None: in none)."""
        if budget is self.budget:
            return
        if self.budget is not None:
            self.budget.leave(self)
        self.budget = budget
        if budget is not None:
            budget.join(self)

    def close(self, reason: str) -> None:
        """Stop the pool: fail waiters, close idle servers; active ones close on return."""
        self.closed = True
        self.fail_waiters(sqlstate.ADMIN_SHUTDOWN, reason)
        self.close_idle(reason)
        if self.budget is not None and self.size == 0:
            self.budget.leave(self)  # else when its last server closes (freed)
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if self._patience_timer is not None:
            self._patience_timer.cancel()
            self._patience_timer = None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for task in list(self._tasks):
            task.cancel()

    @property
    def name(self) -> str:
        return f"{self.settings.user}@{self.settings.database}"

    def set_synced_parameters(self, synced: tuple[str, ...]) -> None:
        """The parameters clients carry from server to server (config: reload)."""
        if synced != self.synced_parameters:
            # A new object: the connections' fingerprint caches compare it by identity.
            self.synced_parameters = synced
            self._fingerprints = {}
            self._parameter_names = None
            self._login_parameters = {}

    def parameter_names(self) -> dict[str, str]:
        """Lower-cased parameter name -> the spelling the server reports (or we sync).
        The same for every login once the pool has learnt its server parameters."""
        names = self._parameter_names
        if names is None:
            assert self.server_parameters is not None
            names = {name.lower(): name for name in self.server_parameters}
            names.update((name.lower(), name) for name in self.synced_parameters)
            self._parameter_names = names
        return names

    def canonical_parameter(self, name: str, value: str) -> str | None:
        """How the server spells a client's startup value of a synced parameter
        ("ISO" -> "ISO, MDY", "utc" -> "UTC"), once a server has applied it."""
        assert self.server_parameters is not None
        default = self.server_parameters.get(name, "")
        return self._canonical.get((name, default, value))

    def remember_canonical(self, name: str, value: str, canonical: str) -> None:
        """A server applied `value` over its session default and showed `canonical`."""
        assert self.server_parameters is not None
        key = (name, self.server_parameters.get(name, ""), value)
        if self._canonical.get(key) != canonical:
            remember(self._canonical, key, canonical, _CANONICAL_VALUES)
            # Settings worked out before may hold the value in the client's spelling.
            self._login_parameters = {}

    def login_parameters(self, encoded: bytes) -> LoginParameters | None:
        """What a startup packet's settings (`encoded`, as sent) came to at an earlier
        login, if still true: it depends on the server parameters, the synced ones and
        the spellings learnt, and is forgotten when any of them changes."""
        if self._login_parameters_basis is not self.server_parameters:
            # A new set of server parameters (it is replaced, never changed in place).
            self._login_parameters_basis = self.server_parameters
            self._login_parameters = {}
            return None
        return self._login_parameters.get(encoded)

    def remember_login_parameters(self, encoded: bytes, outcome: LoginParameters) -> None:
        if (
            encoded
            and len(encoded) <= _LOGIN_PARAMETERS_REMEMBERED
            and self._login_parameters_basis is self.server_parameters
        ):
            remember(self._login_parameters, encoded, outcome, _LOGIN_PARAMETERS)

    def shared_fingerprint(self, fingerprint: tuple[object, ...]) -> tuple[object, ...]:
        """This pool's one object equal to a client's parameter fingerprint: clients
        with the same session parameters share it, so a server that has served one of
        them recognises the next by identity instead of comparing every value."""
        shared = self._fingerprints.get(fingerprint)
        if shared is not None:
            return shared
        if len(self._fingerprints) < _SHARED_FINGERPRINTS:
            self._fingerprints[fingerprint] = fingerprint
        return fingerprint

    def prepared_hits_misses(self) -> tuple[int, int]:
        """Statement hits and misses of every server this pool has had."""
        hits, misses = self.statements.closed_hits, self.statements.closed_misses
        for server in self.servers:
            hits += server.statements.hits
            misses += server.statements.misses
        return hits, misses

    @property
    def active(self) -> int:
        return self.size - len(self.idle) - self.connecting - self.probing

    @property
    def unsettled(self) -> int:
        """Servers that are not idle: in use, being opened or having their idle check."""
        return self.size - len(self.idle)

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest waiting client has waited, `now` being time.monotonic()."""
        if self._head < len(self._waiters):
            return now - self._waiters[self._head].wait_started
        return 0.0


class DatabaseBudget:
    """max_db_connections: how many servers the user pools of one database hold together.

    A pool that would go over the limit closes an idle server of another user's pool
    and takes its place: one open for at least `min_lifetime`, from the pool with the
    most servers above its floor (its min_pool_size, or `guaranteed` if larger). With
    none to take, its clients wait until a server of the database closes or goes
    idle; once the oldest of them has waited `reserve_timeout`, up to `reserve`
    servers over the limit may open. Those close when released with no client waiting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.limit = 0
        self.reserve = 0
        self.reserve_timeout = 3.0
        self.min_lifetime = 30.0
        self.guaranteed = 0
        # Servers of the member pools in any state (the sum of their sizes).
        self.count = 0
        self.pools: list[Pool] = []
        # Pools with clients waiting that could not open a server for the limit.
        self.starving: list[Pool] = []
        self.evictions = 0
        self.reserve_opened = 0
        # Times a server could not open for the limit and the reserve (clients wait).
        self.exhaustions = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._quiet = False

    def configure(
        self,
        limit: int,
        reserve: int,
        reserve_timeout: float,
        min_lifetime: float,
        guaranteed: int,
    ) -> None:
        self.limit = limit
        self.reserve = reserve
        self.reserve_timeout = reserve_timeout
        self.min_lifetime = min_lifetime
        self.guaranteed = guaranteed
        self._trim()  # a smaller limit closes idle servers over it
        self.feed()  # a larger one may let waiting clients in

    def _trim(self) -> None:
        for pool in self.pools:
            while self.count > self.limit and pool.idle and pool.size > self._floor(pool):
                pool.discard(pool.idle.popleft(), "over max_db_connections")

    def join(self, pool: Pool) -> None:
        self.pools.append(pool)
        self.count += pool.size

    def leave(self, pool: Pool) -> None:
        if pool in self.pools:
            self.pools.remove(pool)
            self.count -= pool.size
        if pool in self.starving:
            self.starving.remove(pool)

    def take(self, pool: Pool, now: float) -> bool:
        """Room for one more server of `pool`, counted at once; False: it must wait."""
        if self.count < self.limit or self._evict_for(pool, now):
            self.count += 1
            return True
        if self.count < self.limit + self.reserve and pool.oldest_wait(now) >= self.reserve_timeout:
            self.reserve_opened += 1
            self.count += 1
            return True
        self.exhaustions += 1
        self._starve(pool, now)
        return False

    def reason_to_close(self, pool: Pool, server: PooledServer, now: float) -> str | None:
        """Why a server `pool` got back should close rather than serve its queue (None:
        it serves it). Over the limit and the reserve (a reload lowered them) it closes,
        or the count would never come down while clients queue. At the limit, a user
        whose clients have waited longer for room gets the slot, as an idle server would
        be taken for it (past min_connection_lifetime, above `pool`'s floor): else a user
        that keeps its queue full would hold the database's servers for good."""
        if self.count > self.limit + self.reserve:
            return "over max_db_connections"
        if self.count < self.limit or not self.starving:
            return None
        if pool.size <= self._floor(pool) or now - server.created < self.min_lifetime:
            return None
        mine = pool.oldest_wait(now)
        for other in self.starving:
            if (
                other is not pool
                and not other.closed
                and not other.paused
                and other.waiting > other.connecting + other.probing
                and other.size < other.settings.pool_size
                and other.oldest_wait(now) > mine
            ):
                self.evictions += 1
                return f"closed for {other.name}, waiting longer (max_db_connections)"
        return None

    def freed(self, pool: Pool) -> None:
        """A server of `pool` closed, or failed to open."""
        self.count -= 1
        if pool.closed and pool.size == 0:
            self.leave(pool)
        if not self._quiet:
            self.feed()

    def feed(self) -> None:
        """Let starving pools try again (room was freed, or a server went idle)."""
        if self._quiet or not self.starving:
            return
        pools = self.starving
        self.starving = []
        self._quiet = True  # no feeding from inside: one pass, in the order they starved
        try:
            for pool in pools:
                if pool.waiting and not pool.closed:
                    pool._grow()
        finally:
            self._quiet = False

    def _evict_for(self, pool: Pool, now: float) -> bool:
        found: tuple[Pool, PooledServer] | None = None
        most = 0
        for other in self.pools:
            surplus = self._surplus(other, pool)
            if surplus <= most:
                continue
            # The least recently used idle server old enough to go (the list's front).
            for server in other.idle:
                if now - server.created >= self.min_lifetime:
                    found, most = (other, server), surplus
                    break
        if found is None:
            return False
        victim, chosen = found
        victim.idle.remove(chosen)
        self.evictions += 1
        quiet = self._quiet
        self._quiet = True
        try:
            victim.discard(chosen, f"evicted for {pool.name} (max_db_connections)")
        finally:
            self._quiet = quiet
        return True

    def _surplus(self, other: Pool, pool: Pool) -> int:
        """Servers of `other` that may be closed for `pool`'s clients (0: none)."""
        if other is pool or other.closed:
            return 0
        return other.size - self._floor(other)

    def _floor(self, pool: Pool) -> int:
        """Servers of `pool` that are never taken for another pool."""
        floor = pool.settings.min_pool_size
        return self.guaranteed if self.guaranteed > floor else floor

    def _starve(self, pool: Pool, now: float) -> None:
        if pool not in self.starving:
            self.starving.append(pool)
        # Try again when the reserve opens to this pool or an idle server grows old
        # enough to be taken, whichever comes first; a server that closes or goes
        # idle before then tries again at once (freed, feed).
        at = float("inf")
        if self.reserve > 0 and self.count < self.limit + self.reserve:
            at = now + self.reserve_timeout - pool.oldest_wait(now)
        for other in self.pools:
            if self._surplus(other, pool) <= 0:
                continue
            for server in other.idle:
                ready = server.created + self.min_lifetime
                if now < ready < at:
                    at = ready
        if at == float("inf"):
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(at - now, 0.0) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.feed()
