"""pg_hba rules with PostgreSQL's semantics: the first line that matches decides.

Unlike PgDoorman, a line we can't parse is an error naming the line, never something
skipped or (for an unparsable address) matching every client. Tokenising follows
PostgreSQL's: whitespace-separated fields, comma lists, double quotes that make keywords
literal, ``#`` comments and backslash line continuation.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

CONNECTION_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "md5", "scram-sha-256", "password", "reject")
# Methods PostgreSQL knows that the pooler can't do: named in the error message.
_POSTGRES_ONLY_METHODS = (
    "ident",
    "peer",
    "gss",
    "sspi",
    "pam",
    "ldap",
    "radius",
    "cert",
    "bsd",
    "oauth",
)
_BLANK = " \t\r"  # PostgreSQL's pg_isblank; other whitespace belongs to the token
_DIGITS = re.compile(r"[0-9]+")

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


class HbaError(Exception):
    """An invalid pg_hba line (or legacy hba entry)."""


@dataclass(frozen=True)
class HbaRule:
    line_no: int
    conn_type: str  # "local" | "host" | "hostssl" | "hostnossl"
    databases: frozenset[str] | None  # None: all
    users: frozenset[str] | None  # None: all
    network: Network | None  # None: a local rule, or any address ("all")
    method: str  # one of METHODS
    text: str
    same_user: bool = False  # the database field holds `sameuser`

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
            if self.network is not None and not _address_in(address, self.network):
                return False
        if (
            self.databases is not None
            and database not in self.databases
            and not (self.same_user and database == user)
        ):
            return False
        return self.users is None or user in self.users


def peer_address(text: str) -> Address | None:
    """A client's address as its transport reports it (an IPv6 zone dropped); None
    for the empty text of a Unix-socket peer."""
    return ipaddress.ip_address(text.split("%", 1)[0]) if text else None


def _address_in(address: Address | None, network: Network) -> bool:
    if address is None:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d. They are judged
        # as IPv4 clients, as PostgreSQL (whose IPv6 sockets take no IPv4 clients)
        # judges them: IPv4 lines only, never an IPv6 line such as ::/0.
        address = address.ipv4_mapped
    return address.version == network.version and address in network


@dataclass(frozen=True)
class HbaRules:
    rules: tuple[HbaRule, ...]

    @classmethod
    def parse(cls, text: str) -> HbaRules:
        """Parse pg_hba text; HbaError on the first line we can't honour exactly."""
        rules = []
        for line_no, line in _logical_lines(text):
            fields = _tokenize(line, _Line(line_no, line))
            if fields:
                rules.append(_parse_rule(fields, _Line(line_no, line)))
        if not rules:
            # PostgreSQL refuses such a file too: it would turn every client away.
            raise HbaError("pg_hba contains no rules, so every connection would be rejected")
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
        """The first rule that matches the connection, or None (PostgreSQL then rejects)."""
        if conn_type != "local" and conn_type != "host":
            raise ValueError(f"conn_type must be 'local' or 'host', not {conn_type!r}")
        for rule in self.rules:
            if rule.matches(conn_type, ssl, database, user, address):
                return rule
        return None


# ---- tokenising ------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    text: str
    quoted: bool  # started with a double quote: keywords lose their meaning


