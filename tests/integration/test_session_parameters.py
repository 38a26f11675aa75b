"""Session parameters through transaction pooling: what a client is told, what its
statements see, and what it costs.

A client's startup values (DateStyle, TimeZone, ...) follow it from server to server.
PostgreSQL spells them its own way ("ISO" becomes "ISO, MDY", "utc" becomes "UTC"), so
the pooler adopts the server's spelling the first time a server applies them: the
client is told it, and the next server already holding it needs no SET. The random
programs at the end compare everything a client sees with direct connections.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest

from helpers import EXAMPLE_DB, EXAMPLE_PASSWORD, ExamplePostgres
from helpers import pgwire as w
from helpers.both import next_client
from helpers.metrics import scrape, value
from helpers.pooler import RANDOM_POOLS, PoolerFactory, PoolerProcess, PoolShape, pool_of
from pg_doorman.app.embedded_pg import free_port

SYNCED = (
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
)
# Startup values as drivers send them (pgjdbc sends DateStyle=ISO and its JVM's zone),
# most of them not in PostgreSQL's own spelling.
PROFILES: tuple[dict[str, str], ...] = (
    {},
    {"DateStyle": "ISO", "TimeZone": "utc", "client_encoding": "utf8"},
    {"DateStyle": "German", "IntervalStyle": "SQL_STANDARD", "TimeZone": "asia/tokyo"},
    {"DateStyle": "sql, dmy", "TimeZone": "+03", "standard_conforming_strings": "off"},
    {"IntervalStyle": "iso_8601", "TimeZone": "Europe/Berlin"},
)
LOGGED_ROLE = "params_logged"


# Reported settings that are not synced but follow a client that changes them
# (search_path from PostgreSQL 18, default_transaction_read_only from 14).
FOLLOWED = ("search_path", "default_transaction_read_only")


def _believed(conn: w.PgWire) -> dict[str, str | None]:
    """The synced and followed parameters as the client was told them (greeting and
    since)."""
    return {name: conn.parameters.get(name) for name in SYNCED + FOLLOWED}


def _login(
    target: PoolerProcess | ExamplePostgres, pg: ExamplePostgres, profile: dict[str, str]
) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(
        target.host, target.port, user.name, EXAMPLE_DB, user.password, params=profile
    )


@pytest.fixture
def one_server(pg: ExamplePostgres, pooler: PoolerFactory) -> PoolerProcess:
    return pooler(pools={EXAMPLE_DB: {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})


@pytest.mark.parametrize("profile", PROFILES[1:], ids=lambda p: ",".join(p))
def test_startup_values_end_up_as_postgresql_spells_them(
    pg: ExamplePostgres, one_server: PoolerProcess, profile: dict[str, str]
) -> None:
    direct = _login(pg, pg, profile)
    first = _login(one_server, pg, profile)
    try:
        expected = _believed(direct)
        for conn in (direct, first):
            conn.simple_query("select 1")
        # The first client with these values hears the server's spelling with its
        # first reply at the latest.
        assert _believed(first) == expected
        # The pool remembers it: a later client is greeted with it.
        later = _login(one_server, pg, profile)
        try:
            assert _believed(later) == expected
            got = later.simple_query("select '2020-03-04 05:06:07+00'::timestamptz::text")
            want = direct.simple_query("select '2020-03-04 05:06:07+00'::timestamptz::text")
            assert w.rows(got) == w.rows(want)
            assert _believed(later) == expected
        finally:
            later.close()
    finally:
        direct.close()
        first.close()


def test_a_partial_datestyle_applies_over_the_default_not_the_last_client(
    pg: ExamplePostgres, one_server: PoolerProcess
) -> None:
    """DateStyle "ISO" keeps the session default's day order. Applied over the
    previous client's "SQL, DMY" it would read 01/02/2020 as the 1st of February."""
    german = _login(one_server, pg, {"DateStyle": "SQL, DMY"})
    iso = _login(one_server, pg, {"DateStyle": "ISO"})
    direct = _login(pg, pg, {"DateStyle": "ISO"})
    try:
        assert w.rows(german.simple_query("select '01/02/2020'::date::text")) == [("01/02/2020",)]
        probe = "select '01/02/2020'::date::text, current_setting('DateStyle')"
        assert w.rows(iso.simple_query(probe)) == w.rows(direct.simple_query(probe))
        assert w.rows(iso.simple_query(probe)) == [("2020-01-02", "ISO, MDY")]
    finally:
        for conn in (german, iso, direct):
            conn.close()


