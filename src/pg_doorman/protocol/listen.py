"""LISTEN and UNLISTEN statements a pooler may answer itself (listen_fanout).

A client's `LISTEN channel` is served by one server connection per pool that listens
for all of its clients (net/listen_hub.py); the pooler must know exactly which channel
a statement names, so only the plain forms are read here: one `LISTEN` or `UNLISTEN`
statement, nothing else in the query, no comments, the channel an unquoted identifier
of ASCII letters, digits, `_` and `$` that is not a reserved word, or a quoted one, and
short enough not to be truncated. Such a statement comes as a simple Query
(parse_statement) or as an extended-protocol batch that prepares and/or executes it
(read_extended). Anything else is None: it goes to a server as before, where
PostgreSQL parses it (and reports its errors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pg_doorman.protocol import codes, messages

# What a statement does.
LISTEN: Final = 1
UNLISTEN: Final = 2
UNLISTEN_ALL: Final = 3

# Their CommandComplete messages.
LISTEN_DONE: Final = messages.command_complete("LISTEN")
UNLISTEN_DONE: Final = messages.command_complete("UNLISTEN")

# First bytes of a Query text that may be one of them (checked before it is parsed),
# as a table indexed by the byte.
MAY_START: Final = codes.type_table(b"lLuU \t\n\r\f")

# PostgreSQL's whitespace between tokens (\v counts only from PostgreSQL 16 on).
_SPACE: Final = b" \t\n\r\f"
# Longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1 bytes); longer ones it
# truncates with a NOTICE, which is left to it.
_NAME_MAX: Final = 63
_IDENT_START: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CONT: Final = _IDENT_START | frozenset(b"0123456789$")

# Keywords that cannot name a channel unquoted: PostgreSQL's reserved ones and those
# that may only name a function or type (pg_get_keywords() catcode R and T).
RESERVED: Final = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case
    cast check collate collation column concurrently constraint create cross
    current_catalog current_date current_role current_schema current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign freeze from full grant group having ilike in initially inner
    intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some
    symmetric system_user table tablesample then to trailing true union unique user
    using variadic verbose when where window with""".split()  # noqa: SIM905
)


def parse_statement(text: bytes) -> tuple[int, str] | None:
    """(LISTEN, channel), (UNLISTEN, channel) or (UNLISTEN_ALL, "") for a Query text
    (without its NUL) that is exactly one such plain statement; None otherwise."""
    end = len(text)
    pos = _skip_space(text, 0)
    word_end = pos
    while word_end < end and text[word_end] in _IDENT_CONT:
        word_end += 1
    word = text[pos:word_end].lower()
    if word == b"listen":
        op = LISTEN
    elif word == b"unlisten":
        op = UNLISTEN
    else:
        return None
    pos = _skip_space(text, word_end)
    if pos == word_end:
        return None  # `LISTEN"x"`, `UNLISTEN*`: valid, but rare enough for the server
    if pos < end and text[pos] == 0x2A and op == UNLISTEN:  # *
        op, channel, pos = UNLISTEN_ALL, "", pos + 1
    else:
        parsed = _identifier(text, pos)
        if parsed is None:
            return None
        channel, pos = parsed
    pos = _skip_space(text, pos)
    if pos < end and text[pos] == 0x3B:  # ;
        pos = _skip_space(text, pos + 1)
    if pos != end:
        return None
    return op, channel


def _skip_space(text: bytes, pos: int) -> int:
    end = len(text)
    while pos < end and text[pos] in _SPACE:
        pos += 1
    return pos


def _identifier(text: bytes, pos: int) -> tuple[str, int] | None:
    """The channel name at `pos` and where it ends, or None if not a plain one."""
    end = len(text)
    if pos >= end:
        return None
    if text[pos] == 0x22:  # "
        name = bytearray()
        pos += 1
        while True:
            close = text.find(b'"', pos)
            if close < 0:
                return None
            name += text[pos:close]
            if close + 1 < end and text[close + 1] == 0x22:  # "" stands for "
                name += b'"'
                pos = close + 2
                continue
            pos = close + 1
            break
        if not name or len(name) > _NAME_MAX:
            return None
        try:
            return name.decode("utf-8"), pos
        except UnicodeDecodeError:
            return None
    if text[pos] not in _IDENT_START:
        return None  # digits first, or a byte beyond ASCII: left to PostgreSQL
    start = pos
    while pos < end and text[pos] in _IDENT_CONT:
        pos += 1
    if pos < end and text[pos] >= 0x80:
        return None
    word = text[start:pos].decode("ascii").lower()
    if len(word) > _NAME_MAX or word in RESERVED:
        return None
    return word, pos


def statement_for(op: int, channel: str) -> str:
    """The statement that does `op` for `channel` on the listening server."""
    if op == UNLISTEN_ALL:
        return "UNLISTEN *"
    verb = "LISTEN" if op == LISTEN else "UNLISTEN"
    return f'{verb} "{channel.replace(chr(34), chr(34) * 2)}"'


def channel_of(notification: bytes) -> str | None:
    """The channel a NotificationResponse body (pid, channel, payload) is for."""
    end = notification.find(b"\x00", 4)
    if end < 0:
        return None
    try:
        return notification[4:end].decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---- the extended protocol ----------------------------------------------------------