@dataclass(frozen=True)
class _Line:
    number: int
    text: str

    def error(self, problem: str) -> HbaError:
        return HbaError(f"pg_hba line {self.number}: {problem}: {self.text.strip()}")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines joined across trailing backslashes, numbered by their first physical line."""
    pending: list[str] = []
    first = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not pending:
            first = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield first, "".join(pending)
        pending = []
    if pending:
        yield first, "".join(pending)


def _tokenize(line: str, where: _Line) -> list[list[_Token]]:
    """Fields of a line, each a list of comma-separated tokens (PostgreSQL's next_token)."""
    fields: list[list[_Token]] = []
    pos = 0
    end = len(line)
    while pos < end:
        field: list[_Token] = []
        while True:
            token, pos, more = _next_token(line, pos, where)
            if token is None:
                break
            field.append(token)
            if not more:
                break
        if field:
            fields.append(field)
    return fields


def _next_token(line: str, pos: int, where: _Line) -> tuple[_Token | None, int, bool]:
    """(token or None at end of line, new position, whether a comma followed it)."""
    end = len(line)
    # Like PostgreSQL, blanks and stray commas before a token are skipped.
    while pos < end and (line[pos] in _BLANK or line[pos] == ","):
        pos += 1
    chars: list[str] = []
    in_quote = saw_quote = initial_quote = doubled = False
    comma = False
    while pos < end and (in_quote or line[pos] not in _BLANK):
        char = line[pos]
        if char == "#" and not in_quote:
            pos = end  # comment to end of line
            break
        if char == "," and not in_quote:
            comma = True
            break
        if char != '"' or doubled:
            chars.append(char)
        # Inside quotes, "" is a literal double quote.
        doubled = not doubled if in_quote and char == '"' else False
        if char == '"':
            in_quote = not in_quote
            saw_quote = True
            if not chars:
                initial_quote = True
        pos += 1
    if in_quote:
        raise where.error("unterminated quoted string")
    if not chars and not saw_quote:
        return None, pos, False
    return _Token("".join(chars), initial_quote), pos, comma


# ---- fields ------------------------------------------------------------------------


def _keyword(token: _Token, *words: str) -> bool:
    # Keywords are case-sensitive and only unquoted, as in PostgreSQL.
    return not token.quoted and token.text in words


def _database_field(field: list[_Token], where: _Line) -> tuple[frozenset[str] | None, bool]:
    names: set[str] = set()
    same_user = False
    for token in field:
        if _keyword(token, "all"):
            return None, False
        if _keyword(token, "sameuser"):
            same_user = True
        elif _keyword(token, "samerole", "samegroup"):
            raise where.error(f"{token.text} (role membership) is not supported")
        elif _keyword(token, "replication"):
            # Matches replication connections only, which the pooler never accepts: as
            # in PostgreSQL, such a line is skipped by every normal connection.
            continue
        else:
            _refuse_special(token, "database", where)
            names.add(token.text)
    return frozenset(names), same_user


def _user_field(field: list[_Token], where: _Line) -> frozenset[str] | None:
    names: set[str] = set()
    for token in field:
        if _keyword(token, "all"):
            return None
        if not token.quoted and token.text.startswith("+"):
            raise where.error(f"group membership ({token.text}) is not supported")
        _refuse_special(token, "user", where)
        names.add(token.text)
    return frozenset(names)


def _refuse_special(token: _Token, what: str, where: _Line) -> None:
    # PostgreSQL 16+ reads any token starting with "/" as a regular expression, quoted
    # or not (quotes let it hold commas): taken as a name, it would match nothing.
    if token.text.startswith("/"):
        raise where.error(
            f"regular expressions ({token.text}) in the {what} field are not supported"
        )
    if token.quoted:
        return
    if token.text.startswith("@") and len(token.text) > 1:
        raise where.error(f"file inclusion ({token.text}) in the {what} field is not supported")


def _single(field: list[_Token], what: str, where: _Line) -> _Token:
    if len(field) != 1:
        raise where.error(f"multiple values specified for {what}")
    return field[0]


def _ip_address(text: str) -> Address | None:
    if "%" in text:
        return None  # zone ids would make membership tests meaningless
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _prefix_of_mask(mask: Address) -> int | None:
    """The prefix length of a contiguous netmask like 255.255.0.0, else None."""
    bits = mask.max_prefixlen
    value = int(mask)
    host_bits = (~value) & ((1 << bits) - 1)
    if host_bits & (host_bits + 1):
        return None  # ones after a zero: not contiguous
    return bits - host_bits.bit_length()


def _address_field(fields: list[list[_Token]], where: _Line) -> tuple[Network | None, int]:
    """The address (with an optional separate netmask field); returns it and fields used."""
    token = _single(fields[0], "the address", where)
    if _keyword(token, "all"):
        return None, 1
    if _keyword(token, "samehost", "samenet"):
        raise where.error(f"{token.text} is not supported; list the addresses instead")
    text = token.text
    if "/" in text:
        address_text, prefix_text = text.split("/", 1)
        address = _ip_address(address_text)
        if address is None:
            raise where.error(f"invalid IP address {address_text!r} (host names are not supported)")
        if not _DIGITS.fullmatch(prefix_text) or int(prefix_text) > address.max_prefixlen:
            raise where.error(f"invalid CIDR mask in address {text!r}")
        return ipaddress.ip_network(f"{address}/{int(prefix_text)}", strict=False), 1
    address = _ip_address(text)
    if address is None:
        raise where.error(f"invalid IP address {text!r} (host names are not supported)")
    mask = _ip_address(fields[1][0].text) if len(fields) > 1 else None
    if mask is None:
        # PostgreSQL wants a netmask here; we take a bare address as that one host.
        return ipaddress.ip_network(address), 1
    _single(fields[1], "the netmask", where)
    if mask.version != address.version:
        raise where.error("IP address and mask do not match")
    prefix = _prefix_of_mask(mask)
    if prefix is None:
        raise where.error(f"invalid IP mask {str(mask)!r}: only contiguous netmasks are supported")
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False), 2


