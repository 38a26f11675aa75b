"""pg_hba edge cases where a line must not silently match less, or more, than in
PostgreSQL: quoted regular expressions, IPv4 clients of a dual-stack listener, and
rule text that is empty."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path

import pytest

from pg_doorman.app.cli import load_checked_config
from pg_doorman.app.pooler import Pooler
from pg_doorman.auth.hba import HbaError, HbaRules, legacy_hba_allows
from pg_doorman.auth.methods import ClientAuth
from pg_doorman.auth.scram import make_scram_verifier
from pg_doorman.config import ConfigError, parse_config

IP = ipaddress.ip_address


def _rule_line(
    rules: HbaRules, address: str, *, db: str = "app", user: str = "alice"
) -> int | None:
    rule = rules.match(conn_type="host", ssl=False, database=db, user=user, address=IP(address))
    return None if rule is None else rule.line_no


# ---- regular expressions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('host "/^secret" all 0.0.0.0/0 reject', "database"),
        # A comma inside a regular expression needs the quotes (PostgreSQL's docs).
        ('host "/^(billing,ledger)$" all 0.0.0.0/0 reject', "database"),
        ('host all "/^adm" 0.0.0.0/0 reject', "user"),
        ('host all alice,"/^ops_" 0.0.0.0/0 reject', "user"),
    ],
)
def test_a_quoted_regular_expression_is_refused_too(line: str, field: str) -> None:
    """PostgreSQL 16+ compiles every database or user token that starts with `/`,
    quoted or not: read as a plain name, such a reject line would match nothing and
    let the next line decide."""
    with pytest.raises(HbaError, match=f"pg_hba line 2: regular expressions .* {field} field"):
        HbaRules.parse(f"local all all trust\n{line}\nhost all all 0.0.0.0/0 trust\n")


def test_quoted_group_and_file_names_stay_plain_names() -> None:
    # Only the regular expression ignores quotes in PostgreSQL: "+x" and "@x" are names.
    rules = HbaRules.parse('host "+ops" "@list" 10.0.0.0/8 md5\n')
    assert _rule_line(rules, "10.0.0.1", db="+ops", user="@list") == 1


# ---- IPv4 clients of a dual-stack listener --------------------------------------------


def test_an_ipv4_client_of_a_dual_stack_listener_never_matches_ipv6_lines() -> None:
    """PostgreSQL: an IPv6-format line matches IPv6 connections only, even for an
    address in the IPv4-in-IPv6 range, and its IPv6 sockets take no IPv4 clients. A
    client seen as ::ffff:a.b.c.d is an IPv4 client and is judged as one."""
    rules = HbaRules.parse(
        "host all all ::ffff:0:0/96 trust\n"
        "host all all ::/0 trust\n"
        "host all all 10.0.0.0/8 reject\n"
    )
    assert _rule_line(rules, "::ffff:10.1.2.3") == 3
    assert _rule_line(rules, "10.1.2.3") == 3
    assert _rule_line(rules, "::ffff:192.168.0.1") is None  # no IPv4 line for it
    assert _rule_line(rules, "2001:db8::1") == 2  # IPv6 clients still match IPv6 lines
    assert not legacy_hba_allows(["::/0"], IP("::ffff:10.1.1.1"))
    assert legacy_hba_allows(["10.0.0.0/8"], IP("::ffff:10.1.1.1"))


def test_the_login_verdict_of_a_mapped_client_is_its_ipv4_verdict() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = parse_config(
            {
                "general": {
                    "host": "::",
                    "port": 1,
                    "pg_hba": "host all all ::/0 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
                },
                "pools": {
                    "db": {"users": [{"username": "alice", "password": make_scram_verifier("pw")}]}
                },
            }
        )
        pooler = Pooler(config, loop)
        for address in ("::ffff:127.0.0.1", "127.0.0.1"):
            decision = pooler.decide_auth("db", "alice", address=address, unix=False, ssl=False)
            assert decision.method == ClientAuth.SCRAM
        decision = pooler.decide_auth("db", "alice", address="::1", unix=False, ssl=False)
        assert decision.method == ClientAuth.TRUST
    finally:
        loop.close()


# ---- empty rule text ------------------------------------------------------------------


def _write_config(directory: Path, pg_hba: str) -> Path:
    path = directory / "pg_doorman.toml"
    path.write_text(
        "[general]\n"
        'host = "127.0.0.1"\n'
        "port = 6432\n"
        f"pg_hba = {pg_hba}\n"
        "[pools.db]\n"
        'server_host = "127.0.0.1"\n'
        "[[pools.db.users]]\n"
        'username = "alice"\n'
        'password = "md5ac4ab1f7d3f9cf3b8dd0bba9a3b8d3f8"\n'
    )
    return path


@pytest.mark.parametrize(
    "pg_hba",
    ['""', '{ content = "" }', '{ path = "pg_hba.conf" }'],
    ids=["inline", "content", "empty-file"],
)
def test_empty_rule_text_is_a_config_error(tmp_path: Path, pg_hba: str) -> None:
    """Empty rule text would reject every login (PostgreSQL refuses to start on it);
    it must never mean "no pg_hba", which lets every address in."""
    (tmp_path / "pg_hba.conf").write_text("")
    with pytest.raises(ConfigError, match=r"general\.pg_hba: .*no rules"):
        load_checked_config(str(_write_config(tmp_path, pg_hba)))


def test_a_pooler_given_empty_rule_text_does_not_drop_pg_hba() -> None:
    """The loader refuses empty rule text; a Config made another way still never
    turns it into "no pg_hba"."""
    loop = asyncio.new_event_loop()
    try:
        config = parse_config(
            {
                "general": {"host": "127.0.0.1", "port": 1, "pg_hba": "host all all all md5"},
                "pools": {"db": {"users": [{"username": "alice", "password": ""}]}},
            }
        )
        config = dataclasses.replace(config, general=dataclasses.replace(config.general, pg_hba=""))
        with pytest.raises(HbaError, match="no rules"):
            Pooler(config, loop)
    finally:
        loop.close()
