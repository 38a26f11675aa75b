"""Logins that send the same startup settings share what those settings come to in
their pool (the reported parameters and the greeting's ParameterStatus run): each
client still holds its own copy, and what one changes reaches no later login."""

from __future__ import annotations

import pytest

from helpers import EXAMPLE_DB, ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess

PROFILE = {"DateStyle": "ISO", "TimeZone": "utc", "application_name": "same-for-all"}
# Already in PostgreSQL's spelling: no server teaches the pool another one, so every
# login with it after the first uses what the first worked out.
SPELLED = {"DateStyle": "ISO, MDY", "TimeZone": "UTC", "application_name": "same-for-all"}


@pytest.fixture
def one_server(pg: ExamplePostgres, pooler: PoolerFactory) -> PoolerProcess:
    return pooler(pools={EXAMPLE_DB: {"users": [{"username": pg.md5_user.name, "pool_size": 1}]}})


def _login(
    target: PoolerProcess | ExamplePostgres, pg: ExamplePostgres, profile: dict[str, str] = PROFILE
) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(
        target.host, target.port, user.name, EXAMPLE_DB, user.password, params=profile
    )


def _settings(conn: w.PgWire) -> list[tuple[str | None, ...]]:
    return w.rows(
        conn.simple_query("select current_setting('TimeZone'), current_setting('DateStyle')")
    )


def test_what_a_client_sets_is_not_what_the_next_same_login_is_greeted_with(
    pg: ExamplePostgres, one_server: PoolerProcess
) -> None:
    direct = _login(pg, pg, SPELLED)
    first = _login(one_server, pg, SPELLED)
    try:
        # The first client changes its session on the pool's only server...
        first.simple_query("set TimeZone = 'Asia/Tokyo'; set DateStyle = 'German'")
        assert first.parameters["TimeZone"] == "Asia/Tokyo"
        assert first.parameters["DateStyle"] == "German, DMY"
        # ...the next client with the same startup packet is greeted as at its own
        # login, and its statements run with its own values on that same server.
        second = _login(one_server, pg, SPELLED)
        try:
            expected = {name: direct.parameters[name] for name in ("TimeZone", "DateStyle")}
            greeted = {name: second.parameters[name] for name in expected}
            assert greeted == {"TimeZone": "UTC", "DateStyle": "ISO, MDY"} == expected
            assert second.parameters["application_name"] == "same-for-all"
            assert _settings(second) == _settings(direct)
            assert _settings(first) == [("Asia/Tokyo", "German, DMY")]
        finally:
            second.close()
        # And the first client's own values stay as it set them.
        assert _settings(first) == [("Asia/Tokyo", "German, DMY")]
    finally:
        first.close()
        direct.close()


def test_a_spelling_learnt_reaches_the_next_login_with_the_same_settings(
    pg: ExamplePostgres, one_server: PoolerProcess
) -> None:
    """The first login is greeted with its own "utc" (no server has applied it yet);
    once one has, the next login sending the same packet hears "UTC" at once, and
    other settings are reported as their own."""
    first = _login(one_server, pg)
    user = pg.md5_user
    other = w.PgWire.connect(
        one_server.host,
        one_server.port,
        user.name,
        EXAMPLE_DB,
        user.password,
        params={"TimeZone": "Europe/Berlin", "application_name": "another"},
    )
    try:
        assert first.parameters["TimeZone"] == "utc"
        first.simple_query("select 1")
        assert first.parameters["TimeZone"] == "UTC"
        again = _login(one_server, pg)
        try:
            assert again.parameters["TimeZone"] == "UTC"
            assert again.parameters["DateStyle"] == "ISO, MDY"
            assert again.parameters["application_name"] == "same-for-all"
        finally:
            again.close()
        assert other.parameters["TimeZone"] == "Europe/Berlin"
        assert other.parameters["application_name"] == "another"
        assert w.rows(other.simple_query("select current_setting('TimeZone')")) == [
            ("Europe/Berlin",)
        ]
    finally:
        first.close()
        other.close()
