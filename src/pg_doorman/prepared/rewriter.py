"""Rewrites one client's extended-protocol traffic onto pool-shared statements.

Frontend side: Parse, Bind, Describe and Close are mapped from the client's statement
names to the pool's content-derived server names. A Parse the server already has is
not sent; a statement the server lacks is parsed just before the Bind or Describe that
needs it; Closes of statements the server's LRU evicted wait for the batch's Sync.

Backend side: a queue of expected responses mirrors, in order, every message sent for
this client. It puts a synthetic ParseComplete (or CloseComplete, or error) where
PostgreSQL would have sent one, drops the replies to messages the client didn't send,
and applies PostgreSQL's rule that after an error everything up to Sync is skipped.
"""

from __future__ import annotations

import logging
from typing import Final

from pg_doorman.prepared.registry import PoolStatements, ServerStatements, StatementEntry
from pg_doorman.protocol import codes, messages, sqlstate

logger: Final = logging.getLogger("pg_doorman.prepared")


# Expected responses.
SYNTH: Final = 0  # our own bytes to put in the stream here
PARSE: Final = 1  # ParseComplete for a Parse the client sent
HIDDEN_PARSE: Final = 2  # ParseComplete for a Parse we added: dropped
BIND: Final = 3
DESCRIBE_S: Final = 4  # ParameterDescription, then RowDescription/NoData
DESCRIBE_S_ROWS: Final = 5
DESCRIBE_P: Final = 6
EXECUTE: Final = 7  # rows ... until CommandComplete/EmptyQuery/PortalSuspended
CLOSE: Final = 8
HIDDEN_CLOSE: Final = 9  # CloseComplete for a deferred Close: dropped
SYNC: Final = 10
QUERY: Final = 11  # simple Query or FunctionCall: everything up to ReadyForQuery
# CloseComplete for a Close sent before parsing again a statement the server may have
# dropped (see BatchRewriter._query_ahead): dropped.
RECHECK_CLOSE: Final = 12

# Backend actions returned to the scanner (bit flags).
DROP: Final = 1
HAS_PREFIX: Final = 2

_ASYNC_TYPES: Final = codes.type_table(
    (codes.NOTICE_RESPONSE, codes.NOTIFICATION_RESPONSE, codes.PARAMETER_STATUS)
)
_EXECUTE_END: Final = codes.type_table(
    (codes.COMMAND_COMPLETE, codes.EMPTY_QUERY_RESPONSE, codes.PORTAL_SUSPENDED)
)
_ROW_DESCRIPTION_OR_NO_DATA: Final = codes.type_table((codes.ROW_DESCRIPTION, codes.NO_DATA))


