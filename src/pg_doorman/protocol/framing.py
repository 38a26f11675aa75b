"""Message framing.

`MessageBuffer` yields whole messages and serves the low-volume phases (login,
cleanup, admin). `BackendScanner` and `FrontendScanner` serve the relay: they walk a
byte stream message by message, decode only the messages that drive a pooling
decision, and let everything else through as byte ranges. A message that is not
decoded is never buffered whole, so a 1 GB DataRow costs no more memory than the
chunk it arrives in.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from pg_doorman.protocol import codes
from pg_doorman.protocol.messages import ProtocolError
from pg_doorman.protocol.text_effects import CALLS_ANY, CALLS_LOCK, text_effects

if TYPE_CHECKING:
    # i64 is int when interpreted; compiled, a variable so typed is a machine integer
    # (the scanners' positions and lengths: a plain int is a tagged object whose every
    # addition and shift checks for overflow into a long).
    from mypy_extensions import i64

    # The scanners' hooks: BatchRewriter rewrites client messages (frontend()) and
    # decides, message by message, what of the replies reaches the client (backend(),
    # take_prefix(), drain()). Typed with the class itself, not a Protocol, so that the
    # compiled build calls it natively: these calls run once per message.
    from pg_doorman.prepared.rewriter import BatchRewriter

_LENGTH: Final = struct.Struct("!I")
_unpack_length: Final = _LENGTH.unpack_from
_MAX: Final = 256 * 1024 * 1024  # codes.MAX_MESSAGE_SIZE (a literal: see _Z below)
# Up to this many bytes in all, joined() concatenates a few parts rather than join them.
_SMALL_JOIN: Final = 2048


class MessageBuffer:
    """Accumulates bytes and yields complete (type, body) messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next_message(self, limit: i64 = _MAX) -> tuple[int, bytes] | None:
        """The next whole message, None if it has not all come yet; ProtocolError when
        its length word is below 4 or above `limit` (told as soon as the word is in)."""
        buf = self._buf
        size: i64 = len(buf)
        if size < 5:
            return None
        # Indexing, not struct: the compiled build reads the four bytes as native ints.
        length: i64 = buf[1]
        length = (length << 8) | buf[2]
        length = (length << 8) | buf[3]
        length = (length << 8) | buf[4]
        if length < 4 or length > limit:
            raise ProtocolError(f"invalid message length {length}")
        end = length + 1
        if size < end:
            return None
        msg_type = buf[0]
        body = bytes(buf[5:end])
        if size == end:
            buf.clear()  # the usual case: the chunk held this one message
        else:
            del buf[:end]
        return msg_type, body

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class _Stream:
    """What both scanners keep between chunks.

    `held` is the unfinished tail of the stream: a partial header, or a partial message
    the scanner must see whole. Once its header is known so is its size (`held_total`),
    so a large message arriving in many chunks is appended without rescanning.
    `need` counts body bytes of a message being passed through without holding it.
    Both are plain attributes: the relay checks them on every chunk.
    """

    __slots__ = ("held", "held_total", "need")

    def __init__(self) -> None:
        self.held = bytearray()
        self.held_total = 0
        self.need = 0

    @property
    def mid_message(self) -> bool:
        return bool(self.held) or self.need > 0

    def _join(self, data: bytes) -> bytes:
        """Add data to the held tail; the whole run once it may hold a full message."""
        held = self.held
        if self.held_total and len(held) + len(data) < self.held_total:
            held += data
            return b""
        joined = bytes(held) + data
        held.clear()
        self.held_total = 0
        return joined

    def _hold(self, data: bytes, pos: int) -> None:
        held = self.held
        held += memoryview(data)[pos:]
        self.held_total = _unpack_length(held, 1)[0] + 1 if len(held) >= 5 else 0


_DROP: Final = 1  # BatchRewriter.backend() result bits
_HAS_PREFIX: Final = 2
_CAPTURE: Final = 4
_HOLD: Final = 2  # BatchRewriter.answered_here: the client's bytes wait from here


