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
import re
from typing import TYPE_CHECKING, Final

from pg_doorman.prepared.deallocate import parse_deallocate
from pg_doorman.prepared.registry import (
    PoolStatements,
    ServerStatements,
    StatementEntry,
    row_shape,
)
from pg_doorman.protocol import codes, messages, sqlstate

if TYPE_CHECKING:
    from mypy_extensions import i64  # a machine integer when compiled (see framing)

    from pg_doorman.protocol.framing import BackendScanner, FrontendScanner

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
# ParseComplete for the client's text parsed into the server's unnamed statement (which
# no client's statement uses) to learn PostgreSQL's verdict on it: passed on, or
# dropped when a refusal follows (see BatchRewriter._probe).
PROBE: Final = 13
HIDDEN_PROBE: Final = 14
# The error for a Describe of a statement that never exists, sent in place of a message
# the pooler refuses so that the server fails at the same place: replaced by the
# payload, the pooler's own error.
REFUSED: Final = 15
# The ReadyForQuery that ends a batch the server refused for a schema change, which
# the rewriter runs again (see _rerun): dropped, the batch run again sends its own.
RERUN_SYNC: Final = 16
# A Describe of a statement we parsed, added to learn its result columns
# (StatementEntry.shape): ParameterDescription, then RowDescription/NoData, all dropped.
SHAPE_LEARN: Final = 17
SHAPE_LEARN_ROWS: Final = 18
# Likewise, added to check a statement parsed again on a server against the columns it
# was first described with: the client's bytes wait for the answer (see _check_shape).
SHAPE_CHECK: Final = 19
SHAPE_CHECK_ROWS: Final = 20

# Backend actions returned to the scanner (bit flags).
DROP: Final = 1
HAS_PREFIX: Final = 2
# The message is a RowDescription or NoData the rewriter reads (shape_seen()).
CAPTURE: Final = 4

# BatchRewriter.answered_here: the message is answered by the rewriter alone, or the
# client's bytes from this message on wait for the answer to a check (see
# _check_shape; the scanner holds them until resume_due).
ANSWERED: Final = 1
HOLD: Final = 2

_ASYNC_TYPES: Final = codes.type_table(
    (codes.NOTICE_RESPONSE, codes.NOTIFICATION_RESPONSE, codes.PARAMETER_STATUS)
)
# 1 for the replies that end an Execute's, 2 for CopyInResponse (see _copy_in_began):
# one table read for every message of an Execute's reply, rows included.
_EXECUTE_END: Final = bytes(
    1
    if code in (codes.COMMAND_COMPLETE, codes.EMPTY_QUERY_RESPONSE, codes.PORTAL_SUSPENDED)
    else 2
    if code == codes.COPY_IN_RESPONSE
    else 0
    for code in range(256)
)
_ROW_DESCRIPTION_OR_NO_DATA: Final = codes.type_table((codes.ROW_DESCRIPTION, codes.NO_DATA))


# Slots an emptied Expectations keeps (see there): a batch of Parse, Bind, Describe,
# Execute and Sync needs five; a long pipeline's are given back.
_SPARE_SLOTS: Final = 16


class Expectations:
    """The responses still due from the server, oldest first: kinds with a payload
    (a statement name, or our own bytes for SYNTH).

    Two parallel lists and a read index rather than a deque of tuples: in the compiled
    build every operation stays native and nothing is allocated per message. Hot paths
    test `size` and read `kinds[head]` directly: attribute reads stay cheap when the
    module runs interpreted, where `__bool__` or a method would be a Python call.

    The entries pending are those in [head, head + size); slots past them are spares
    that the next entries overwrite. An emptied queue keeps up to _SPARE_SLOTS of
    them: list.clear() would free the lists' storage, and the next batch's appends
    would allocate it again, every transaction.
    """

    __slots__ = ("head", "kinds", "payloads", "popped", "queries", "size", "syncs")

    def __init__(self) -> None:
        self.kinds: list[int] = []
        self.payloads: list[bytes] = []
        self.head = 0  # index of the oldest pending entry
        self.size = 0  # entries pending
        self.queries = 0  # pending QUERY entries (BatchRewriter._query_ahead)
        self.syncs = 0  # pending SYNC entries: batches whose outcome is not known yet
        # Entries consumed so far: the oldest pending entry's serial number. Entry
        # serials outlive the list indexes, which restart when consumed entries go.
        self.popped = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return self.size

    def append(self, kind: int, payload: bytes = b"") -> None:
        end = self.head + self.size
        if end < len(self.kinds):
            self.kinds[end] = kind
            self.payloads[end] = payload
        else:
            self.kinds.append(kind)
            self.payloads.append(payload)
        self.size += 1
        if kind == QUERY:
            self.queries += 1
        elif kind == SYNC:
            self.syncs += 1

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
        self.popped += 1
        self.size = size
        kind = self.kinds[self.head]
        if kind == QUERY:
            self.queries -= 1
        elif kind == SYNC:
            self.syncs -= 1
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
        self.popped += self.size
        if len(self.kinds) > _SPARE_SLOTS:
            self.kinds.clear()
            self.payloads.clear()
        self.head = 0
        self.size = 0
        self.queries = 0
        self.syncs = 0

    def void_syncs_after_head(self) -> int:
        """The Syncs expected right behind the oldest entry will get no reply: they
        become empty synthetic answers, so that later entries keep their serials.
        Returns how many."""
        kinds = self.kinds
        i = self.head + 1
        end = self.head + self.size
        voided = 0
        while i < end and kinds[i] == SYNC:
            kinds[i] = SYNTH
            self.payloads[i] = b""
            voided += 1
            i += 1
        self.syncs -= voided
        return voided

    def all_synthetic(self) -> bool:
        kinds = self.kinds
        # A loop, not all(<generator>): interpreted, creating the generator costs more
        # than the one or two entries this usually looks at.
        for i in range(self.head, self.head + self.size):  # noqa: SIM110
            if kinds[i] != SYNTH:
                return False
        return True


# Longest Parse body a client keeps for the repeated-Parse shortcut: bounds its memory.
_REMEMBERED_PARSE_MAX: Final = 8192

# Stands for an empty queue until the first expectation; never appended to.
_NOTHING_EXPECTED: Final = Expectations()
# Likewise for an empty journal (BatchRewriter._journal): most clients never need one.
_NOTHING_JOURNALED: Final[list[tuple[int, bytes, StatementEntry | None]]] = []


def _name_end(body: bytes, start: i64) -> i64:
    """Index just past the NUL that ends the name starting at `start` (0 if none)."""
    return _name_end_before(body, start, len(body))


def _name_end_before(data: bytes, start: i64, end: i64) -> i64:
    """_name_end within data[:end] (a message's end, not its chunk's).

    A loop over bytes compiles to native reads, where bytes.find() is a generic call
    that parses its arguments; names (portals, statements) are short."""
    i = start
    while i < end:
        if data[i] == 0:
            return i + 1
        i += 1
    return 0


def close_statement(name: bytes) -> bytes:
    return messages.build(b"C", b"S" + name + b"\x00")


