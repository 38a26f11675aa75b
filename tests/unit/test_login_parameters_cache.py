"""A pool remembers what a startup packet's settings came to, for as long as what
they were worked out from holds: its server parameters, synced parameters and the
spellings it has learnt."""

from __future__ import annotations

import asyncio

from pg_doorman.pool.pool import LoginParameters, Pool, PoolSettings
from pg_doorman.protocol.startup import StartupMessage, parse_startup_packet

PACKET_SETTINGS = b"user\x00u\x00database\x00db\x00DateStyle\x00ISO\x00\x00"


def _pool() -> Pool:
    async def never_opens(pool: Pool) -> None:
        raise AssertionError("no server is opened here")

    loop = asyncio.new_event_loop()
    try:
        pool = Pool(PoolSettings("db", "u", pool_size=1), never_opens, loop)  # type: ignore[arg-type]
    finally:
        loop.close()
    pool.server_parameters = {"DateStyle": "ISO, MDY", "TimeZone": "UTC"}
    pool.set_synced_parameters(("DateStyle", "TimeZone"))
    return pool


def _outcome() -> LoginParameters:
    return LoginParameters({"DateStyle": "ISO"}, {}, ("DateStyle",), "", b"S...")


def test_a_startup_packet_keeps_the_settings_it_was_sent_with() -> None:
    body = (3 << 16).to_bytes(4, "big") + PACKET_SETTINGS
    packet = (len(body) + 4).to_bytes(4, "big") + body
    request = parse_startup_packet(packet)
    assert isinstance(request, StartupMessage)
    assert request.encoded_parameters == PACKET_SETTINGS
    assert request.parameters == {"user": "u", "database": "db", "DateStyle": "ISO"}


def test_same_settings_share_one_outcome_until_its_basis_changes() -> None:
    pool = _pool()
    assert pool.login_parameters(PACKET_SETTINGS) is None
    outcome = _outcome()
    pool.remember_login_parameters(PACKET_SETTINGS, outcome)
    assert pool.login_parameters(PACKET_SETTINGS) is outcome
    assert pool.login_parameters(PACKET_SETTINGS + b"x") is None

    # A spelling already known changes nothing; a new one forgets the outcome, which
    # may hold the client's own spelling.
    pool.remember_canonical("DateStyle", "ISO", "ISO, MDY")
    assert pool.login_parameters(PACKET_SETTINGS) is None
    pool.remember_login_parameters(PACKET_SETTINGS, outcome)
    pool.remember_canonical("DateStyle", "ISO", "ISO, MDY")
    assert pool.login_parameters(PACKET_SETTINGS) is outcome

    # Other synced parameters: forgotten.
    pool.set_synced_parameters(("TimeZone",))
    assert pool.login_parameters(PACKET_SETTINGS) is None

    # Another set of server parameters: forgotten, and nothing worked out from the
    # old set is kept for the new one.
    pool.remember_login_parameters(PACKET_SETTINGS, outcome)
    pool.server_parameters = {"DateStyle": "SQL, DMY", "TimeZone": "UTC"}
    assert pool.login_parameters(PACKET_SETTINGS) is None
    assert pool.login_parameters(PACKET_SETTINGS) is None


def test_a_login_without_encoded_settings_is_never_shared() -> None:
    pool = _pool()
    assert pool.login_parameters(b"") is None
    pool.remember_login_parameters(b"", _outcome())
    assert pool.login_parameters(b"") is None