@pytest.fixture
def logged_role(pg: ExamplePostgres) -> Iterator[str]:
    """A role whose sessions log every statement, and its SCRAM verifier."""
    verifier = w.scram_verifier(EXAMPLE_PASSWORD)
    pg.create_role(LOGGED_ROLE, password=verifier)
    pg.psql(f"ALTER ROLE {LOGGED_ROLE} SET log_statement = 'all'")
    yield verifier
    pg.psql(f"DROP ROLE {LOGGED_ROLE}")


def test_a_startup_value_is_set_once_not_before_every_transaction(
    pg: ExamplePostgres, pooler: PoolerFactory, logged_role: str
) -> None:
    """A client whose startup DateStyle is "ISO" (pgjdbc sends that) on a server that
    shows "ISO, MDY": one SET, then the values agree."""
    user = {"username": LOGGED_ROLE, "password": logged_role, "pool_size": 1}
    proc = pooler(pools={EXAMPLE_DB: {"users": [user]}})
    log_start = pg.log_path.stat().st_size
    params = {"DateStyle": "ISO", "TimeZone": "utc", "client_encoding": "utf8"}
    with w.PgWire.connect(
        proc.host, proc.port, LOGGED_ROLE, EXAMPLE_DB, EXAMPLE_PASSWORD, params=params
    ) as conn:
        for i in range(20):
            assert w.rows(conn.simple_query(f"select {i}")) == [(str(i),)]
        assert conn.parameters["DateStyle"] == "ISO, MDY"
        assert conn.parameters["TimeZone"] == "UTC"
        assert conn.parameters["client_encoding"] == "UTF8"
    with open(pg.log_path, "rb") as log:
        log.seek(log_start)
        text = log.read().decode("utf-8", "replace")
    logged = re.findall(rf"{LOGGED_ROLE}@{EXAMPLE_DB} LOG:  statement: (.*)", text)
    sets = [line for line in logged if "set_config" in line]
    assert len(sets) == 1, logged
    assert len([line for line in logged if re.fullmatch(r"select \d+", line)]) == 20


def _prepared_rows(conn: w.PgWire, name: str, sql: str) -> list[tuple[str | None, ...]]:
    return w.rows(_prepared_messages(conn, name, sql))


SETTING_DEPENDENT = (
    "select '01/02/2020'::date::text",
    "select '2020-03-04 05:06:07+00'::timestamptz::text",
    "select '1 day 02:03:04'::interval::text",
)