class Expectations:
    """The responses still due from the server, oldest first: kinds with a payload
    (a statement name, or our own bytes for SYNTH).

    Two parallel lists and a read index rather than a deque of tuples: in the compiled
    build every operation stays native and nothing is allocated per message. Hot paths
    test `size` and read `kinds[head]` directly: attribute reads stay cheap when the
    module runs interpreted, where `__bool__` or a method would be a Python call.
    """

    __slots__ = ("head", "kinds", "payloads", "queries", "size")

    def __init__(self) -> None:
        self.kinds: list[int] = []
        self.payloads: list[bytes] = []
        self.head = 0  # index of the oldest pending entry
        self.size = 0  # entries pending
        self.queries = 0  # pending QUERY entries (BatchRewriter._query_ahead)

    def __bool__(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return self.size

    def append(self, kind: int, payload: bytes = b"") -> None:
        self.kinds.append(kind)
        self.payloads.append(payload)
        self.size += 1
        if kind == QUERY:
            self.queries += 1

    def first_kind(self) -> int:
        """Kind of the oldest expectation (the queue must not be empty)."""
        return self.kinds[self.head]

    def first_payload(self) -> bytes:
        return self.payloads[self.head]

    def replace_first(self, kind: int) -> None:
        self.kinds[self.head] = kind
        self.payloads[self.head] = b""

    def popleft(self) -> bytes:
        """Drop the oldest expectation; returns its payload."""
        payload = self.payloads[self.head]
        size = self.size - 1
        if not size:
            self.clear()
            return payload
        self.size = size
        if self.kinds[self.head] == QUERY:
            self.queries -= 1
        head = self.head + 1
        if head >= 64 and head > size:
            # A client that pipelines without pause may never let the queue run empty:
            # drop the consumed entries once they are the bigger part.
            del self.kinds[:head]
            del self.payloads[:head]
            head = 0
        self.head = head
        return payload

    def clear(self) -> None:
        self.kinds.clear()
        self.payloads.clear()
        self.head = 0
        self.size = 0
        self.queries = 0

    def all_synthetic(self) -> bool:
        kinds = self.kinds
        # A loop, not all(<generator>): interpreted, creating the generator costs more
        # than the one or two entries this usually looks at.
        for i in range(self.head, len(kinds)):  # noqa: SIM110
            if kinds[i] != SYNTH:
                return False
        return True


# Longest Parse body a client keeps for the repeated-Parse shortcut: bounds its memory.
_REMEMBERED_PARSE_MAX: Final = 8192

# Stands for an empty queue until the first expectation; never appended to.
_NOTHING_EXPECTED: Final = Expectations()


def _name_end(body: bytes, start: int) -> int:
    """Index just past the NUL that ends the name starting at `start` (0 if none).

    A loop over bytes compiles to native reads, where bytes.find() is a generic call
    that parses its arguments; names (portals, statements) are short."""
    n = len(body)
    i = start
    while i < n:
        if body[i] == 0:
            return i + 1
        i += 1
    return 0


def close_statement(name: bytes) -> bytes:
    return messages.build(b"C", b"S" + name + b"\x00")


def _missing_statement_error(name: bytes) -> bytes:
    if name:
        text = f'prepared statement "{name.decode("utf-8", "replace")}" does not exist'
    else:
        text = "unnamed prepared statement does not exist"
    return messages.error_response("ERROR", sqlstate.INVALID_SQL_STATEMENT_NAME, text)


class BatchRewriter:
    """Statement mapping of one client plus the response queue of its current server."""

    __slots__ = (
        "_last_parse",
        "_last_parse_entry",
        "_prefix",
        "context",
        "desynced",
        "expect",
        "leading_queries",
        "named",
        "registry",
        "server",
        "skipping",
        "unnamed",
    )

    def __init__(self, registry: PoolStatements, context: bytes) -> None:
        self.registry = registry
        self.context = context  # client settings that change what a query text means
        self.named: dict[bytes, StatementEntry] = {}
        self.unnamed: StatementEntry | None = None
        self.server: ServerStatements | None = None
        # A queue of its own only once the client uses the extended protocol: most idle
        # clients never do.
        self.expect: Expectations = _NOTHING_EXPECTED
        # Queries sent while nothing else was expected: answered before anything queued.
        self.leading_queries = 0
        self.skipping = False  # after a synthetic error: drop client messages until Sync
        self.desynced = False
        # Synthetic answers due before the next server message; usually one.
        self._prefix: list[bytes] = []
        # The last Parse body and its entry: drivers that do not name their statements
        # send the same Parse before every execution, and comparing bytes is cheaper
        # than building and hashing the registry key again. Reuse skips the registry's
        # recency update, so an entry the registry evicted is looked up again instead.
        self._last_parse = b""
        self._last_parse_entry: StatementEntry | None = None

    # ---- attachment ---------------------------------------------------------

    def attach(self, server: ServerStatements) -> None:
        self.server = server
        if self.expect.size:
            self.expect.clear()
        self.leading_queries = 0
        self.skipping = False

    @property
    def active(self) -> bool:
        """Responses need rewriting (else the scanner's fast path is enough)."""
        return self.expect.size > 0

    # ---- frontend -----------------------------------------------------------

    def frontend(self, msg_type: int, data: bytes, pos: int, end: int) -> bytes | None:
        """Replacement for one client message (None: forward unchanged)."""
        if msg_type == codes.SYNC:
            self.skipping = False
            return self._sync(data[pos:end])
        if self.skipping:
            return b""
        if msg_type == codes.PARSE:
            return self._parse(data[pos + 5 : end])
        if msg_type == codes.BIND:
            return self._bind(data[pos + 5 : end])
        if msg_type == codes.EXECUTE:
            self._push(EXECUTE)
            return None
        if msg_type == codes.DESCRIBE:
            return self._describe(data[pos + 5 : end])
        if msg_type == codes.CLOSE:
            return self._close(data[pos + 5 : end])
        if msg_type == codes.QUERY or msg_type == codes.FUNCTION_CALL:
            if self.expect.size:
                self.expect.append(QUERY)
            else:
                self.leading_queries += 1
        return None  # Flush and anything else

    def _push(self, kind: int, payload: bytes = b"") -> None:
        expect = self.expect
        if expect is _NOTHING_EXPECTED:
            self.expect = expect = Expectations()
        if not expect.size and self.leading_queries:
            # Earlier simple queries are still being answered: they come first.
            for _ in range(self.leading_queries):
                expect.append(QUERY)
            self.leading_queries = 0
        # Expectations.append inlined: this runs for every extended-protocol message
        # (never with QUERY, so its count needs no update).
        expect.kinds.append(kind)
        expect.payloads.append(payload)
        expect.size += 1

    def _query_ahead(self) -> bool:
        """A simple Query (or FunctionCall) sent earlier is still unanswered. It may be
        a DISCARD ALL or DEALLOCATE ALL, which drops the server's statements before
        the messages behind it run: the server's record can't be trusted for them."""
        return self.leading_queries > 0 or self.expect.queries > 0

    def _send_parse(self, entry: StatementEntry, kind: int) -> bytes:
        """Parse `entry` on a server that lacks it; `kind` is PARSE (the client's own
        Parse) or HIDDEN_PARSE (one we add)."""
        server = self.server
        assert server is not None
        entry.misses += 1
        server.add(entry.name)
        self._push(kind, entry.name)
        return entry.parse_message

    def _parse_again(self, entry: StatementEntry, kind: int) -> bytes:
        """Parse `entry` again behind a query that may drop it (see _query_ahead).
        Closed first: harmless if the server still has it."""
        self._push(RECHECK_CLOSE, entry.name)
        self._push(kind, entry.name)
        return close_statement(entry.name) + entry.parse_message

    def _ensure_on_server(self, entry: StatementEntry) -> bytes:
        """The Parse to send first if the server lacks the statement, else b''."""
        server = self.server
        assert server is not None
        if not server.has(entry.name):
            return self._send_parse(entry, HIDDEN_PARSE)
        if self._query_ahead():
            return self._parse_again(entry, HIDDEN_PARSE)
        return b""

    def _parse(self, body: bytes) -> bytes:
        name_end = _name_end(body, 0)
        entry = self._last_parse_entry
        if entry is None or entry.evicted or body != self._last_parse:
            entry = self.registry.lookup(body, name_end, self.context)
            if len(body) <= _REMEMBERED_PARSE_MAX:
                self._last_parse = body
                self._last_parse_entry = entry
        if name_end > 1:
            self.named[body[: name_end - 1]] = entry
            entry.kinds |= 1  # registry.NAMED
        else:
            self.unnamed = entry
            entry.kinds |= 2  # registry.UNNAMED
        server = self.server
        assert server is not None
        if not server.has(entry.name):
            return self._send_parse(entry, PARSE)
        if self._query_ahead():
            return self._parse_again(entry, PARSE)
        entry.hits += 1
        self._push(SYNTH, messages.PARSE_COMPLETE)
        return b""

    def _resolve(self, name: bytes) -> StatementEntry | None:
        return self.named.get(name) if name else self.unnamed

    def _refuse(self, error: bytes) -> bytes:
        # Answer the message with `error` and skip the rest of the batch up to Sync,
        # as PostgreSQL does after an error in the extended protocol.
        self._push(SYNTH, error)
        self.skipping = True
        return b""

    def _missing(self, name: bytes) -> bytes:
        # Never forward an unknown name: it could collide with a server-side name.
        return self._refuse(_missing_statement_error(name))

    def server_reset(self) -> None:
        """The server dropped all its statements (DISCARD ALL or DEALLOCATE ALL) at
        this point of its replies, with client messages still queued behind: it has
        only those whose Parse is among them. The client's own names stay, since which
        of them came before the command is not known."""
        server = self.server
        assert server is not None
        server.clear()
        expect = self.expect
        kinds, payloads = expect.kinds, expect.payloads
        for i in range(expect.head, expect.head + expect.size):
            kind = kinds[i]
            if kind == PARSE or kind == HIDDEN_PARSE:
                server.restore(payloads[i])

    def forget_statements(self) -> None:
        """The client's names after DEALLOCATE ALL or DISCARD ALL: none."""
        self.named.clear()
        self.unnamed = None

    def _invalid(self, text: str) -> bytes:
        # A malformed message: PostgreSQL's own answer.
        return self._refuse(messages.error_response("ERROR", sqlstate.PROTOCOL_VIOLATION, text))

    def _statement_name(self, body: bytes) -> bytes | None:
        """The name in a Describe or Close of a statement (b"S" name NUL), or None
        when the message is malformed (answered as PostgreSQL would)."""
        name_end = _name_end(body, 1)
        if not name_end:
            self._invalid("invalid string in message")
            return None
        if name_end != len(body):
            self._invalid("invalid message format")
            return None
        return body[1 : name_end - 1]

    def _bind(self, body: bytes) -> bytes | None:
        portal_end = _name_end(body, 0)
        name_end = _name_end(body, portal_end) if portal_end else 0
        if not name_end:
            return self._invalid("invalid string in message")
        entry = self._resolve(body[portal_end : name_end - 1])
        if entry is None:
            return self._missing(body[portal_end : name_end - 1])
        prefix = self._ensure_on_server(entry)
        self._push(BIND)
        name = entry.name
        # One join instead of a chain of concatenations: this runs for every Bind.
        length = len(body) - (name_end - portal_end) + len(name) + 5
        header = length.to_bytes(4, "big")
        return b"".join((prefix, b"B", header, body[:portal_end], name, b"\x00", body[name_end:]))

    def _describe(self, body: bytes) -> bytes | None:
        if body[:1] != b"S":
            self._push(DESCRIBE_P)
            return None
        name = self._statement_name(body)
        if name is None:
            return b""
        entry = self._resolve(name)
        if entry is None:
            return self._missing(name)
        prefix = self._ensure_on_server(entry)
        self._push(DESCRIBE_S)
        return prefix + messages.build(b"D", b"S" + entry.name + b"\x00")

    def _close(self, body: bytes) -> bytes | None:
        if body[:1] != b"S":
            self._push(CLOSE)
            return None
        name = self._statement_name(body)
        if name is None:
            return b""
        if name:
            self.named.pop(name, None)
        else:
            self.unnamed = None
        # The server-side statement stays for others; the client gets its CloseComplete.
        self._push(SYNTH, messages.CLOSE_COMPLETE)
        return b""

    def _sync(self, sync: bytes) -> bytes | None:
        server = self.server
        assert server is not None
        closes = server.take_pending_close() if server.pending_close else ()
        if not closes:
            self._push(SYNC)
            return None
        parts = []
        for name in closes:
            self._push(HIDDEN_CLOSE, name)
            parts.append(close_statement(name))
        self._push(SYNC)
        parts.append(sync)
        return b"".join(parts)

    # ---- backend ------------------------------------------------------------

    def backend(self, msg_type: int) -> int:
        """Decide about one server message; see DROP/HAS_PREFIX."""
        expect = self.expect
        action = 0
        if expect.size and expect.kinds[expect.head] == SYNTH:
            self._drain_into_prefix()
            action = HAS_PREFIX
        if _ASYNC_TYPES[msg_type]:
            return action
        if not expect.size:
            return action
        kind = expect.kinds[expect.head]
        if msg_type == codes.ERROR_RESPONSE:
            if kind == QUERY:
                return action  # a simple query's error; its ReadyForQuery follows
            self._undo(kind, expect.popleft())
            self._skip_to_sync()
            return action
        if msg_type == codes.READY_FOR_QUERY:
            if kind == SYNC or kind == QUERY:
                expect.popleft()
            else:
                self._lost(kind, msg_type)
            return action
        if kind == EXECUTE:
            if _EXECUTE_END[msg_type]:
                expect.popleft()
            return action
        if kind == QUERY:
            return action
        if kind == PARSE:
            ok = msg_type == codes.PARSE_COMPLETE
        elif kind == HIDDEN_PARSE:
            if msg_type == codes.PARSE_COMPLETE:
                expect.popleft()
                return action | DROP
            ok = False
        elif kind == BIND:
            ok = msg_type == codes.BIND_COMPLETE
        elif kind == DESCRIBE_S:
            if msg_type == codes.PARAMETER_DESCRIPTION:
                expect.replace_first(DESCRIBE_S_ROWS)
                return action
            ok = False
        elif kind == DESCRIBE_S_ROWS or kind == DESCRIBE_P:
            ok = _ROW_DESCRIPTION_OR_NO_DATA[msg_type] == 1
        elif kind == CLOSE:
            ok = msg_type == codes.CLOSE_COMPLETE
        elif kind == HIDDEN_CLOSE or kind == RECHECK_CLOSE:
            if msg_type == codes.CLOSE_COMPLETE:
                expect.popleft()
                return action | DROP
            ok = False
        else:
            ok = False
        if ok:
            expect.popleft()
        else:
            self._lost(kind, msg_type)
        return action

    def only_synthetic_due(self) -> bool:
        """Everything still expected is ours to answer: the server will send nothing."""
        return self.expect.all_synthetic()

    def take_prefix(self) -> bytes:
        parts = self._prefix
        prefix = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return prefix

    def drain(self) -> bytes:
        """Synthetic messages that are next in line, to send to the client now."""
        expect = self.expect
        if expect.size and expect.kinds[expect.head] == SYNTH:
            self._drain_into_prefix()
        return self.take_prefix() if self._prefix else b""

    def _drain_into_prefix(self) -> None:
        expect = self.expect
        prefix = self._prefix
        while expect.size and expect.kinds[expect.head] == SYNTH:
            payload = expect.popleft()
            prefix.append(payload)
            if payload[:1] == b"E":
                # Our own error: PostgreSQL would skip to Sync from here as well.
                self._skip_to_sync()

    def _skip_to_sync(self) -> None:
        """After an error the server ignores everything up to Sync: so do we."""
        expect = self.expect
        while expect.size and expect.kinds[expect.head] != SYNC:
            kind = expect.kinds[expect.head]
            self._undo(kind, expect.popleft())

    def _undo(self, kind: int, payload: bytes) -> None:
        server = self.server
        if server is None:
            return
        if kind == PARSE or kind == HIDDEN_PARSE:
            server.forget(payload)  # never created
        elif kind == HIDDEN_CLOSE:
            server.restore(payload)  # never closed
        elif kind == RECHECK_CLOSE:
            # Skipped with the Parse behind it: whether the server still has the
            # statement depends on the query ahead. Let the server be reset at check-in.
            server.forget(payload)
            self.desynced = True

    def _lost(self, kind: int, msg_type: int) -> None:
        # Should not happen; if it does, stop rewriting rather than corrupt the stream.
        logger.error(
            "prepared statements: unexpected %r while expecting kind %d; resetting",
            chr(msg_type),
            kind,
        )
        self.desynced = True
        if self.expect.size:
            self.expect.clear()