# ---- cleanup flags armed by CommandComplete tags -------------------------------
# (and by what protocol.text_effects reads in statement texts: CLEAN_SET, CLEAN_TEMP)

CLEAN_SET: Final = 1  # SET seen: RESET ALL (and the identity resets) at check-in
CLEAN_PREPARE: Final = 2  # server-side prepared statements exist: DEALLOCATE ALL
CLEAN_DECLARE: Final = 4  # cursors may be open (WITH HOLD survives commit): CLOSE ALL
CLEAN_LISTEN: Final = 8  # LISTEN seen: UNLISTEN * so notifications don't leak
# A table, view or sequence created (maybe temporary): DISCARD TEMP, before another
# client's transaction (net/server.py finish()).
CLEAN_TEMP: Final = 16
# Session-level advisory locks may be held (a transaction called one of their lock
# functions): pg_advisory_unlock_all() at check-in. The calls themselves are reported
# as protocol.text_effects' CALLS_* bits, in the same flags, until the transaction ends.
CLEAN_ADVISORY: Final = 32
# A simple Query or FunctionCall sent behind an Execute, before the batch's Sync.
# PostgreSQL 18 (Parse/Bind/Execute/Query/Sync) then fails the session's next command,
# whatever it is, with XX000 "StartTransactionCommand: unexpected state STARTED": the
# server is closed at check-in instead of reaching another client (net/server.py
# finish()). Not for a Query behind a batch without an Execute, as asyncpg sends its
# COPY behind a Parse, Describe and Flush: that leaves the session as it should.
QUERY_IN_BATCH: Final = 256
# RESET seen (of one parameter or all: the same tag). It may have undone the startup
# settings the pooler applied for the client (net/server.py extra_parameters): while the
# server holds any, it gets the RESET ALL of CLEAN_SET at check-in, so that the pooler
# knows its settings again (net/server.py finish()).
CLEAN_RESET: Final = 512

# Tags of the statements that may create temporary objects, which would outlive the
# transaction (their rows readable by the server's next client) unless ON COMMIT DROP.
_CREATES_TEMP: Final = frozenset((b"CREATE TABLE", b"CREATE VIEW", b"CREATE SEQUENCE"))


def tag_cleanup_effect(tag: bytes, flags: int) -> int:
    """New cleanup flags after a CommandComplete tag (without the trailing NUL)."""
    first = tag[:1]
    if first == b"S":
        if tag == b"SET":
            return flags | CLEAN_SET
    elif first == b"D":
        if tag == b"DO":
            # A DO block's SETs and set_config calls are tagged DO, wherever it stands
            # in a text: each one counts as one that may have set parameters.
            return flags | CLEAN_SET
        if tag == b"DECLARE CURSOR":
            return flags | CLEAN_DECLARE
        if tag == b"DISCARD ALL":
            # The calls stay: reported as the client's bytes are forwarded, they may
            # come from statements sent behind it.
            return flags & CALLS_ANY
        if tag == b"DEALLOCATE ALL":
            return flags & ~CLEAN_PREPARE
        if tag == b"DISCARD TEMP":
            return flags & ~CLEAN_TEMP
    elif first == b"P":
        if tag == b"PREPARE":
            return flags | CLEAN_PREPARE
    elif first == b"C":
        if tag.startswith(b"CREATE ") and tag in _CREATES_TEMP:  # not for each COMMIT
            return flags | CLEAN_TEMP
        if tag == b"CLOSE CURSOR ALL":
            return flags & ~CLEAN_DECLARE
    elif first == b"L" and tag == b"LISTEN":
        return flags | CLEAN_LISTEN
    elif first == b"R" and tag == b"RESET":
        return flags | CLEAN_RESET
    # "RESET" undoes nothing of the flags, nor does "UNLISTEN": RESET of one parameter
    # and RESET ALL share their tag, as do UNLISTEN of one channel and UNLISTEN *, so a
    # SET of another parameter or another channel's LISTEN may still need undoing.
    return flags


