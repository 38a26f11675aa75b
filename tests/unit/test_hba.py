"""pg_hba parsing and PostgreSQL first-match semantics, and the auth decision."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_doorman.auth.hba import HbaError, HbaRules, legacy_hba_allows
from pg_doorman.auth.md5 import md5_password_hash
from pg_doorman.auth.methods import ClientAuth, decide_client_auth
from pg_doorman.auth.scram import make_scram_verifier

IP = ipaddress.ip_address


def match(
    rules: HbaRules,
    user: str = "alice",
    db: str = "app",
    addr: str | None = "10.1.2.3",
    ssl: bool = False,
) -> int | None:
    rule = rules.match(
        conn_type="local" if addr is None else "host",
        ssl=ssl,
        database=db,
        user=user,
        address=None if addr is None else IP(addr),
    )
    return None if rule is None else rule.line_no


def test_first_match_wins() -> None:
    rules = HbaRules.parse(
        "# comment\n"
        "\n"
        "host all bob 10.0.0.0/8 reject\n"
        "host all all 10.0.0.0/8 trust   # trailing comment\n"
        "host all all 0.0.0.0/0 md5\n"
    )
    assert match(rules, user="bob") == 3
    assert match(rules, user="alice") == 4
    assert match(rules, addr="192.168.1.1") == 5
    assert match(rules, addr="::1") is None  # no IPv6 rule


def test_lists_keywords_and_quotes() -> None:
    rules = HbaRules.parse(
        'host app,"all" alice,bob 10.0.0.0/8 md5\n'
        "host sameuser all 10.0.0.0/8 scram-sha-256\n"
        'host "all" all 10.0.0.0/8 trust\n'
    )
    assert match(rules, db="app", user="bob") == 1
    assert match(rules, db="all", user="alice") == 1  # quoted: a database named all
    assert match(rules, db="carol", user="carol") == 2
    assert match(rules, db="other", user="dave") is None  # "all" quoted is just a name


def test_connection_types() -> None:
    rules = HbaRules.parse(
        "local all all trust\n"
        "hostssl all all 0.0.0.0/0 scram-sha-256\n"
        "hostnossl all all 0.0.0.0/0 md5\n"
    )
    assert match(rules, addr=None) == 1
    assert match(rules, ssl=True) == 2
    assert match(rules, ssl=False) == 3


def test_addresses() -> None:
    rules = HbaRules.parse(
        "host all all 127.0.0.1 255.255.255.255 trust\n"
        "host all all ::1/128 trust\n"
        "host all all 192.168.0.5 md5\n"
        "host all all all reject\n"
    )
    assert match(rules, addr="127.0.0.1") == 1
    assert match(rules, addr="::1") == 2
    assert match(rules, addr="::ffff:127.0.0.1") == 1  # mapped IPv4 matches IPv4 rules
    assert match(rules, addr="192.168.0.5") == 3
    assert match(rules, addr="192.168.0.6") == 4


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hots all all 0.0.0.0/0 md5", "invalid connection type"),
        ("host all all 0.0.0.0/0", "missing"),
        ("host all all 0.0.0.0/0 ldap", "unsupported authentication method"),
        ("host all all 0.0.0.0/0 md5 clientcert=verify-full", "options are not supported"),
        ("host all all db.example.com md5", "invalid IP address"),
        ("host all all 300.0.0.1/32 md5", "invalid IP address"),
        ("host all +admins 0.0.0.0/0 md5", "not supported"),
        ("host @dbs all 0.0.0.0/0 md5", "not supported"),
        ("host all all samenet md5", "not supported"),
        ("host replication all 0.0.0.0/0 md5", "not supported"),
        ('host "all all 0.0.0.0/0 md5', "unterminated quote"),
        ("host a,,b all 0.0.0.0/0 md5", "empty list item"),
        ("host a, all 0.0.0.0/0 md5", "missing"),
    ],
)
def test_parse_errors_name_the_line(text: str, reason: str) -> None:
    with pytest.raises(HbaError) as info:
        HbaRules.parse("local all all trust\n" + text)
    message = str(info.value)
    assert message.startswith("pg_hba line 2:")
    assert reason in message


@given(
    st.ip_addresses(v=4),
    st.integers(min_value=0, max_value=32),
    st.ip_addresses(v=4),
)
def test_cidr_membership_agrees_with_ipaddress(
    base: ipaddress.IPv4Address, prefix: int, client: ipaddress.IPv4Address
) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    rules = HbaRules.parse(f"host all all {network} trust\n")
    assert (match(rules, addr=str(client)) == 1) == (client in network)


def test_legacy_hba() -> None:
    assert legacy_hba_allows([], IP("1.2.3.4"))
    assert legacy_hba_allows(["10.0.0.0/8"], IP("10.9.9.9"))
    assert not legacy_hba_allows(["10.0.0.0/8"], IP("11.0.0.1"))
    assert legacy_hba_allows(["10.0.0.0/8"], None)  # unix socket


MD5 = md5_password_hash("pw", "alice")
SCRAM = make_scram_verifier("pw")


@pytest.mark.parametrize(
    ("line", "stored", "expected"),
    [
        (None, MD5, ClientAuth.MD5),
        (None, SCRAM, ClientAuth.SCRAM),
        (None, "", ClientAuth.REJECT),
        (None, "plaintext", ClientAuth.REJECT),
        ("host all all 0.0.0.0/0 trust", "", ClientAuth.TRUST),
        ("host all all 0.0.0.0/0 reject", MD5, ClientAuth.REJECT),
        ("host all all 0.0.0.0/0 md5", MD5, ClientAuth.MD5),
        ("host all all 0.0.0.0/0 md5", SCRAM, ClientAuth.SCRAM),  # upgraded, as PostgreSQL
        ("host all all 0.0.0.0/0 scram-sha-256", SCRAM, ClientAuth.SCRAM),
        ("host all all 0.0.0.0/0 scram-sha-256", MD5, ClientAuth.REJECT),
        ("host all all 0.0.0.0/0 password", MD5, ClientAuth.MD5),
        ("host all all 0.0.0.0/0 md5", "", ClientAuth.REJECT),
    ],
)
def test_decide_client_auth(line: str | None, stored: str, expected: ClientAuth) -> None:
    if line is None:
        decision = decide_client_auth(None, False, stored)
    else:
        rule = HbaRules.parse(line).rules[0]
        decision = decide_client_auth(rule, True, stored)
    assert decision.method == expected
    if expected == ClientAuth.REJECT:
        assert decision.reason


def test_no_matching_rule_is_an_hba_refusal() -> None:
    decision = decide_client_auth(None, True, MD5)
    assert decision.method == ClientAuth.REJECT and decision.by_hba
