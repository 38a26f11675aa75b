"""Pool configurations of the LISTEN tests."""

from __future__ import annotations

from . import EXAMPLE_DB, ExamplePostgres


def md5_user_pool(pg: ExamplePostgres, pool_size: int = 1, **settings: object) -> dict[str, object]:
    """The md5 user's pool (`pool_size` servers; one by default) with `settings`."""
    user = {"username": pg.md5_user.name, "pool_size": pool_size}
    return {EXAMPLE_DB: {"users": [user], **settings}}


def fanout_pool(pg: ExamplePostgres, pool_size: int = 1, **settings: object) -> dict[str, object]:
    """The same with listen_fanout on."""
    return md5_user_pool(pg, pool_size, listen_fanout=True, **settings)