def cleanup_queries(flags: int) -> list[str]:
    """Statements that undo session state, in an order that always succeeds."""
    statements: list[str] = []
    if flags & CLEAN_SET:
        # RESET ALL leaves the role and the session user (SET SESSION AUTHORIZATION,
        # for a superuser) as they are: the next client would run as someone else.
        statements += ["RESET SESSION AUTHORIZATION", "RESET ROLE", "RESET ALL"]
    if flags & CLEAN_PREPARE:
        statements.append("DEALLOCATE ALL")
    if flags & CLEAN_DECLARE:
        statements.append("CLOSE ALL")
    if flags & CLEAN_LISTEN:
        statements.append("UNLISTEN *")
    if flags & CLEAN_TEMP:
        statements.append("DISCARD TEMP")
    if flags & (CLEAN_ADVISORY | CALLS_LOCK):
        statements.append("SELECT pg_catalog.pg_advisory_unlock_all()")
    return statements


# Backend message types the relay must decode. Literals, not codes.X: mypyc inlines a
# literal Final, where a copy of another module's is a module global read at each use
# (tests/unit/test_framing.py checks they agree).
_Z: Final = 0x5A  # codes.READY_FOR_QUERY
_E: Final = 0x45  # codes.ERROR_RESPONSE
_C: Final = 0x43  # codes.COMMAND_COMPLETE
_S: Final = 0x53  # codes.PARAMETER_STATUS
_G: Final = 0x47  # codes.COPY_IN_RESPONSE
_H: Final = 0x48  # codes.COPY_OUT_RESPONSE
_W: Final = 0x57  # codes.COPY_BOTH_RESPONSE
_A: Final = 0x41  # codes.NOTIFICATION_RESPONSE
_BACKEND_DECODED: Final = codes.type_table((_Z, _E, _C, _S, _G, _H, _W))


def joined(parts: list[bytes]) -> bytes:
    """b"".join(parts). A few short parts (a rewritten request, a reply with a synthetic
    message put in) are concatenated instead: join's set-up for every part (a buffer
    entry, a reference taken and dropped) costs more than copying a few hundred bytes
    once more. Empty parts (a message answered here, nothing between two rewritten
    ones) do not count."""
    if len(parts) <= 8:
        total: i64 = 0
        count: i64 = 0
        for part in parts:
            total += len(part)
            if len(part):
                count += 1
        if count <= 4 and total <= _SMALL_JOIN:
            out = b""
            for part in parts:
                if len(part):
                    out = out + part if len(out) else part
            return out
    return b"".join(parts)


def joined_with_rest(parts: list[bytes], data: bytes, start: int, upto: int) -> bytes:
    """joined(parts + [data[start:upto]]). With two parts, the usual case of one message
    rewritten or one synthetic reply put in, the output is concatenated without
    growing the list, which would reallocate its storage; copied once, as a join
    would, unless all of it is short."""
    if len(parts) == 2 and (
        not len(parts[0]) or len(parts[0]) + len(parts[1]) + upto - start <= _SMALL_JOIN
    ):
        out = parts[1]
        if len(parts[0]):
            out = parts[0] + out
        if start < upto:
            out = out + data[start:upto] if len(out) else data[start:upto]
        return out
    parts.append(data[start:upto])
    return joined(parts)


def _plus(parts: list[bytes] | None, before: bytes, inserted: bytes) -> list[bytes]:
    """`parts` with `before` (the stream's bytes up to an insertion) and `inserted`
    added; the first time, a list made at its size (appending to an empty one would
    allocate its storage and then grow it)."""
    if parts is None:
        return [before, inserted]
    parts += (before, inserted)
    return parts


def _int32_at(data: bytes, at: i64) -> i64:
    """The big-endian 32-bit word at `at` (the caller checked it is there)."""
    word: i64 = data[at]
    word = (word << 8) | data[at + 1]
    word = (word << 8) | data[at + 2]
    return (word << 8) | data[at + 3]


def _select_tag_at(data: bytes, at: i64) -> bool:
    """Whether the six bytes at `at` spell SELECT (the caller checked they are there)."""
    return (
        data[at] == 83  # S
        and data[at + 1] == 69  # E
        and data[at + 2] == 76  # L
        and data[at + 3] == 69  # E
        and data[at + 4] == 67  # C
        and data[at + 5] == 84  # T
    )