@pytest.mark.parametrize("in_block", [False, True], ids=["between-transactions", "in-a-block"])
def test_statements_prepared_after_a_set_are_parsed_under_it(
    pg: ExamplePostgres, one_server: PoolerProcess, in_block: bool
) -> None:
    """Literals are read when a statement is parsed, under the settings of that moment.
    A statement prepared after `SET DateStyle` (or TimeZone, IntervalStyle) must not
    be one the server parsed earlier under other settings, for this client or another."""
    changes = (
        "set datestyle = 'ISO, DMY'",
        "set timezone = 'Asia/Tokyo'",
        "set intervalstyle = 'sql_standard'",
    )
    direct = _login(pg, pg, {})
    pooled = _login(one_server, pg, {})
    other = _login(one_server, pg, {})
    try:
        for conn in (direct, pooled, other):
            for number, sql in enumerate(SETTING_DEPENDENT):
                _prepared_rows(conn, f"before{number}", sql)
        for conn in (direct, pooled):
            if in_block:
                conn.simple_query("begin")
            for change in changes:
                conn.simple_query(change)
        for number, sql in enumerate(SETTING_DEPENDENT):
            for name in (f"after{number}", ""):
                want = _prepared_rows(direct, name, sql)
                assert _prepared_rows(pooled, name, sql) == want, sql
            # Statements prepared before keep what they were parsed as.
            assert w.rows(pooled.run_prepared(f"before{number}")) == w.rows(
                direct.run_prepared(f"before{number}")
            )
        if in_block:
            for conn in (direct, pooled):
                conn.simple_query("rollback")
            for sql in SETTING_DEPENDENT:
                assert _prepared_rows(pooled, "", sql) == _prepared_rows(direct, "", sql)
        # The other client's settings never changed: it still reads 01/02 as January.
        assert _prepared_rows(other, "", SETTING_DEPENDENT[0]) == [("2020-01-02",)]
    finally:
        for conn in (direct, pooled, other):
            conn.close()


# ---- random programs ------------------------------------------------------------------

CLIENTS = 3
SEEDS = range(40)
BATCHES = 50

SETS = (
    "set timezone = 'Europe/Berlin'",
    "set timezone to 'UTC'",
    "set datestyle = 'SQL, DMY'",
    "set datestyle = 'ISO'",
    "set datestyle = 'postgres'",
    "set intervalstyle = 'iso_8601'",
    "set intervalstyle = 'postgres_verbose'",
    "set standard_conforming_strings = off",
    "set standard_conforming_strings = on",
    "set local timezone = 'America/New_York'",
    "set local datestyle = 'German'",
    "select set_config('TimeZone', 'Pacific/Auckland', false)",
    "select set_config('IntervalStyle', 'sql_standard', true)",
    "set timezone = 'Nowhere/Invalid'",
    "set timezone = 'Asia/Kolkata'; select 1/0",
    "set datestyle = 'SQL'; select 2",
)
# Changes of the followed settings, where PostgreSQL reports them.
FOLLOWED_SETS = (
    "set search_path = 'pg_catalog, public'",
    "select set_config('search_path', 'information_schema', false)",
    "set local search_path = 'public'",
    "set default_transaction_read_only = on",
    "set default_transaction_read_only = off",
)
# RESET and SET ... TO DEFAULT go back to the server's session defaults, which are a
# client's own only when it sent none at startup (docs/configuration.md).
RESETS = ("reset timezone", "reset all", "set datestyle to default", "discard all")
PROBES = (
    "show timezone",
    "show datestyle",
    "show search_path",
    "show transaction_read_only",
    "select '2020-03-04 05:06:07+00'::timestamptz::text",
    "select '01/02/2020'::date::text, '2020-01-02 03:04:05'::timestamp",
    "select '1 day 02:03:04'::interval::text, interval '-1 year 2 mons'",
    "select 'a\\b' as s, E'c\\\\d' as e",
    "select 1/0",
    "select 'x'",
)
BLOCK = ("begin", "commit", "rollback")
STATEMENT_NAMES = ("", "s1", "s2")


def random_step(
    rng: random.Random, profile: dict[str, str], in_transaction: bool, sets: tuple[str, ...]
) -> tuple[str | None, str]:
    """A simple query (name None), or a statement to prepare under a name ("" for the
    unnamed one) and run, for the settings-dependent probes."""
    kind = rng.random()
    if kind < 0.25:
        return None, rng.choice(sets)
    if kind < 0.35 and not profile:
        reset = rng.choice(RESETS)
        return None, "select 3" if reset == "discard all" and in_transaction else reset
    if kind < 0.5:
        return None, rng.choice(BLOCK)
    if kind < 0.7:
        return rng.choice(STATEMENT_NAMES), rng.choice(SETTING_DEPENDENT)
    return None, rng.choice(PROBES)