# Extended-protocol messages that may start a batch, ahead of which the Closes of
# evicted statements go (see _closes_ahead).
_STARTS_BATCH: Final = codes.type_table(
    (codes.PARSE, codes.BIND, codes.DESCRIBE, codes.CLOSE, codes.EXECUTE)
)
_UNNAMED_MISSING: Final = "unnamed prepared statement does not exist"
_MAY_BE_DEALLOCATE: Final = codes.MAY_START_DEALLOCATE
# BatchRewriter.error_fix: what to do with the server's next ErrorResponse.
_RENAME_IN_ERROR: Final = 1
_REPLACE_ERROR: Final = 2
# As _RENAME_IN_ERROR, unless the error refuses the statement for a schema change:
# then the batch runs again (see _rerun).
_RERUN_IF_REPLANNED: Final = 3
# Nothing to change in the error, but the ParameterDescription held before it goes
# out first (see _held_params).
_RELEASE_HELD: Final = 4
# BatchRewriter._rerun_state: how far the batch that may run again has come.
_RERUN_PARSED: Final = 1  # its Parse was not sent: the server had the statement
_RERUN_BOUND: Final = 2  # then the first Bind or Describe of a statement
_RERUN_SYNCED: Final = 3  # then the Sync, in the same read as that message
# Or then a Flush in that read, the last message the client sent (asyncpg prepares
# with Parse, Describe and Flush, and binds once it has the answer).
_RERUN_FLUSHED: Final = 4
_SYNC_MESSAGE: Final = b"S\x00\x00\x00\x04"
# The longest batch kept to run again: its bytes are kept until it is answered.
_RERUN_MAX: Final = 65536
# No server statement has this name: the rewriter only creates DOORMAN_<16 hex digits>.
_DESCRIBE_NOTHING: Final = messages.build(b"D", b"SDOORMAN_refused\x00")


def _error_with_routine(code: str, message: str, source: str, routine: str) -> bytes:
    fields = [b"SERROR", b"VERROR", b"C" + code.encode(), b"M" + message.encode()]
    fields += [b"F" + source.encode(), b"R" + routine.encode()]
    return messages.build(b"E", b"\x00".join(fields) + b"\x00\x00")


# PostgreSQL's refusal of a statement whose result columns changed since its Parse;
# drivers tell it by its routine (asyncpg then prepares the statement again).
_RESULT_TYPE_CHANGED: Final = _error_with_routine(
    sqlstate.FEATURE_NOT_SUPPORTED,
    "cached plan must not change result type",
    "plancache.c",
    "RevalidateCachedQuery",
)


def _missing_statement_error(name: bytes) -> bytes:
    if name:
        text = f'prepared statement "{name.decode("utf-8", "replace")}" does not exist'
    else:
        text = _UNNAMED_MISSING
    return messages.error_response("ERROR", sqlstate.INVALID_SQL_STATEMENT_NAME, text)


def _duplicate_statement_error(name: bytes) -> bytes:
    text = f'prepared statement "{name.decode("utf-8", "replace")}" already exists'
    return messages.error_response("ERROR", sqlstate.DUPLICATE_PREPARED_STATEMENT, text)


# The names the pooler gives its statements on servers (registry.statement_name).
_SERVER_NAME: Final = re.compile(rb"DOORMAN_[0-9a-f]{16}")
# A server-side statement name as PostgreSQL quotes it in an error message.
_QUOTED_SERVER_NAME: Final = re.compile(b'"' + _SERVER_NAME.pattern + b'"')

# A Query that fails wherever it runs (a zero-length identifier is a syntax error).
_ALWAYS_FAILS: Final = messages.build(b"Q", b'DEALLOCATE ""\x00')


_MISSING_CODE: Final = sqlstate.INVALID_SQL_STATEMENT_NAME.encode()


def _rename_in_error(body: bytes, client_name: bytes) -> tuple[bytes | None, bool]:
    """The ErrorResponse `body` with the server's name for a statement replaced by the
    client's, as PostgreSQL would have worded it (None: no name to replace), and
    whether it says that statement does not exist (26000)."""
    fields = body.split(b"\x00")
    changed = False
    code = b""
    for i, field in enumerate(fields):
        if field[:1] == b"C":
            code = field[1:]
        elif field[:1] == b"M":
            found = _QUOTED_SERVER_NAME.search(field)
            if found is not None:
                start, end = found.span()
                fields[i] = b"".join((field[:start], b'"', client_name, b'"', field[end:]))
                changed = True
    if not changed:
        return None, False
    missing = code == _MISSING_CODE
    if not client_name and missing:
        fields = [b"M" + _UNNAMED_MISSING.encode() if f[:1] == b"M" else f for f in fields]
    out = b"\x00".join(fields)
    return b"E" + (len(out) + 4).to_bytes(4, "big") + out, missing


_FEATURE_NOT_SUPPORTED: Final = b"C" + sqlstate.FEATURE_NOT_SUPPORTED.encode()
# The routine that refuses a statement whose result columns changed since its Parse;
# unlike the message, routine names are never translated.
_REVALIDATE: Final = b"RRevalidateCachedQuery"


def _plan_changed(body: bytes) -> bool:
    """The ErrorResponse `body`, answering a Bind or a Describe of a statement, refuses
    a statement parsed before a change to what its text means: 0A000 "cached plan
    must not change result type", or an error of parse analysis (class 42, raised in
    PostgreSQL's parse_*.c or analyze.c), which a Bind meets only when the server
    analyses the text again for a changed table, with the parameter types of its
    first Parse (a column turned from int to text: 42883 "operator does not exist:
    text = integer", where a Parse of the text now infers text)."""
    fields = body.split(b"\x00")
    if _FEATURE_NOT_SUPPORTED in fields and _REVALIDATE in fields:
        return True
    if not any(field[:3] == b"C42" for field in fields):
        return False
    return any(field[:7] == b"Fparse_" or field == b"Fanalyze.c" for field in fields)


_PROTOCOL_VIOLATION: Final = b"C" + sqlstate.PROTOCOL_VIOLATION.encode()
# The routine that refuses a Bind whose result formats don't match the statement's
# columns ("bind message has 2 result formats but query has 3 columns").
_RESULT_FORMATS: Final = b"RPortalSetResultFormat"


def _reshaped_statement_error(body: bytes) -> bytes | None:
    """PostgreSQL's 0A000 "cached plan must not change result type" for the
    ErrorResponse `body`, when it refuses a Bind's result formats (None otherwise).

    A client names one format per column of its statement as it was described. When
    the server that runs the Bind lacked the statement and parsed its text again after
    a table it reads gained or lost a column, its columns no longer match. PostgreSQL,
    which keeps a session's statement as it was first parsed, refuses the Bind with
    0A000, and drivers recover from that by preparing again (pgjdbc, pgx); they don't
    from this one, so every later use failed the same way. The server's message
    becomes the DETAIL: a client that simply miscounted its formats still reads why."""
    fields = body.split(b"\x00")
    if _PROTOCOL_VIOLATION not in fields or _RESULT_FORMATS not in fields:
        return None
    out = []
    for field in fields:
        kind = field[:1]
        if kind == b"C":
            field = _FEATURE_NOT_SUPPORTED
        elif kind == b"M":
            # The server's words stay as the detail, for a client that miscounted.
            out.append(b"Mcached plan must not change result type")
            field = b"D" + field[1:]
        elif kind == b"D":
            continue
        elif kind == b"F":
            field = b"Fplancache.c"
        elif kind == b"R":
            field = _REVALIDATE
        elif kind == b"L":
            continue  # a line of another source file
        out.append(field)
    payload = b"\x00".join(out)
    return b"E" + (len(payload) + 4).to_bytes(4, "big") + payload


