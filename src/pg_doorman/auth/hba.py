"""pg_hba rules with PostgreSQL's semantics: the first matching line decides.

Unlike PgDoorman, a line we can't parse is an error (naming its line), not something
skipped or, worse, matching every address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

CONNECTION_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "md5", "scram-sha-256", "password", "reject")
_UNSUPPORTED_KEYWORDS = ("samehost", "samenet", "samerole", "samegroup", "replication")

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


class HbaError(Exception):
    """An invalid pg_hba line."""


@dataclass(frozen=True)
class HbaRule:
    line_no: int
    conn_type: str
    databases: frozenset[str] | None  # None: all
    users: frozenset[str] | None  # None: all
    network: Network | None  # None: any address (or a local rule)
    method: str
    text: str
    same_user: bool = False  # database keyword `sameuser`

    def matches(
        self,
        conn_type: str,
        ssl: bool,
        database: str,
        user: str,
        address: Address | None,
    ) -> bool:
        if self.conn_type == "local":
            if conn_type != "local":
                return False
        else:
            if conn_type != "host":
                return False
            if self.conn_type == "hostssl" and not ssl:
                return False
            if self.conn_type == "hostnossl" and ssl:
                return False
            if self.network is not None:
                if address is None:
                    return False
                if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                if address.version != self.network.version or address not in self.network:
                    return False
        if self.databases is not None or self.same_user:
            in_list = self.databases is not None and database in self.databases
            if not (in_list or (self.same_user and database == user)):
                return False
        return self.users is None or user in self.users


def _tokenize(line: str, line_no: int) -> list[list[tuple[str, bool]]]:
    """Fields of a line; each field is a list of (token, was_quoted) split on commas."""
    fields: list[list[tuple[str, bool]]] = []
    field: list[tuple[str, bool]] = []
    token: list[str] = []
    started = quoted = in_quotes = after_comma = False
    for char in line:
        if in_quotes:
            if char == '"':
                in_quotes = False
            else:
                token.append(char)
            continue
        if char == '"':
            in_quotes = quoted = started = True
        elif char == "#":
            break
        elif char == ",":
            if not started:
                raise HbaError(f"pg_hba line {line_no}: empty list item: {line.strip()}")
            field.append(("".join(token), quoted))
            token, started, quoted, after_comma = [], False, False, True
        elif char.isspace():
            if started:
                field.append(("".join(token), quoted))
                fields.append(field)
                field, token, started, quoted, after_comma = [], [], False, False, False
        else:
            token.append(char)
            started = True
    if in_quotes:
        raise HbaError(f"pg_hba line {line_no}: unterminated quote: {line.strip()}")
    if started:
        field.append(("".join(token), quoted))
    elif after_comma:
        raise HbaError(f"pg_hba line {line_no}: list ends with a comma: {line.strip()}")
    if field:
        fields.append(field)
    return fields


def _names(
    field: list[tuple[str, bool]], what: str, line_no: int, text: str
) -> tuple[frozenset[str] | None, bool]:
    """Database or user list: (names or None for `all`, whether `sameuser` appeared)."""
    names: set[str] = set()
    same_user = False
    for token, quoted in field:
        if not quoted:
            keyword = token.lower()
            if keyword == "all":
                return None, False
            if keyword == "sameuser" and what == "database":
                same_user = True
                continue
            if keyword in _UNSUPPORTED_KEYWORDS or token.startswith(("+", "@")):
                raise HbaError(
                    f"pg_hba line {line_no}: {token!r} in the {what} field is not supported: {text}"
                )
        names.add(token)
    return frozenset(names), same_user


def _network(
    fields: list[list[tuple[str, bool]]], line_no: int, text: str
) -> tuple[Network | None, int]:
    """The address (and optional separate netmask) field; returns it and fields used."""
    if len(fields[0]) != 1:
        raise HbaError(f"pg_hba line {line_no}: the address field can't be a list: {text}")
    token, quoted = fields[0][0]
    if not quoted and token.lower() == "all":
        return None, 1
    if not quoted and token.lower() in _UNSUPPORTED_KEYWORDS:
        raise HbaError(f"pg_hba line {line_no}: {token!r} is not supported: {text}")
    try:
        if "/" in token:
            return ipaddress.ip_network(token, strict=False), 1
        address = ipaddress.ip_address(token)
    except ValueError:
        raise HbaError(
            f"pg_hba line {line_no}: invalid IP address {token!r} (host names are not "
            f"supported): {text}"
        ) from None
    if len(fields) > 2 and len(fields[1]) == 1:
        mask_text = fields[1][0][0]
        try:
            mask = ipaddress.ip_address(mask_text)
        except ValueError:
            pass
        else:
            if mask.version != address.version:
                raise HbaError(f"pg_hba line {line_no}: netmask does not match address: {text}")
            try:
                network = ipaddress.ip_network(f"{address}/{mask}", strict=False)
            except ValueError:
                raise HbaError(f"pg_hba line {line_no}: invalid netmask: {text}") from None
            return network, 2
    # A bare address: that host only.
    return ipaddress.ip_network(address), 1


@dataclass(frozen=True)
class HbaRules:
    rules: tuple[HbaRule, ...]

    @classmethod
    def parse(cls, text: str) -> HbaRules:
        rules = []
        for line_no, raw_line in enumerate(text.splitlines(), start=1):
            fields = _tokenize(raw_line, line_no)
            if fields:
                rules.append(_parse_rule(fields, line_no, raw_line.strip()))
        return cls(tuple(rules))

    def match(
        self,
        *,
        conn_type: Literal["local", "host"],
        ssl: bool,
        database: str,
        user: str,
        address: Address | None,
    ) -> HbaRule | None:
        for rule in self.rules:
            if rule.matches(conn_type, ssl, database, user, address):
                return rule
        return None


def _parse_rule(fields: list[list[tuple[str, bool]]], line_no: int, text: str) -> HbaRule:
    conn_type = fields[0][0][0].lower()
    if len(fields[0]) != 1 or conn_type not in CONNECTION_TYPES:
        raise HbaError(f"pg_hba line {line_no}: invalid connection type: {text}")
    needed = 4 if conn_type == "local" else 5
    if len(fields) < needed:
        raise HbaError(f"pg_hba line {line_no}: missing fields: {text}")
    databases, same_user = _names(fields[1], "database", line_no, text)
    users, _ = _names(fields[2], "user", line_no, text)
    network: Network | None = None
    rest = fields[3:]
    if conn_type != "local":
        network, used = _network(rest, line_no, text)
        rest = rest[used:]
    if not rest:
        raise HbaError(f"pg_hba line {line_no}: missing authentication method: {text}")
    method_field = rest[0]
    method = method_field[0][0].lower()
    if len(method_field) != 1 or method not in METHODS:
        raise HbaError(
            f"pg_hba line {line_no}: unsupported authentication method "
            f"{method_field[0][0]!r} (supported: {', '.join(METHODS)}): {text}"
        )
    if len(rest) > 1:
        raise HbaError(f"pg_hba line {line_no}: authentication options are not supported: {text}")
    return HbaRule(line_no, conn_type, databases, users, network, method, text, same_user)


def parse_legacy_hba(cidrs: Sequence[str]) -> list[Network]:
    networks = []
    for index, cidr in enumerate(cidrs):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise HbaError(f"hba[{index}]: invalid CIDR {cidr!r}") from None
    return networks


def legacy_hba_allows(cidrs: Sequence[str], address: Address | None) -> bool:
    """The legacy allow-list: empty allows everyone, Unix-socket clients always pass."""
    if not cidrs or address is None:
        return True
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in parse_legacy_hba(cidrs))