# A batch that needs more bytes before it can be read.
INCOMPLETE: Final = -1
# Longest message of such a batch: a longer one is something else, and is not held
# back to be read whole.
_SMALL: Final = 1024

_PARSE_COMPLETE: Final = messages.build(b"1")
_BIND_COMPLETE: Final = messages.build(b"2")
_NO_DATA: Final = messages.build(b"n")
_NO_PARAMETERS: Final = messages.build(b"t", b"\x00\x00")


class ExtendedStatement:
    """A batch that prepares, or runs, one LISTEN or UNLISTEN in the extended
    protocol, and PostgreSQL's answers to it: `before` the statement's CommandComplete
    (ParseComplete, BindComplete, what a Describe asks), and `after` it (ReadyForQuery
    at a Sync, nothing at a Flush)."""

    __slots__ = ("after", "before", "channel", "end", "op", "parse", "runs")

    def __init__(
        self, end: int, op: int, channel: str, before: bytes, parse: bytes, runs: bool
    ) -> None:
        self.end = end  # where the batch ends in the bytes read
        self.op = op
        self.channel = channel
        self.before = before
        self.after = messages.READY_IDLE
        # The body of the batch's Parse (b"": none): the client's statement name now
        # stands for the statement.
        self.parse = parse
        self.runs = runs  # it executes the statement (else it only prepares it)


def read_extended(
    buf: bytes, statement_text: Callable[[bytes], bytes | None]
) -> ExtendedStatement | int | None:
    """The batch at the start of `buf` if it is exactly: a Parse of a plain LISTEN or
    UNLISTEN without parameter types, or a Bind without parameters of such a statement
    prepared earlier (`statement_text` gives the text of a statement the client
    prepared, None if unknown), or both in that order; Describes of that statement or
    portal; an Execute of that portal after a Bind; and a Sync (or, with no Execute, a
    Flush). INCOMPLETE if more bytes are needed to tell; None if it is anything else:
    it goes to a server."""
    pos = 0
    end = len(buf)
    statement: tuple[int, str] | None = None
    parse = b""
    statement_name = b""
    portal = b""
    bound = False
    executed = False
    before = b""
    while True:
        if end - pos < 5:
            return INCOMPLETE
        msg_type = buf[pos]
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4 or length > _SMALL:
            return None
        if end - pos - 1 < length:
            return INCOMPLETE
        body = buf[pos + 5 : pos + 1 + length]
        pos += 1 + length
        if msg_type == codes.PARSE and pos == 1 + length:  # first in the batch
            strings = _cstrings(body, 2)
            if strings is None or body[strings[1] :] != b"\x00\x00":
                return None  # with parameter types, or malformed
            statement = parse_statement(strings[0][1])
            if statement is None:
                return None
            statement_name = strings[0][0]
            parse = body
            before += _PARSE_COMPLETE
        elif msg_type == codes.BIND and not bound:
            strings = _cstrings(body, 2)
            if strings is None or not _no_parameters(body, strings[1]):
                return None
            portal, name = strings[0]
            if statement is None:
                text = statement_text(name)
                if not text or not MAY_START[text[0]]:
                    return None
                statement = parse_statement(text)
                if statement is None:
                    return None
                statement_name = name
            elif name != statement_name:
                return None
            bound = True
            before += _BIND_COMPLETE
        elif msg_type == codes.DESCRIBE and statement is not None and not executed:
            if body == b"S" + statement_name + b"\x00":
                before += _NO_PARAMETERS + _NO_DATA
            elif bound and body == b"P" + portal + b"\x00":
                before += _NO_DATA
            else:
                return None
        elif msg_type == codes.EXECUTE and bound and not executed:
            strings = _cstrings(body, 1)
            if strings is None or strings[0][0] != portal or len(body) != strings[1] + 4:
                return None
            executed = True
        elif msg_type == codes.SYNC and statement is not None and bound == executed:
            if length != 4:
                return None
            op, channel = statement
            return ExtendedStatement(pos, op, channel, before, parse, executed)
        elif msg_type == codes.FLUSH and statement is not None and not bound:
            if length != 4:
                return None
            op, channel = statement
            prepared = ExtendedStatement(pos, op, channel, before, parse, False)
            prepared.after = b""
            return prepared
        else:
            return None


def _cstrings(body: bytes, count: int) -> tuple[list[bytes], int] | None:
    """The first `count` NUL-terminated strings of `body`, and where the rest starts."""
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        nul = body.find(b"\x00", pos)
        if nul < 0:
            return None
        out.append(body[pos:nul])
        pos = nul + 1
    return out, pos


def _no_parameters(body: bytes, pos: int) -> bool:
    """A Bind's rest (from its formats on) binds no parameter values."""
    if len(body) < pos + 2:
        return False
    formats = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2 + 2 * formats
    if body[pos : pos + 2] != b"\x00\x00" or len(body) < pos + 4:
        return False
    results = int.from_bytes(body[pos + 2 : pos + 4], "big")
    return len(body) == pos + 4 + 2 * results