class BatchRewriter:
    """Statement mapping of one client plus the response queue of its current server."""

    __slots__ = (
        "_bind_head",
        "_bind_length",
        "_bind_name",
        "_checked_unnamed_parse",
        "_error_fix_payload",
        "_held_params",
        "_instead",
        "_journal",
        "_last_parse",
        "_last_parse_entry",
        "_prefix",
        "_rerun_bind",
        "_rerun_data",
        "_rerun_end",
        "_rerun_parse",
        "_rerun_replies",
        "_rerun_start",
        "_rerun_state",
        "_reshaped",
        "_resume_bytes",
        "_shape_checking",
        "_shape_entries",
        "_shape_entry",
        "answered_here",
        "checking",
        "client_stream",
        "context",
        "desynced",
        "error_fix",
        "expect",
        "ignored_syncs",
        "leading_queries",
        "named",
        "registry",
        "rerun_bytes",
        "rerun_syncs",
        "resume_at",
        "resume_due",
        "server",
        "server_replies",
        "skipped_queries",
        "skipping",
        "unnamed",
    )

    def __init__(self, registry: PoolStatements, context: bytes) -> None:
        self.registry = registry
        # The client's settings that change what a query text means.
        self.context = registry.shared_context(context)
        self.named: dict[bytes, StatementEntry] = {}
        self.unnamed: StatementEntry | None = None
        self.server: ServerStatements | None = None
        # The current server's reply stream: its transaction status.
        self.server_replies: BackendScanner | None = None
        # The client's stream (set by the client): whether it is inside a message.
        self.client_stream: FrontendScanner | None = None
        # A queue of its own only once the client uses the extended protocol: most idle
        # clients never do.
        self.expect: Expectations = _NOTHING_EXPECTED
        # Queries sent while nothing else was expected: answered before anything queued.
        self.leading_queries = 0
        self.skipping = False  # after a synthetic error: drop client messages until Sync
        # Queries (and FunctionCalls) sent after an extended-protocol message that
        # failed, before its Sync: PostgreSQL skips them, so their ReadyForQuery never
        # comes (read and reset by the server connection, which owes one fewer each).
        self.skipped_queries = 0
        # Syncs PostgreSQL ignores because a COPY FROM STDIN began before them (see
        # _copy_in_began): no ReadyForQuery comes for them (read and reset by the
        # client's scanner, which owes one fewer each).
        self.ignored_syncs = 0
        self.desynced = False
        # Synthetic answers due before the next server message; usually one.
        self._prefix: list[bytes] = []
        # The last Parse body and its entry: drivers that do not name their statements
        # send the same Parse before every execution, and comparing bytes is cheaper
        # than building and hashing the registry key again. Reuse skips the registry's
        # recency update, so an entry the registry evicted is looked up again instead.
        self._last_parse = b""
        self._last_parse_entry: StatementEntry | None = None
        # The last rewritten Bind's type byte and length: a statement's Binds mostly
        # repeat their length, and converting the int costs more than comparing it.
        self._bind_length = 0
        self._bind_head = b""
        # The statement name of the last Bind. A client mostly binds one statement
        # again and again: the name sliced from each Bind is a new bytes object whose
        # hash the dict lookup would compute every time, while this one's is cached.
        self._bind_name = b""
        # Changes to the client's names that the server's replies have not confirmed
        # yet, oldest first: (serial of the expected reply that confirms the change,
        # name (b"" for the unnamed statement), what the name meant before). PostgreSQL
        # skips a message after an error, or rejects it: then the change is undone.
        self._journal: list[tuple[int, bytes, StatementEntry | None]] = _NOTHING_JOURNALED
        # The server's error just expected needs fixing (see fixed_error): a Bind's or
        # Describe's names the statement, renamed to the client's name in the payload;
        # a refusal's is replaced by the payload.
        self.error_fix = 0
        self._error_fix_payload = b""
        # ANSWERED: the message frontend() was just given is answered by the rewriter
        # alone and must not be counted as owing a ReadyForQuery; HOLD: the client's
        # bytes from that message on wait (read and reset by the scanner).
        self.answered_here = 0
        # The bytes _parse_for returned stand for the whole message (a check, a refusal).
        self._instead = False
        # The entries of the SHAPE_* replies expected, oldest first, and the one whose
        # RowDescription or NoData is being read (see shape_seen).
        self._shape_entries: list[StatementEntry] = []
        self._shape_entry: StatementEntry | None = None
        self._shape_checking = False
        # A check holds the client's bytes (see _check_shape); once it is answered (or
        # can no longer be), `resume_due` asks the relay to forward them again.
        self.checking = False
        self.resume_due = False
        # The message the last check holds is the client's Parse of its unnamed
        # statement (see backend(): the check's Parse failing drops that statement).
        self._checked_unnamed_parse = False
        # What a check found changed: the client's next use of the statement on this
        # server is refused (0A000), and the bytes to send the server first (a Close).
        self._reshaped: StatementEntry | None = None
        self._resume_bytes = b""
        # A batch the server may refuse because a table changed since it parsed the
        # statement (see _rerun): how far it has come (_RERUN_*; 0: no such batch),
        # the client's Parse, which the server was not sent, the read holding its
        # first Bind and its Sync, where the Bind starts and the Sync ends, and the
        # serial of the reply to the Bind.
        self._rerun_state: i64 = 0
        self._rerun_parse = b""
        self._rerun_data = b""
        self._rerun_start: i64 = 0
        self._rerun_end: i64 = 0
        self._rerun_bind = -1
        # With a Flush last: how many replies had been due in all when it came (more
        # by the error, the client sent more behind it).
        self._rerun_replies: i64 = 0
        # The client's messages of such a batch, to be fed again (read and reset by
        # the client with the bytes a check held: resume_due), and how many Syncs of
        # the client's are among them (counted when they first came).
        self.rerun_bytes = b""
        self.rerun_syncs: i64 = 0
        # The server's ParameterDescription for a Describe of such a batch, held until
        # the RowDescription after it (then it goes out before it) or an error (then
        # it goes out before the error, or not at all when the batch runs again, which
        # describes the statement anew): PostgreSQL sends it before it finds that the
        # statement's result changed.
        self._held_params = b""
        # Set (to a position past the message's start) when frontend()'s replacement
        # stands only for the bytes up to it: the client's bytes from there on are
        # forwarded as they are (read and reset by the scanner).
        self.resume_at = 0

    # ---- attachment ---------------------------------------------------------

    def attach(self, server: ServerStatements, replies: BackendScanner | None = None) -> None:
        self.server = server
        self.server_replies = replies
        if self.expect.size:
            self.expect.clear()
        if self._journal:
            self._journal.clear()
        if self._shape_entries:
            self._shape_entries.clear()
        self.leading_queries = 0
        self.skipping = False
        self.skipped_queries = 0
        self.ignored_syncs = 0
        if self._rerun_state:
            self._forget_rerun()
        self.rerun_bytes = b""
        self._held_params = b""

    @property
    def active(self) -> bool:
        """Responses need rewriting (else the scanner's fast path is enough)."""
        return self.expect.size > 0

    # ---- frontend -----------------------------------------------------------

    def frontend(self, msg_type: i64, data: bytes, pos: i64, end: i64) -> bytes | None:
        """Replacement for one client message (None: forward unchanged)."""
        if msg_type == codes.SYNC:
            if self._rerun_state:
                self._rerun_sync(data, end)
            self.skipping = False
            self._push(SYNC)
            return None
        if self.skipping:
            return b""
        if not self.expect.size and _STARTS_BATCH[msg_type]:
            server = self.server
            if server is not None and server.pending_close and not self.leading_queries:
                replies = self.server_replies
                if replies is None or not replies.in_copy:
                    return self._closes_ahead(server, msg_type, data, pos, end)
        if msg_type == codes.PARSE:
            return self._parse(data[pos + 5 : end])
        if msg_type == codes.BIND:
            if self._rerun_state == _RERUN_PARSED:
                self._rerun_bound(data, pos)
            return self._bind(data, pos, end)
        if msg_type == codes.EXECUTE:
            self._push(EXECUTE)
            return None
        if msg_type == codes.DESCRIBE:
            if self._rerun_state == _RERUN_PARSED and data[pos + 5] == 0x53:  # b"S"
                self._rerun_bound(data, pos)
            return self._describe(data[pos + 5 : end])
        if msg_type == codes.CLOSE:
            return self._close(data[pos + 5 : end])
        if msg_type == codes.QUERY or msg_type == codes.FUNCTION_CALL:
            if self._rerun_state:
                self._forget_rerun()  # it may run something the batch depends on
            if (
                msg_type == codes.QUERY
                and 5 < end - pos <= codes.DEALLOCATE_MAX + 5
                and _MAY_BE_DEALLOCATE[data[pos + 5]]
            ):
                answer = self._deallocate_here(data[pos + 5 : end])
                if answer is not None:
                    return answer
            if self.expect.size:
                self.expect.append(QUERY)
                if msg_type == codes.QUERY and (self.unnamed is not None or self._journal):
                    # Skipped if an error comes first in the batch: then it keeps it.
                    self._record(b"", self.unnamed, self.unnamed is None)
            else:
                self.leading_queries += 1
            if msg_type == codes.QUERY:
                self.unnamed = None  # a simple Query drops the unnamed statement
        if msg_type == codes.FLUSH and self._rerun_state == _RERUN_BOUND:
            if data is self._rerun_data and end - self._rerun_start <= _RERUN_MAX:
                self._rerun_state = _RERUN_FLUSHED
                self._rerun_end = end
                self._rerun_replies = self.expect.popped + self.expect.size
            else:
                self._forget_rerun()
        return None  # Flush and anything else

    def _deallocate_here(self, body: bytes) -> bytes | None:
        """A `DEALLOCATE name` of one of the client's statements, with a server
        attached (inside a transaction block, or between transactions by a client
        pinned to its server) and nothing in flight: the server does not know the
        client's name, so the rewriter answers as PostgreSQL would (b""). In a failed
        block the server answers (25P02, before it looks at the name); DEALLOCATE ALL
        runs on the server (None: the Query goes on as it is). One of a statement the
        pooler prepared fails (see deallocate): inside a block the server must fail
        it too, so it gets a Query that always fails instead, whose error is
        replaced."""
        replies = self.server_replies
        if (
            self.expect.size
            or self.leading_queries
            or replies is None
            or (replies.status != codes.TX_IN_BLOCK and replies.status != codes.TX_IDLE)
            or body[-1:] != b"\x00"
        ):
            return None
        reply = self.deallocate(body[:-1], all_too=False)
        if reply is None:
            return None
        if replies.status == codes.TX_IDLE:
            ready = messages.READY_IDLE
        elif reply[:1] == b"E":
            self.error_fix = _REPLACE_ERROR
            self._error_fix_payload = reply
            self._push(QUERY)  # an expected reply: the relay shows the rewriter its error
            return _ALWAYS_FAILS
        else:
            ready = messages.READY_IN_TRANSACTION
        self._push(SYNTH, reply + ready)
        self.answered_here = ANSWERED
        return b""

    def deallocate(self, query: bytes, all_too: bool) -> bytes | None:
        """The reply to a simple-query DEALLOCATE (`query`, the text without its NUL)
        of the client's protocol-level statements, which no server knows by the
        client's names, after forgetting them; None when it is something else (an
        SQL-level PREPARE's name, or DEALLOCATE ALL unless `all_too`): the server
        answers it. A name the pooler gives its statements on servers is none of the
        client's: 26000, as PostgreSQL answers for a statement its session never
        prepared, rather than taking a statement from under other clients."""
        parsed = parse_deallocate(query)
        if parsed is None:
            return None
        deallocate_all, name = parsed
        if deallocate_all:
            if not all_too:
                return None
            self.forget_statements()
            return messages.command_complete("DEALLOCATE ALL")
        if self.named.pop(name, None) is None:
            if _SERVER_NAME.fullmatch(name) is not None:
                self.unnamed = None
                return _missing_statement_error(name)
            return None
        self.unnamed = None  # as any simple Query drops it
        return messages.command_complete("DEALLOCATE")

    def _push(self, kind: int, payload: bytes = b"") -> None:
        expect = self.expect
        if expect is _NOTHING_EXPECTED:
            self.expect = expect = Expectations()
        if not expect.size and self.leading_queries:
            # Earlier simple queries are still being answered: they come first.
            for _ in range(self.leading_queries):
                expect.append(QUERY)
            self.leading_queries = 0
        expect.append(kind, payload)

    def _record(self, name: bytes, previous: StatementEntry | None, same: bool = False) -> None:
        """Journal a change to the client's names made by the message whose expected
        reply was queued last (see _journal). `same`: the name keeps its meaning, which
        only matters while earlier changes may still be undone."""
        expect = self.expect
        journal = self._journal
        while journal and journal[0][0] < expect.popped:
            del journal[0]  # answered without error: settled
        if same and not journal:
            return
        if journal is _NOTHING_JOURNALED:
            self._journal = journal = []
        journal.append((expect.popped + expect.size - 1, name, previous))

    def _settle_error(self, failed: int) -> None:
        """The server answered the entry numbered `failed` with an error and skipped
        everything behind it up to the Sync now at the head of the queue: undo the
        name changes of the messages that never ran, newest first. A name changed
        again by a message after the Sync (sent before the error came back) keeps
        that meaning; only what its change would restore is corrected."""
        journal = self._journal
        if not journal:
            return
        end = self.expect.popped  # the first entry that was not skipped
        later = [record for record in journal if record[0] >= end]
        for i in range(len(journal) - 1, -1, -1):
            serial, name, previous = journal[i]
            if serial < failed or serial >= end:
                continue
            if serial == failed and not name:
                # A failing Parse of the unnamed statement has dropped the old one.
                previous = None
            for j in range(len(later)):
                if later[j][1] == name:
                    later[j] = (later[j][0], name, previous)
                    break
            else:
                if not name:
                    self.unnamed = previous
                elif previous is None:
                    self.named.pop(name, None)
                else:
                    self.named[name] = previous
        self._journal = later

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
        if server.uncertain and entry.name in server.uncertain:
            server.uncertain.discard(entry.name)
            return self._parse_again(entry, kind)
        self._push(kind, entry.name)
        return entry.parse_message

    def _parse_again(self, entry: StatementEntry, kind: int) -> bytes:
        """Parse `entry` again where the server's record is a guess: behind a query
        that may drop it or a batch not answered yet (see _parse), or a name in doubt.
        Closed first: harmless if the server does not have it."""
        self._push(RECHECK_CLOSE, entry.name)
        self._push(kind, entry.name)
        return close_statement(entry.name) + entry.parse_message

    def _parse_for(self, entry: StatementEntry) -> bytes:
        """The Parse to send ahead of a Bind or Describe of `entry`, which the server
        lacks (or may have lost to a query ahead). Sets `_instead` when the bytes
        returned stand for the whole message: a check of a statement whose columns are
        known (see _check_shape), or the refusal of one such a check found changed."""
        server = self.server
        assert server is not None
        again = entry.name in server
        if entry is self._reshaped:
            # As PostgreSQL refuses it in the session that prepared it (the client
            # prepares it again: a new statement, see registry.replan).
            self._instead = True
            return self._refuse(_RESULT_TYPE_CHANGED)
        if entry.shape is not None:
            self._instead = True
            return self._check_shape(entry, again)
        if again:
            out = self._parse_again(entry, HIDDEN_PARSE)
        else:
            out = self._send_parse(entry, HIDDEN_PARSE)
        return out + self._learn_shape(entry)

    def _learn_shape(self, entry: StatementEntry) -> bytes:
        """A Describe of `entry`, just parsed, to learn its result columns: sent along
        with the client's messages, its answer dropped (see shape_seen)."""
        self._push(SHAPE_LEARN, entry.name)
        self._shape_entries.append(entry)
        return messages.build(b"D", b"S" + entry.name + b"\x00")

    def _check_shape(
        self, entry: StatementEntry, again: bool, unnamed_parse: bool = False
    ) -> bytes:
        """Parse `entry` on a server that lacks it (`again`: that may have lost it)
        with a Describe and a Flush behind, and have the client's bytes from the
        message that needs it on wait for the answer (HOLD). PostgreSQL fixes a
        statement's result columns at its Parse and refuses it once they changed
        (0A000); parsed anew, the text may read a table changed since, and the client
        would decode the new columns as the old ones. See shape_seen for the answer.
        Only where the server parses the text again: the statements a server has are
        PostgreSQL's to check."""
        if again:
            out = self._parse_again(entry, HIDDEN_PARSE)
        else:
            out = self._send_parse(entry, HIDDEN_PARSE)
        self._checked_unnamed_parse = unnamed_parse
        self._push(SHAPE_CHECK, entry.name)
        self._shape_entries.append(entry)
        self.checking = True
        self.answered_here = HOLD
        return b"".join((out, messages.build(b"D", b"S" + entry.name + b"\x00"), messages.FLUSH))

    def shape_seen(self, data: bytes, pos: i64, end: i64) -> None:
        """The RowDescription or NoData in data[pos:end] answers the Describe that
        backend() just matched it to (CAPTURE); or the ParameterDescription to hold
        (see _held_params)."""
        if data[pos] == codes.PARAMETER_DESCRIPTION:
            self._held_params = data[pos:end]
            return
        entry = self._shape_entry
        self._shape_entry = None
        if entry is None:
            return
        shape = row_shape(data[pos + 5 : end]) if data[pos] == codes.ROW_DESCRIPTION else b""
        if not self._shape_checking:
            self.registry.learn(entry, shape)
            return
        self._shape_checking = False
        self.checking = False
        self.resume_due = True
        if shape == entry.shape:
            return  # the held bytes go on: the server has the statement now
        # Changed: what PostgreSQL does when a statement's columns changed under it.
        # Every Parse of the text from now on gets a new statement (replan); this one,
        # parsed here under the name of the old, is closed, so that no client binds it
        # for the old one; the message held is refused as PostgreSQL refuses it.
        self.registry.replan(entry)
        server = self.server
        if server is not None:
            server.forget(entry.name)
        self._push(RECHECK_CLOSE, entry.name)
        self._resume_bytes = close_statement(entry.name)
        self._reshaped = entry

    def take_resume_bytes(self) -> bytes:
        """What to send the server before the held bytes go on (see shape_seen)."""
        out = self._resume_bytes
        self._resume_bytes = b""
        return out

    def resumed(self) -> None:
        """The held bytes have gone on: a later use of a statement found changed on
        this server is checked again (the table may be as it was by then)."""
        self._reshaped = None

    def wants_whole(self) -> bool:
        """The reply next due answers a Describe the rewriter added: the scanner reads
        it whole, to read it or to drop all of it."""
        expect = self.expect
        if not expect.size:
            return False
        kind = expect.kinds[expect.head]
        return kind >= SHAPE_LEARN or (kind == DESCRIBE_S and self._describe_may_rerun())

    def _describe_may_rerun(self) -> bool:
        """The Describe at the head of the queue is the first message of a batch that
        may run again (see _rerun): its replies wait for the end of the Describe."""
        state = self._rerun_state
        return (
            state == _RERUN_SYNCED or state == _RERUN_FLUSHED
        ) and self.expect.popped == self._rerun_bind

    def _shape_dropped(self, kind: int) -> None:
        """A SHAPE_* reply will never come (an error before it, or the queue reset)."""
        if self._shape_entries:
            del self._shape_entries[0]
        if kind == SHAPE_CHECK or kind == SHAPE_CHECK_ROWS:
            self.checking = False
            self.resume_due = True

    def _parse(self, body: bytes) -> bytes:
        name_end = _name_end(body, 0)
        name = body[: name_end - 1] if name_end > 1 else b""
        if name:
            previous = self.named.get(name)
            if previous is not None and not self._query_ahead():
                # With a query ahead the name may be gone by now (a DISCARD ALL or
                # DEALLOCATE): then the Parse replaces it.
                return self._probe(body, name_end, HIDDEN_PROBE) + self._refuse(
                    _duplicate_statement_error(name)
                )
        else:
            previous = self.unnamed
        entry = self._last_parse_entry
        if entry is None or entry.evicted or body != self._last_parse:
            entry = self.registry.lookup(body, name_end, self.context)
            if len(body) <= _REMEMBERED_PARSE_MAX:
                self._last_parse = body
                self._last_parse_entry = entry
        server = self.server
        assert server is not None
        present = server.has(entry.name)
        # Behind a batch not answered yet, the server's record is a guess: the Parse
        # that put the statement there may fail, or the transaction be failed by then.
        # Let the server answer (Close first: harmless if the statement is not there).
        again = present and (self._query_ahead() or self.expect.syncs > 0)
        if entry.shape is not None and (again or not present):
            # The text is parsed anew where other clients' statements of it were
            # described before: checked first, the client's names untouched until the
            # Parse is taken again (once changed, the text gets a new statement).
            return self._check_shape(entry, again, unnamed_parse=not name and name_end > 0)
        if name:
            self.named[name] = entry
            entry.kinds |= 1  # registry.NAMED
        elif name_end:  # without its NUL the Parse fails without touching any name
            self.unnamed = entry
            entry.kinds |= 2  # registry.UNNAMED
        replies = self.server_replies
        if not present:
            out = self._send_parse(entry, PARSE)
        elif again:
            out = self._parse_again(entry, PARSE)
        elif replies is not None and replies.status == codes.TX_FAILED:
            # In a failed transaction PostgreSQL refuses the Parse (unless it is a
            # COMMIT or ROLLBACK): let it answer.
            out = self._probe(body, name_end, PROBE)
        else:
            entry.hits += 1
            self._push(SYNTH, messages.PARSE_COMPLETE)
            if previous is not entry or self._journal:
                self._record(name, previous, previous is entry)
            if (
                name_end
                and (self.expect.size == 1 or self._only_closes_ahead())
                and replies is not None
                and replies.status == codes.TX_IDLE
            ):
                # It starts a batch outside a transaction block: kept, in case the
                # server refuses the statement for a schema change (see _rerun).
                self._rerun_state = _RERUN_PARSED
                self._rerun_parse = body
            return b""
        if name_end:
            self._record(name, previous)
        if entry.shape is None and (again or not present):
            out += self._learn_shape(entry)
        return out

    def _only_closes_ahead(self) -> bool:
        """Of the replies due, all but the last (the answer of the message just
        seen) answer Closes the rewriter sent ahead of it, of statements no longer
        used (see _closes_ahead): it begins a batch. After a schema change they
        lead the first batch on each server."""
        expect = self.expect
        kinds = expect.kinds
        for at in range(expect.head, expect.head + expect.size - 1):
            if kinds[at] != HIDDEN_CLOSE:
                return False
        return True

    def _probe(self, body: bytes, name_end: int, kind: int) -> bytes:
        """The client's Parse (`body`), renamed to the server's unnamed statement."""
        self._push(kind)
        length = len(body) - name_end + 5
        return b"".join((b"P", length.to_bytes(4, "big"), b"\x00", body[name_end:]))

    def _rerun_bound(self, data: bytes, pos: i64) -> None:
        """The first Bind, or Describe of a statement, behind a Parse the server was
        not sent (see _rerun), at data[pos]: where the batch would run again from."""
        expect = self.expect
        if not expect.size:
            # The Parse's answer has gone out already, with a reply of the server's
            # to something else in between: not the simple batch _rerun takes.
            self._forget_rerun()
            return
        self._rerun_state = _RERUN_BOUND
        self._rerun_data = data
        self._rerun_start = pos
        self._rerun_bind = expect.popped + expect.size  # the serial of its reply

    def _rerun_sync(self, data: bytes, end: i64) -> None:
        """A Sync (ending at data[end]) of the batch that may run again: its end, if
        everything from the Bind on came in one read (kept as a reference to it)."""
        state = self._rerun_state
        if state == _RERUN_SYNCED:
            return  # a later batch's: it makes the batch one not to run again
        if (
            state == _RERUN_BOUND
            and data is self._rerun_data
            and end - self._rerun_start <= _RERUN_MAX
        ):
            self._rerun_state = _RERUN_SYNCED
            self._rerun_end = end
        else:
            self._forget_rerun()

    def _forget_rerun(self) -> None:
        self._rerun_state = 0
        self._rerun_parse = b""
        self._rerun_data = b""
        self._rerun_start = 0
        self._rerun_end = 0
        self._rerun_bind = -1

    def _may_rerun(self, failed: int, client_name: bytes) -> bool:
        """The error that answers the expected reply numbered `failed` (a Bind or
        Describe of the client's statement `client_name`) may be the refusal of a batch
        that can run again (see _rerun): the first Bind or Describe of a statement
        behind the Parse, of its statement, the batch complete, with nothing sent
        after it that is answered (the server skipped to the Sync, the last reply
        due; or, with a Flush last, nothing is due and nothing was sent after the
        Flush), and the client not inside a message the server has begun to
        receive."""
        body = self._rerun_parse
        stream = self.client_stream
        state = self._rerun_state
        expect = self.expect
        return (
            failed == self._rerun_bind
            and (
                (state == _RERUN_SYNCED and expect.size == 1 and expect.kinds[expect.head] == SYNC)
                or (
                    state == _RERUN_FLUSHED
                    and not expect.size
                    and expect.popped == self._rerun_replies
                )
            )
            and client_name == body[: _name_end(body, 0) - 1]
            and (
                stream is None
                or not (stream.need or stream.paused or stream.copy_in or stream.terminated)
            )
        )

    def _rerun(self, entry: StatementEntry) -> bool:
        """The server refused `entry` at the client's first Bind or Describe of it
        (drivers that prepare describe first: asyncpg, with a Flush behind), behind a
        Parse of it that the server was not sent (it had the statement), because a
        table it reads changed since the server parsed it: PostgreSQL alone would have
        parsed the client's text anew and run it. The batch is a transaction of its own
        (sent outside a transaction block), and what the server ran of it before the
        Bind changed nothing a second run would repeat (no Execute before the first
        Bind), and it skipped the rest: the client's name gets the text's statement
        of the registry's new generation (replan), and its messages from that one to
        the Sync (or the Flush) are fed again (rerun_bytes, with resume_due), behind
        the server's ReadyForQuery for the refused batch, which is dropped
        (RERUN_SYNC). False when the registry gives the same statement (it was not
        replanned)."""
        body = self._rerun_parse
        name_end = _name_end(body, 0)
        fresh = self.registry.lookup(body, name_end, self.context)
        if fresh is entry:
            return False
        self._call(body[: name_end - 1], fresh)
        self.rerun_bytes = self._rerun_data[self._rerun_start : self._rerun_end]
        expect = self.expect
        if self._rerun_state == _RERUN_SYNCED:
            expect.replace_first(RERUN_SYNC)
            expect.syncs -= 1
            self.rerun_syncs = 1
        else:
            # The server skips to a Sync the client has not sent (it waits for the
            # answer to its Flush): the pooler sends one, whose ReadyForQuery is its,
            # and the client's messages count again from there.
            self._resume_bytes = _SYNC_MESSAGE
            self._push(RERUN_SYNC)
            self.skipping = False
            self.rerun_syncs = 0
        self._forget_rerun()
        self.resume_due = True
        logger.info(
            "prepared statements: a statement was refused after a schema change"
            " (cached plan must not change result type); its batch ran again with"
            " the text parsed anew"
        )
        return True

    def _resolve(self, name: bytes) -> StatementEntry | None:
        entry = self.named.get(name) if name else self.unnamed
        if entry is not None and entry.context is not self.context:
            return self._reread(name, entry)
        return entry

    def _reread(self, name: bytes, entry: StatementEntry) -> StatementEntry:
        """A statement the client prepared under other settings (it has SET DateStyle,
        TimeZone, ... since). Where the server has it, it is used as it was read. On a
        server that lacks it, a Parse would read it under the client's present
        settings, and the server would hold a statement that does not mean what its
        name says for every other client: it is read there under a name of its own
        for these settings, and the client's name follows it."""
        server = self.server
        assert server is not None
        if entry.context == self.context or server.has(entry.name):
            return entry
        present = self.registry.under(entry, self.context)
        if name:
            self.named[name] = present
        else:
            self.unnamed = present
        present.kinds |= entry.kinds
        return present

    def set_context(self, context: bytes) -> None:
        """The client's settings that change what a text means have changed: what it
        prepares from now on is read under them."""
        if context != self.context:
            self.context = self.registry.shared_context(context)
            self._last_parse_entry = None

    def _refuse(self, error: bytes) -> bytes:
        """Answer the message with `error`. The server fails at the same place, on a
        Describe of a statement that does not exist: it skips the rest of the batch up
        to Sync and fails the transaction, as PostgreSQL would have for the client's
        message, and so does the rewriter."""
        self._push(REFUSED, error)
        self.skipping = True
        return _DESCRIBE_NOTHING

    def _missing(self, name: bytes) -> bytes:
        # Never forward an unknown name: it could collide with a server-side name.
        return self._refuse(_missing_statement_error(name))

    def server_reset(self) -> None:
        """The server dropped all its statements (DISCARD ALL or DEALLOCATE ALL) at
        this point of its replies, with client messages still queued behind: it has
        only those whose Parse is among them. The client keeps only the names set by
        the messages behind the command, which are still in the journal, and its
        unnamed statement: PostgreSQL drops that one at every simple Query (frontend()
        has seen to it), never at the command, which may run as an extended one."""
        server = self.server
        assert server is not None
        server.clear()
        expect = self.expect
        kinds, payloads = expect.kinds, expect.payloads
        for i in range(expect.head, expect.head + expect.size):
            kind = kinds[i]
            if kind == PARSE or kind == HIDDEN_PARSE:
                server.restore(payloads[i])
        command = expect.popped  # the reset's own entry
        named = self.named
        kept: dict[bytes, StatementEntry] = {}
        journal = self._journal
        for i in range(len(journal)):
            serial, name, _ = journal[i]
            if serial <= command or not name:
                continue
            if name in named:
                kept[name] = named[name]
            # Undone, the change leaves the name as the reset left it: unset.
            journal[i] = (serial, name, None)
        self.named = kept

    def prepare_here(self, body: bytes) -> bool:
        """A Parse the pooler answers itself, between transactions (a LISTEN the
        pool's listening server runs: net/listen_hub.py): the client's name stands for
        the statement from now on, as after any Parse. False when the name is taken:
        the server path reports that as PostgreSQL does."""
        name_end = _name_end(body, 0)
        if not name_end:
            return False
        name = body[: name_end - 1]
        if name and name in self.named:
            return False
        self._call(name, self.registry.lookup(body, name_end, self.context))
        return True

    def _call(self, name: bytes, entry: StatementEntry) -> None:
        """The client's statement `name` (b"": its unnamed one) is `entry` from now on."""
        if name:
            self.named[name] = entry
            entry.kinds |= 1  # registry.NAMED
        else:
            self.unnamed = entry
            entry.kinds |= 2  # registry.UNNAMED

    def bound_text(self, data: bytes, end: i64) -> bytes | None:
        """The text of the statement the Bind starting `data` (up to `end`) names;
        None if its names are not all there yet or the statement is unknown."""
        portal_end = _name_end_before(data, 5, end)
        if not portal_end:
            return None
        name_end = _name_end_before(data, portal_end, end)
        if not name_end:
            return None
        return self.statement_text(data[portal_end : name_end - 1])

    def statement_text(self, name: bytes) -> bytes | None:
        """The text of the client's statement `name` (b"": the unnamed one)."""
        entry = self.named.get(name) if name else self.unnamed
        return None if entry is None else entry.query

    def forget_statements(self) -> None:
        """The client's names after DEALLOCATE ALL or DISCARD ALL: none."""
        self.named.clear()
        self.unnamed = None
        self._journal.clear()

    def fixed_error(self, body: bytes) -> bytes | None:
        """What to send the client instead of the ErrorResponse `body` the server just
        sent (None: pass it on). A refusal's error is replaced by the pooler's own; a
        Bind's or Describe's names the statement by the client's name. A
        ParameterDescription held before it (see _held_params) goes out first, unless
        the batch runs again (b"": the error is dropped)."""
        held = self._held_params
        if not len(held):
            return self._fixed_error(body)
        self._held_params = b""
        fixed = self._fixed_error(body)
        if fixed is None:
            return held + messages.build(b"E", body)
        return held + fixed if len(fixed) else fixed

    def _fixed_error(self, body: bytes) -> bytes | None:
        fix = self.error_fix
        payload = self._error_fix_payload
        self.error_fix = 0
        self._error_fix_payload = b""
        if fix == _REPLACE_ERROR:
            return payload
        if fix == _RENAME_IN_ERROR or fix == _RERUN_IF_REPLANNED:
            rerun = fix == _RERUN_IF_REPLANNED
            reshaped = _reshaped_statement_error(body)
            if reshaped is not None:
                if rerun:
                    self._forget_rerun()
                return reshaped
            if _plan_changed(body):
                entry = self.named.get(payload) if payload else self.unnamed
                if entry is not None:
                    self.registry.replan(entry)
                    if rerun and self._rerun(entry):
                        return b""  # dropped: the batch runs again
            if rerun:
                self._forget_rerun()
            renamed, missing = _rename_in_error(body, payload)
            if missing:
                # The server lacks a statement of ours that its record says it has:
                # something the pooler could not see by its tag dropped it (DEALLOCATE
                # run by a DO block or a function, another client's doing). Without
                # this the record stays wrong and every later use of the statement on
                # this server fails the same way; with it the server's statements are
                # reset at check-in and parsed again when next needed.
                self.desynced = True
            return renamed
        return None

    def _invalid(self, text: str) -> bytes:
        # A malformed message: PostgreSQL's own answer.
        return self._refuse(messages.error_response("ERROR", sqlstate.PROTOCOL_VIOLATION, text))

    def _statement_name(self, body: bytes) -> bytes | None:
        """The name in a Describe or Close of a statement (b"S" name NUL), or None
        when the message is malformed: then it is refused (see _refuse) with
        PostgreSQL's answer, and the caller sends the refusal's message."""
        name_end = _name_end(body, 1)
        if not name_end:
            self._invalid("invalid string in message")
            return None
        if name_end != len(body):
            self._invalid("invalid message format")
            return None
        return body[1 : name_end - 1]

    def _bind(self, data: bytes, pos: i64, end: i64) -> bytes | None:
        """The Bind in data[pos:end] up to its statement name, with the server's name;
        the parameters behind it go out as the client sent them (resume_at)."""
        portal_start = pos + 5
        portal_end = _name_end_before(data, portal_start, end)
        # Not a conditional expression: its int-or-i64 value would be a boxed object.
        name_end: i64 = 0
        if portal_end:
            name_end = _name_end_before(data, portal_end, end)
        if not name_end:
            return self._invalid("invalid string in message")
        client_name = data[portal_end : name_end - 1]
        if client_name == self._bind_name:
            client_name = self._bind_name
        else:
            self._bind_name = client_name
        entry = self._resolve(client_name)
        if entry is None:
            return self._missing(client_name)
        if entry.text_effects:
            replies = self.server_replies
            if replies is not None:
                replies.cleanup_flags |= entry.text_effects  # see net/server.py
        server = self.server
        assert server is not None
        if server.has(entry.name) and not self._query_ahead():
            prefix = b""
        else:
            prefix = self._parse_for(entry)
            if self._instead:
                self._instead = False
                return prefix  # held for a check, or refused
        self._push(BIND, client_name)
        self.resume_at = name_end
        name = entry.name
        length: int = end - pos - (name_end - portal_end) + len(name)
        if length != self._bind_length:
            self._bind_length = length
            # Type byte and length in one conversion: 0x42 is "B".
            self._bind_head = (0x42_0000_0000 | length).to_bytes(5, "big")
        head = self._bind_head
        if portal_end == portal_start + 1:  # the unnamed portal, as most drivers bind
            return prefix + head + entry.named_by_bind
        return b"".join((prefix, head, data[portal_start:portal_end], name, b"\x00"))

    def _describe(self, body: bytes) -> bytes | None:
        if body[:1] != b"S":
            self._push(DESCRIBE_P)
            return None
        name = self._statement_name(body)
        if name is None:
            return _DESCRIBE_NOTHING  # refused: see _statement_name
        entry = self._resolve(name)
        if entry is None:
            return self._missing(name)
        server = self.server
        assert server is not None
        if server.has(entry.name) and not self._query_ahead():
            prefix = b""
        else:
            prefix = self._parse_for(entry)
            if self._instead:
                self._instead = False
                return prefix  # held for a check, or refused
        self._push(DESCRIBE_S, name)
        return prefix + messages.build(b"D", b"S" + entry.name + b"\x00")

    def _close(self, body: bytes) -> bytes | None:
        if body[:1] != b"S":
            self._push(CLOSE)
            return None
        name = self._statement_name(body)
        if name is None:
            return _DESCRIBE_NOTHING  # refused: see _statement_name
        if name:
            previous = self.named.pop(name, None)
        else:
            previous = self.unnamed
            self.unnamed = None
        # The server-side statement stays for others; the client gets its CloseComplete.
        self._push(SYNTH, messages.CLOSE_COMPLETE)
        if previous is not None or self._journal:
            self._record(name, previous, previous is None)
        return b""

    def _closes_ahead(
        self, server: ServerStatements, msg_type: int, data: bytes, pos: int, end: int
    ) -> bytes:
        """The first message of a batch, behind the Closes of the statements evicted
        from the server since the last ones went out. Only here is the server known
        to wait for a new batch: a Close behind an Execute, at the batch's Sync,
        would reach it inside a COPY FROM STDIN, a protocol violation that ends the
        connection. A Close runs in a failed transaction too."""
        parts = []
        for name in server.take_pending_close():
            self._push(HIDDEN_CLOSE, name)
            parts.append(close_statement(name))
        out = self.frontend(msg_type, data, pos, end)  # the queue is not empty now
        if out is None:
            parts.append(data[pos:end])
        else:
            parts.append(out)
            if self.resume_at:
                parts.append(data[self.resume_at : end])
                self.resume_at = 0
        return b"".join(parts)

    # ---- backend ------------------------------------------------------------

    def backend(self, msg_type: i64) -> int:
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
            failed = expect.popped
            payload = expect.popleft()
            if (
                kind == HIDDEN_PARSE
                and self._checked_unnamed_parse
                and expect.size
                and expect.kinds[expect.head] == SHAPE_CHECK
            ):
                # The check's Parse failed (in a failed transaction, say), and the
                # client's, held behind it, gets its error: PostgreSQL drops the
                # unnamed statement before it parses the text.
                self.unnamed = None
            if kind == BIND or kind == DESCRIBE_S:
                self.error_fix = _RENAME_IN_ERROR
                self._error_fix_payload = payload
            elif kind == REFUSED:
                self.error_fix = _REPLACE_ERROR
                self._error_fix_payload = payload
            self._undo(kind, payload)
            self._skip_to_sync()
            self._settle_error(failed)
            if self._rerun_state:
                if (
                    kind == BIND or kind == DESCRIBE_S or kind == DESCRIBE_S_ROWS
                ) and self._may_rerun(failed, payload):
                    self.error_fix = _RERUN_IF_REPLANNED
                    self._error_fix_payload = payload
                else:
                    self._forget_rerun()
            if len(self._held_params) and not self.error_fix:
                self.error_fix = _RELEASE_HELD
            return action
        if msg_type == codes.READY_FOR_QUERY:
            if kind == SYNC or kind == QUERY:
                expect.popleft()
                if self._rerun_state:
                    self._forget_rerun()  # the batch ran
            elif kind == RERUN_SYNC:
                expect.popleft()
                return action | DROP  # see _rerun
            else:
                self._lost(kind, msg_type)
            return action
        if kind == EXECUTE:
            end = _EXECUTE_END[msg_type]
            if end:
                if end == 1:
                    expect.popleft()
                else:
                    self._copy_in_began()
            return action
        if kind == QUERY:
            return action
        if kind == PARSE:
            ok = msg_type == codes.PARSE_COMPLETE
        elif kind == HIDDEN_PARSE or kind == HIDDEN_PROBE:
            if msg_type == codes.PARSE_COMPLETE:
                expect.popleft()
                return action | DROP
            ok = False
        elif kind == PROBE:
            ok = msg_type == codes.PARSE_COMPLETE
        elif kind == BIND:
            ok = msg_type == codes.BIND_COMPLETE
        elif kind == DESCRIBE_S:
            if msg_type == codes.PARAMETER_DESCRIPTION:
                if self._describe_may_rerun():
                    # The client's name stays with it, for an error (see _may_rerun).
                    expect.kinds[expect.head] = DESCRIBE_S_ROWS
                    return action | DROP | CAPTURE
                expect.replace_first(DESCRIBE_S_ROWS)
                return action
            ok = False
        elif kind == DESCRIBE_S_ROWS or kind == DESCRIBE_P:
            ok = _ROW_DESCRIPTION_OR_NO_DATA[msg_type] == 1
            if ok and len(self._held_params):
                self._prefix.append(self._held_params)
                self._held_params = b""
                action |= HAS_PREFIX
        elif kind == CLOSE:
            ok = msg_type == codes.CLOSE_COMPLETE
        elif kind == HIDDEN_CLOSE or kind == RECHECK_CLOSE:
            if msg_type == codes.CLOSE_COMPLETE:
                expect.popleft()
                return action | DROP
            ok = False
        elif kind == SHAPE_LEARN or kind == SHAPE_CHECK:
            if msg_type == codes.PARAMETER_DESCRIPTION:
                expect.replace_first(kind + 1)  # its _ROWS kind
                return action | DROP
            ok = False
        elif kind == SHAPE_LEARN_ROWS or kind == SHAPE_CHECK_ROWS:
            if _ROW_DESCRIPTION_OR_NO_DATA[msg_type]:
                expect.popleft()
                entries = self._shape_entries
                if entries:
                    self._shape_entry = entries.pop(0)
                self._shape_checking = kind == SHAPE_CHECK_ROWS
                return action | DROP | CAPTURE
            ok = False
        else:
            ok = False
        if ok:
            expect.popleft()
        else:
            self._lost(kind, msg_type)
        return action

    def _copy_in_began(self) -> None:
        """The Execute at the head of the queue began a COPY FROM STDIN: PostgreSQL
        ignores the Syncs the client sent behind it until the copy's end (libpq sends
        one before its data), so their ReadyForQuery never comes. Decided here, at
        the CopyInResponse's place among the replies, for this Execute's own Syncs:
        the client may have pipelined more batches behind them, copies too, whose
        replies may be in the same read (copy_end_ahead marks where each copy ends)."""
        self.ignored_syncs += self.expect.void_syncs_after_head()

    def copy_end_ahead(self) -> None:
        """The client ended a copy (CopyDone, CopyFail) before the server said it began:
        a mark behind the Syncs sent before it, so that a CopyInResponse voids no Sync
        sent after it (see _copy_in_began). The mark answers nothing (an empty
        synthetic entry, dropped when it comes first)."""
        self._push(SYNTH)

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
            prefix.append(expect.popleft())

    def _skip_to_sync(self) -> None:
        """After an error the server ignores everything up to Sync: so do we."""
        expect = self.expect
        doubted = b""
        while expect.size and expect.kinds[expect.head] != SYNC:
            kind = expect.kinds[expect.head]
            payload = expect.popleft()
            if kind == QUERY:
                self.skipped_queries += 1
            elif kind == RECHECK_CLOSE:
                # Skipped, and so is the Parse right behind it: see below.
                doubted = payload
                self.desynced = True
            elif doubted and payload == doubted and (kind == PARSE or kind == HIDDEN_PARSE):
                # Neither the Close nor the Parse ran: the server has the statement
                # only if it had it before, which was a guess (see _parse). Parse it
                # again behind a Close when it is next needed, and reset the server
                # at check-in.
                doubted = b""
                server = self.server
                if server is not None and not self._parse_queued(payload):
                    server.doubt(payload)
            else:
                self._undo(kind, payload)
        if not expect.size:
            # The client has not sent the Sync yet: the server ignores everything
            # until it comes, and so must the rewriter, or it would expect replies
            # that never come and answer for messages that never ran.
            self.skipping = True

    def _undo(self, kind: int, payload: bytes) -> None:
        if kind >= SHAPE_LEARN:
            self._shape_dropped(kind)
            return
        server = self.server
        if server is None:
            return
        if kind == PARSE or kind == HIDDEN_PARSE:
            # Never created, unless a Parse of it queued behind this one creates it.
            if not self._parse_queued(payload):
                server.forget(payload)
        elif kind == HIDDEN_CLOSE:
            server.restore(payload)  # never closed
        elif kind == RECHECK_CLOSE:
            server.doubt(payload)  # see _skip_to_sync
            self.desynced = True

    def _parse_queued(self, name: bytes) -> bool:
        """A Parse of `name` is among the replies still expected (runs on errors only)."""
        expect = self.expect
        kinds, payloads = expect.kinds, expect.payloads
        for i in range(expect.head, expect.head + expect.size):
            kind = kinds[i]
            if (kind == PARSE or kind == HIDDEN_PARSE) and payloads[i] == name:
                return True
        return False

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
        if self._rerun_state:
            self._forget_rerun()
        self._journal.clear()
        self._shape_entries.clear()
        if self.checking:
            self.checking = False
            self.resume_due = True