def _parse_rule(fields: list[list[_Token]], where: _Line) -> HbaRule:
    conn_type = _single(fields[0], "the connection type", where).text
    if conn_type in ("include", "include_if_exists", "include_dir"):
        raise where.error("include directives are not supported")
    if conn_type in ("hostgssenc", "hostnogssenc"):
        raise where.error(f"connection type {conn_type!r} (GSSAPI encryption) is not supported")
    if conn_type not in CONNECTION_TYPES:
        raise where.error(f"invalid connection type {conn_type!r}")
    rest = fields[1:]
    if not rest:
        raise where.error("missing database field")
    databases, same_user = _database_field(rest[0], where)
    if len(rest) < 2:
        raise where.error("missing user field")
    users = _user_field(rest[1], where)
    rest = rest[2:]
    network: Network | None = None
    if conn_type != "local":
        if not rest:
            raise where.error("missing address field")
        network, used = _address_field(rest, where)
        rest = rest[used:]
    if not rest:
        raise where.error("missing authentication method")
    method = _single(rest[0], "the authentication method", where).text
    if method not in METHODS:
        supported = ", ".join(METHODS)
        if method in _POSTGRES_ONLY_METHODS:
            raise where.error(
                f"authentication method {method!r} is not supported (supported: {supported})"
            )
        raise where.error(f"invalid authentication method {method!r} (supported: {supported})")
    if len(rest) > 1:
        raise where.error("authentication options (such as clientcert=...) are not supported")
    return HbaRule(
        where.number, conn_type, databases, users, network, method, where.text.strip(), same_user
    )


# ---- legacy general.hba -------------------------------------------------------------


def parse_legacy_hba(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """The legacy `general.hba` allow-list; HbaError for an entry that isn't a CIDR."""
    return _parse_legacy(tuple(cidrs))


@functools.lru_cache(maxsize=16)
def _parse_legacy(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    networks = []
    for index, cidr in enumerate(cidrs):
        address_text, slash, prefix_text = cidr.strip().partition("/")
        address = _ip_address(address_text)
        if (
            address is None
            or not slash
            or not _DIGITS.fullmatch(prefix_text)
            or int(prefix_text) > address.max_prefixlen
        ):
            raise HbaError(
                f"hba[{index}]: invalid CIDR {cidr!r} (expected a network like '10.0.0.0/8')"
            )
        networks.append(ipaddress.ip_network(f"{address}/{int(prefix_text)}", strict=False))
    return tuple(networks)


def legacy_hba_allows(cidrs: Sequence[str], address: Address | None) -> bool:
    """Empty allows everyone; Unix-socket clients (no address) are always allowed."""
    if not cidrs or address is None:
        return True
    return any(_address_in(address, network) for network in _parse_legacy(tuple(cidrs)))
