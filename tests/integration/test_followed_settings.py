"""Settings PostgreSQL reports that a transaction-mode client changes at run time
(search_path from PostgreSQL 18, default_transaction_read_only from 14): they follow
the client to its next servers and never reach another client, whether it changed
them by SET, set_config(), a function or a ROLLBACK.

Each program runs twice: on two direct connections, and on two clients of a pooler
(sharing its one server, or two when one client keeps its server); every reply must
be the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.listen import md5_user_pool
from helpers.pooler import PoolerFactory, PoolerProcess

FOLLOWED = ("search_path", "default_transaction_read_only")
SETTER = "followed_settings_set_path"

# (client, simple query): 0 and 1 share the pooler's one server.
SET_AND_SHOW = (
    (0, "set search_path to pg_catalog, public"),
    (1, "show search_path"),
    (0, "show search_path"),
    (0, "set default_transaction_read_only = on"),
    (1, "show transaction_read_only"),
    (0, "show transaction_read_only"),
    (0, "create table followed_settings_refused (x int)"),
    (1, "select 1"),
    (0, "set default_transaction_read_only = off"),
    (0, "show transaction_read_only"),
    (0, "reset search_path"),
    (0, "show search_path"),
    (1, "show search_path"),
)
IN_BLOCKS = (
    (0, "begin"),
    (0, "set search_path to information_schema"),
    (0, "show search_path"),
    (1, "show search_path"),  # waits for the server: run after 0's block below
    (0, "rollback"),
    (0, "show search_path"),
    (0, "begin; set search_path to pg_catalog; commit"),
    (1, "show search_path"),
    (0, "show search_path"),
    (0, "begin; set local search_path to information_schema; show search_path; commit"),
    (0, "show search_path"),
)
BY_FUNCTIONS = (
    (0, "select pg_catalog.set_config('search_path', 'information_schema', false)"),
    (1, "show search_path"),
    (0, "show search_path"),
    (0, f"select {SETTER}('pg_catalog')"),
    (1, "show search_path"),
    (0, "show search_path"),
    (1, f"select {SETTER}('public')"),
    (0, "show search_path"),
    (1, "show search_path"),
    (0, "do $$ begin perform pg_catalog.set_config('search_path', 'public', false); end $$"),
    (0, "show search_path"),
    (1, "show search_path"),
)

# Client 0 keeps its server for its LISTEN (pin_on_listen) from the second step on.
WHILE_PINNED = (
    (0, "set search_path to pg_catalog, public"),
    (0, "listen followed_settings"),
    (1, "show search_path"),
    (0, "show search_path"),
    (0, "set search_path to information_schema"),
    (0, "set default_transaction_read_only = on"),
    (0, "reset work_mem"),
    (0, "show search_path"),
    (0, "reset all"),
    (0, "show search_path"),
    (0, "set search_path to public, pg_catalog"),
    (0, "unlisten *"),
    (1, "show search_path"),
    (0, "show search_path"),
    (0, "show transaction_read_only"),
    (1, "show transaction_read_only"),
)


@pytest.fixture
def one_server(pg: ExamplePostgres, pooler: PoolerFactory) -> Iterator[PoolerProcess]:
    _skip_unless_followed(pg)
    with _connect(pg, pg) as probe:
        probe.simple_query(
            f"create or replace function {SETTER}(path text) returns text language sql"
            " as $$ select pg_catalog.set_config('search_path', path, false) $$"
        )
    try:
        yield pooler(pools=md5_user_pool(pg, pool_size=1))
    finally:
        with _connect(pg, pg) as probe:
            probe.simple_query(f"drop function {SETTER}(text)")


def _connect(
    target: PoolerProcess | ExamplePostgres, pg: ExamplePostgres, **params: str
) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(
        target.host, target.port, user.name, EXAMPLE_DB, user.password, params=params
    )


def _run(program: tuple[tuple[int, str], ...], clients: list[w.PgWire]) -> list[list[w.Reply]]:
    """Each step's replies; a step of client 1 while client 0 is in a transaction
    block waits, on a shared server, until the block ends: it is run after it."""
    replies: list[list[w.Reply]] = []
    deferred: list[tuple[int, int, str]] = []
    for number, (client, sql) in enumerate(program):
        if client == 1 and clients[0].status != "I":
            deferred.append((number, client, sql))
            replies.append([])
            continue
        replies.append(w.comparable(clients[client].simple_query(sql)))
        if clients[0].status == "I":
            for later, other, text in deferred:
                replies[later] = w.comparable(clients[other].simple_query(text))
            deferred.clear()
    return replies


def _skip_unless_followed(pg: ExamplePostgres) -> None:
    with _connect(pg, pg) as probe:
        reported = [name for name in FOLLOWED if name in probe.parameters]
    if reported != list(FOLLOWED):
        pytest.skip(f"this PostgreSQL reports {reported} of {list(FOLLOWED)}")


def _compare(
    program: tuple[tuple[int, str], ...],
    direct: list[w.PgWire],
    pooled: list[w.PgWire],
    reports: bool = True,
) -> None:
    """Run `program` on both pairs: the same replies (without ParameterStatus unless
    `reports`), and the same followed settings believed at the end."""
    try:
        want = _run(program, direct)
        got = _run(program, pooled)
        for (client, sql), mine, theirs in zip(program, got, want, strict=True):
            if not reports:
                mine = [reply for reply in mine if reply[0] != b"S"]
                theirs = [reply for reply in theirs if reply[0] != b"S"]
            assert mine == theirs, f"client {client}: {sql}"
        for conn, alone in zip(pooled, direct, strict=True):
            for name in FOLLOWED:
                assert conn.parameters[name] == alone.parameters[name], name
    finally:
        for conn in direct + pooled:
            conn.close()


@pytest.mark.parametrize(
    "program",
    [SET_AND_SHOW, IN_BLOCKS, BY_FUNCTIONS],
    ids=["set-and-show", "in-blocks", "by-functions"],
)
def test_a_client_s_reported_settings_follow_it_and_no_one_else(
    pg: ExamplePostgres, one_server: PoolerProcess, program: tuple[tuple[int, str], ...]
) -> None:
    """Two clients take turns on one server: each sees its own settings in every
    transaction, ParameterStatus included, as on connections of their own."""
    _compare(
        program,
        [_connect(pg, pg) for _ in range(2)],
        [_connect(one_server, pg) for _ in range(2)],
    )


@pytest.mark.parametrize("startup", [{}, {"search_path": "public, information_schema"}])
def test_a_client_that_keeps_its_server_keeps_its_settings(
    pg: ExamplePostgres, pooler: PoolerFactory, startup: dict[str, str]
) -> None:
    """While it keeps its server (here for its LISTEN) a client's changes stay there,
    and go with it when it lets the server go; its RESET goes back to its startup
    values, which the pooler sets again. A client's changes of the followed settings
    are reported when they happen; the startup value set again after a RESET is
    reported ahead of the next reply (compared as what the client ends up believing)."""
    _skip_unless_followed(pg)
    proc = pooler(pools=md5_user_pool(pg, pool_size=2, pin_on_listen=True))
    _compare(
        WHILE_PINNED,
        [_connect(pg, pg, **startup), _connect(pg, pg)],
        [_connect(proc, pg, **startup), _connect(proc, pg)],
        reports=False,
    )
