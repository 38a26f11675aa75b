"""A long-running pooler's auth_query cache holds the answers still fresh, not every
name ever tried: logins of made-up users leave it after cache_failure_ttl."""

from __future__ import annotations

import time

from test_auth_query import auth_query_pooler, auth_query_row, current_user, refused

from helpers import ExamplePostgres
from helpers.pooler import PoolerFactory

GHOSTS = 30


def test_names_not_found_leave_the_cache_after_cache_failure_ttl(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    user = pg.md5_user
    proc = auth_query_pooler(
        pooler,
        pg,
        general={"retain_connections_time": 100},
        cache_failure_ttl="2s",
        cache_ttl="1h",
    )
    assert current_user(proc, user.name, user.password) == user.name
    for i in range(GHOSTS):
        assert refused(proc, f"ghost_{i}", "x").sqlstate == "28P01"
    # The last names tried are younger than cache_failure_ttl: still there.
    assert int(auth_query_row(proc)["cache_entries"] or 0) > 1
    deadline = time.monotonic() + 15
    while (entries := int(auth_query_row(proc)["cache_entries"] or 0)) != 1:
        assert time.monotonic() < deadline, f"{entries} users still cached, want 1"
        time.sleep(0.1)
    # The user found is still answered from the cache: no new lookup.
    queries = auth_query_row(proc)["executor_queries"]
    assert current_user(proc, user.name, user.password) == user.name
    assert auth_query_row(proc)["executor_queries"] == queries
