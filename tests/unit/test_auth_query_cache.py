"""auth_query's reply parsing and its cache (the lookup replaced by canned replies;
tests/integration/test_auth_query.py runs the real thing against PostgreSQL)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pg_doorman.auth.auth_query import (
    MAX_CACHED_USERS,
    AuthQuery,
    AuthQueryError,
    LookedUp,
    LookupConnections,
    lookup_messages,
    parse_lookup_reply,
    parse_startup_parameters,
    password_column,
)
from pg_doorman.config.schema import AuthQueryConfig
from pg_doorman.pool.pool import AcquireError
from pg_doorman.protocol import messages
from pg_doorman.protocol.framing import MessageBuffer

MD5 = "md5" + "0" * 32


def reply(columns: list[str], *rows: list[str | None]) -> bytes:
    out = messages.PARSE_COMPLETE + messages.BIND_COMPLETE
    out += messages.row_description([(name, 25) for name in columns])
    for row in rows:
        out += messages.data_row(row)
    out += messages.command_complete(f"SELECT {len(rows)}")
    return out + messages.READY_IDLE


def error_reply(message: str) -> bytes:
    return messages.error_response("ERROR", "42P01", message) + messages.READY_IDLE


# --- the wire --------------------------------------------------------------------------------


def test_lookup_messages_are_one_extended_round_trip() -> None:
    data = lookup_messages("SELECT passwd FROM t WHERE u = $1", "alice")
    kinds = messages.message_types(data)
    assert bytes(kinds) == b"PBDES"  # nothing else: no SET, no session state
    assert b"SELECT passwd FROM t WHERE u = $1\x00" in data
    assert b"\x00\x00\x00\x05alice" in data  # $1 as text, length-prefixed


@pytest.mark.parametrize(
    ("columns", "index"),
    [
        (["usename", "passwd"], 1),
        (["password", "x", "y"], 0),
        (["rolname", "rolpassword"], 1),
        (["secret"], 0),
        (["name", "secret"], 1),
        (["PASSWD", "usename"], 0),
    ],
)
def test_the_password_column(columns: list[str], index: int) -> None:
    assert password_column(columns) == index


def test_three_unnamed_columns_are_a_config_error() -> None:
    with pytest.raises(AuthQueryError, match="name the password column"):
        password_column(["a", "b", "c"])


def test_parse_found_missing_and_null() -> None:
    assert parse_lookup_reply(reply(["usename", "passwd"], ["alice", MD5])) == LookedUp(True, MD5)
    assert parse_lookup_reply(reply(["usename", "passwd"])) == LookedUp(False)
    assert parse_lookup_reply(reply(["usename", "passwd"], ["alice", None])) == LookedUp(True, "")


def test_the_startup_parameters_column_is_never_the_password() -> None:
    columns = ["usename", "secret", "startup_parameters"]
    assert password_column(columns) == 1
    assert password_column(["startup_parameters", "secret"]) == 1
    found = parse_lookup_reply(reply(columns, ["alice", MD5, '{"work_mem": "8MB"}']))
    assert found == LookedUp(True, MD5, '{"work_mem": "8MB"}')
    assert parse_lookup_reply(reply(columns, ["alice", MD5, None])).parameters is None


def test_startup_parameters_of_a_looked_up_user() -> None:
    text = '{"work_mem": "8MB", "jit": false, "statement_timeout": 5000, "role": "admin"}'
    parameters, problems, dropped = parse_startup_parameters(text)
    assert parameters == {"work_mem": "8MB", "jit": "off", "statement_timeout": "5000"}
    assert problems == [
        "startup parameter 'role' ignored: reserved: the pooler sets this parameter itself"
    ]
    assert dropped == "auth_query_invalid_entry"
    assert parse_startup_parameters(None) == ({}, [], None)
    assert parse_startup_parameters(" ") == ({}, [], None)
    assert parse_startup_parameters('{"work_mem": "8MB"}') == ({"work_mem": "8MB"}, [], None)
    assert parse_startup_parameters('{"a b": "x", "_pq_.x": "1", "s": [1]}')[0] == {}
    empty, problems, dropped = parse_startup_parameters("{oops")
    assert empty == {} and problems[0].startswith("startup_parameters is not JSON")
    assert dropped == "auth_query_invalid_json"
    assert parse_startup_parameters('["work_mem"]') == (
        {},
        ["startup_parameters is not a JSON object: all ignored"],
        "auth_query_invalid_shape",
    )


def test_parse_refuses_several_rows_and_errors() -> None:
    with pytest.raises(AuthQueryError, match="2 rows") as info:
        parse_lookup_reply(reply(["passwd"], [MD5], [MD5]))
    assert info.value.code == "21000"
    with pytest.raises(AuthQueryError, match="relation t does not exist") as info:
        parse_lookup_reply(error_reply("relation t does not exist"))
    assert info.value.code == "42P01"


# --- the cache -------------------------------------------------------------------------------


def bound_user(data: bytes) -> str:
    """$1 of the Bind message in lookup_messages()."""
    buffer = MessageBuffer()
    buffer.feed(data)
    while (message := buffer.next_message()) is not None:
        kind, body = message
        if kind == ord("B"):
            # portal "", statement "", no format codes, one parameter: length, value
            assert body[:6] == b"\x00\x00\x00\x00\x00\x01"
            length = int.from_bytes(body[6:10], "big")
            return body[10 : 10 + length].decode()
    raise AssertionError("no Bind message")


class CannedLookups(LookupConnections):
    """Answers lookups from a dict; counts them; may be told to fail or to stall."""

    def __init__(self, passwords: dict[str, str | None]) -> None:
        self.passwords = passwords
        self.queries = 0
        self.errors = 0
        self.fail_with: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def run(self, message: bytes) -> bytes:
        self.queries += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        user = bound_user(message)
        if user not in self.passwords:
            return reply(["usename", "passwd"])
        return reply(["usename", "passwd"], [user, self.passwords[user]])

    def close(self, reason: str) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    passwords: dict[str, str | None], **settings: Any
) -> tuple[AuthQuery, CannedLookups, Clock]:
    config = AuthQueryConfig(query="q $1", user="u", **settings)
    lookups = CannedLookups(passwords)
    clock = Clock()
    return AuthQuery(config, lookups, clock), lookups, clock


def test_found_users_are_cached_for_cache_ttl() -> None:
    auth, lookups, clock = make({"alice": MD5}, cache_ttl=60_000)

    async def main() -> None:
        assert await auth.user("alice") == (True, MD5, {})
        clock.now += 59
        assert await auth.user("alice") == (True, MD5, {})
        assert lookups.queries == 1
        clock.now += 2
        assert await auth.user("alice") == (True, MD5, {})
        assert lookups.queries == 2

    asyncio.run(main())
    assert (auth.stats.cache_hits, auth.stats.cache_misses) == (1, 2)


def test_missing_users_are_cached_for_cache_failure_ttl() -> None:
    auth, lookups, clock = make({}, cache_failure_ttl=5_000)

    async def main() -> None:
        assert await auth.user("bob") == (False, "", {})
        lookups.passwords["bob"] = MD5
        clock.now += 4
        assert await auth.user("bob") == (False, "", {})
        clock.now += 2
        assert await auth.user("bob") == (True, MD5, {})

    asyncio.run(main())
    assert lookups.queries == 2


def test_refetch_is_rate_limited_and_reports_only_changes() -> None:
    auth, lookups, clock = make({"alice": MD5}, min_interval=1_000)

    async def main() -> None:
        await auth.user("alice")
        assert await auth.refetch("alice") is None  # within min_interval
        assert auth.stats.cache_rate_limited == 1
        clock.now += 1
        assert await auth.refetch("alice") is None  # fetched, unchanged
        lookups.passwords["alice"] = "md5" + "1" * 32
        clock.now += 1
        assert await auth.refetch("alice") == (True, "md5" + "1" * 32, {})
        assert await auth.user("alice") == (True, "md5" + "1" * 32, {})

    asyncio.run(main())
    assert auth.stats.cache_refetches == 2
    assert lookups.queries == 3


def test_concurrent_lookups_of_one_user_share_one_query() -> None:
    auth, lookups, _ = make({"alice": MD5})
    lookups.gate = asyncio.Event()

    async def main() -> list[tuple[bool, str]]:
        waiting = [asyncio.ensure_future(auth.user("alice")) for _ in range(5)]
        await asyncio.sleep(0.01)
        # One of the waiters gives up; the others still get the answer.
        waiting[0].cancel()
        assert lookups.gate is not None
        lookups.gate.set()
        return await asyncio.gather(*waiting[1:])

    assert asyncio.run(main()) == [(True, MD5, {})] * 4
    assert lookups.queries == 1


def test_failures_are_not_cached_and_reach_every_waiter() -> None:
    auth, lookups, _ = make({"alice": MD5})
    lookups.fail_with = AcquireError("08006", "cannot connect to server 127.0.0.1:1")

    async def main() -> None:
        results = await asyncio.gather(
            auth.user("alice"), auth.user("alice"), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, AuthQueryError)
            assert result.code == "08006"
            assert "auth_query could not connect: cannot connect" in result.message
        lookups.fail_with = None
        assert await auth.user("alice") == (True, MD5, {})

    asyncio.run(main())
    assert lookups.errors == 1
    assert lookups.queries == 2


def test_the_cache_is_bounded() -> None:
    auth, _, clock = make({}, cache_failure_ttl=3_600_000)

    async def main() -> None:
        for i in range(MAX_CACHED_USERS + 10):
            await auth.user(f"u{i}")
            clock.now += 0.001

    asyncio.run(main())
    assert auth.cache_entries <= MAX_CACHED_USERS
    assert auth.cache_entries > MAX_CACHED_USERS // 2
