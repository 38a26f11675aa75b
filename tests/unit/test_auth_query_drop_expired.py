"""auth_query's cache forgets expired answers when swept, not only once it is full."""

from __future__ import annotations

import asyncio

from test_auth_query_cache import MD5, make


def test_drop_expired_keeps_only_answers_still_fresh() -> None:
    auth, lookups, clock = make({"alice": MD5}, cache_ttl=60_000, cache_failure_ttl=5_000)

    async def main() -> None:
        await auth.user("alice")
        for i in range(50):  # a scan of made-up names, each tried once
            await auth.user(f"ghost{i}")

    asyncio.run(main())
    assert auth.cache_entries == 51
    clock.now += 4
    assert auth.drop_expired() == 0
    clock.now += 2  # past cache_failure_ttl, within cache_ttl
    assert auth.drop_expired() == 50
    assert auth.cache_entries == 1

    async def again() -> None:
        assert await auth.user("alice") == (True, MD5, {})

    asyncio.run(again())
    assert lookups.queries == 51  # alice's answer was kept: no new lookup
    clock.now += 60
    assert auth.drop_expired() == 1
    assert auth.cache_entries == 0