class BackendScanner(_Stream):
    """Walks backend->client bytes, tracking transaction and copy state.

    `feed()` returns the bytes that can be forwarded now and holds back at most an
    incomplete header or an incomplete decoded message. After each call the caller
    reads `ready_count`/`status` (ReadyForQuery seen), `copy_in_started` and the rest.
    """

    __slots__ = (
        "cleanup_flags",
        "copy_in_started",
        "discarded_all",
        "error_count",
        "hook",
        "in_copy",
        "last_error",
        "notify_as",
        "notify_from",
        "param_changes",
        "parameters",
        "passing_size",
        "ready_count",
        "reported",
        "statements_reset",
        "status",
    )

    def __init__(self, parameters: dict[str, str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.status = codes.TX_IDLE
        self.ready_count = 0
        self.copy_in_started = 0
        self.in_copy = False
        # The whole size of the message `need` counts the rest of (meaningless while
        # `need` is 0): the relay bounds how long a client may stall inside a large one.
        self.passing_size: i64 = 0
        self.error_count = 0
        self.last_error: bytes | None = None
        self.cleanup_flags = 0
        self.param_changes = 0
        # Each ParameterStatus relayed, as (name, value before, value), until the client
        # reads them (log_client_parameter_status_changes) and empties the list.
        self.reported: list[tuple[str, str | None, str]] = []
        # The server dropped all its prepared statements (DEALLOCATE ALL / DISCARD ALL)
        # while no hook was set; with one, the hook is told at once.
        self.statements_reset = False
        # DISCARD ALL ran, which also UNLISTENs everything (read and reset by the relay).
        self.discarded_all = False
        # Rewrites the response stream of clients using shared prepared statements.
        self.hook: BatchRewriter | None = None
        # A NotificationResponse from this server's own session (its sender is the
        # backend `notify_from`) names as its sender the client it serves, by the pid
        # that client was given in its BackendKeyData (`notify_as`; 0: none, as is
        # its pid). Drivers tell a client's own notifications by that pid.
        self.notify_from: i64 = 0
        self.notify_as: i64 = 0

    def _refuse(self, resumed: int) -> None:
        """The read being refused (ProtocolError) goes out in no part. If it began
        with the rest of a message whose start has gone out (`resumed` bytes of it),
        the peer is left inside that message, and `need` says so: the connection must
        be neither handed to another client nor sent a message of the pooler's."""
        self.need = resumed

    def feed(self, data: bytes) -> bytes:
        self.ready_count = 0
        self.copy_in_started = 0
        # The resume-from-last-chunk prologue is repeated in FrontendScanner.feed on
        # purpose: it runs twice per transaction and a shared helper costs a call.
        if len(self.held):
            data = self._join(data)
            if not len(data):
                return b""
        n: i64 = len(data)
        pos: i64 = self.need
        # The rest of a message begun in an earlier read, whose start has gone out.
        resumed: i64 = pos
        if pos:
            if pos >= n:
                self.need = pos - n
                return data
            self.need = 0
        hook = self.hook
        # With a hook, output is assembled from parts: data[start:...] plus insertions.
        parts: list[bytes] | None = None
        start: i64 = 0
        decoded = _BACKEND_DECODED
        while n - pos >= 5:
            msg_type: i64 = data[pos]
            # Byte by byte into an i64: shifting the bytes as ints would be boxed-int work.
            length: i64 = data[pos + 1]
            length = (length << 8) | data[pos + 2]
            length = (length << 8) | data[pos + 3]
            length = (length << 8) | data[pos + 4]
            end = pos + 1 + length
            if not decoded[msg_type]:
                if length < 4 or length > _MAX:
                    self._refuse(resumed)
                    raise ProtocolError(f"invalid backend message length {length}")
                own = False
                if msg_type == _A and self.notify_as:
                    if n - pos < 9:
                        break  # held until its sender's pid is all here
                    own = _int32_at(data, pos + 5) == self.notify_from
                if hook is not None:
                    if end > n and hook.wants_whole():
                        break  # the answer to a Describe of the pooler's: read whole
                    action = hook.backend(msg_type)
                    if action:
                        if action & _CAPTURE:
                            hook.shape_seen(data, pos, end)
                        if action & _HAS_PREFIX:
                            parts = _plus(parts, data[start:pos], hook.take_prefix())
                        elif parts is None:
                            parts = [data[start:pos]]
                        else:
                            parts.append(data[start:pos])
                        start = end if action & _DROP else pos
                if own:
                    sender = int(self.notify_as).to_bytes(4, "big")
                    parts = _plus(parts, data[start : pos + 5], sender)
                    start = pos + 9
                if end > n:
                    self.need = end - n
                    self.passing_size = length + 1
                    pos = n
                    break
                pos = end
                continue
            if length < 4 or length > _MAX or (msg_type == _Z and length != 5):
                self._refuse(resumed)
                raise ProtocolError(f"invalid backend message length {length}")
            if end > n:
                break
            if hook is not None:
                action = hook.backend(msg_type)
                if action:
                    if action & _HAS_PREFIX:
                        parts = _plus(parts, data[start:pos], hook.take_prefix())
                        start = pos
                    if action & _DROP:
                        # The ReadyForQuery of a batch the hook runs again (rewriter
                        # RERUN_SYNC): the batch's own comes later. Not counted.
                        parts = _plus(parts, data[start:pos], b"")
                        start = pos = end
                        continue
            if msg_type == _Z:
                self.ready_count += 1
                self.status = data[pos + 5]
                self.in_copy = False
            elif msg_type == _C:
                self.in_copy = False
                # A SELECT's tag, the usual one, changes nothing: recognised in place,
                # without slicing it out (length 11: "SELECT" and the NUL at least).
                if length < 11 or not _select_tag_at(data, pos + 5):
                    tag = data[pos + 5 : end - 1]
                    self.cleanup_flags = tag_cleanup_effect(tag, self.cleanup_flags)
                    if tag == b"DEALLOCATE ALL" or tag == b"DISCARD ALL":
                        if tag == b"DISCARD ALL":
                            self.discarded_all = True
                        if hook is not None:
                            hook.server_reset()  # here, before the replies queued behind
                        else:
                            self.statements_reset = True
            elif msg_type == _E:
                self.in_copy = False
                self.error_count += 1
                self.last_error = data[pos + 5 : end]
                if hook is not None and hook.error_fix:
                    fixed = hook.fixed_error(self.last_error)
                    if fixed is not None:
                        parts = _plus(parts, data[start:pos], fixed)
                        start = end
                        if not len(fixed):
                            # Dropped: the hook runs the failed batch again.
                            self.error_count -= 1
                            self.last_error = None
            elif msg_type == _S:
                self._parameter_status(data[pos + 5 : end])
            elif msg_type == _G:
                self.in_copy = True
                self.copy_in_started += 1
            else:  # CopyOutResponse / CopyBothResponse
                self.in_copy = True
            pos = end
        if hook is not None:
            tail = hook.drain()
            if len(tail):
                parts = _plus(parts, data[start:pos], tail)
                start = pos
        if pos < n:
            self._hold(data, pos)
            if parts is None:
                return data[:pos]
        elif parts is None:
            return data
        return joined_with_rest(parts, data, start, pos)

    def _parameter_status(self, body: bytes) -> None:
        self.param_changes += 1
        parts = body.split(b"\x00")
        if len(parts) >= 2:
            name = parts[0].decode("utf-8", "replace")
            value = parts[1].decode("utf-8", "replace")
            self.reported.append((name, self.parameters.get(name), value))
            self.parameters[name] = value


# Frontend message types the relay acts on.
_QUERY: Final = 0x51  # codes.QUERY
_SYNC: Final = 0x53  # codes.SYNC
_FUNCTION_CALL: Final = 0x46  # codes.FUNCTION_CALL
_EXECUTE: Final = 0x45  # codes.EXECUTE
_TERMINATE: Final = 0x58  # codes.TERMINATE
_PARSE: Final = 0x50  # codes.PARSE
_COPY_DONE: Final = 0x63  # codes.COPY_DONE
_COPY_FAIL: Final = 0x66  # codes.COPY_FAIL
_FLUSH: Final = 0x48  # codes.FLUSH
_COPY_DATA: Final = 0x64  # codes.COPY_DATA
_FRONTEND_VALID: Final = codes.type_table(b"BCDEFHPQSXcdfp")
_FRONTEND_SMALL: Final = codes.SMALL_FRONTEND_TYPES
_SMALL_MAX: Final = 10000  # codes.SMALL_MESSAGE_MAX
# Messages a rewriter sees; the first five it needs whole.
_REWRITTEN: Final = codes.type_table(b"PBDCSEHQF")
_REWRITTEN_WHOLE: Final = codes.type_table(b"PBDCS")
_MAY_BE_DEALLOCATE: Final = codes.MAY_START_DEALLOCATE
# Bytes of a Query text kept across reads: more than the longest name text_effects
# looks for (an advisory lock function's) with a character on either side.
_SCAN_OVERLAP: Final = 32
_DEALLOCATE_MAX: Final = 201  # codes.DEALLOCATE_MAX


class RefusedMessage(ProtocolError):
    """A client message that is no message (an unknown type, an impossible length).

    `forward` is what the client sent before it in the same read, whole messages as
    the scanner (and its rewriter) let them through: PostgreSQL would run those and
    answer them before it reads the bad one and ends the session, so they may still
    go to the server.
    """

    def __init__(self, message: str, forward: bytes) -> None:
        super().__init__(message)
        self.forward = forward


class FrontendScanner(_Stream):
    """Walks client->server bytes and keeps the request/response accounting.

    `pending_ready` counts ReadyForQuery messages the server still owes (one per
    Query, Sync and FunctionCall); `batch_open` says the client has sent part of an
    extended-protocol batch without its Sync. A server may go back to the pool only
    when both are clear, so no half-sent batch is ever split across two servers.
    """

    __slots__ = (
        "_scan_tail",
        "batch_open",
        "copy_ended_ahead",
        "copy_in",
        "effects_seen",
        "execute_open",
        "flush_seen",
        "named_parse_seen",
        "paused",
        "pending_ready",
        "rewriter",
        "syncs_after_execute",
        "syncs_before_copy_end",
        "terminated",
        "watch_texts",
    )

    def __init__(self) -> None:
        super().__init__()
        self.pending_ready = 0
        self.batch_open = False
        self.copy_in = False
        # A CopyDone or CopyFail sent behind the last Execute or Query before the
        # server said a COPY began (the client sent its data without waiting), and
        # the Syncs sent between that Execute and it.
        self.copy_ended_ahead = False
        self.syncs_before_copy_end = 0
        self.execute_open = False  # an Execute since the last Sync or Query
        self.syncs_after_execute = 0
        self.terminated = False
        self.named_parse_seen = False
        self.flush_seen = False
        # The bytes in `held` wait for the rewriter (BatchRewriter.checking) from a
        # message on: what comes meanwhile joins them, until resume().
        self.paused = False
        self.rewriter: BatchRewriter | None = None
        # Transaction pooling: Query texts (and, without a rewriter, Parse texts) are
        # read for what they may leave on the session unseen by the tags, reported in
        # `effects_seen` (protocol.text_effects bits, read and reset by the client).
        self.watch_texts = False
        self.effects_seen = 0
        # The end of a Query text read so far whose rest is still to come (None: no
        # such Query): a name split between two reads is found across them.
        self._scan_tail: bytes | None = None

    def on_copy_in_started(self) -> None:
        # The backend ignores Sync and Flush while in copy-in, so Syncs the client
        # sent after the COPY's Execute will never be answered.
        ended_ahead = self.copy_ended_ahead
        self.copy_ended_ahead = False
        rewriter = self.rewriter
        if rewriter is not None:
            # It knows each copy's own Syncs (the counts here are the last Execute's,
            # wrong when the client pipelined more batches behind the copy).
            ignored = rewriter.ignored_syncs
            rewriter.ignored_syncs = 0
        elif ended_ahead:
            # The client's copy is already over: only the Syncs before its end went
            # into the copy; those behind it are answered.
            ignored = self.syncs_before_copy_end
        else:
            ignored = self.syncs_after_execute
        self.pending_ready -= ignored
        if self.pending_ready < 0:
            self.pending_ready = 0
        self.syncs_after_execute = 0
        self.copy_in = not ended_ahead  # messages behind an ended copy are no copy's

    def _stop_at(self, data: bytes, pos: int) -> None:
        """A client message at data[pos] is refused, and what came before it goes on
        (RefusedMessage.forward). The stream ends there, as at a Terminate; the
        scanner keeps the refused message's first byte as a tail it cannot get past,
        so that no reply ends the client's transaction meanwhile."""
        self.terminated = True
        self.need = 0
        held = self.held
        held.clear()
        held.append(data[pos])
        self.held_total = 0

    def on_copy_aborted_by_server(self) -> None:
        self.copy_in = False

    def feed(self, data: bytes) -> bytes:
        """Account for client bytes; return what may be forwarded to the server.

        Stops at Terminate (which is never forwarded) and sets `terminated`, as it
        does at a message that is no message, raising RefusedMessage. With a
        rewriter, extended-protocol messages are replaced by what it returns.
        """
        if len(self.held):
            if self.paused:
                self.held += data
                return b""
            data = self._join(data)
            if not len(data):
                return b""
        n: i64 = len(data)
        pos: i64 = self.need
        if pos:
            if self._scan_tail is not None:
                self._scan_query_rest(data, pos if pos < n else n, pos <= n)
            if pos >= n:
                self.need = pos - n
                return data
            self.need = 0
        rewriter = self.rewriter
        parts: list[bytes] | None = None
        start: i64 = 0
        valid = _FRONTEND_VALID
        while n - pos >= 5:
            msg_type: i64 = data[pos]
            length: i64 = data[pos + 1]  # as in BackendScanner.feed
            length = (length << 8) | data[pos + 2]
            length = (length << 8) | data[pos + 3]
            length = (length << 8) | data[pos + 4]
            if (
                not valid[msg_type]
                or length < 4
                or length > _MAX
                or (length > _SMALL_MAX and _FRONTEND_SMALL[msg_type])
            ):
                self._stop_at(data, pos)
                raise RefusedMessage(
                    f"invalid frontend message type {msg_type!r} or length {length}",
                    self._output(data, parts, start, pos),
                )
            end = pos + 1 + length
            # During COPY FROM STDIN the server ignores Sync and Flush (and refuses
            # anything else but the copy's messages): none of it is the rewriter's.
            if rewriter is not None and _REWRITTEN[msg_type] and not self.copy_in:
                skipping = rewriter.skipping
                if end > n and (
                    skipping
                    or _REWRITTEN_WHOLE[msg_type]
                    or (
                        msg_type == _QUERY
                        and length <= _DEALLOCATE_MAX + 4
                        and (pos + 5 >= n or _MAY_BE_DEALLOCATE[data[pos + 5]] == 1)
                    )
                ):
                    break  # rewriting needs the whole message (a Query: if a DEALLOCATE)
                if skipping and msg_type != _SYNC:
                    # Ignored, as PostgreSQL ignores messages after an error until Sync.
                    if parts is None:
                        parts = []
                    parts.append(data[start:pos])
                    start = pos = end
                    continue
                replacement = rewriter.frontend(msg_type, data, pos, end)
                if replacement is not None:
                    parts = _plus(parts, data[start:pos], replacement)
                    if rewriter.resume_at:
                        start = rewriter.resume_at
                        rewriter.resume_at = 0
                    else:
                        start = end
                    if rewriter.answered_here:
                        if rewriter.answered_here == _HOLD:
                            # This message and all behind it wait: the replacement is
                            # what the rewriter needs answered first.
                            rewriter.answered_here = 0
                            self.paused = True
                            self.held += memoryview(data)[pos:]
                            self.held_total = 0
                            return self._output(data, parts, pos, pos)
                        # A Query the rewriter answered: no reply comes from the server.
                        rewriter.answered_here = 0
                        pos = end
                        continue
            if msg_type == _SYNC or msg_type == _QUERY or msg_type == _FUNCTION_CALL:
                if msg_type == _SYNC:
                    if not self.copy_in:  # the backend ignores Sync during copy-in
                        self.pending_ready += 1
                        self.syncs_after_execute += 1
                        self.batch_open = False
                        self.execute_open = False
                else:
                    self.pending_ready += 1
                    self.syncs_after_execute = 0
                    self.copy_ended_ahead = False
                    self.batch_open = False
                    if self.execute_open:
                        self.effects_seen |= QUERY_IN_BATCH
                        self.execute_open = False
                    if msg_type == _QUERY and self.watch_texts:
                        if end <= n:
                            self.effects_seen |= text_effects(data, pos + 5, end)
                        else:
                            self.effects_seen |= text_effects(data, pos + 5, n)
                            self._scan_tail = data[max(pos + 5, n - _SCAN_OVERLAP) : n]
            elif msg_type == _TERMINATE:
                self.terminated = True
                return self._output(data, parts, start, pos)
            else:
                if msg_type == _PARSE:
                    if end > n:
                        break  # need the statement name: hold the message
                    if rewriter is None:
                        named = length > 4 and data[pos + 5] != 0
                        if named:
                            self.named_parse_seen = True
                        if self.watch_texts:  # with a rewriter, its Binds report them
                            # The text, after the statement's name and its NUL.
                            name_end = data.find(b"\x00", pos + 5, end) if named else pos + 5
                            if name_end >= 0:  # else malformed: the server refuses it
                                self.effects_seen |= text_effects(data, name_end + 1, end)
                    self.batch_open = True
                elif msg_type == _EXECUTE:
                    self.syncs_after_execute = 0
                    self.copy_ended_ahead = False
                    self.batch_open = True
                    self.execute_open = True
                elif msg_type == _COPY_DONE or msg_type == _COPY_FAIL:
                    if not self.copy_in:
                        self.copy_ended_ahead = True
                        self.syncs_before_copy_end = self.syncs_after_execute
                        if rewriter is not None and rewriter.expect.size:
                            rewriter.copy_end_ahead()
                    self.copy_in = False
                elif msg_type == _FLUSH:
                    self.flush_seen = True
                elif msg_type != _COPY_DATA:
                    self.batch_open = True
            if end > n:
                self.need = end - n
                return self._output(data, parts, start, n)
            pos = end
        if pos < n:
            if not valid[data[pos]]:
                # PostgreSQL refuses a message by its type byte, before its length
                # arrives: a client that sent no more would wait for good.
                self._stop_at(data, pos)
                raise RefusedMessage(
                    f"invalid frontend message type {data[pos]!r}",
                    self._output(data, parts, start, pos),
                )
            self._hold(data, pos)
        return self._output(data, parts, start, pos)

    def resume(self) -> bytes:
        """The bytes held while paused, to be fed again."""
        data = bytes(self.held)
        self.held.clear()
        self.held_total = 0
        self.paused = False
        return data

    def _scan_query_rest(self, data: bytes, upto: i64, last: bool) -> None:
        """Read data[:upto], the next part of a Query text begun in an earlier read
        (`last`: its end), and across the boundary with the part before."""
        tail = self._scan_tail
        assert tail is not None
        window = tail + data[: upto if upto < _SCAN_OVERLAP else _SCAN_OVERLAP]
        self.effects_seen |= text_effects(window, 0, len(window)) | text_effects(data, 0, upto)
        if last:
            self._scan_tail = None
        elif upto < _SCAN_OVERLAP:
            self._scan_tail = window[-_SCAN_OVERLAP:]
        else:
            self._scan_tail = data[upto - _SCAN_OVERLAP : upto]

    @staticmethod
    def _output(data: bytes, parts: list[bytes] | None, start: int, upto: int) -> bytes:
        if parts is None:
            return data if upto == len(data) else data[:upto]
        return joined_with_rest(parts, data, start, upto)
