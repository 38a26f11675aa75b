"""Raw connections as the example md5 user, and one exchange run twice: straight
against PostgreSQL and through the pooler, for answers that must be PostgreSQL's."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from . import EXAMPLE_DB, ExamplePostgres
from .pgwire import PgWire

T = TypeVar("T")


class Endpoint(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def connect(target: Endpoint, pg: ExamplePostgres) -> PgWire:
    """A logged-in raw connection to `target` (PostgreSQL or a pooler in front of it)."""
    user = pg.md5_user
    return PgWire.connect(target.host, target.port, user.name, EXAMPLE_DB, user.password)


def on_both(pg: ExamplePostgres, pooler: Endpoint, exchange: Callable[[PgWire], T]) -> tuple[T, T]:
    """`exchange` on a fresh connection to PostgreSQL, then on one through `pooler`:
    (direct, pooled)."""
    results = []
    for target in (pg, pooler):
        conn = connect(target, pg)
        try:
            results.append(exchange(conn))
        finally:
            conn.close()
    return results[0], results[1]


def next_client(
    rng: random.Random,
    direct: Sequence[PgWire],
    servers: int,
    batch_open: Sequence[bool] = (),
) -> int:
    """For random programs: any client, unless as many hold a server (inside a
    transaction, or a batch left open by a Flush) as the pool has: then one of those,
    so that no batch waits for a server held by an idle client. `direct` are the
    clients' connections to PostgreSQL, whose status says."""
    holding = [
        i for i, conn in enumerate(direct) if conn.status != "I" or (batch_open and batch_open[i])
    ]
    if len(holding) >= servers:
        return rng.choice(holding)
    return rng.randrange(len(direct))