def _prepared_messages(conn: w.PgWire, name: str, sql: str) -> list[w.Message]:
    """Close `name`, then Parse, Bind and Execute `sql` under it in one batch."""
    conn.send_raw(
        w.close("S", name) + w.parse(name, sql) + w.bind("", name) + w.execute() + w.sync()
    )
    return conn.read_until_ready()


@pytest.fixture(scope="module", params=RANDOM_POOLS, ids=str)
def params_pooler(
    request: pytest.FixtureRequest,
    pg: ExamplePostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PoolerProcess, int]]:
    shape: PoolShape = request.param
    with pool_of(pg, tmp_path_factory.mktemp("parity-params"), shape) as proc:
        yield proc, shape.servers_per_worker


def _without_parameter_status(messages: list[w.Message]) -> list[w.Reply]:
    """ParameterStatus is compared as what the client ends up believing, not message for
    message: the first client with new startup values hears the server's spelling
    late (see test_startup_values_end_up_as_postgresql_spells_them)."""
    return w.comparable(m for m in messages if m[0] != b"S")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_session_parameter_program(
    pg: ExamplePostgres, params_pooler: tuple[PoolerProcess, int], seed: int
) -> None:
    """Clients with different startup values SET, SET LOCAL, roll back, fail and read
    settings-dependent values, by simple queries and by statements they prepare,
    sharing a pool of one of the shapes in helpers.pooler.RANDOM_POOLS; every reply
    and every value a client is told must be PostgreSQL's."""
    proc, servers = params_pooler
    rng = random.Random(seed)
    profiles = [rng.choice(PROFILES) for _ in range(CLIENTS)]
    direct = [_login(pg, pg, p) for p in profiles]
    pooled = [_login(proc, pg, p) for p in profiles]
    program = [f"  profiles: {profiles}"]
    followed = all(name in direct[0].parameters for name in FOLLOWED)
    sets = SETS + FOLLOWED_SETS if followed else SETS
    try:
        for step in range(BATCHES):
            client = next_client(rng, direct, servers)
            name, sql = random_step(rng, profiles[client], direct[client].status != "I", sets)
            if name is None:
                program.append(f"  {step:2d} client {client}: {sql}")
                got = direct[client].simple_query(sql)
                mine = pooled[client].simple_query(sql)
            else:
                program.append(f"  {step:2d} client {client}: prepare {name!r} as {sql}, run")
                got = _prepared_messages(direct[client], name, sql)
                mine = _prepared_messages(pooled[client], name, sql)
            listing = "\n".join(program)
            assert _without_parameter_status(mine) == _without_parameter_status(got), (
                f"seed {seed}, batch {step} differs\nprogram:\n{listing}"
            )
            assert _believed(pooled[client]) == _believed(direct[client]), (
                f"seed {seed}, batch {step}: parameters differ\nprogram:\n{listing}"
            )
    finally:
        for conn in direct + pooled:
            conn.close()


