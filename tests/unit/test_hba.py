"""pg_hba parsing and PostgreSQL's first-match semantics; the legacy CIDR allow-list."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_doorman.auth.hba import (
    HbaError,
    HbaRules,
    legacy_hba_allows,
    parse_legacy_hba,
)

IP = ipaddress.ip_address


def line_of(
    rules: HbaRules,
    *,
    user: str = "alice",
    db: str = "app",
    addr: str | None = "10.1.2.3",
    ssl: bool = False,
    local: bool = False,
) -> int | None:
    """The line number of the rule that decides, or None."""
    rule = rules.match(
        conn_type="local" if local else "host",
        ssl=ssl,
        database=db,
        user=user,
        address=None if addr is None or local else IP(addr),
    )
    return None if rule is None else rule.line_no


# ---- first match ---------------------------------------------------------------------


def test_first_matching_line_decides() -> None:
    rules = HbaRules.parse(
        "# comment\n"
        "\n"
        "host all bob 10.0.0.0/8 reject\n"
        "host all all 10.0.0.0/8 trust   # trailing comment\n"
        "host all bob 10.0.0.0/8 trust\n"
        "host all all 0.0.0.0/0 md5\n"
    )
    assert line_of(rules, user="bob") == 3  # the reject line above the trust lines wins
    assert line_of(rules, user="alice") == 4
    assert line_of(rules, addr="192.168.1.1") == 6
    assert line_of(rules, addr="::1") is None  # no IPv6 rule: rejected
    assert rules.rules[0].method == "reject"
    assert rules.rules[1].text == "host all all 10.0.0.0/8 trust   # trailing comment"


def test_a_different_method_does_not_skip_the_line() -> None:
    """PgDoorman would skip a scram line for an md5 user; PostgreSQL stops there."""
    rules = HbaRules.parse("host all all 0.0.0.0/0 scram-sha-256\nhost all all 0.0.0.0/0 md5\n")
    assert line_of(rules) == 1


def test_lists_and_sameuser() -> None:
    rules = HbaRules.parse(
        "host app,reports alice,bob 10.0.0.0/8 md5\n"
        "host sameuser all 10.0.0.0/8 scram-sha-256\n"
        "host other,sameuser carol 10.0.0.0/8 trust\n"
    )
    assert line_of(rules, db="app", user="bob") == 1
    assert line_of(rules, db="reports", user="alice") == 1
    assert line_of(rules, db="app", user="carol") is None
    assert line_of(rules, db="dave", user="dave") == 2
    assert line_of(rules, db="other", user="carol") == 3
    assert line_of(rules, db="app", user="Alice") is None  # names are case-sensitive
    assert rules.rules[0].databases == frozenset({"app", "reports"})
    assert rules.rules[0].users == frozenset({"alice", "bob"})
    assert rules.rules[1].databases == frozenset() and rules.rules[1].same_user


def test_all_in_a_list_matches_everything() -> None:
    rules = HbaRules.parse("host app,all alice,all 0.0.0.0/0 trust\n")
    assert rules.rules[0].databases is None and rules.rules[0].users is None
    assert line_of(rules, db="x", user="y") == 1


def test_lists_as_postgres_tokenises_them() -> None:
    rules = HbaRules.parse(
        "host a, b alice 0.0.0.0/0 trust\n"  # blanks after a comma continue the list
        "host c,,d alice 0.0.0.0/0 trust\n"  # empty items are skipped
        "host ,e,\tf alice 0.0.0.0/0 trust\n"  # so is a leading comma
    )
    assert [r.databases for r in rules.rules] == [
        frozenset({"a", "b"}),
        frozenset({"c", "d"}),
        frozenset({"e", "f"}),
    ]


def test_quotes_make_keywords_literal() -> None:
    rules = HbaRules.parse(
        'host "all" "all" 10.0.0.0/8 md5\n'
        'host "sameuser" alice 10.0.0.0/8 md5\n'
        'host "my db","a,b" "x""y" 10.0.0.0/8 md5\n'
        'host "+admins" "@list" 10.0.0.0/8 md5\n'
        'host "replication" all 10.0.0.0/8 md5\n'
    )
    assert line_of(rules, db="all", user="all") == 1  # a database and a user named all
    assert line_of(rules, db="app", user="all") is None
    assert line_of(rules, db="sameuser", user="alice") == 2
    assert line_of(rules, db="alice", user="alice") is None
    assert rules.rules[2].databases == frozenset({"my db", "a,b"})
    assert rules.rules[2].users == frozenset({'x"y'})
    assert rules.rules[3].databases == frozenset({"+admins"})
    assert rules.rules[3].users == frozenset({"@list"})
    assert rules.rules[4].databases == frozenset({"replication"})


def test_keywords_are_case_sensitive() -> None:
    rules = HbaRules.parse("host ALL All 0.0.0.0/0 trust\n")
    assert rules.rules[0].databases == frozenset({"ALL"})
    assert line_of(rules, db="app") is None


def test_connection_types() -> None:
    rules = HbaRules.parse(
        "local all all trust\n"
        "hostssl all all 0.0.0.0/0 scram-sha-256\n"
        "hostnossl all all 0.0.0.0/0 md5\n"
        "host all all ::/0 reject\n"
    )
    assert line_of(rules, local=True) == 1
    assert line_of(rules, ssl=True) == 2
    assert line_of(rules, ssl=False) == 3
    assert line_of(rules, addr="::1", ssl=True) == 4
    assert line_of(rules, addr="::1", ssl=False) == 4
    only_tcp = HbaRules.parse("host all all all trust\n")
    assert line_of(only_tcp, local=True) is None  # host lines never match Unix sockets
    assert line_of(only_tcp, ssl=True) == 1  # host matches with and without TLS
    only_local = HbaRules.parse("local all all trust\n")
    assert line_of(only_local) is None
    assert only_local.rules[0].network is None


def test_addresses() -> None:
    rules = HbaRules.parse(
        "host all all 127.0.0.1 255.255.255.255 trust\n"
        "host all all ::1/128 trust\n"
        "host all all 192.168.0.5 md5\n"
        "host all all 10.20.0.0 255.255.0.0 md5\n"
        "host all all 2001:db8::/32 md5\n"
        "host all all fd00:: ffff:ff00:: md5\n"
        "host all all 172.16.9.9/12 md5\n"  # host bits set: still the /12 network
        "host all all all reject\n"
    )
    assert line_of(rules, addr="127.0.0.1") == 1
    assert line_of(rules, addr="127.0.0.2") == 8
    assert line_of(rules, addr="::1") == 2
    assert line_of(rules, addr="192.168.0.5") == 3
    assert line_of(rules, addr="192.168.0.6") == 8
    assert line_of(rules, addr="10.20.255.1") == 4
    assert line_of(rules, addr="2001:db8:1::7") == 5
    assert line_of(rules, addr="fd00:ab::1") == 6
    assert line_of(rules, addr="172.31.0.1") == 7
    assert line_of(rules, addr="8.8.8.8") == 8
    assert line_of(rules, addr="2001:db9::1") == 8
    assert str(rules.rules[2].network) == "192.168.0.5/32"
    assert str(rules.rules[3].network) == "10.20.0.0/16"
    assert str(rules.rules[6].network) == "172.16.0.0/12"
    assert rules.rules[7].network is None


def test_ipv4_mapped_clients_match_ipv4_rules() -> None:
    rules = HbaRules.parse("host all all 127.0.0.1/32 trust\nhost all all ::/0 reject\n")
    assert line_of(rules, addr="::ffff:127.0.0.1") == 1
    # An IPv4 client, as in PostgreSQL: IPv6 lines never match it, not even these.
    assert line_of(rules, addr="::ffff:127.0.0.2") is None
    mapped_rule = HbaRules.parse("host all all ::ffff:0:0/96 trust\nhost all all ::/0 trust\n")
    assert line_of(mapped_rule, addr="::ffff:10.0.0.1") is None


def test_a_tcp_client_without_an_address_only_matches_all() -> None:
    rules = HbaRules.parse("host all all 0.0.0.0/0 md5\nhost all all all trust\n")
    assert line_of(rules, addr=None) == 2


def test_backslash_continues_a_line() -> None:
    rules = HbaRules.parse(
        "# header\nhost all \\\nalice 10.0.0.0/8 \\\r\n   md5\nlocal all all trust\n"
    )
    assert [r.line_no for r in rules.rules] == [2, 5]
    assert rules.rules[0].users == frozenset({"alice"}) and rules.rules[0].method == "md5"


def test_crlf_and_tabs() -> None:
    rules = HbaRules.parse("host\tall\tall\t10.0.0.0/8\tmd5\r\n\r\nlocal all all trust\r\n")
    assert [(r.line_no, r.method) for r in rules.rules] == [(1, "md5"), (3, "trust")]


def test_match_rejects_unknown_connection_types() -> None:
    rules = HbaRules.parse("host all all all trust\n")
    with pytest.raises(ValueError):
        rules.match(conn_type="hostssl", ssl=True, database="d", user="u", address=None)  # type: ignore[arg-type]


# ---- parse errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hots all all 0.0.0.0/0 md5", "invalid connection type 'hots'"),
        ("HOST all all 0.0.0.0/0 md5", "invalid connection type 'HOST'"),
        ("host,local all all 0.0.0.0/0 md5", "multiple values specified for the connection type"),
        ("hostgssenc all all 0.0.0.0/0 md5", "GSSAPI encryption) is not supported"),
        ("include other.conf", "include directives are not supported"),
        ("host", "missing database field"),
        ("local all", "missing user field"),
        ("host all all", "missing address field"),
        ("host all all 0.0.0.0/0", "missing authentication method"),
        ("local all all", "missing authentication method"),
        ("host all all 0.0.0.0/0 ldap", "authentication method 'ldap' is not supported"),
        ("host all all 0.0.0.0/0 peer", "authentication method 'peer' is not supported"),
        ("host all all 0.0.0.0/0 MD5", "invalid authentication method 'MD5'"),
        ("host all all 0.0.0.0/0 letmein", "invalid authentication method 'letmein'"),
        ("host all all 0.0.0.0/0 md5,trust", "multiple values specified for the authentication"),
        ("host all all 0.0.0.0/0 md5 clientcert=verify-full", "options (such as clientcert"),
        ("hostssl all all 0.0.0.0/0 trust clientcert=verify-ca", "not supported"),
        ("local all all md5 extra", "options (such as clientcert"),
        ("host all all db.example.com md5", "invalid IP address 'db.example.com' (host names"),
        ('host all all "all" md5', "invalid IP address 'all'"),  # quoted: a host name
        ("host all all 300.0.0.1/32 md5", "invalid IP address '300.0.0.1'"),
        ("host all all 10.0.0.0/33 md5", "invalid CIDR mask in address '10.0.0.0/33'"),
        ("host all all ::1/129 md5", "invalid CIDR mask"),
        ("host all all 10.0.0.0/ md5", "invalid CIDR mask"),
        ("host all all 10.0.0.0/255.0.0.0 md5", "invalid CIDR mask"),
        ("host all all 10.0.0.0/+8 md5", "invalid CIDR mask"),
        ("host all all fe80::1%eth0/64 md5", "invalid IP address"),
        ("host all all 10.0.0.0 255.0.255.0 md5", "only contiguous netmasks"),
        ("host all all 10.0.0.0 ffff:: md5", "IP address and mask do not match"),
        ("host all all 10.0.0.0,10.1.0.0 md5", "multiple values specified for the address"),
        ("host all all 10.0.0.0 255.0.0.0,255.0.0.0 md5", "multiple values specified for the net"),
        ("host all all 10.0.0.0 255.0.0.0", "missing authentication method"),
        ("host all +admins 0.0.0.0/0 md5", "group membership (+admins) is not supported"),
        ("host all @users.txt 0.0.0.0/0 md5", "file inclusion (@users.txt)"),
        ("host @dbs.txt all 0.0.0.0/0 md5", "file inclusion (@dbs.txt)"),
        ("host /^app all 0.0.0.0/0 md5", "regular expressions (/^app)"),
        ("host all /^a 0.0.0.0/0 md5", "regular expressions (/^a)"),
        ("host samerole all 0.0.0.0/0 md5", "samerole (role membership) is not supported"),
        ("host app,samegroup all 0.0.0.0/0 md5", "samegroup (role membership)"),
        ("host all all samenet md5", "samenet is not supported"),
        ("host all all samehost md5", "samehost is not supported"),
        ('host "all all 0.0.0.0/0 md5', "unterminated quoted string"),
        ("host a, all 0.0.0.0/0 md5", "invalid IP address 'md5'"),  # the list ate `all`
    ],
)
def test_parse_errors_name_the_line(text: str, reason: str) -> None:
    with pytest.raises(HbaError) as info:
        HbaRules.parse("# ok so far\nlocal all all trust\n" + text + "\nhost all all all md5\n")
    message = str(info.value)
    assert message.startswith("pg_hba line 3: ")
    assert reason in message
    assert message.endswith(": " + text.strip())


def test_error_on_a_continued_line_names_its_first_line() -> None:
    with pytest.raises(HbaError, match=r"^pg_hba line 2: invalid authentication method"):
        HbaRules.parse("local all all trust\nhost all all \\\n0.0.0.0/0 ldapx\n")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_no_rules_is_an_error(text: str) -> None:
    with pytest.raises(HbaError, match="no rules"):
        HbaRules.parse(text)


# ---- properties --------------------------------------------------------------------


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32), st.ip_addresses(v=4))
def test_ipv4_cidr_membership_agrees_with_ipaddress(
    base: ipaddress.IPv4Address, prefix: int, client: ipaddress.IPv4Address
) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    rules = HbaRules.parse(f"host all all {base}/{prefix} trust\n")
    assert (line_of(rules, addr=str(client)) == 1) == (client in network)
    # The same client arriving as an IPv4-mapped IPv6 address is judged the same way.
    assert (line_of(rules, addr=f"::ffff:{client}") == 1) == (client in network)
    # And the separate-netmask spelling means the same network.
    mask_rules = HbaRules.parse(f"host all all {base} {network.netmask} trust\n")
    assert mask_rules.rules[0].network == network


@given(st.ip_addresses(v=6), st.integers(min_value=0, max_value=128), st.ip_addresses(v=6))
def test_ipv6_cidr_membership_agrees_with_ipaddress(
    base: ipaddress.IPv6Address, prefix: int, client: ipaddress.IPv6Address
) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    rules = HbaRules.parse(f"host all all {base}/{prefix} trust\n")
    # An IPv4-mapped client is an IPv4 client: no IPv6 line matches it.
    expected = client in network and client.ipv4_mapped is None
    assert (line_of(rules, addr=str(client)) == 1) == expected


@given(
    st.lists(st.sampled_from(["a", "b", "c", "all"]), min_size=1, max_size=3),
    st.sampled_from(["a", "b", "c", "d"]),
)
def test_database_lists_match_like_sets(names: list[str], database: str) -> None:
    rules = HbaRules.parse(f"host {','.join(names)} all all trust\n")
    expected = "all" in names or database in names
    assert (line_of(rules, db=database) == 1) == expected


# ---- legacy general.hba ------------------------------------------------------------


def test_legacy_hba() -> None:
    assert legacy_hba_allows([], IP("1.2.3.4"))  # empty: everyone
    assert legacy_hba_allows(["10.0.0.0/8"], IP("10.9.9.9"))
    assert not legacy_hba_allows(["10.0.0.0/8"], IP("11.0.0.1"))
    assert legacy_hba_allows(["10.0.0.0/8"], None)  # Unix socket
    assert legacy_hba_allows(["10.0.0.0/8"], IP("::ffff:10.1.1.1"))
    assert not legacy_hba_allows(["10.0.0.0/8"], IP("::1"))
    assert legacy_hba_allows(["10.0.0.0/8", "::1/128"], IP("::1"))
    assert legacy_hba_allows(["192.168.1.7/24"], IP("192.168.1.200"))  # host bits allowed


def test_parse_legacy_hba() -> None:
    assert [str(n) for n in parse_legacy_hba(["10.0.0.0/8", "::1/128", "192.168.1.7/24"])] == [
        "10.0.0.0/8",
        "::1/128",
        "192.168.1.0/24",
    ]


@pytest.mark.parametrize(
    ("cidrs", "index"),
    [
        (["10.0.0.1"], 0),  # the legacy list wants the CIDR form
        (["10.0.0.0/8", "all"], 1),
        (["10.0.0.0/33"], 0),
        (["10.0.0.0/255.0.0.0"], 0),
        (["example.com/8"], 0),
        ([""], 0),
    ],
)
def test_parse_legacy_hba_errors(cidrs: list[str], index: int) -> None:
    with pytest.raises(HbaError, match=rf"^hba\[{index}\]: invalid CIDR"):
        parse_legacy_hba(cidrs)
    with pytest.raises(HbaError):
        legacy_hba_allows(cidrs, IP("10.0.0.1"))


def test_replication_lines_never_match_normal_connections() -> None:
    rules = HbaRules.parse(
        "host replication all 0.0.0.0/0 trust\n"
        "host replication,app all 0.0.0.0/0 md5\n"
        "host all all 0.0.0.0/0 scram-sha-256\n"
    )
    assert line_of(rules, db="replication") == 3
    assert line_of(rules, db="app") == 2
