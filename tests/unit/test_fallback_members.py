"""Which Patroni members the fallback may use (as in PgDoorman: only running or
streaming members, none tagged nofailover or noloadbalance), the API's URL, and server
iteration counts no PostgreSQL could send."""

from __future__ import annotations

import asyncio
import json

import pytest

from pg_doorman.net.patroni_api import Member, parse_cluster
from pg_doorman.pool.fallback import Fallback, FallbackSettings, candidate_waves
from pg_doorman.pool.pool import AcquireError


def test_members_that_do_not_serve_are_no_candidates() -> None:
    members = [
        Member("n1", "sync_standby", "stopped", "10.0.0.1", 5432),
        Member("n2", "sync_standby", "crashed", "10.0.0.2", 5432),
        Member("n3", "replica", "starting", "10.0.0.3", 5432),
        Member("n4", "replica", "streaming", "10.0.0.4", 5432),
        Member("n5", "leader", "running", "10.0.0.5", 5432),
    ]
    waves = candidate_waves(members, set())
    assert [[m.name for m in wave] for wave in waves] == [["n4", "n5"]]


def test_members_tagged_nofailover_or_noloadbalance_are_no_candidates() -> None:
    body = {
        "members": [
            {
                "name": "dr",
                "role": "sync_standby",
                "state": "streaming",
                "host": "10.0.0.1",
                "port": 5432,
                "tags": {"nofailover": True},
            },
            {
                "name": "delayed",
                "role": "replica",
                "state": "streaming",
                "host": "10.0.0.2",
                "port": 5432,
                "tags": {"noloadbalance": True},
            },
            {
                "name": "ok",
                "role": "replica",
                "state": "streaming",
                "host": "10.0.0.3",
                "port": 5432,
                "tags": {"nofailover": False},
            },
        ]
    }
    waves = candidate_waves(parse_cluster(json.dumps(body).encode()), set())
    assert [[m.name for m in wave] for wave in waves] == [["ok"]]


def test_a_cluster_of_stopped_members_says_so() -> None:
    members = [Member("n1", "replica", "stopped", "10.0.0.1", 5432)]
    attempts: list[str] = []

    async def fetch(urls: object, timeout: float) -> tuple[str, list[Member]]:
        return "u", members

    async def local() -> object:
        raise AcquireError("08006", "refused")

    async def open_at(host: str, port: int) -> object:
        attempts.append(host)
        raise AcquireError("08006", "refused")

    fallback = Fallback("p", FallbackSettings(urls=("http://x",)), fetch)
    with pytest.raises(AcquireError) as info:
        asyncio.run(fallback.connect(local, open_at))
    assert attempts == []
    assert "running" in info.value.message


@pytest.mark.parametrize(
    "url",
    ["http://h:8008", "http://h:8008/", "http://h:8008/cluster", "http://h:8008/cluster/"],
)
def test_a_url_that_already_names_cluster_asks_for_cluster_once(url: str) -> None:
    """PgDoorman strips a trailing /cluster from patroni_api_urls (client.rs:
    trim_end_matches("/cluster")): a PgDoorman config that lists
    http://node:8008/cluster must not make this pooler ask for /cluster/cluster."""
    from pg_doorman.net.patroni_api import request_for

    request = request_for(url)[3]
    assert request.startswith(b"GET /cluster HTTP/1.1\r\n"), request


@pytest.mark.parametrize("iterations", ["9" * 5000, str(2**31), str(10**18)])
def test_an_absurd_server_iteration_count_is_a_scram_error(iterations: str) -> None:
    """PostgreSQL's scram_iterations is at most INT_MAX. A server-first-message beyond
    that is malformed: ScramError (08P01 to the client), not a ValueError that escapes
    the login as an internal error, nor PBKDF2 run for years on the event loop."""
    from pg_doorman.auth.scram import ScramClientSession, ScramError

    session = ScramClientSession(password="secret", nonce="abc")
    server_first = f"r=abcdef,s=c2FsdA==,i={iterations}".encode()
    with pytest.raises(ScramError):
        session.handle_server_first(server_first)
