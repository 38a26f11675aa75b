"""The pooler's per-login auth verdicts: keyed by the peer's address, dropped when
pg_hba or the pools are replaced, and bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pg_doorman.app import pooler as pooler_module
from pg_doorman.app.pooler import Pooler
from pg_doorman.auth.hba import HbaRules
from pg_doorman.auth.methods import ClientAuth
from pg_doorman.auth.scram import make_scram_verifier
from pg_doorman.config import parse_config

HBA = "host all all 127.0.0.1/32 scram-sha-256\nhost all all 10.0.0.0/8 reject\n"


@pytest.fixture
def pooler() -> Iterator[Pooler]:
    loop = asyncio.new_event_loop()
    config = parse_config(
        {
            "general": {"host": "127.0.0.1", "port": 1, "pg_hba": HBA},
            "pools": {
                "db": {
                    "users": [
                        {"username": "alice", "password": make_scram_verifier("pw")},
                        {"username": "bob", "password": ""},
                    ]
                }
            },
        }
    )
    try:
        yield Pooler(config, loop)
    finally:
        loop.close()


def _method(pooler: Pooler, address: str, user: str = "alice") -> ClientAuth:
    return pooler.decide_auth("db", user, address=address, unix=False, ssl=False).method


def test_each_address_gets_its_own_verdict(pooler: Pooler) -> None:
    for _ in range(2):  # the second round comes from the memo
        assert _method(pooler, "127.0.0.1") == ClientAuth.SCRAM
        assert _method(pooler, "10.1.2.3") == ClientAuth.REJECT
        assert _method(pooler, "192.168.0.1") == ClientAuth.REJECT  # no line matches
        assert _method(pooler, "127.0.0.1", user="bob") == ClientAuth.REJECT  # no password


def test_ipv4_clients_of_a_dual_stack_listener_and_zoned_ipv6(pooler: Pooler) -> None:
    assert _method(pooler, "::ffff:127.0.0.1") == ClientAuth.SCRAM
    assert _method(pooler, "fe80::1%eth0") == ClientAuth.REJECT


def test_a_new_pg_hba_or_new_pools_replace_the_verdicts(pooler: Pooler) -> None:
    assert _method(pooler, "127.0.0.1") == ClientAuth.SCRAM
    pooler.hba = HbaRules.parse("host all all 127.0.0.1/32 reject\n")
    assert _method(pooler, "127.0.0.1") == ClientAuth.REJECT
    pooler.hba = HbaRules.parse("host all all 127.0.0.1/32 trust\n")
    assert _method(pooler, "127.0.0.1") == ClientAuth.TRUST
    pooler.hba = HbaRules.parse(HBA)
    assert _method(pooler, "127.0.0.1") == ClientAuth.SCRAM
    entries = dict(pooler.entries)
    entries[("db", "alice")].password = ""
    pooler.entries = entries
    assert _method(pooler, "127.0.0.1") == ClientAuth.REJECT


def test_the_memo_stays_bounded(pooler: Pooler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pooler_module, "_AUTH_CACHE_SIZE", 50)
    for i in range(120):
        assert _method(pooler, f"10.0.{i // 250}.{i % 250}") == ClientAuth.REJECT
        assert len(pooler._auth_cache) <= 50
    assert _method(pooler, "127.0.0.1") == ClientAuth.SCRAM