def test_a_statement_prepared_before_a_set_is_never_shared_under_the_wrong_settings(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client prepares a statement, SETs DateStyle, and uses it on a server that
    lacks it. Parsed there under the client's new settings, it must not pass for the
    statement other clients with the old settings prepare (docs/prepared-statements.md)."""
    users = [{"username": pg.md5_user.name, "pool_size": 2}]
    proc = pooler(pools={EXAMPLE_DB: {"users": users}})
    sql = SETTING_DEPENDENT[0]
    mover, holder, other = (_login(proc, pg, {}) for _ in range(3))
    try:
        assert _prepared_rows(mover, "b", sql) == [("2020-01-02",)]
        mover.simple_query("set datestyle = 'ISO, DMY'")
        holder.simple_query("begin")  # takes the server the mover used last
        # On the other server, read under the mover's settings now: the one
        # difference from PostgreSQL, where it keeps what it was read as.
        assert w.rows(mover.run_prepared("b")) == [("2020-02-01",)]
        # The other client, with the default settings, gets that server too.
        assert _prepared_rows(other, "", sql) == [("2020-01-02",)]
        assert _prepared_rows(other, "c", sql) == [("2020-01-02",)]
        holder.simple_query("rollback")
    finally:
        for conn in (mover, holder, other):
            conn.close()


# --- configured startup parameters ----------------------------------------------------------


def test_a_startup_parameter_postgresql_refuses(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """PostgreSQL's own error reaches the client; the refusal is counted by pool and
    SQLSTATE and logged with the parameter; the other pools go on serving."""
    port = free_port()
    user = pg.md5_user
    proc = pooler(
        web={"enabled": True, "host": "127.0.0.1", "port": port},
        pools={
            "refusing": {
                "server_host": pg.host,
                "server_port": pg.port,
                "server_database": EXAMPLE_DB,
                "startup_parameters": {"lock_timeout": "1s", "work_mem": "lots"},
                "users": [{"username": user.name, "password": user.pooler_password}],
            }
        },
    )
    for _ in range(2):
        with pytest.raises(w.ServerError) as info:
            w.PgWire.connect(proc.host, proc.port, user.name, "refusing", user.password)
        assert info.value.sqlstate == "22023", info.value.fields
        assert 'invalid value for parameter "work_mem": "lots"' in str(info.value)
    samples = scrape(port)["pg_doorman_backend_startup_parameter_errors"]
    name = "pg_doorman_backend_startup_parameter_errors_total"
    assert value(samples, name, pool="refusing", sqlstate="22023") == 2
    assert len(samples) == 1
    assert "PostgreSQL refused the startup parameter work_mem='lots'" in proc.log_text()
    conn = w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password)
    try:
        assert conn.execute_query("select 1") == [("1",)]
    finally:
        conn.close()


PARAMETER_LINE = re.compile(
    r"client (#c\d+) \(([^)]*)\): parameter (\S+) changed from (.*) to (.*)$"
)


def _parameter_lines(proc: PoolerProcess) -> list[tuple[str, ...]]:
    found = (PARAMETER_LINE.search(line) for line in proc.log_text().splitlines())
    return [match.groups() for match in found if match is not None]


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_parameter_status_changes_are_logged_when_asked(
    pg: ExamplePostgres, pooler: PoolerFactory, enabled: bool
) -> None:
    """log_client_parameter_status_changes: a line for each ParameterStatus a client
    gets (its SET, a ROLLBACK undoing one), none for what the pooler sets on a server to
    give the next client its own values."""
    user = pg.md5_user
    pool = {"users": [{"username": user.name, "pool_size": 1}]}
    pool["log_client_parameter_status_changes"] = enabled
    proc = pooler(pools={EXAMPLE_DB: pool})
    who = f"{user.name}@{EXAMPLE_DB}"
    with w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password) as first:
        zone = first.parameters["TimeZone"]
        first.simple_query("set timezone = 'Asia/Tokyo'")
        # PostgreSQL reports a change when a query ends: one query each.
        for query in ("begin", "set application_name = 'inside'", "rollback"):
            first.simple_query(query)
        assert first.parameters["TimeZone"] == "Asia/Tokyo"
        assert first.parameters["application_name"] == "pg_doorman"
        # The same server, given back the other client's time zone first: no line.
        with w.PgWire.connect(
            proc.host, proc.port, user.name, EXAMPLE_DB, user.password, params={"TimeZone": "UTC"}
        ) as second:
            assert w.rows(second.simple_query("show timezone")) == [("UTC",)]
        assert w.rows(first.simple_query("show timezone")) == [("Asia/Tokyo",)]
    lines = _parameter_lines(proc)
    if not enabled:
        assert lines == []
        return
    assert len({line[0] for line in lines}) == 1, lines  # the first client only
    assert [line[1:] for line in lines] == [
        (who, "TimeZone", repr(zone), "'Asia/Tokyo'"),
        (who, "application_name", "'pg_doorman'", "'inside'"),
        (who, "application_name", "'inside'", "'pg_doorman'"),
    ]
