"""Patroni-assisted fallback: when a pool's own server is unreachable, open servers on
another member of its Patroni cluster for a while.

A pool configured with ``patroni_api_urls`` opens servers as usual. When that fails
because the server is not there (connection refused or timed out, or PostgreSQL
answering 57P0x: shutting down, starting up), the local server is put aside for
``fallback_cooldown`` and new servers are opened elsewhere: ``GET /cluster`` is asked of
every URL at once, and the members are tried in two waves — every synchronous standby
at once first (the likely next primary, with no data lost), then every other member at
once; the first to log in wins. Each winner gets ``fallback_lifetime`` instead of the
server lifetime, so the pool comes back once the local server does. Later servers of
the cooldown go to the same member without asking Patroni again. A member that fails
is skipped for ``fallback_connect_timeout``, doubled for each failure in a row (at most
a minute). Login errors from the local server (a wrong password, a missing database)
never start a fallback: the server is there, and says no.

One Fallback serves every user pool of one ``[pools.<name>]``; with several workers,
each has its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from pg_doorman.net.patroni_api import Member, PatroniApiError, fetch_cluster
from pg_doorman.pool.pool import AcquireError, ConnectTimeout
from pg_doorman.protocol import sqlstate

logger = logging.getLogger(__name__)

# Roles tried first: a synchronous (or quorum) standby is the promotion candidate.
SYNCHRONOUS_ROLES: Final = frozenset(("sync_standby", "quorum_standby"))
# Patroni states of a PostgreSQL that serves (a leader "running", a replica
# "streaming"): as in PgDoorman, members stopped, crashed, starting or restoring are no
# candidates, nor members tagged never to be promoted or to take load.
SERVING_STATES: Final = frozenset(("running", "streaming"))
EXCLUDING_TAGS: Final = frozenset(("nofailover", "noloadbalance"))
FAILURE_REASONS: Final = (
    "connect_error",
    "startup_error",
    "server_unavailable",
    "timeout",
    "other",
)
# A failing member is skipped at most this long, however often it failed.
MEMBER_COOLDOWN_CAP: Final = 60.0
# One warning per member and this many seconds; the rest go to debug.
WARN_EVERY: Final = 10.0
# Upper bounds (seconds) of the /cluster duration histogram.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerLike(Protocol):
    def close(self, reason: str) -> None: ...


S = TypeVar("S", bound=ServerLike)


@dataclass(frozen=True, slots=True)
class FallbackSettings:
    urls: tuple[str, ...]
    cooldown: float = 30.0
    api_timeout: float = 5.0
    connect_timeout: float = 5.0
    lifetime: float = 30.0


def local_unavailable(error: AcquireError) -> bool:
    """Whether a failed server login means the server is not there to serve."""
    return error.code == sqlstate.CONNECTION_FAILURE or error.code.startswith("57P")


def failure_reason(error: BaseException) -> str:
    if isinstance(error, ConnectTimeout):
        return "timeout"
    if isinstance(error, AcquireError):
        if error.code == sqlstate.CONNECTION_FAILURE:
            return "connect_error"
        if error.code.startswith("57P"):
            return "server_unavailable"
        return "startup_error"
    return "other"


def eligible(member: Member) -> bool:
    """Whether Patroni says the member serves and may be fallen back on."""
    return member.state in SERVING_STATES and not member.tags & EXCLUDING_TAGS


def candidate_waves(members: Sequence[Member], skipped: set[tuple[str, int]]) -> list[list[Member]]:
    """Synchronous standbys, then every other member, each in listed order; members
    that do not serve (eligible()) are left out."""
    first: list[Member] = []
    second: list[Member] = []
    seen: set[tuple[str, int]] = set()
    for member in members:
        address = (member.host, member.port)
        if address in skipped or address in seen or not eligible(member):
            continue
        seen.add(address)
        (first if member.role in SYNCHRONOUS_ROLES else second).append(member)
    return [wave for wave in (first, second) if wave]


@dataclass
class FallbackStats:
    api_requests: int = 0
    api_errors: int = 0
    # /cluster durations: counts per DURATION_BUCKETS bound (cumulative at export), sum.
    api_duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    api_duration_over: int = 0
    api_duration_sum: float = 0.0
    connections: int = 0
    cache_hits: int = 0
    candidate_failures: Counter[str] = field(default_factory=Counter)

    def record_duration(self, seconds: float) -> None:
        self.api_duration_sum += seconds
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.api_duration_counts[i] += 1
                return
        self.api_duration_over += 1


class Fallback:
    def __init__(
        self,
        name: str,
        settings: FallbackSettings,
        fetch: Callable[[Sequence[str], float], Awaitable[tuple[str, list[Member]]]] = (
            fetch_cluster
        ),
    ) -> None:
        self.name = name
        self.settings = settings
        self._fetch = fetch
        # Monotonic time until which the local server is not tried.
        self.local_down_until = 0.0
        # The member servers go to during this cooldown, once one logged in.
        self.member: Member | None = None
        # Members that failed: until when they are skipped, and failures in a row.
        self._member_down: dict[tuple[str, int], tuple[float, int]] = {}
        self._warned: dict[tuple[str, int], float] = {}
        self.stats = FallbackStats()

    def active(self, now: float) -> bool:
        return now < self.local_down_until

    async def connect(
        self, open_local: Callable[[], Awaitable[S]], open_at: Callable[[str, int], Awaitable[S]]
    ) -> S:
        """A server: the local one unless it is in cooldown or turns out unreachable."""
        if not self.active(time.monotonic()):
            try:
                server = await open_local()
            except AcquireError as error:
                if not local_unavailable(error):
                    raise
                self._local_failed(error)
            else:
                self._local_back()
                return server
        return await self._connect_elsewhere(open_at)

    def _local_failed(self, error: AcquireError) -> None:
        now = time.monotonic()
        if not self.active(now):
            logger.warning(
                "pool %s: server unavailable (%s); opening servers on other Patroni members "
                "for %gs",
                self.name,
                error.message,
                self.settings.cooldown,
            )
        self.local_down_until = now + self.settings.cooldown

    def _local_back(self) -> None:
        if self.member is not None:
            logger.info(
                "pool %s: server reachable again; new servers open there, not on %s:%d",
                self.name,
                self.member.host,
                self.member.port,
            )
            self.member = None

    async def _connect_elsewhere(self, open_at: Callable[[str, int], Awaitable[S]]) -> S:
        member = self.member
        reasons: Counter[str] = Counter()
        if member is not None and not self._skipped((member.host, member.port), time.monotonic()):
            try:
                server = await open_at(member.host, member.port)
            except Exception as error:
                self._member_failed(member, error, reasons)
                self.member = None
            else:
                self.stats.connections += 1
                self.stats.cache_hits += 1
                return server
        members = await self._discover()
        now = time.monotonic()
        skipped = {address for address in self._member_down if self._skipped(address, now)}
        for wave in candidate_waves(members, skipped):
            opened = await self._race(wave, open_at, reasons)
            if opened is not None:
                server, member = opened
                self.stats.connections += 1
                self._member_down.pop((member.host, member.port), None)
                if self.member != member:
                    logger.warning(
                        "pool %s: new servers open on %s:%d (Patroni member %s, %s) until "
                        "the local server is back",
                        self.name,
                        member.host,
                        member.port,
                        member.name or "unnamed",
                        member.role or "no role",
                    )
                self.member = member
                return server
        breakdown = ", ".join(f"{reasons[r]} {r}" for r in FAILURE_REASONS if reasons[r])
        if not members:
            detail = "the Patroni API lists no members"
        elif not any(eligible(m) for m in members):
            detail = "the Patroni API lists no running member to fall back on"
        elif not breakdown:
            detail = "every member failed recently and is skipped for now"
        else:
            detail = f"all fallback candidates rejected ({breakdown})"
        logger.warning("pool %s: server unavailable and %s", self.name, detail)
        raise AcquireError(sqlstate.CONNECTION_FAILURE, f"server unavailable and {detail}")

    async def _discover(self) -> list[Member]:
        stats = self.stats
        stats.api_requests += 1
        started = time.monotonic()
        try:
            _, members = await self._fetch(self.settings.urls, self.settings.api_timeout)
        except PatroniApiError as error:
            stats.api_errors += 1
            logger.warning("pool %s: Patroni API unavailable: %s", self.name, error)
            raise AcquireError(
                sqlstate.CONNECTION_FAILURE,
                "server unavailable and the Patroni API could not be asked for another "
                "member (see the pooler log)",
            ) from None
        finally:
            stats.record_duration(time.monotonic() - started)
        return members

    async def _race(
        self,
        wave: list[Member],
        open_at: Callable[[str, int], Awaitable[S]],
        reasons: Counter[str],
    ) -> tuple[S, Member] | None:
        """Log in to every member of the wave at once: the first server, or None."""
        attempts = {asyncio.ensure_future(open_at(m.host, m.port)): m for m in wave}
        pending = set(attempts)
        winner: tuple[S, Member] | None = None
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for attempt in done:
                    error = attempt.exception()
                    if error is not None:
                        self._member_failed(attempts[attempt], error, reasons)
                    elif winner is None:
                        winner = (attempt.result(), attempts[attempt])
                    else:
                        attempt.result().close("another fallback member logged in first")
        finally:
            for attempt in pending:
                attempt.cancel()
                attempt.add_done_callback(_close_late_server)
        return winner

    def _skipped(self, address: tuple[str, int], now: float) -> bool:
        until, _ = self._member_down.get(address, (0.0, 0))
        return now < until

    def _member_failed(self, member: Member, error: BaseException, reasons: Counter[str]) -> None:
        reason = failure_reason(error)
        reasons[reason] += 1
        self.stats.candidate_failures[reason] += 1
        address = (member.host, member.port)
        now = time.monotonic()
        until, failures = self._member_down.get(address, (0.0, 0))
        if now >= until + MEMBER_COOLDOWN_CAP:
            failures = 0  # failed long ago: start the backoff afresh
        pause = min(self.settings.connect_timeout * 2**failures, MEMBER_COOLDOWN_CAP)
        self._member_down[address] = (now + pause, failures + 1)
        message = error.message if isinstance(error, AcquireError) else repr(error)
        if now - self._warned.get(address, -WARN_EVERY) >= WARN_EVERY:
            self._warned[address] = now
            log = logger.warning
        else:
            log = logger.debug
        log(
            "pool %s: fallback member %s:%d rejected (%s: %s); skipped for %gs",
            self.name,
            member.host,
            member.port,
            reason,
            message,
            pause,
        )


def _close_late_server(attempt: asyncio.Future[Any]) -> None:
    """A member that logged in after the race was decided: its server is not needed."""
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close("another fallback member logged in first")
