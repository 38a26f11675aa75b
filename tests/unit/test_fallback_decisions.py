"""The fallback's decisions: when the local server is put aside, which members are tried
in which order, what is remembered, and how failing members are skipped. Opening a
server is a function given to Fallback.connect; here it succeeds or fails on cue (the
integration tests open real servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pg_doorman.net.patroni_api import Member, PatroniApiError
from pg_doorman.pool import fallback as fallback_module
from pg_doorman.pool.fallback import (
    MEMBER_COOLDOWN_CAP,
    Fallback,
    FallbackSettings,
    candidate_waves,
    failure_reason,
    local_unavailable,
)
from pg_doorman.pool.pool import AcquireError, ConnectTimeout

REFUSED = AcquireError("08006", "cannot connect to server: Connection refused")
SETTINGS = FallbackSettings(urls=("http://patroni:8008",), cooldown=30.0, connect_timeout=5.0)


def member(name: str, role: str, port: int = 5432) -> Member:
    return Member(name, role, "running", f"10.0.0.{name[-1]}", port)


class Server:
    def __init__(self, where: str) -> None:
        self.where = where
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


class Cluster:
    """What Patroni lists, and how each address answers a login."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.fetches = 0
        self.down: dict[str, AcquireError] = {}
        self.delay: dict[str, float] = {}
        self.opened: list[Server] = []
        self.attempts: list[str] = []

    async def fetch(self, urls: Sequence[str], timeout: float) -> tuple[str, list[Member]]:
        self.fetches += 1
        return urls[0], list(self.members)

    async def open_at(self, host: str, port: int) -> Server:
        self.attempts.append(host)
        await asyncio.sleep(self.delay.get(host, 0.0))
        if host in self.down:
            raise self.down[host]
        server = Server(host)
        self.opened.append(server)
        return server


async def local_down() -> Server:
    raise REFUSED


async def local_up() -> Server:
    return Server("local")


def test_waves_put_synchronous_standbys_first_and_skip_what_failed() -> None:
    members = [
        member("n1", "leader"),
        member("n2", "replica"),
        member("n3", "sync_standby"),
        member("n4", "quorum_standby"),
        member("n5", "standby_leader"),
        member("n2", "replica"),  # listed twice
    ]
    waves = candidate_waves(members, {("10.0.0.5", 5432)})
    assert [[m.name for m in wave] for wave in waves] == [["n3", "n4"], ["n1", "n2"]]
    assert candidate_waves([member("n1", "leader")], set()) == [[member("n1", "leader")]]
    assert candidate_waves([], set()) == []


def test_what_counts_as_the_local_server_being_gone() -> None:
    assert local_unavailable(REFUSED)
    assert local_unavailable(AcquireError("57P03", "the database system is starting up"))
    assert not local_unavailable(AcquireError("28P01", "password authentication failed"))
    assert not local_unavailable(AcquireError("3D000", 'database "x" does not exist'))
    assert failure_reason(ConnectTimeout("08006", "timeout")) == "timeout"
    assert failure_reason(REFUSED) == "connect_error"
    assert failure_reason(AcquireError("57P01", "terminating")) == "server_unavailable"
    assert failure_reason(AcquireError("28P01", "password")) == "startup_error"
    assert failure_reason(RuntimeError("?")) == "other"


def test_a_login_error_of_the_local_server_is_not_a_fallback() -> None:
    cluster = Cluster([member("n2", "sync_standby")])
    fallback = Fallback("db", SETTINGS, cluster.fetch)

    async def refused() -> Server:
        raise AcquireError("28P01", "password authentication failed")

    with pytest.raises(AcquireError, match="password"):
        asyncio.run(fallback.connect(refused, cluster.open_at))
    assert cluster.fetches == 0
    assert fallback.local_down_until == 0.0


def test_during_the_cooldown_the_chosen_member_is_used_without_asking_again() -> None:
    cluster = Cluster([member("n1", "leader"), member("n2", "sync_standby")])
    fallback = Fallback("db", SETTINGS, cluster.fetch)
    local_calls = 0

    async def local() -> Server:
        nonlocal local_calls
        local_calls += 1
        raise REFUSED

    async def main() -> None:
        first = await fallback.connect(local, cluster.open_at)
        second = await fallback.connect(local, cluster.open_at)
        assert (first.where, second.where) == ("10.0.0.2", "10.0.0.2")

    asyncio.run(main())
    assert local_calls == 1  # then in cooldown
    assert cluster.fetches == 1
    assert cluster.attempts == ["10.0.0.2", "10.0.0.2"]  # the leader, a later wave: never
    assert fallback.stats.cache_hits == 1
    assert fallback.stats.connections == 2

    # Cooldown over and the local server back: it is used, the member forgotten.
    fallback.local_down_until = 0.0
    server = asyncio.run(fallback.connect(local_up, cluster.open_at))
    assert server.where == "local"
    assert fallback.member is None


def test_the_second_wave_races_and_the_late_winner_is_closed() -> None:
    cluster = Cluster(
        [member("n1", "sync_standby"), member("n2", "replica"), member("n3", "leader")]
    )
    cluster.down["10.0.0.1"] = REFUSED
    cluster.delay["10.0.0.3"] = 0.05  # logs in after the replica did
    fallback = Fallback("db", SETTINGS, cluster.fetch)

    async def main() -> Server:
        server = await fallback.connect(local_down, cluster.open_at)
        await asyncio.sleep(0.1)  # the leader's attempt was cancelled or finished
        return server

    server = asyncio.run(main())
    assert server.where == "10.0.0.2"
    assert fallback.stats.candidate_failures == {"connect_error": 1}
    late = [s for s in cluster.opened if s.where == "10.0.0.3"]
    assert all(s.closed for s in late)


def test_a_failing_cached_member_leads_to_one_new_discovery() -> None:
    cluster = Cluster([member("n1", "sync_standby"), member("n2", "replica")])
    fallback = Fallback("db", SETTINGS, cluster.fetch)
    assert asyncio.run(fallback.connect(local_down, cluster.open_at)).where == "10.0.0.1"
    cluster.down["10.0.0.1"] = AcquireError("57P03", "the database system is starting up")
    assert asyncio.run(fallback.connect(local_down, cluster.open_at)).where == "10.0.0.2"
    assert cluster.fetches == 2
    assert cluster.attempts == ["10.0.0.1", "10.0.0.1", "10.0.0.2"]  # n1 skipped now
    assert fallback.stats.candidate_failures == {"server_unavailable": 1}


def test_failing_members_are_skipped_longer_each_time_up_to_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(fallback_module.time, "monotonic", lambda: clock[0])
    cluster = Cluster([member("n1", "replica")])
    cluster.down["10.0.0.1"] = REFUSED
    fallback = Fallback("db", SETTINGS, cluster.fetch)
    pauses = []
    for _ in range(6):
        with pytest.raises(AcquireError, match=r"all fallback candidates rejected \(1 connect"):
            asyncio.run(fallback.connect(local_down, cluster.open_at))
        until, _ = fallback._member_down[("10.0.0.1", 5432)]
        pauses.append(until - clock[0])
        # Skipped until then: no attempt, a different message.
        with pytest.raises(AcquireError, match="every member failed recently"):
            asyncio.run(fallback.connect(local_down, cluster.open_at))
        clock[0] = until
    assert pauses == [5.0, 10.0, 20.0, 40.0, MEMBER_COOLDOWN_CAP, MEMBER_COOLDOWN_CAP]
    assert len(cluster.attempts) == 6
    # Quiet for long enough: the backoff starts afresh.
    clock[0] += MEMBER_COOLDOWN_CAP
    with pytest.raises(AcquireError):
        asyncio.run(fallback.connect(local_down, cluster.open_at))
    until, failures = fallback._member_down[("10.0.0.1", 5432)]
    assert (until - clock[0], failures) == (5.0, 1)


def test_no_answer_from_patroni() -> None:
    async def unreachable(urls: Sequence[str], timeout: float) -> tuple[str, list[Member]]:
        raise PatroniApiError("http://patroni:8008: Connection refused")

    fallback = Fallback("db", SETTINGS, unreachable)
    with pytest.raises(AcquireError, match="Patroni API could not be asked") as caught:
        asyncio.run(fallback.connect(local_down, Cluster([]).open_at))
    assert caught.value.code == "08006"
    assert (fallback.stats.api_requests, fallback.stats.api_errors) == (1, 1)
    assert sum(fallback.stats.api_duration_counts) == 1
    assert fallback.active(fallback.local_down_until - 1)


def test_a_cluster_without_members() -> None:
    fallback = Fallback("db", SETTINGS, Cluster([]).fetch)
    with pytest.raises(AcquireError, match="lists no members"):
        asyncio.run(fallback.connect(local_down, Cluster([]).open_at))


def test_members_logging_in_at_once_keep_one_server() -> None:
    cluster = Cluster([member("n1", "replica"), member("n2", "replica"), member("n3", "leader")])
    fallback = Fallback("db", SETTINGS, cluster.fetch)
    server = asyncio.run(fallback.connect(local_down, cluster.open_at))
    assert len(cluster.opened) == 3  # all three logged in in the same turn of the loop
    assert [s.closed is None for s in cluster.opened] == [s is server for s in cluster.opened]
    assert {s.closed for s in cluster.opened if s is not server} == {
        "another fallback member logged in first"
    }
