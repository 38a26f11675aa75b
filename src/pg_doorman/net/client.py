"""A client connection: startup, authentication, then the relay.

Startup and authentication run as one short coroutine per connection. After the
greeting the connection is driven by callbacks only: between transactions the first
message of the next one checks a server out of the pool synchronously when one is
idle, and only a client that must wait leaves a callback in the pool's queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar, cast

from pg_doorman.auth.hba import peer_address
from pg_doorman.auth.jwt import JwtError
from pg_doorman.auth.key_derivation import verifier_of
from pg_doorman.auth.md5 import md5_password_hash, verify_md5_response
from pg_doorman.auth.methods import NO_HBA_ENTRY, ClientAuth
from pg_doorman.auth.mock_auth import mock_salt
from pg_doorman.auth.scram import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LENGTH,
    KEY_LENGTH,
    AuthenticationFailed,
    ScramError,
    ScramServerSession,
    ScramVerifier,
)
from pg_doorman.auth.talos import TALOS_USER, session_application_name
from pg_doorman.config import ADMIN_DATABASES, format_duration_ms
from pg_doorman.memo import remember
from pg_doorman.net.client_hello import NO_APPLICATION_PROTOCOL_ALERT, read_client_hello
from pg_doorman.net.send_queue import untaken_bytes
from pg_doorman.net.session_state import SessionState
from pg_doorman.net.suspend import SUSPEND, resume
from pg_doorman.net.tls import (
    ALPN_PROTOCOL,
    TlsReader,
    negotiated_postgresql,
    start_tls_with_hello,
    tls_end_point,
)
from pg_doorman.net.writer import SocketWriter
from pg_doorman.pool.pool import AcquireError, LoginParameters, Pool
from pg_doorman.prepared.registry import StatementEntry
from pg_doorman.prepared.rewriter import BatchRewriter
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import (
    CLEAN_ADVISORY,
    CLEAN_PREPARE,
    CLEAN_RESET,
    FrontendScanner,
    MessageBuffer,
    RefusedMessage,
)
from pg_doorman.protocol.listen import (
    INCOMPLETE,
    LISTEN,
    LISTEN_DONE,
    UNLISTEN,
    UNLISTEN_DONE,
    ExtendedStatement,
    channel_of,
    read_extended,
)
from pg_doorman.protocol.listen import MAY_START as MAY_START_LISTEN
from pg_doorman.protocol.listen import parse_statement as parse_listen
from pg_doorman.protocol.messages import ProtocolError
from pg_doorman.protocol.startup import (
    CancelRequest,
    SSLRequest,
    StartupError,
    StartupMessage,
    parse_startup_packet,
    startup_packet_length,
)

if TYPE_CHECKING:
    from pg_doorman.app.pooler import PoolEntry, Pooler
    from pg_doorman.auth.talos import Talos
    from pg_doorman.net.listen_hub import ListenHub
    from pg_doorman.net.server import ServerConnection

logger: Final = logging.getLogger("pg_doorman.client")
_now: Final = time.monotonic

# Client states.
STARTUP: Final = 0
LOGIN: Final = 1
IDLE: Final = 2  # logged in, no server
WAITING: Final = 3  # queued for a server
ACTIVE: Final = 4  # holds a server
CLOSED: Final = 5

_T = TypeVar("_T")

# What a suspended login waits for.
_NOT_WAITING: Final = 0
_WAIT_MESSAGE: Final = 1  # the client's next message
_WAIT_SERVER: Final = 2  # a server from the pool's queue (the pool's first login)
_WAIT_TASK: Final = 3  # an auth_query lookup or a PAM check (a task of the pooler's)

# Why a transaction-mode client keeps its server between transactions (`pinned_for`):
# its LISTENs (pin_on_listen), its session-level advisory locks (pin_on_advisory_lock).
PIN_LISTEN: Final = 1
PIN_LOCKS: Final = 2

_STATE_NAMES: Final = {STARTUP: "startup", LOGIN: "login", IDLE: "idle", WAITING: "waiting"}
_STATE_NAMES.update({ACTIVE: "active", CLOSED: "closed"})

_unpack_length: Final = messages._INT32.unpack_from  # signed: a negative length is invalid
_VALID_TYPES: Final = codes.type_table(b"BCDEFHPQSXcdfp")
_NOT_REPORTED: Final = frozenset(("user", "database", "options", "replication"))
# Session settings that change how a statement is parsed or planned.
_PLANNING: Final = frozenset(
    (
        "search_path",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "standard_conforming_strings",
        "default_text_search_config",
        "role",
    )
)
_PLANNING_ORDER: Final = tuple(sorted(_PLANNING))
# Settings PostgreSQL reports (search_path from version 18, default_transaction_read_only
# from 14) that are not synced: a transaction-mode client's changes to them, by SET,
# RESET, set_config() or a ROLLBACK, follow it to its next servers as its startup
# settings do, and the server it leaves is known to hold them.
_FOLLOWED_SETTINGS: Final = frozenset(("search_path", "default_transaction_read_only"))
_ADMIN_DATABASES: Final = ADMIN_DATABASES
# Planning contexts built (see _planning_context), by their values in _PLANNING_ORDER.
_PLANNING_CONTEXTS: Final[dict[tuple[str | None, ...], bytes]] = {}
_PLANNING_CONTEXTS_MAX: Final = 256
_PLANNING_CONTEXT_REMEMBERED: Final = 4096  # longest context kept
_AUTH_SASL: Final = messages.auth_sasl(ScramServerSession.mechanisms)
_AUTH_SASL_WITH_BINDING: Final = messages.auth_sasl(ScramServerSession.mechanisms_with_binding)
# The longest message a client may send during its login, length word included:
# PostgreSQL reads a password or SASL message of at most PG_MAX_AUTH_TOKEN_LENGTH
# (65535) bytes and refuses a longer length word at once, before reading the rest.
_LOGIN_MESSAGE_MAX: Final = 65535 + 4
# Bytes a client may have sent ahead during its login before its reading is paused
# (until the login wants its next message): the kernel's buffers hold the rest, as
# they do for PostgreSQL, not the pooler's memory.
_LOGIN_BACKLOG: Final = 2 * _LOGIN_MESSAGE_MAX
# Bytes a waiting client may send before its reading is paused.
_WAITING_BACKLOG: Final = 64 * 1024
# A client paused inside a large message (proxy_copy_data_timeout) is checked this many
# times per timeout for whether it took any of it since.
_STALL_CHECKS: Final = 4
# A refused message's FATAL waits for the replies owed before it, but no longer than
# the server stays silent this long: the count of what is owed can be more than will
# come (without the rewriter, after COPYs the client pipelined: docs/configuration.md).
_REFUSAL_SILENCE: Final = 1.0
# Messages that get no reply when they start a transaction: PostgreSQL ignores COPY
# messages outside a COPY (the leftovers of one the server ended with an error before
# CopyDone), and a Flush has nothing to flush. Checking a server out for them would
# hold it with no ReadyForQuery to give it back: they are dropped instead.
_DROPPED_BETWEEN: Final = codes.type_table(b"cdfH")
_MAY_BE_DEALLOCATE: Final = codes.MAY_START_DEALLOCATE
_DEALLOCATE_MAX: Final = 201  # codes.DEALLOCATE_MAX, a literal (see protocol/framing.py _Z)
_MAY_BE_LISTEN: Final = MAY_START_LISTEN
# Longest Query read as a LISTEN (listen_fanout): a longer one is not held back whole.
_LISTEN_MAX: Final = 1024
# Bytes of notifications a client may leave unread (or held through a transaction)
# before it is disconnected: the hub cannot slow down for one client.
_NOTIFY_BACKLOG: Final = 16 * 1024 * 1024
# How a transaction's reply ends when it committed a LISTEN or UNLISTEN sent to a
# server: in a transaction block, or on its own.
_COMMITTED: Final = messages.command_complete("COMMIT") + messages.READY_IDLE
_UNLISTENED: Final = UNLISTEN_DONE + messages.READY_IDLE
_LISTENED: Final = LISTEN_DONE + messages.READY_IDLE
# The answer to a request canceled before it reached a server.
_CANCELED_REQUEST: Final = (
    messages.error_response(
        "ERROR", sqlstate.QUERY_CANCELED, "canceling statement due to user request"
    )
    + messages.READY_IDLE
)
# Encryption requests a client has made (ClientConnection._negotiated).
_SSL_ASKED: Final = 1
_GSS_ASKED: Final = 2
_INJECTION_DETAIL: Final = (
    "This could be either a client-software bug or evidence of an attempted "
    "man-in-the-middle attack."
)
# A TLS record's first byte when it carries a handshake message (the client's hello).
_TLS_HANDSHAKE_RECORD: Final = 0x16
_ALPN_POSTGRESQL: Final = ALPN_PROTOCOL.encode()
# Names that may be spliced into SET statements; anything else is refused at login.
_GUC_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


def first_request_end(buf: bytes) -> int | None:
    """Where the first complete request in `buf` ends: after a Query or FunctionCall,
    or after the Sync closing an extended-protocol batch; None if there is none yet."""
    pos = 0
    n = len(buf)
    while pos + 5 <= n:
        msg_type = buf[pos]
        length: int = _unpack_length(buf, pos + 1)[0]
        end = pos + 1 + length
        if length < 4 or end > n:
            return None
        if msg_type in (codes.QUERY, codes.SYNC, codes.FUNCTION_CALL):
            return end
        pos = end
    return None


class ClientConnection(asyncio.Protocol):
    # Slots: thousands of idle clients each keep one of these.
    __slots__ = (
        "_auth_final",
        "_check_query_next",
        "_checking",
        "_checking_locks",
        "_discarding",
        "_fingerprint",
        "_fingerprint_synced",
        "_hello_context",
        "_hello_timer",
        "_inbox",
        "_listening",
        "_login_coro",
        "_login_wait",
        "_memory_accounted",
        "_negotiated",
        "_on_data",
        "_param_mark",
        "_pending",
        "_raw_parameters",
        "_refusal_timer",
        "_restoring",
        "_stall_since",
        "_stall_timer",
        "_stall_untaken",
        "_startup_buf",
        "_tls_end_point",
        "_writer",
        "address",
        "admin",
        "application_name",
        "bytes_received",
        "bytes_sent",
        "client_id",
        "closing_after_transaction",
        "connected_at",
        "database",
        "entry",
        "errors",
        "extra_parameters",
        "frontend",
        "held_notifications",
        "listen_at_commit",
        "listen_hub",
        "loop",
        "on_cancel",
        "over_limit",
        "parameters",
        "pinned_for",
        "pool",
        "pooler",
        "port",
        "queries",
        "reading_paused",
        "refusal",
        "rewriter",
        "secret",
        "server",
        "startup_settings",
        "state",
        "tls",
        "transactions",
        "transport",
        "unix",
        "user",
        "wait_started",
        "write_paused",
    )

    def __init__(self, pooler: Pooler, *, unix: bool = False) -> None:
        self.pooler = pooler
        self.loop = pooler.loop
        self.unix = unix
        self.tls = False  # the TLS handshake with the client is done
        self.transport: asyncio.Transport | None = None
        # Every write to the client goes through it (net/writer.py).
        self._writer: SocketWriter | None = None
        self.state = STARTUP
        self.client_id = 0
        self.secret = 0
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.address: str = ""
        self.port = 0
        self.pool: Pool | None = None
        self.entry: PoolEntry | None = None
        self.server: ServerConnection | None = None
        self.frontend = FrontendScanner()
        # Why a message of the client's was refused, while the replies owed for what
        # it sent before that message are still coming (_refuse_after_replies).
        self.refusal: str | None = None
        self._refusal_timer: asyncio.TimerHandle | None = None
        self.parameters: dict[str, str] = {}
        self.write_paused = False
        self.reading_paused = False
        self.connected_at = time.monotonic()
        self.wait_started = 0.0  # set by the pool when this client joins its queue
        self.transactions = 0
        self.queries = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.errors = 0
        self.over_limit = False
        self.admin = False
        # What a CancelRequest for this client does when it holds no server (admin).
        self.on_cancel: Callable[[], None] | None = None
        # Set at shutdown or when its pool goes away: the FATAL message to close with
        # as soon as the current transaction ends.
        self.closing_after_transaction: str | None = None
        # Nonzero: keeps its server between transactions in a transaction-mode pool,
        # as in session mode, for the reasons its PIN_* bits name: its LISTENs
        # (pin_on_listen) until it disconnects, its session-level advisory locks
        # (pin_on_advisory_lock) while it holds any.
        self.pinned_for = 0
        # listen_fanout: the pool's hub this client listens through (net/listen_hub.py),
        # and notifications that came while it was in a transaction, for after it.
        self.listen_hub: ListenHub | None = None
        self.held_notifications: bytearray | None = None
        # LISTENs and UNLISTENs it sent to its server (listen_fanout): the hub's part
        # is done when the transaction commits (listen_statements_committed).
        self.listen_at_commit: list[tuple[int, str]] | None = None
        # Its LISTEN runs on the hub's server: what to answer around the statement's
        # CommandComplete once it has (`_pending` holds what the client sent after).
        self._listening: tuple[bytes, bytes] | None = None
        self._startup_buf = bytearray()
        # The encryption requests answered so far (_SSL_ASKED, _GSS_ASKED): each may
        # come once, as in PostgreSQL.
        self._negotiated = 0
        # Its TLS session's channel binding data (net/tls.py tls_end_point), if any.
        self._tls_end_point: bytes | None = None
        # Set from the S answered to its SSLRequest until its TLS hello has come whole:
        # the context the handshake will use, and the backstop that cuts a client
        # sending none (as the TLS layer cuts a handshake, at tls_handshake_timeout).
        self._hello_context: ssl.SSLContext | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._inbox = MessageBuffer()
        # The login coroutine, driven by this connection (see net/suspend.py).
        self._login_coro: Coroutine[Any, Any, None] | None = None
        self._login_wait = _NOT_WAITING
        self._pending = b""  # bytes of the next transaction, before a server is attached
        self._discarding = 0  # bytes still to come of a dropped message (_DROPPED_BETWEEN)
        self._check_query_next = False
        # The pool's check query is running for this client; `_pending` holds what
        # follows it, whose replies must come after the check's.
        self._checking = False
        # Its server is asked whether the session holds advisory locks; `_pending`
        # holds what the client sent since, not yet forwarded.
        self._checking_locks = False
        self._param_mark = 0
        self.rewriter: BatchRewriter | None = None
        # Settings SET on each server this client uses: its startup parameters that
        # are not synced (statement_timeout, search_path, ...), and the reported
        # settings it changed since (_FOLLOWED_SETTINGS).
        self.extra_parameters: dict[str, str] = {}
        # The startup part of them: what a RESET on a server it keeps goes back to.
        self.startup_settings: dict[str, str] = {}
        self._fingerprint: tuple[object, ...] | None = None
        self._fingerprint_synced: tuple[str, ...] = ()
        # Synced parameters still holding the client's own spelling from its startup
        # packet ("ISO"), not yet the server's ("ISO, MDY"): see settle_parameter.
        self._raw_parameters: tuple[str, ...] = ()
        self._memory_accounted = 0
        # Where the client's bytes go; None while relaying (see data_received).
        self._on_data: Callable[[bytes], None] | None = self._startup_data
        # AuthenticationSASLFinal, held back to go out with what follows it in one write,
        # as PostgreSQL sends it.
        self._auth_final = b""
        # A session an upgrade's old process handed over, until the loop adopts it.
        self._restoring: SessionState | None = None
        # Armed while paused inside a large message its server relays (see
        # _watch_stall): the bytes it had yet to take at the last check, and since when
        # it has taken none.
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_untaken = 0
        self._stall_since = 0.0

    # ---- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._writer = SocketWriter(self.transport)
        restoring = self._restoring
        if restoring is not None:
            self._resume(restoring)
            return
        clients = self.pooler.clients
        client_id = self.pooler.ids.next_client_id()
        while client_id in clients:  # held long, or brought over by an upgrade
            client_id = self.pooler.ids.next_client_id()
        self.client_id = client_id
        self.secret = self.pooler.ids.cancel_secret()
        peer = transport.get_extra_info("peername")
        if not self.unix and isinstance(peer, tuple):
            self.address, self.port = str(peer[0]), int(peer[1])
            if self.pooler.tune_each_client:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    self.pooler.tune_client_socket(sock)
        elif self.unix:
            self.pooler.tune_unix_client_socket(transport.get_extra_info("socket"))
        self.over_limit = not self.pooler.register_client(self)
        # Until it has logged in, the pooler's sweep cuts it at client_login_timeout.
        self.pooler.logging_in[self] = _now()

    def data_received(self, data: bytes) -> None:
        # Relaying, the handler is called by name: a native call in the compiled build,
        # where calling a bound method kept in `_on_data` is a generic one.
        handler = self._on_data
        if handler is None:
            self._relay_data(data)
        else:
            handler(data)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        if was == CLOSED:
            return  # a failed TLS handshake reports it twice: ours, then the TLS layer's
        self.state = CLOSED
        if self._hello_context is not None:
            # Gone between the S and its TLS hello: a handshake it gave up.
            self._stop_waiting_for_hello()
            logger.info("client %s: TLS handshake failed: closed before its hello", self.name)
            self.pooler.login_failures += 1
        if self._writer is not None:
            self._writer.stop()  # the transport closes the descriptor once this returns
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        self.pooler.logging_in.pop(self, None)
        self._on_data = _ignore
        if self._login_wait == _WAIT_MESSAGE:
            # Its next message will never come: let the login see the client gone.
            self.loop.call_soon(self._wake_login)
        elif self._login_wait == _WAIT_SERVER:
            # Nobody is left to log in: leave the pool's queue now, not when a server
            # comes or query_wait_timeout passes.
            self.loop.call_soon(self._abandon_server_wait)
        if was == WAITING and self.pool is not None:
            self.pool.cancel_wait(self)
        if self.listen_hub is not None:
            self.listen_hub.leave(self)
        server = self.server
        if server is not None:
            self.server = None
            server.client_gone()
        self._account_memory(0)
        self.pooler.unregister_client(self)
        if was >= IDLE and self.pooler.config.general.log_client_disconnections:
            logger.info(
                "client %s disconnected (%s@%s) after %.1fs",
                self.name,
                self.user,
                self.database,
                time.monotonic() - self.connected_at,
            )

    def pause_writing(self) -> None:
        # The client reads slower than its server writes: stop reading the server.
        self.write_paused = True
        server = self.server
        if server is not None:
            server.pause_relay()
            if server.scanner.need:
                self._watch_stall(server)  # paused inside a message
        else:
            # What is answered here without a server (the cached check query, a local
            # DEALLOCATE) would pile up unsent: read no more requests until it has gone.
            self.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        server = self.server
        if server is not None:
            server.resume_relay()
            if server.writing_paused:
                return  # still paused for the server's sake (ServerConnection.pause_writing)
        self.resume_reading()

    def _watch_stall(self, server: ServerConnection) -> None:
        """Paused in the middle of a message its server is relaying: when the message
        has at least message_size_to_be_stream bytes, the client may go
        proxy_copy_data_timeout without taking any of it, then it and the server are
        closed. What is timed is a stall, not the whole message: a slow reader that
        keeps taking bytes is never cut."""
        general = self.pooler.config.general
        if (
            general.proxy_copy_data_timeout <= 0
            or server.scanner.passing_size < general.message_size_to_be_stream
            or self._stall_timer is not None
            or self.transport is None
        ):
            return
        self._stall_untaken = untaken_bytes(self.transport)
        self._stall_since = _now()
        delay = general.proxy_copy_data_timeout / (1000 * _STALL_CHECKS)
        self._stall_timer = self.loop.call_later(delay, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_timer = None
        server = self.server
        if (
            server is None
            or not self.write_paused
            or not server.scanner.need
            or self.state == CLOSED
            or self.transport is None
        ):
            return
        timeout = self.pooler.config.general.proxy_copy_data_timeout  # a reload's too
        if timeout <= 0:
            return
        now = _now()
        untaken = untaken_bytes(self.transport)
        if untaken < self._stall_untaken:
            self._stall_since = now  # it took some: a new stall starts from here
        self._stall_untaken = untaken
        if now - self._stall_since >= timeout / 1000:
            self._cut_off_stalled(server, timeout)
            return
        delay = timeout / (1000 * _STALL_CHECKS)
        self._stall_timer = self.loop.call_later(delay, self._check_stall)

    def _cut_off_stalled(self, server: ServerConnection, timeout: int) -> None:
        """The client took nothing of a large message for proxy_copy_data_timeout. It is
        inside the message, so no error can reach it: its connection is dropped, with
        what the pooler still holds for it, and the server, which can finish the
        message for no one, is closed."""
        logger.warning(
            "client %s (pool %s): took nothing of a %d-byte message from server %d for %s"
            " (proxy_copy_data_timeout); closing the client and the server",
            self.name,
            server.pool.name,
            server.scanner.passing_size,
            server.server_id,
            format_duration_ms(timeout),
        )
        self.server = None
        server.abandon("its client stopped reading inside a message (proxy_copy_data_timeout)")
        if self._writer is not None:
            self._writer.stop()
        assert self.transport is not None
        self.transport.abort()  # close() would wait for the buffer to drain

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if (
            self.reading_paused
            and self.transport is not None
            and self.state != WAITING
            and not (self.write_paused and self.server is None)  # see pause_writing
        ):
            self.reading_paused = False
            self.transport.resume_reading()

    # ---- output -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        writer = self._writer
        if len(data) and writer is not None and self.state != CLOSED:
            self.bytes_sent += len(data)
            writer.write(data)

    def fail(self, code: str, message: str, *, detail: str | None = None) -> None:
        """Send a FATAL error and close: the session cannot go on (once: a client
        already being closed, by KILL say, is not told twice). A client inside a
        message its server is sending is closed without it (_close_inside_a_message)."""
        if self.state == CLOSED or self.transport is None or self.transport.is_closing():
            return
        server = self.server
        if server is not None and server.scanner.need:
            self._close_inside_a_message(code, message)
            return
        logger.info("client %s: %s (%s)", self.name, message, code)
        if self.state < IDLE:
            self.pooler.login_failures += 1
        error = messages.error_response("FATAL", code, message, detail=detail)
        if self._writer is not None:
            self._writer.write(self._take_auth_final() + error)
        self.close()

    def _take_auth_final(self) -> bytes:
        """The held-back AuthenticationSASLFinal (b"" if none), to lead the next write."""
        final, self._auth_final = self._auth_final, b""
        return final

    def close(self) -> None:
        if self._hello_context is not None:
            self._stop_waiting_for_hello()  # closed by the pooler, which says why itself
        if self.transport is not None and not self.transport.is_closing():
            if self._writer is not None:
                self._writer.stop()  # what comes later is the closing transport's to drop
            self.transport.close()

    def _close_after_cancel(self, forwarded: asyncio.Task[None]) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"#c{self.client_id}"

    @property
    def transport_closed(self) -> bool:
        return self.state == CLOSED or self.transport is None or self.transport.is_closing()

    @property
    def state_name(self) -> str:
        return _STATE_NAMES[self.state]

    # ---- startup ------------------------------------------------------------

    def _startup_data(self, data: bytes) -> None:
        buf = self._startup_buf
        buf += data
        if buf and buf[0] == _TLS_HANDSHAKE_RECORD and not self.tls:
            self._direct_tls(buf)
            return
        while len(buf) >= 4:
            try:
                length = startup_packet_length(buf)
            except StartupError as exc:
                self.fail(exc.code, exc.message)
                return
            if len(buf) < length:
                return
            packet = bytes(buf[:length])
            del buf[:length]
            try:
                request = parse_startup_packet(packet)
            except StartupError as exc:
                self.fail(exc.code, exc.message)
                return
            # Each kind tested alone: compiled, `isinstance(x, A | B)` builds the union
            # object on every call, and the login's own message is by far the most common.
            if isinstance(request, StartupMessage):
                self._start_login(request, buf)
                return
            if isinstance(request, CancelRequest):
                if self.tls:
                    self.pooler.tls_sessions -= 1  # counted as a cancel instead
                forwarded = self.pooler.handle_cancel(request.pid, request.secret)
                if forwarded is None:
                    self.close()
                else:  # closed once the cancel reached its target (see handle_cancel)
                    forwarded.add_done_callback(self._close_after_cancel)
                return
            # An SSLRequest or a GSSEncRequest.
            ssl_request = isinstance(request, SSLRequest)
            asked = _SSL_ASKED if ssl_request else _GSS_ASKED
            if self._negotiated & asked or self.tls:
                # PostgreSQL takes each request once (none inside TLS) and reads a second
                # one as a startup packet of an unknown protocol version: so do we, rather
                # than answer N for as long as the client asks.
                code = codes.SSL_REQUEST_CODE if ssl_request else codes.GSSENC_REQUEST_CODE
                self.fail(
                    sqlstate.FEATURE_NOT_SUPPORTED,
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                    "server supports 3.0",
                )
                return
            self._negotiated |= asked
            if buf:
                # Bytes after the request would be read as if they came through the
                # encrypted channel: refuse, in PostgreSQL's words (CVE-2021-23214).
                kind = "SSL request" if ssl_request else "GSSAPI encryption request"
                self.fail(
                    sqlstate.PROTOCOL_VIOLATION,
                    f"received unencrypted data after {kind}",
                    detail=_INJECTION_DETAIL,
                )
                return
            context = self.pooler.tls_context
            if (
                isinstance(request, SSLRequest)
                and context is not None
                and not self.unix
                and not self.tls
            ):
                self._start_tls(context)
                return
            self.write(messages.SSL_REFUSED)

    def _start_login(self, request: StartupMessage, buf: bytearray) -> None:
        """The client's StartupMessage has come: the login begins (`buf` holds what the
        client sent after it)."""
        if self.pooler.tls_required and not self.tls and not self.unix:
            self.fail(
                sqlstate.INVALID_AUTHORIZATION,
                "Connection without SSL is not allowed by tls_mode.",
            )
            return
        self.state = LOGIN
        rest = bytes(buf)
        buf.clear()
        self._inbox.feed(rest)
        self._on_data = self._login_data
        self._login_coro = self._login(request)
        self._resume_login(None)

    def _direct_tls(self, buf: bytearray) -> None:
        """A TLS hello where a startup packet belongs (a length, whose first byte is 0):
        direct TLS (PostgreSQL 17's sslnegotiation=direct), without an SSLRequest."""
        context = self.pooler.tls_context
        if context is None or self.unix:
            logger.info("client %s: direct TLS, but TLS is not offered here", self.name)
            self.pooler.login_failures += 1
            self.close()
            return
        self._take_hello(context, direct=True)

    def _hello_after_ssl_request(self, data: bytes) -> None:
        self._startup_buf += data
        context = self._hello_context
        if context is not None:
            self._take_hello(context, direct=False)

    def _take_hello(self, context: ssl.SSLContext, *, direct: bool) -> None:
        """Start the handshake once the client's TLS hello is in `_startup_buf`, unless
        its ALPN offer leaves out postgresql."""
        buf = self._startup_buf
        hello = read_client_hello(buf)
        if hello is None:
            return
        if direct and len(buf) > hello.end:
            # The client sends nothing more before the server's hello.
            logger.info("client %s: direct TLS with data after its hello", self.name)
            self.pooler.login_failures += 1
            self.close()
            return
        if hello.alpn is not None and _ALPN_POSTGRESQL not in hello.alpn:
            # As PostgreSQL, with or without an SSLRequest: a client that offers ALPN
            # means another protocol if postgresql is not among its offers.
            offered = ", ".join(repr(name.decode("ascii", "replace")) for name in hello.alpn[:8])
            logger.info(
                "client %s: TLS handshake refused: the client's ALPN offer (%s) lacks "
                "postgresql; sent a no_application_protocol alert",
                self.name,
                offered,
            )
            self.write(NO_APPLICATION_PROTOCOL_ALERT)
            self.pooler.login_failures += 1
            self.close()
            return
        self._stop_waiting_for_hello()
        first_bytes = bytes(buf)
        buf.clear()
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        self._on_data = self._startup_during_handshake
        self.pooler.track(
            self.loop.create_task(self._tls_handshake(transport, context, first_bytes, direct))
        )

    def _startup_during_handshake(self, data: bytes) -> None:
        # Decrypted data that the TLS layer hands over as soon as the handshake is
        # through, before _tls_handshake resumes: the client's startup packet may come
        # in the same flight as its last handshake message.
        self._startup_buf += data

    def _start_tls(self, context: ssl.SSLContext) -> None:
        """Answer S; the client's TLS hello comes next, and the startup packet through
        the TLS session."""
        self.write(messages.SSL_ACCEPTED)
        self._hello_context = context
        self._hello_timer = self.loop.call_later(
            self.pooler.tls_handshake_timeout, self._no_hello_in_time
        )
        self._on_data = self._hello_after_ssl_request

    def _no_hello_in_time(self) -> None:
        if self._hello_context is not None:
            logger.info("client %s: TLS handshake failed: no hello in time", self.name)
            self.pooler.login_failures += 1
            self.close()

    def _stop_waiting_for_hello(self) -> None:
        self._hello_context = None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    async def _tls_handshake(
        self, transport: asyncio.Transport, context: ssl.SSLContext, hello: bytes, direct: bool
    ) -> None:
        """`hello`: the client's TLS hello, already read; `direct`: without an SSLRequest."""
        limiter = self.pooler.tls_limiter
        if limiter is not None:
            delay = limiter.delay(_now())
            if delay > 0:
                logger.debug(
                    "client %s: TLS handshake delayed %.1f ms by tls_rate_limit_per_second",
                    self.name,
                    delay * 1000,
                )
                await asyncio.sleep(delay)
                if self.state == CLOSED:  # gone, or cut by client_login_timeout
                    return
        if self._writer is not None:
            self._writer.stop()  # the TLS layer writes to the socket from here on
        try:
            opening = self.loop.start_tls(
                transport,
                TlsReader(self),
                context,
                server_side=True,
                ssl_handshake_timeout=self.pooler.tls_handshake_timeout,
            )
            tls_transport = await start_tls_with_hello(opening, transport, hello)
        except OSError as exc:  # ssl.SSLError, TimeoutError and resets included
            logger.info("client %s: TLS handshake failed: %s", self.name, exc)
            self.pooler.login_failures += 1
            if not transport.is_closing():
                transport.abort()
            # The TLS layer may not report a connection it never finished.
            self.connection_lost(None)
            return
        if tls_transport is None or tls_transport.is_closing() or self.state == CLOSED:
            # Closed during the handshake (by the login timeout, say): the TLS layer
            # hands back a dead transport and reports nothing to us.
            self.connection_lost(None)
            return
        self.transport = tls_transport
        self._writer = SocketWriter(tls_transport)
        if direct and not negotiated_postgresql(tls_transport):
            # As PostgreSQL: direct TLS needs ALPN, so that a TLS connection meant for
            # another protocol is never taken for ours.
            logger.info("client %s: direct TLS without the postgresql ALPN protocol", self.name)
            self.pooler.login_failures += 1
            self.close()
            return
        self.tls = True
        self._tls_end_point = tls_end_point(context)
        self.pooler.tls_sessions += 1
        self._on_data = self._startup_data
        if self._startup_buf:
            self._startup_data(b"")

    def login_timed_out(self) -> None:
        """client_login_timeout passed before the login completed."""
        if self.state == STARTUP:
            # No startup packet yet, so no protocol to answer in: just hang up.
            logger.info("client %s: no startup packet within client_login_timeout", self.name)
            self.pooler.login_failures += 1
            self.close()
        elif self.state == LOGIN:
            self.fail(sqlstate.QUERY_CANCELED, "canceling authentication due to timeout")

    def _logged_in(self) -> None:
        """The greeting is out: the client is idle and no longer timed as a login."""
        self.state = IDLE
        self.pooler.logging_in.pop(self, None)
        self.resume_reading()  # if paused by _login_data: the relay or console reads now

    # ---- the login coroutine, driven without a task --------------------------

    def _resume_login(self, value: object) -> None:
        """Run the login until it waits again (or ends); `value` is what it waited for."""
        coro = self._login_coro
        if coro is None:
            return
        self._login_wait = _NOT_WAITING
        try:
            finished = resume(coro, value)
        except BaseException:
            self._login_coro = None
            raise
        if finished:
            # Thousands of idle clients: don't keep a finished coroutine each.
            self._login_coro = None

    def _login_data(self, data: bytes) -> None:
        inbox = self._inbox
        inbox.feed(data)
        if len(inbox) > _LOGIN_BACKLOG:
            # Sent ahead of the login (or while it waits for a lookup, a PAM check or
            # the pool's first server): no more until the login has read it.
            self.pause_reading()
        self._wake_login()

    def _abandon_server_wait(self) -> None:
        """End a login waiting for a server (see _fetch_server_parameters), unless the
        server came first."""
        if self._login_wait == _WAIT_SERVER:
            self._resume_login(None)

    def _wake_login(self) -> None:
        """Resume a login waiting for the client's next message (or for its end)."""
        if self._login_wait == _WAIT_MESSAGE:
            self._resume_login(None)

    async def _next_message(self) -> tuple[int, bytes]:
        """The client's next whole message during the login."""
        while True:
            msg = self._inbox.next_message(_LOGIN_MESSAGE_MAX)
            if msg is not None:
                return msg
            if self.state == CLOSED:
                raise ConnectionError("client went away")
            self.resume_reading()  # paused by _login_data: the login reads again
            self._login_wait = _WAIT_MESSAGE
            await SUSPEND

    async def _login(self, startup: StartupMessage) -> None:
        try:
            await self._login_steps(startup)
        # Each handler's name is its own: mypyc gives a name one type per function, the
        # type of its first binding (tests/unit/test_compiled_rules.py).
        except StartupError as refused:
            self.fail(refused.code, refused.message)
        except ProtocolError as malformed:
            self.fail(sqlstate.PROTOCOL_VIOLATION, f"invalid message during login: {malformed}")
        except ConnectionError:
            self.close()
        except Exception:
            logger.exception("client %s: login failed unexpectedly", self.name)
            self.fail(sqlstate.INTERNAL_ERROR, "internal error during login")

    async def _login_steps(self, startup: StartupMessage) -> None:
        if startup.needs_negotiation:
            self.write(messages.negotiate_protocol_version(0, startup.protocol_options))
        params = startup.parameters
        user = params.get("user", "")
        if not user:
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            )
        self.user = user
        self.database = database = params.get("database") or user
        self.application_name = params.get("application_name", "")
        if "replication" in params and params["replication"].lower() not in (
            "false",
            "off",
            "0",
            "no",
        ):
            raise StartupError(
                sqlstate.FEATURE_NOT_SUPPORTED, "replication connections are not supported"
            )
        if self.pooler.shutting_down:
            raise StartupError(sqlstate.CANNOT_CONNECT_NOW, "the pooler is shutting down")
        if self.over_limit:
            raise StartupError(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
        # The pooler's lookups read here, not through its pool_entry: its methods run
        # interpreted, a frame each per login.
        if database in _ADMIN_DATABASES:
            await self._admin_login(database, user)
            return
        decision = self.pooler.decide_auth(
            database, user, address=self.address, unix=self.unix, ssl=self.tls
        )
        entry = self.pooler.entries.get((database, user))
        if decision.method == ClientAuth.REJECT and decision.by_hba:
            # PostgreSQL's words; the line that refused is for the log only, as there.
            logger.info("client %s: %s", self.name, decision.reason)
            refused = (
                "no pg_hba.conf entry"
                if decision.reason == NO_HBA_ENTRY
                else "pg_hba.conf rejects connection"
            )
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION,
                f'{refused} for host "{self.address or "[local]"}", user "{user}", '
                f'database "{database}", {"SSL encryption" if self.tls else "no encryption"}',
            )
        talos = self.pooler.talos if user == TALOS_USER else None
        talos_login = talos is not None
        if talos is not None:
            entry = await self._talos_login(talos, database)
        elif entry is None and self.pooler.looks_up_users(database):
            entry = await self._looked_up_login(database, user)
        else:
            if entry is None and decision.method == ClientAuth.TRUST:
                raise StartupError(
                    sqlstate.INVALID_CATALOG_NAME,
                    f'no pool for database "{database}" and user "{user}"',
                )
            if entry is None or decision.method == ClientAuth.REJECT:
                if decision.reason and entry is not None:
                    logger.info("client %s: %s", self.name, decision.reason)
                # Ask for a password anyway, as PostgreSQL does, so a refusal doesn't
                # tell which user names exist.
                await self._refuse_after_password(decision.mock)
            if decision.method == ClientAuth.MD5:
                await self._auth_md5(entry.password)
            elif decision.method == ClientAuth.SCRAM:
                await self._auth_scram(entry)
            elif decision.method == ClientAuth.JWT:
                await self._auth_token(entry)
            elif decision.method == ClientAuth.PAM:
                await self._auth_pam(entry)
        self.entry = entry
        self.pool = pool = entry.pool
        if pool.closed:
            # Retired by a reload (or an idle looked-up user's pool dropped) while this
            # login exchanged its password: queued there, it would only time out.
            raise StartupError(
                sqlstate.ADMIN_SHUTDOWN, "the pool closed during the login; reconnect"
            )
        if pool.server_parameters is None:
            await self._fetch_server_parameters(pool)
        # Most logins to a pool send the same settings: worked out once, then copied.
        encoded = b"" if talos_login else startup.encoded_parameters
        worked_out = pool.login_parameters(encoded)
        if worked_out is None:
            settings = dict(params)
            settings.update(parse_options(params.get("options", "")))
            if talos_login:
                settings["application_name"] = self.application_name  # the token's clientId
            worked_out = self._work_out_startup_parameters(settings, pool)
            pool.remember_login_parameters(encoded, worked_out)
        self.parameters = worked_out.reported.copy()
        self.extra_parameters = worked_out.extra.copy()
        self.startup_settings = worked_out.extra  # shared with the pool's memo: never changed
        self._raw_parameters = worked_out.raw
        if worked_out.application_name is not None:
            self.application_name = worked_out.application_name
        if pool.settings.prepared_statements:
            context = worked_out.planning_context
            if context is None:
                context = worked_out.planning_context = self._planning_context()
            self.rewriter = BatchRewriter(pool.statements, context)
            self.rewriter.client_stream = self.frontend
            self.frontend.rewriter = self.rewriter
        self.frontend.watch_texts = not pool.settings.session_mode
        greeting = (
            self._take_auth_final(),
            messages.AUTH_OK,
            worked_out.statuses,
            messages.backend_key_data(self.client_id, self.secret),
            messages.READY_IDLE,
        )
        if self.state == CLOSED:
            return
        self.write(b"".join(greeting))
        self._logged_in()
        if self.pooler.config.general.log_client_connections:
            logger.info(
                "client %s connected (%s@%s) from %s",
                self.name,
                self.user,  # for a Talos login, the user its token picked
                database,
                self.address or "unix socket",
            )
        rest = self._inbox.take_rest()
        self._on_data = None  # relaying
        if rest:
            self._relay_data(rest)

    async def _admin_login(self, database: str, user: str) -> None:
        """Log in to the admin console: admin credentials, pg_hba applies too."""
        general = self.pooler.config.general
        address = None if self.unix else peer_address(self.address)
        method = self.pooler.admin_auth_method(
            database, user, address=address, unix=self.unix, ssl=self.tls
        )
        if method is None:
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION,
                f'no pg_hba entry matches the admin console for user "{user}"',
            )
        if user != general.admin_username:
            await self._refuse_after_password(
                ClientAuth.SCRAM if method == ClientAuth.SCRAM else ClientAuth.MD5
            )
        if method == ClientAuth.MD5:
            await self._auth_md5(md5_password_hash(general.admin_password, user))
        elif method == ClientAuth.SCRAM:
            verifier = await self._wait_for(
                verifier_of(general.admin_password), "the admin password's SCRAM verifier"
            )
            await self._auth_scram_with(verifier)
        elif method == ClientAuth.REJECT:
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION, f'pg_hba rejects the admin console for "{user}"'
            )
        from pg_doorman.admin.console import AdminConsole

        console = AdminConsole(self.pooler, self)
        if self.state == CLOSED:
            return
        self.admin = True
        self.write(
            self._take_auth_final()
            + messages.AUTH_OK
            + console.greeting()
            + messages.backend_key_data(self.client_id, self.secret)
            + messages.READY_IDLE
        )
        self._logged_in()
        rest = self._inbox.take_rest()
        self._on_data = console.data_received
        if rest:
            console.data_received(rest)

    @staticmethod
    def _work_out_startup_parameters(startup: dict[str, str], pool: Pool) -> LoginParameters:
        """Split the client's startup parameters into reported and extra ones."""
        server_parameters = pool.server_parameters
        assert server_parameters is not None
        synced = pool.synced_parameters
        canonical = pool.parameter_names()
        # What the greeting reports: the server's set, overridden by the client's wishes.
        reported = dict(server_parameters)
        extra: dict[str, str] = {}
        raw: tuple[str, ...] = ()
        for raw_name, value in startup.items():
            lowered = raw_name.lower()
            if lowered in _NOT_REPORTED:
                continue
            name = canonical.get(lowered)
            if name is not None:
                if name in synced:
                    default = server_parameters.get(name)
                    known = pool.canonical_parameter(name, value)
                    if known is not None:
                        value = known
                    elif default is not None and same_parameter(name, value, default):
                        value = default  # "utf8": reported as the server spells it
                    else:
                        raw += (name,)
                reported[name] = value
                if name not in synced and lowered != "application_name":
                    # Reported by the server but not followed by default (search_path
                    # on PostgreSQL 18): apply it like any other startup setting.
                    extra[name] = value
            elif lowered == "application_name":
                reported["application_name"] = value
            else:
                if not _GUC_NAME.fullmatch(raw_name):
                    raise StartupError(
                        sqlstate.PROTOCOL_VIOLATION,
                        f"invalid configuration parameter name {raw_name!r}",
                    )
                extra[raw_name] = value
        # Shown to this client when not synced, but the backend keeps the pool's name.
        application_name = (
            None if "application_name" in synced else startup.get("application_name", "")
        )
        return LoginParameters(
            reported, extra, raw, application_name, messages.parameter_statuses(reported)
        )

    def _planning_context(self) -> bytes:
        """Settings that change what a statement text means (search_path above all):
        clients share a server-side statement only when these agree."""
        extra = self.extra_parameters
        parameters = self.parameters
        values: list[str | None] = []
        for name in _PLANNING_ORDER:
            value = extra.get(name)
            values.append(parameters.get(name) if value is None else value)
        # Most clients of a pool share their context: it is built once per distinct one.
        key = tuple(values)
        context = _PLANNING_CONTEXTS.get(key)
        if context is None:
            context = b"\x00".join(
                [
                    f"{name}={value}".encode()
                    for name, value in zip(_PLANNING_ORDER, key, strict=True)
                    if value is not None
                ]
            )
            if len(context) <= _PLANNING_CONTEXT_REMEMBERED:
                remember(_PLANNING_CONTEXTS, key, context, _PLANNING_CONTEXTS_MAX)
        return context

    async def _talos_login(self, talos: Talos, database: str) -> PoolEntry:
        """Log in as `talos` with a token: the session runs as the pool user the token
        picks (pg_hba has let `talos` through, and must let that user through too)."""
        body = await self._password_response(messages.auth_request(codes.AUTH_CLEARTEXT))
        pooler = self.pooler
        try:
            token = talos.read(body.removesuffix(b"\x00").decode("utf-8"))
        except (UnicodeDecodeError, JwtError) as exc:
            logger.info("client %s: talos token refused: %s", self.name, exc)
            raise self._password_failed() from None
        user, route = talos.pool_user(
            token, lambda name: pooler.pool_entry(database, name) is not None
        )
        entry = pooler.pool_entry(database, user)
        if entry is None:
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION,
                f'talos token with role "{token.role}": database "{database}" has no user "{user}"',
            )
        if not pooler.hba_permits(
            database, user, address=self.address, unix=self.unix, ssl=self.tls
        ):
            raise StartupError(
                sqlstate.INVALID_AUTHORIZATION,
                f'pg_hba rejects user "{user}" (talos) for host "{self.address or "local"}", '
                f'database "{database}"',
            )
        logger.info(
            "client %s: talos client %r with role %s runs as %s@%s (%s)",
            self.name,
            token.client_id,
            token.role,
            user,
            database,
            route,
        )
        self.user = user
        self.application_name = session_application_name(token.client_id)
        return entry

    async def _looked_up_login(self, database: str, user: str) -> PoolEntry:
        """Log in a user the pool's auth_query looks up (pg_hba has let it through).
        The user's pool is made only once the login has succeeded: a name that merely
        exists in PostgreSQL opens nothing."""
        pooler = self.pooler
        found = await self._wait_for(pooler.looked_up_user(database, user), "the user lookup")
        ok = False
        try:
            if found is None:
                # No such user: refused like a wrong password, after the exchange
                # PostgreSQL's mock authentication would have.
                await self._refuse_after_password(ClientAuth.SCRAM)
            decision = pooler.decide_looked_up_auth(
                database, user, found.password, address=self.address, unix=self.unix, ssl=self.tls
            )
            client_key: bytes | None = None
            if decision.method == ClientAuth.REJECT:
                if decision.reason:
                    logger.info("client %s: %s", self.name, decision.reason)
                await self._refuse_after_password(decision.mock)
            elif decision.method == ClientAuth.MD5:
                salt, response = await self._md5_exchange()
                if not verify_md5_response(found.password, salt, response):
                    # The password may have changed in PostgreSQL since it was cached:
                    # the same answer is checked against a fresh copy.
                    fresh = await self._wait_for(
                        pooler.looked_up_again(database, user), "the user lookup"
                    )
                    if fresh is None or not verify_md5_response(fresh.password, salt, response):
                        raise self._password_failed()
                    found = fresh
            elif decision.method == ClientAuth.SCRAM:
                assert found.scram_verifier is not None
                try:
                    client_key = await self._auth_scram_with(found.scram_verifier)
                except StartupError as failed:
                    if failed.code == sqlstate.INVALID_PASSWORD:
                        # A SCRAM proof can't be checked again against a new verifier;
                        # the fresh copy serves the client's next attempt.
                        await self._wait_for(
                            pooler.looked_up_again(database, user), "the user lookup"
                        )
                    raise
            elif decision.method != ClientAuth.TRUST:
                await self._auth_md5(None)  # nothing else is looked up
            entry = pooler.admit_looked_up(database, user, found)
            if client_key is not None:
                # Passthrough: the ClientKey lets the pooler log in to the backend as
                # this user.
                entry.credentials.scram_client_key = client_key
            ok = True
        finally:
            pooler.count_looked_up_login(database, ok)
        return entry

    async def _wait_for(self, work: Coroutine[Any, Any, _T], what: str) -> _T:
        """Run `work` (an auth_query lookup, a PAM check) as a task and suspend the
        login until it ends. It ends on its own even if this client goes away
        (connect_timeout bounds a lookup)."""
        task = self.loop.create_task(work)
        self._login_wait = _WAIT_TASK
        task.add_done_callback(self._task_done)
        await SUSPEND
        if task.cancelled():  # a reload removed the lookup, or the pooler is stopping
            raise StartupError(sqlstate.CANNOT_CONNECT_NOW, f"{what} was stopped")
        return task.result()

    async def _auth_pam(self, entry: PoolEntry) -> None:
        """A cleartext password, checked by the user's PAM service in a PAM thread
        (the login waits as for a lookup)."""
        body = await self._password_response(messages.auth_request(codes.AUTH_CLEARTEXT))
        secret = body.removesuffix(b"\x00")
        try:
            password = secret.decode("utf-8")
        except UnicodeDecodeError:
            password = ""
        if not password or "\x00" in password:
            logger.info("client %s: PAM: an empty or undecodable password", self.name)
            raise self._password_failed()
        refusal = await self._wait_for(
            self.pooler.pam_refusal(entry, password, self.address), "the PAM check"
        )
        if refusal is not None:
            logger.info("client %s: PAM refused user %r: %s", self.name, self.user, refusal)
            raise self._password_failed()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._login_wait == _WAIT_TASK:
            self._resume_login(None)
        elif not task.cancelled():
            task.exception()  # the login is gone: its error is nobody's to raise

    def _password_failed(self) -> StartupError:
        return StartupError(
            sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"'
        )

    async def _md5_exchange(self) -> tuple[bytes, bytes]:
        """Send an MD5 challenge; returns its salt and the client's answer."""
        salt = os.urandom(4)
        body = await self._password_response(messages.auth_md5(salt))
        return salt, body

    async def _password_response(self, request: bytes) -> bytes:
        """Send the authentication `request` and read the client's PasswordMessage: one
        C string and nothing else, as PostgreSQL checks (strlen + 1 == length) before
        it looks at the password."""
        self.write(request)
        msg_type, body = await self._next_message()
        if msg_type != codes.PASSWORD_MESSAGE:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "expected a password response")
        if body.find(b"\x00") != len(body) - 1:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "invalid password packet size")
        return body

    async def _refuse_after_password(self, mock: ClientAuth) -> NoReturn:
        """Ask for a password the way a real user would be asked, then refuse it
        (28P01): PostgreSQL's mock authentication. A mock SCRAM exchange offers the
        same salt at every attempt for one user name (PostgreSQL's scram_mock_salt),
        derived from a random secret all the pooler's processes share; its keys are
        random, and it refuses even a proof that happened to match them."""
        if mock != ClientAuth.SCRAM:
            await self._md5_exchange()
            raise self._password_failed()
        verifier = ScramVerifier(
            DEFAULT_ITERATIONS,
            mock_salt(self.user, DEFAULT_SALT_LENGTH),
            os.urandom(KEY_LENGTH),
            os.urandom(KEY_LENGTH),
        )
        await self._auth_scram_with(verifier)
        raise self._password_failed()

    async def _auth_md5(self, stored: str | None) -> None:
        """MD5 challenge; with no stored hash it always ends in a refusal."""
        salt, response = await self._md5_exchange()
        if stored is None or not verify_md5_response(stored, salt, response):
            raise self._password_failed()

    async def _auth_token(self, entry: PoolEntry) -> None:
        """A JWT sent as a cleartext password, checked with the user's public key."""
        body = await self._password_response(messages.auth_request(codes.AUTH_CLEARTEXT))
        verifier = entry.token_verifier
        if verifier is None:
            reason: str | None = "no key to check tokens with"
        else:
            reason = verifier.refusal(body, self.user)
        if reason is not None:
            logger.info("client %s: token refused: %s", self.name, reason)
            raise self._password_failed()

    async def _auth_scram(self, entry: PoolEntry) -> None:
        verifier = entry.scram_verifier
        assert verifier is not None
        client_key = await self._auth_scram_with(verifier)
        # Passthrough: the ClientKey lets the pooler log in to the backend as this user.
        entry.credentials.scram_client_key = client_key

    async def _auth_scram_with(self, verifier: ScramVerifier) -> bytes:
        """SCRAM-SHA-256 exchange; returns the client's recovered ClientKey."""
        end_point = self._tls_end_point
        session = ScramServerSession(verifier, channel_binding=end_point)
        self.write(_AUTH_SASL if end_point is None else _AUTH_SASL_WITH_BINDING)
        msg_type, body = await self._next_message()
        if msg_type != codes.PASSWORD_MESSAGE:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "expected a SASL response")
        try:
            mechanism, data = messages.parse_sasl_initial_response(body)
            self.write(messages.auth_sasl_continue(session.handle_client_first(mechanism, data)))
            msg_type, body = await self._next_message()
            if msg_type != codes.PASSWORD_MESSAGE:
                raise StartupError(sqlstate.PROTOCOL_VIOLATION, "expected a SASL response")
            final = session.handle_client_final(body)
        except AuthenticationFailed:
            raise self._password_failed() from None
        except ScramError as exc:
            raise StartupError(
                sqlstate.PROTOCOL_VIOLATION, f"invalid SCRAM exchange: {exc}"
            ) from exc
        self._auth_final = messages.auth_sasl_final(final)
        return session.client_key

    async def _fetch_server_parameters(self, pool: Pool) -> None:
        """The first login of a pool needs a backend to learn its ParameterStatus set."""
        server = pool.acquire(self, _now())
        if server is None:
            self._login_wait = _WAIT_SERVER
            try:
                outcome = await SUSPEND  # on_server or on_acquire_error resumes it
            finally:
                if self._login_wait == _WAIT_SERVER:  # abandoned: leave the queue
                    self._login_wait = _NOT_WAITING
                    pool.cancel_wait(self)
            if outcome is None:  # the client went away (_abandon_server_wait)
                pool.cancel_wait(self)
                raise ConnectionError("client went away")
            if isinstance(outcome, AcquireError):
                raise StartupError(outcome.code, outcome.message)
            server = outcome
        pool.server_parameters = dict(server.parameters)
        server.finish(_now())

    # ---- relay --------------------------------------------------------------

    def _relay_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        server = self.server
        if server is not None:
            if self.frontend.pending_ready == 0:
                server.query_started = _now()  # a new request starts
            if self.listen_hub is not None:
                self._note_listen_statement(data)
            self._forward(server, data)
        elif self.state == WAITING:
            # Clients wait for answers before sending much more; only a flood is paused.
            self._pending += data
            if len(self._pending) > _WAITING_BACKLOG:
                self.pause_reading()
        else:
            self._between_transactions(data)

    def cancel_waiting(self) -> bool:
        """A CancelRequest while queued for a server, or while its server is asked
        about advisory locks: answer the first request waiting with 57014 as PostgreSQL
        would, and keep waiting for whatever follows it. False when there is nothing to
        cancel (not waiting, or the request is still incomplete)."""
        checking_locks = self._checking_locks
        if not checking_locks and (
            self.state != WAITING
            or self.pool is None
            or self._check_query_next
            or self._checking  # its first request is the check query, on a server
            or self._listening is not None  # its LISTEN runs on the listening server
        ):
            return False
        end = first_request_end(self._pending)
        if end is None:
            return False
        rest = self._pending[end:]
        if checking_locks:
            self._pending = rest  # waits for the check's answer (locks_checked)
            self.write(_CANCELED_REQUEST)
            return True
        self._pending = b""
        assert self.pool is not None
        self.pool.cancel_wait(self)
        self.state = IDLE
        self.write(_CANCELED_REQUEST)
        self.resume_reading()
        if rest:
            self._between_transactions(rest)
        return True

    def _forward(self, server: ServerConnection, data: bytes) -> None:
        if server.scanner.param_changes != self._param_mark and not server.sync_pending:
            self._follow_server_parameters(server)
        frontend = self.frontend
        if (
            server.slow_query_seconds >= 0.0
            and frontend.pending_ready == 0
            and server.request_data is None
        ):
            server.request_data = data  # a request starts: kept for its log line
        try:
            out = frontend.feed(data)
        except RefusedMessage as refused:
            # What came before it goes on, as PostgreSQL runs it; the scanner reads
            # nothing after it (terminated).
            out = refused.forward
            self.refusal = f"invalid message from client: {refused}"
        if frontend.effects_seen:
            server.scanner.cleanup_flags |= frontend.effects_seen  # see net/server.py
            frontend.effects_seen = 0
        if len(out):
            if frontend.named_parse_seen:
                frontend.named_parse_seen = False
                server.scanner.cleanup_flags |= CLEAN_PREPARE
            server.bytes_sent += len(out)
            server_writer = server.writer
            assert server_writer is not None
            server_writer.write(out)
        if (len(frontend.held) or self._memory_accounted) and not self._account_memory(
            len(frontend.held)
        ):
            return
        rewriter = self.rewriter
        if rewriter is not None and rewriter.expect.size and rewriter.only_synthetic_due():
            # Nothing is coming from the server to carry these answers: send them now.
            # (Otherwise they go out with its reply, in one write.)
            self.write(rewriter.drain())
        if frontend.terminated:
            if self.refusal is None:
                self.close()
            else:
                self._refuse_after_replies(server)
        elif server.end_deferred and frontend.pending_ready <= 0 and self.server is server:
            server.end_if_over(self)

    def _refuse_after_replies(self, server: ServerConnection) -> None:
        """A message of the client's is no message: PostgreSQL answers what came
        before it, then ends the session with a FATAL 08P01. So does the pooler: what
        came before has gone to the server, and the FATAL follows the last reply owed
        for it (net/server.py _relay), goes now if none is, or goes once the server
        has been silent for _REFUSAL_SILENCE. Nothing after the refused message is
        read; reading on shows the client leaving."""
        self._on_data = _ignore
        frontend = self.frontend
        if frontend.pending_ready <= 0 or frontend.copy_in or server.scanner.in_copy:
            # Nothing owed, or a COPY FROM STDIN whose data would have to come after
            # the refused message: the server would wait for it in vain.
            self.refuse_now()
        else:
            self._refusal_timer = self.loop.call_later(
                _REFUSAL_SILENCE, self._refuse_if_silent, server, server.bytes_received
            )

    def _refuse_if_silent(self, server: ServerConnection, received: int) -> None:
        """Still waiting for the replies owed before a refused message: refuse now if
        the server sent nothing since the last look (`received` bytes then)."""
        self._refusal_timer = None
        if self.state == CLOSED or self.refusal is None:
            return
        if self.server is not server or (
            server.bytes_received == received and not self.write_paused
        ):
            # (Paused, the client is slower than the server: not the server's silence.)
            self.refuse_now()
            return
        self._refusal_timer = self.loop.call_later(
            _REFUSAL_SILENCE, self._refuse_if_silent, server, server.bytes_received
        )

    def refused_at_copy(self, replies: bytes) -> bool:
        """A COPY FROM STDIN began for what the client sent before a refused message:
        its data would have to come after that message (not so for a copy the client
        ended before the server said it began). True when the FATAL went now, behind
        `replies`."""
        if not self.frontend.copy_in:
            return False
        self.write(replies)
        self.refuse_now()
        return True

    def refuse_now(self) -> None:
        """The FATAL for the refused message (`refusal`), behind the replies owed."""
        reason = self.refusal
        assert reason is not None
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        # The refused message's first byte, which the scanner kept so that no reply
        # ended the transaction meanwhile, is not a message the server is inside of.
        self.frontend.held.clear()
        self.fail(sqlstate.PROTOCOL_VIOLATION, reason)

    def _close_inside_a_message(self, code: str, message: str) -> None:
        """Instead of a FATAL: the client has part of a message its server is sending,
        and an error now would be read as the rest of it. It sees the connection close."""
        if self.state == CLOSED:
            return
        logger.info(
            "client %s: %s (%s), in the middle of a message to the client: closed"
            " without an error message",
            self.name,
            message,
            code,
        )
        self.close()

    def resume_after_check(self, server: ServerConnection) -> None:
        """The check the client's bytes were held for (prepared.rewriter
        BatchRewriter.checking) is answered: forward them now."""
        rewriter = self.rewriter
        assert rewriter is not None
        rewriter.resume_due = False
        if self.server is not server or self.state == CLOSED:
            rewriter.rerun_bytes = b""
            return
        ahead = rewriter.take_resume_bytes()
        if len(ahead):
            server.bytes_sent += len(ahead)
            server_writer = server.writer
            assert server_writer is not None
            server_writer.write(ahead)
        data = self.frontend.resume()
        rerun = rewriter.rerun_bytes
        if len(rerun):
            # A batch refused for a schema change runs again (rewriter _rerun). Its
            # Sync (if it has come) was counted then; the ReadyForQuery then is not.
            rewriter.rerun_bytes = b""
            self.frontend.pending_ready -= rewriter.rerun_syncs
            data = rerun + data
        if len(data):
            self._forward(server, data)
        rewriter.resumed()

    def _between_transactions(self, data: bytes) -> None:
        """No server attached: answer what needs none, else check one out."""
        if self._discarding:
            if len(data) <= self._discarding:
                self._discarding -= len(data)
                return
            data = data[self._discarding :]
            self._discarding = 0
        buf = self._pending + data if len(self._pending) else data
        self._pending = b""
        pool = self.pool
        assert pool is not None
        check_query = pool.check_query
        while True:
            n = len(buf)
            if n < 5:
                if n and not _VALID_TYPES[buf[0]]:
                    # Refused by its type byte, as PostgreSQL does before the length.
                    self.fail(
                        sqlstate.PROTOCOL_VIOLATION,
                        f"invalid message from client: type {buf[0]!r}",
                    )
                    return
                self._pending = buf
                return
            msg_type = buf[0]
            length = (buf[1] << 24) | (buf[2] << 16) | (buf[3] << 8) | buf[4]
            if (
                not _VALID_TYPES[msg_type]
                or length < 4
                or length > codes.MAX_MESSAGE_SIZE
                or (length > codes.SMALL_MESSAGE_MAX and codes.SMALL_FRONTEND_TYPES[msg_type])
            ):
                self.fail(
                    sqlstate.PROTOCOL_VIOLATION,
                    f"invalid message from client: type {msg_type!r} length {length}",
                )
                return
            if msg_type == codes.TERMINATE:
                self.close()
                return
            if _DROPPED_BETWEEN[msg_type]:
                if n < length + 1:
                    self._discarding = length + 1 - n
                    return
                buf = buf[length + 1 :]
                continue
            if (
                msg_type == codes.QUERY
                and length <= _DEALLOCATE_MAX + 4
                and (n == 5 or _MAY_BE_DEALLOCATE[buf[5]])  # n == 5: its text is yet to come
                and self.rewriter is not None
            ):
                if n < length + 1:
                    self._pending = buf
                    return
                # Without its NUL the text is malformed: PostgreSQL says so.
                reply = self._local_deallocate(buf[5:length]) if buf[length] == 0 else None
                if reply is not None:
                    self.write(reply)
                    buf = buf[length + 1 :]
                    continue
            if (
                msg_type == codes.QUERY
                and length <= _LISTEN_MAX
                and (n == 5 or _MAY_BE_LISTEN[buf[5]])
                and pool.settings.listen_fanout
            ):
                if n < length + 1:
                    self._pending = buf
                    return
                statement = parse_listen(buf[5:length]) if buf[length] == 0 else None
                if statement is not None and self._fans_out(pool):
                    buf = buf[length + 1 :]
                    if self.rewriter is not None:
                        self.rewriter.unnamed = None  # as any simple Query drops it
                    op, channel = statement
                    if self._listen_through_hub(pool, op, channel, b"", messages.READY_IDLE):
                        continue
                    self._pending = buf
                    return
            if (
                (msg_type == codes.PARSE or msg_type == codes.BIND)
                and pool.settings.listen_fanout
                and self._may_start_listen(buf, n)
                and self._fans_out(pool)
            ):
                batch = self._read_listen_batch(buf)
                if batch == INCOMPLETE:
                    self._pending = buf
                    return
                if isinstance(batch, ExtendedStatement) and self._prepared_here(batch):
                    buf = buf[batch.end :]
                    if not batch.runs:
                        self.write(batch.before + batch.after)
                        continue
                    if self._listen_through_hub(
                        pool, batch.op, batch.channel, batch.before, batch.after
                    ):
                        continue
                    self._pending = buf
                    return
            if msg_type == codes.QUERY and length + 1 == len(check_query):
                if n < length + 1:
                    self._pending = buf
                    return
                if buf[: length + 1] == check_query:
                    buf = buf[length + 1 :]
                    cached = pool.check_query_response
                    if cached is not None:
                        if self.rewriter is not None:
                            self.rewriter.unnamed = None  # as any simple Query drops it
                        self.write(cached)
                        continue
                    self._check_query_next = True
            break
        now = _now()
        server = pool.acquire(self, now)
        if server is None:
            self.state = WAITING
            self._pending = buf
            return
        self._start(server, buf, now)

    def _fans_out(self, pool: Pool) -> bool:
        """Whether this client's LISTENs go through the pool's hub: in transaction
        mode, in the hub's encoding (notifications are passed on byte for byte)."""
        if pool.settings.session_mode or pool.closed:
            return False
        # Spelt as PostgreSQL reads encoding names: case and punctuation aside
        # (asyncpg sends 'utf-8', quotes included).
        spelling = self.parameters.get("client_encoding", "UTF8")
        encoding = "".join(c for c in spelling if c.isalnum()).lower()
        return encoding in ("utf8", "unicode")

    def _may_start_listen(self, buf: bytes, n: int) -> bool:
        """Whether the Parse or Bind starting `buf` may begin a LISTEN or UNLISTEN
        batch: the first byte of its statement's text says (read_extended makes sure).
        A Parse whose text is yet to come may (read_extended waits for the rest of a
        short one); a Bind must name a statement known here."""
        if buf[0] == codes.BIND:
            rewriter = self.rewriter
            if rewriter is None:
                return False  # nothing knows the text of a statement prepared earlier
            text = rewriter.bound_text(buf, n)
            return text is not None and len(text) > 0 and _MAY_BE_LISTEN[text[0]] != 0
        i = 5
        while i < n and buf[i] != 0:  # the statement's name
            i += 1
        return i + 1 >= n or _MAY_BE_LISTEN[buf[i + 1]] != 0

    def _read_listen_batch(self, buf: bytes) -> ExtendedStatement | int | None:
        """read_extended() of `buf`, a Bind's statement text known by the rewriter."""
        rewriter = self.rewriter
        return read_extended(buf, _no_statement if rewriter is None else rewriter.statement_text)

    def _prepared_here(self, batch: ExtendedStatement) -> bool:
        """A batch's Parse, if any, names the statement here, as a server would (False:
        the batch goes to a server after all)."""
        if not batch.parse:
            return True
        rewriter = self.rewriter
        if rewriter is None:
            # Nothing tracks the client's statements: only a batch that runs its own
            # unnamed statement needs none.
            return batch.runs and batch.parse[:1] == b"\x00"
        return rewriter.prepare_here(batch.parse)

    def _listen_through_hub(
        self, pool: Pool, op: int, channel: str, before: bytes, after: bytes
    ) -> bool:
        """Run a LISTEN or UNLISTEN through the pool's hub; its answer is `before`,
        the statement's CommandComplete, `after`. True when answered now; else the
        client waits (nothing more is read) until listen_answered()."""
        if op == LISTEN:
            hub = self.listen_hub or self.pooler.listen_hub(pool)
            if not hub.listen(self, channel):
                self._listening = (before, after)
                self.state = WAITING  # nothing is forwarded until it is answered
                return False
            self.write(before + LISTEN_DONE + after)
            return True
        if self.listen_hub is not None:
            self.listen_hub.unlisten(self, op, channel)
        self.write(before + UNLISTEN_DONE + after)
        return True

    def listen_answered(self, error: bytes | None) -> None:
        """The hub's server has run this client's LISTEN: `error` is its
        ErrorResponse if it failed."""
        reply = self._listening
        if self.state == CLOSED or reply is None:
            return
        self._listening = None
        self.state = IDLE
        before, after = reply
        if error is None:
            self.write(before + LISTEN_DONE + after)
        else:
            self.write(before + error + messages.READY_IDLE)
        if self.held_notifications is not None:
            self.deliver_held_notifications()
        self.resume_reading()
        if len(self._pending):
            self._between_transactions(b"")

    def notify(self, notification: bytes) -> None:
        """A notification on a channel this client listens on: sent now between
        transactions, else held until its transaction is over (or, for a client that
        keeps its server, until that server's message to it is whole: the server's
        relay sends it then)."""
        if self.state == CLOSED:
            return
        if self.state == IDLE or self.pinned_between_transactions():
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size() > _NOTIFY_BACKLOG:
                self._notifications_overflow()
                return
            self.write(notification)
            return
        held = self.held_notifications
        if held is None:
            held = self.held_notifications = bytearray()
        held += notification
        if len(held) > _NOTIFY_BACKLOG:
            self._notifications_overflow()

    def _note_listen_statement(self, data: bytes) -> None:
        """A client that listens through the pool's hub sends its server a plain
        LISTEN or UNLISTEN (in a transaction block, say, or once pinned to it). Noted
        here, read as between transactions (one statement, at the start of what was
        read; anything else is left as it was); listen_statements_committed() does
        the hub's part when the transaction commits."""
        frontend = self.frontend
        if frontend.need > 0 or len(frontend.held) or frontend.copy_in:
            return  # `data` goes on a message begun earlier: no statement starts it
        statement: tuple[int, str] | None = None
        first = data[0]
        if first == codes.QUERY:
            if len(data) > 5 and _MAY_BE_LISTEN[data[5]]:
                length = int.from_bytes(data[1:5], "big")
                if length <= _LISTEN_MAX and len(data) > length and data[length] == 0:
                    statement = parse_listen(data[5:length])
        elif (first == codes.PARSE or first == codes.BIND) and self._may_start_listen(
            data, len(data)
        ):
            batch = self._read_listen_batch(data)
            if isinstance(batch, ExtendedStatement) and batch.runs:
                statement = (batch.op, batch.channel)
        if statement is not None:
            if self.listen_at_commit is None:
                self.listen_at_commit = []
            self.listen_at_commit.append(statement)

    def listen_statements_committed(self, reply_end: bytes) -> None:
        """Its transaction with LISTENs or UNLISTENs sent to a server has ended
        (`reply_end`: the end of the reply). If it committed them:

        - the hub stops delivering an UNLISTENed channel (the server listens on
          nothing), and drops what it held for it during the transaction, as
          PostgreSQL drops what comes for a channel before the UNLISTEN commits;
        - a channel LISTENed on a server the client keeps (pin_on_listen) is heard
          from that server from now on, and no longer through the hub, which would
          deliver each notification a second time.

        A rollback (or a reply that does not end in the commit) changes nothing."""
        pending = self.listen_at_commit
        self.listen_at_commit = None
        hub = self.listen_hub
        if pending is None or hub is None:
            return
        # Up to the last ReadyForQuery: a notification from a server the client
        # keeps may follow it.
        ready = reply_end.rfind(messages.READY_IDLE)
        reply_end = reply_end[: ready + len(messages.READY_IDLE)] if ready >= 0 else b""
        if (
            not reply_end.endswith(_COMMITTED)
            and not reply_end.endswith(_UNLISTENED)
            and not reply_end.endswith(_LISTENED)
        ):
            return
        unlistened = False
        for op, channel in pending:
            if op != LISTEN:
                hub.unlisten(self, op, channel)
                unlistened = True
            elif self.pinned_for & PIN_LISTEN:
                hub.unlisten(self, UNLISTEN, channel)
        held = self.held_notifications
        if unlistened and held:
            kept = hub.channels_of.get(self, set())
            still = bytearray()
            pos = 0
            while pos + 5 <= len(held):  # whole NotificationResponses, as notify() adds
                end = pos + 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
                if channel_of(bytes(held[pos + 5 : end])) in kept:
                    still += held[pos:end]
                pos = end
            self.held_notifications = still

    def deliver_held_notifications(self) -> None:
        """Its transaction is over: what came meanwhile goes out."""
        held = self.held_notifications
        self.held_notifications = None
        if held:
            self.write(bytes(held))

    def _notifications_overflow(self) -> None:
        self.held_notifications = None
        self.fail(
            sqlstate.PROGRAM_LIMIT_EXCEEDED,
            "too many notifications are waiting for this client",
            detail=f"More than {_NOTIFY_BACKLOG} bytes of notifications were not yet"
            " read by the client or were held for the end of its transaction.",
        )

    def disconnect_listener(self, message: str) -> None:
        """The hub's server connection was lost: disconnect now between transactions,
        else when the current one ends."""
        if self.state == CLOSED:
            return
        self._listening = None
        if self.server is None or self.pinned_between_transactions():
            self.fail(sqlstate.CONNECTION_FAILURE, message)
        else:
            self.closing_after_transaction = message

    def _local_deallocate(self, query: bytes) -> bytes | None:
        """Answer DEALLOCATE of protocol-level statements, which no server knows by the
        client's name; anything else (SQL-level PREPAREs) goes to the server."""
        rewriter = self.rewriter
        assert rewriter is not None
        reply = rewriter.deallocate(query, all_too=True)
        return None if reply is None else reply + messages.READY_IDLE

    def _start(self, server: ServerConnection, data: bytes, now: float) -> None:
        """Begin a transaction on a server just checked out (at `now`)."""
        if self._check_query_next:
            self._check_query_next = False
            self._checking = True
            self._pending = data
            self.state = WAITING  # nothing is forwarded until the probe is answered
            assert self.pool is not None
            server.capture_query(self.pool.check_query, self._check_query_done)
            return
        self._attach(server, now)
        self._forward(server, data)

    def _check_query_done(self, server: ServerConnection, reply: bytes | None) -> None:
        self._checking = False
        pool = self.pool
        assert pool is not None
        if reply is None:
            self.fail(sqlstate.CONNECTION_FAILURE, "server failed to answer the check query")
            return
        if codes.ERROR_RESPONSE not in messages.message_types(reply) and reply.endswith(
            messages.READY_IDLE
        ):
            pool.check_query_response = reply
        server.finish(_now())
        if self.state == CLOSED:
            return
        self.write(reply)
        if self.held_notifications is not None:
            self.deliver_held_notifications()
        self.state = IDLE
        self.resume_reading()
        if len(self._pending):
            self._between_transactions(b"")

    def _attach(self, server: ServerConnection, now: float) -> None:
        self.server = server
        self.state = ACTIVE
        if self.listen_at_commit is not None:
            self.listen_at_commit = None  # from a transaction that never ended
        discard_temp = server.attach(self, now)
        if self.rewriter is not None:
            self.rewriter.attach(server.statements, server.scanner)
        pool = self.pool
        assert pool is not None
        synced = pool.synced_parameters
        mine = self.params_fingerprint(synced)
        theirs = server.params_fingerprint(synced)
        statement = ""
        settles: tuple[str, ...] = ()
        if mine is theirs:
            pass
        elif mine == theirs:
            server.share_fingerprint(mine)
        else:
            statement, settles = self._parameter_sync_statement(server)
            if not statement:
                # Equal after normalising (utf8 vs UTF8): adopt the server's spelling
                # so the fingerprints match next time.
                self.accept_server_parameters(server)
        if statement or discard_temp:
            server.send_parameter_sync(statement, settles, discard_temp)
        self._param_mark = server.scanner.param_changes

    def reapply_startup_settings(self, server: ServerConnection) -> None:
        """Set this client's startup settings again on the server it keeps, after its
        DISCARD ALL or RESET (sent as its transaction ends, ahead of whatever it sends
        next; the reply is swallowed): those that went back to a default, not those it has SET
        itself since, as a RESET in a session of its own would have left them.
        pg_settings.source tells which; a custom setting (`app.x`), which pg_settings
        does not list, counts as reset when it is empty."""
        if server.scanner.param_changes != self._param_mark:
            self._follow_server_parameters(server)  # the RESET's reports, logged
        wanted = self.startup_settings  # never empty: both callers check
        pool = self.pool
        assert pool is not None and pool.server_parameters is not None
        # What it keeps now: its followed settings as reported (the RESET's reports
        # included), and its startup settings, which the statement below sets again
        # where the RESET took them back to the default (it cannot tell RESET x from
        # RESET ALL, so a followed one is taken as reset when it is at the default).
        keeps = dict(self.extra_parameters)
        for name, value in wanted.items():
            if name not in _FOLLOWED_SETTINGS or keeps.get(name) in (
                None,
                pool.server_parameters.get(name),
            ):
                keeps[name] = value
        self.extra_parameters = keeps
        self._fingerprint = None
        rows = ", ".join(f"({quote_literal(n)}, {quote_literal(v)})" for n, v in wanted.items())
        statement = (
            "SELECT pg_catalog.set_config(w.name, w.value, false)"
            f" FROM (VALUES {rows}) AS w(name, value)"
            " LEFT JOIN pg_catalog.pg_settings s ON lower(s.name) = lower(w.name)"
            " WHERE CASE WHEN s.name IS NULL"
            " THEN coalesce(pg_catalog.current_setting(w.name, true), '') = ''"
            " ELSE s.source <> 'session' END"
        )
        server.set_extra_parameters(dict(keeps))
        server.send_parameter_sync(statement, (), tell=True)

    def _parameter_sync_statement(self, server: ServerConnection) -> tuple[str, tuple[str, ...]]:
        """A statement that gives the server this client's session parameters, and
        for each value it selects, the synced parameter it settles ("" for none).

        set_config() takes the value exactly as a startup packet carries it, so list
        settings like search_path keep their meaning and nothing needs quoting rules.
        It returns the value as the server spells it, which the client adopts.
        """
        pool = self.pool
        assert pool is not None and pool.server_parameters is not None
        mine = self.parameters
        theirs = server.parameters
        changes: list[tuple[str, str]] = []
        settles: list[str] = []
        for name in pool.synced_parameters:
            value = mine.get(name)
            if value is not None and not same_parameter(name, value, theirs.get(name)):
                default = pool.server_parameters.get(name)
                if name in self._raw_parameters and default is not None:
                    # A startup value applies over the session default, as it would
                    # in a session of the client's own: DateStyle "ISO" keeps the
                    # default's day order, not the last client's.
                    changes.append((name, default))
                    settles.append("")
                changes.append((name, value))
                settles.append(name)
        resets: list[str] = []
        wanted = self.extra_parameters
        applied = server.extra_parameters
        if wanted or applied:
            extra = [(n, v) for n, v in wanted.items() if applied.get(n) != v]
            changes += extra
            settles += [""] * len(extra)
            resets = [f'RESET "{name}"' for name in applied if name not in wanted]
            server.set_extra_parameters(dict(wanted))
        statements = resets
        if changes:
            calls = ", ".join(
                f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(v)}, false)"
                for n, v in changes
            )
            statements = [f"SELECT {calls}", *resets]
        return ";".join(statements), tuple(settles)

    def params_fingerprint(self, synced: tuple[str, ...]) -> tuple[object, ...]:
        """This client's session parameters as one comparable value (cached)."""
        fingerprint = self._fingerprint
        if fingerprint is None or self._fingerprint_synced is not synced:
            mine = self.parameters
            assert self.pool is not None
            # One object per distinct value among the pool's clients (see _attach).
            fingerprint = self.pool.shared_fingerprint(
                (
                    tuple(mine.get(name) for name in synced),
                    tuple(sorted(self.extra_parameters.items())),
                )
            )
            self._fingerprint = fingerprint
            self._fingerprint_synced = synced
        return fingerprint

    def settle_parameter(self, name: str, value: str) -> bytes:
        """The server applied this client's `name` and shows it as `value`: adopt that
        spelling, so that the next server holding it needs no SET, and return the
        ParameterStatus that tells the client, if it was told another spelling."""
        pool = self.pool
        assert pool is not None
        told = self.parameters.get(name)
        if name in self._raw_parameters:
            self._raw_parameters = tuple(n for n in self._raw_parameters if n != name)
            if told is not None:
                pool.remember_canonical(name, told, value)
        if told is None or told == value:
            return b""
        self.parameters[name] = value
        self._fingerprint = None
        return messages.parameter_status(name, value)

    def accept_server_parameters(self, server: ServerConnection) -> None:
        assert self.pool is not None
        for name in self.pool.synced_parameters:
            if name in server.parameters and name in self.parameters:
                self.parameters[name] = server.parameters[name]
        self._raw_parameters = ()
        self._fingerprint = None

    def parameters_refused(self, server: ServerConnection) -> None:
        """The server rejected this client's startup parameters: stop asking for them."""
        self.accept_server_parameters(server)
        if self.extra_parameters:
            logger.warning(
                "client %s: dropping startup parameters the server refused: %s",
                self.name,
                ", ".join(self.extra_parameters),
            )
            self.extra_parameters = {}
            self.startup_settings = {}
        self._fingerprint = None

    def _follow_server_parameters(self, server: ServerConnection) -> None:
        """The server reported new session parameters while this client holds it (its
        SETs, a ROLLBACK undoing them, the values the pooler set for it): adopt them,
        to carry to the next server, and key what it prepares next by them."""
        self._param_mark = server.scanner.param_changes
        reported = server.scanner.reported
        if reported:
            pool = self.pool
            assert pool is not None
            if pool.settings.log_parameter_changes:
                self._log_parameter_changes(reported)
            if not pool.settings.session_mode:
                self._follow_settings(server, reported)
            reported.clear()
        self.accept_server_parameters(server)
        if self.rewriter is not None:
            self.rewriter.set_context(self._planning_context())

    def _follow_settings(
        self, server: ServerConnection, reported: list[tuple[str, str | None, str]]
    ) -> None:
        """Take the values of _FOLLOWED_SETTINGS the server reported as this client's
        own, in the order they came: its next servers get them (set_config, as its
        startup settings), and this one is known to hold them, so the next client
        here without them gets them reset. A value back at the pool's default is
        dropped, unless it overrides a startup setting."""
        pool = self.pool
        assert pool is not None and pool.server_parameters is not None
        mine = self.extra_parameters
        held: dict[str, str] | None = None
        for name, _before, value in reported:
            if name not in _FOLLOWED_SETTINGS:
                continue
            if held is None:
                held = dict(server.extra_parameters)
            self.parameters[name] = value
            if value == pool.server_parameters.get(name) and name not in self.startup_settings:
                mine.pop(name, None)
                held.pop(name, None)
            else:
                mine[name] = value
                held[name] = value
        if held is not None:
            server.set_extra_parameters(held)
            self._fingerprint = None

    def _log_parameter_changes(self, reported: list[tuple[str, str | None, str]]) -> None:
        """log_client_parameter_status_changes: the ParameterStatus messages relayed to
        this client since the last call."""
        for name, before, value in reported:
            logger.info(
                "client %s (%s@%s): parameter %s changed from %r to %r",
                self.name,
                self.user,
                self.database,
                name,
                before,
                value,
            )

    def detach_server(self, server: ServerConnection) -> None:
        if server.scanner.param_changes != self._param_mark:
            self._follow_server_parameters(server)
        self.server = None
        if self.state == ACTIVE:
            self.state = IDLE
        if self.write_paused:
            self.pause_reading()  # no server to hold back now (see pause_writing)
        # Released only when nothing is pending, so the rest of the accounting is clear.
        self.frontend.syncs_after_execute = 0
        self.frontend.copy_ended_ahead = False
        if self.rewriter is not None:
            self.rewriter.server = None
        if self.closing_after_transaction is not None:
            # After the reply now being relayed has been written.
            self.loop.call_soon(self._after_last_transaction)

    def _after_last_transaction(self) -> None:
        """Shutting down: the transaction is over. An upgrade's new process takes the
        session if it can (see app.migration); else the client is told to reconnect."""
        message = self.closing_after_transaction
        if self.state == CLOSED or message is None:
            return
        emigration = self.pooler.emigration
        if emigration is not None and emigration.take(self):
            return
        self.fail(sqlstate.ADMIN_SHUTDOWN, message)

    # Pool waiter callbacks.

    def on_server(self, server: ServerConnection, now: float) -> None:
        if self._login_wait == _WAIT_SERVER:  # the login's wait (_fetch_server_parameters)
            # Resumed from the loop, not inside the pool's hand-over.
            self._login_wait = _NOT_WAITING
            self.loop.call_soon(self._resume_login, server)
            return
        if self.state != WAITING:
            # Gone while the server was on its way: give it back untouched.
            if self.pool is not None:
                self.pool.release(server, now)
            return
        self.state = IDLE
        self.resume_reading()
        data, self._pending = self._pending, b""
        self._start(server, data, now)

    def on_acquire_error(self, code: str, message: str) -> None:
        if self._login_wait == _WAIT_SERVER:
            self._login_wait = _NOT_WAITING
            self.loop.call_soon(self._resume_login, AcquireError(code, message))
            return
        self.fail(code, message)

    def on_server_lost(self, server: ServerConnection, *, broke_protocol: bool = False) -> None:
        """The attached server died or broke the protocol."""
        if self.server is server:
            self.server = None
        if server.scanner.need:
            self._close_inside_a_message(
                sqlstate.CONNECTION_FAILURE, "server connection lost during the transaction"
            )
            return
        if server.said_goodbye and not broke_protocol:
            # Its FATAL (pg_terminate_backend, a shutdown, idle_session_timeout) went to
            # the client, which reads it as the reason, as from PostgreSQL alone: an
            # error of the pooler's behind it would take its place in drivers that keep
            # the last one (asyncpg).
            logger.info(
                "client %s: its server closed the connection after a FATAL error,"
                " which was relayed",
                self.name,
            )
            self.close()
            return
        what = (
            "The PostgreSQL backend sent data that is not valid protocol; the pooler closed it"
            if broke_protocol
            else "The PostgreSQL backend closed the connection unexpectedly"
        )
        self.fail(
            sqlstate.CONNECTION_FAILURE,
            "server connection lost during the transaction",
            detail=f"{what}; the transaction was not committed by the pooler.",
        )

    # ---- binary upgrade: the session moves to the new process ----------------

    def move_blocker(self) -> str | None:
        """Why this client cannot move to an upgrade's new process (None: it can, at
        a moment between transactions)."""
        if self.state < IDLE or self.pool is None or self.entry is None:
            return "still logging in"
        if self.admin:
            return "admin console"
        if self.tls:
            return "TLS"  # its encryption state lives in this process
        if self.pool.settings.session_mode:
            return "session pooling"  # it holds its server
        if self.pinned_for & PIN_LISTEN:
            return "LISTEN"  # it holds its server, which has the LISTENs
        if self.pinned_for:
            return "advisory locks"  # held by its server's session
        if self.listen_hub is not None:
            return "LISTEN"  # its LISTENs live on this process's listening server
        return None

    def pinned_between_transactions(self, *, session_too: bool = False) -> bool:
        """Holds its server (for its LISTENs or advisory locks; with `session_too`,
        also as a session-mode client), with no request in flight on it."""
        server = self.server
        pool = self.pool
        return (
            (
                self.pinned_for != 0
                or (session_too and pool is not None and pool.settings.session_mode)
            )
            and server is not None
            and server.between_requests(self)
            and server.scanner.status == codes.TX_IDLE
        )

    # ---- session-level advisory locks (pin_on_advisory_lock) -------------------

    def await_lock_check(self, server: ServerConnection) -> None:
        """Its transaction called advisory lock functions: `server` is asked whether
        its session holds locks. Meanwhile what the client sends waits here."""
        self.detach_server(server)
        self.state = WAITING
        self._checking = True
        self._checking_locks = True

    def locks_checked(self, server: ServerConnection, reply: bytes | None) -> None:
        """The answer: a client holding locks keeps (or gets back) `server`, one
        holding none goes on through the pool, and the server goes back to it."""
        self._checking = False
        self._checking_locks = False
        if reply is None:  # the server is closed
            if self.state != CLOSED:
                self.fail(
                    sqlstate.CONNECTION_FAILURE,
                    "server connection lost after the transaction",
                    detail="Its session-level advisory locks are released.",
                )
            return
        # An error (none is expected) is taken as locks held: kept, they are released
        # at the latest when the client disconnects.
        error = messages.first_error_message(reply)
        holds = error is not None or codes.DATA_ROW in messages.message_types(reply)
        if error is not None and self.state != CLOSED:
            logger.warning(
                "client %s: the advisory lock check on server %d failed (%s); the client"
                " keeps the server as if it held locks",
                self.name,
                server.server_id,
                error,
            )
        scanner = server.scanner
        if holds:
            scanner.cleanup_flags |= CLEAN_ADVISORY
        else:
            scanner.cleanup_flags &= ~CLEAN_ADVISORY
        now = _now()
        if self.state == CLOSED:
            server.finish(now)
            return
        pool = self.pool
        assert pool is not None
        if holds:
            if not self.pinned_for & PIN_LOCKS:
                self.pinned_for |= PIN_LOCKS
                logger.info(
                    "pool %s: client %s holds session-level advisory locks; it keeps"
                    " server %d until it releases them (pin_on_advisory_lock)",
                    pool.name,
                    self.name,
                    server.server_id,
                )
            self._attach(server, now)
            if (
                scanner.cleanup_flags & CLEAN_RESET
                and self.startup_settings
                and not server.sync_pending
            ):
                # Its RESET in the checked transaction (a DISCARD ALL is seen to by
                # _attach): there is no next checkout to set its startup settings.
                server.reapply_startup_settings(self)
        else:
            if self.pinned_for & PIN_LOCKS:
                self.unpin(PIN_LOCKS, server)
            server.client = self  # the owner of what finish() keeps for it
            server.finish(now)
            self.state = IDLE
        if self.held_notifications is not None:
            self.deliver_held_notifications()
        self.resume_reading()
        data, self._pending = self._pending, b""
        if holds:
            if len(data):
                self._forward(server, data)
        elif len(data):
            self._between_transactions(data)

    def unpin(self, reason: int, server: ServerConnection) -> None:
        """It no longer needs `server` for `reason` (a PIN_* bit)."""
        self.pinned_for &= ~reason
        if not self.pinned_for and reason == PIN_LOCKS and self.pool is not None:
            logger.info(
                "pool %s: client %s holds no advisory locks; server %d goes back to the pool",
                self.pool.name,
                self.name,
                server.server_id,
            )

    def export_session(self) -> SessionState | None:
        """This session for the new process, or None while it is in a transaction or
        has a half-read message or unsent bytes. Only for a client that can move at
        all (move_blocker() is None)."""
        transport = self.transport
        pool = self.pool
        entry = self.entry
        if (
            (self.state != IDLE and self.state != WAITING)
            or self.server is not None
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or self._discarding
            or self._check_query_next
            or self._checking
            or self.frontend.held
            or pool is None
            or entry is None
            or pool.server_parameters is None
        ):
            return None
        named: list[tuple[bytes, bytes, bytes, bytes | None]] = []
        unnamed: tuple[bytes, bytes, bytes | None] | None = None
        rewriter = self.rewriter
        if rewriter is not None:
            if rewriter.expect.size or rewriter.skipping:
                return None
            for name, statement in rewriter.named.items():
                body = _statement_body(statement)
                named.append((name, body, statement.context, statement.shape))
            nameless = rewriter.unnamed
            if nameless is not None:
                unnamed = (_statement_body(nameless), nameless.context, nameless.shape)
        credentials = entry.credentials
        return SessionState(
            client_id=self.client_id,
            secret=self.secret,
            database=self.database,
            user=self.user,
            application_name=self.application_name,
            address=self.address,
            port=self.port,
            unix=self.unix,
            age=time.monotonic() - self.connected_at,
            parameters=dict(self.parameters),
            extra_parameters=dict(self.extra_parameters),
            startup_settings=dict(self.startup_settings),
            raw_parameters=self._raw_parameters,
            server_parameters=dict(pool.server_parameters),
            named=named,
            unnamed=unnamed,
            pending=bytes(self._pending),
            scram_client_key=credentials.scram_client_key,
            pam_password=credentials.password if entry.user.auth_pam_service else None,
        )

    def leave_for_successor(self) -> None:
        """The new process serves this connection now (it holds the socket): forget
        the client here without closing the connection or telling it anything."""
        was = self.state
        self.state = CLOSED
        self._on_data = _ignore
        if was == WAITING and self.pool is not None:
            self.pool.cancel_wait(self)
        self._account_memory(0)
        self.pooler.unregister_client(self)
        if self.transport is not None:
            if self._writer is not None:
                self._writer.stop()  # the new process writes to the socket now
            # Only this process's descriptor closes: the socket lives on in the other.
            self.transport.abort()

    def restore_session(self, session: SessionState, entry: PoolEntry) -> None:
        """Become the session an upgrade's old process handed over; the login is
        skipped when the loop adopts the socket (connection_made)."""
        self._restoring = session
        self.entry = entry
        self.pool = entry.pool

    def _resume(self, session: SessionState) -> None:
        self._restoring = None
        pool = self.pool
        assert pool is not None
        self.client_id = session.client_id
        self.secret = session.secret
        self.user = session.user
        self.database = session.database
        self.application_name = session.application_name
        self.address = session.address
        self.port = session.port
        self.connected_at = time.monotonic() - session.age
        if pool.server_parameters is None:
            pool.server_parameters = dict(session.server_parameters)
        self.parameters = dict(session.parameters)
        self.extra_parameters = dict(session.extra_parameters)
        self.startup_settings = dict(session.startup_settings)
        self._raw_parameters = session.raw_parameters
        if pool.settings.prepared_statements:
            registry = pool.statements
            rewriter = BatchRewriter(registry, self._planning_context())
            for name, body, context, shape in session.named:
                rewriter.named[name] = registry.moved_in(body, context, shape)
            if session.unnamed is not None:
                rewriter.unnamed = registry.moved_in(*session.unnamed)
            rewriter.client_stream = self.frontend
            self.rewriter = rewriter
            self.frontend.rewriter = rewriter
        self.frontend.watch_texts = not pool.settings.session_mode
        # Counted against max_connections, but never refused: it is already connected.
        self.pooler.register_client(self)
        self.state = IDLE
        self._on_data = None  # relaying
        if session.pending:
            self._relay_data(session.pending)

    def _account_memory(self, held: int) -> bool:
        delta = held - self._memory_accounted
        if not delta:
            return True
        if not self.pooler.memory.add(delta):
            # Refused growth is not counted: what this client gives back when it goes
            # (connection_lost) is only what the budget holds for it, so repeated
            # refusals cannot drive the shared count below zero and lift the limit.
            self.fail(
                sqlstate.OUT_OF_MEMORY,
                "pooler is temporarily out of memory (max_memory_usage); try again later",
            )
            return False
        self._memory_accounted = held
        return True


def parse_options(options: str) -> dict[str, str]:
    """Settings from the libpq `options` startup parameter (`-c name=value`, `--name=value`).

    Other server command-line switches make no sense through a pooler and are refused.
    """
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        current = words[i]
        if current == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif (current.startswith("-c") and len(current) > 2) or (
            current.startswith("--") and "=" in current
        ):
            setting = current[2:]
            i += 1
        else:
            raise StartupError(
                sqlstate.FEATURE_NOT_SUPPORTED,
                f"unsupported startup option {current!r}: only -c name=value is supported",
            )
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise StartupError(sqlstate.SYNTAX_ERROR, f"invalid startup option {setting!r}")
        settings[name.replace("-", "_")] = value
    return settings


def same_parameter(name: str, mine: str, theirs: str | None) -> bool:
    if theirs is None:
        return False
    if name == "client_encoding":
        # "utf8", "UTF-8" and "UTF8" are one encoding.
        return mine.replace("-", "").replace("_", "").upper() == theirs.replace("_", "").upper()
    return mine == theirs


def quote_literal(value: str) -> str:
    """An escape-string literal: safe whatever standard_conforming_strings is."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _statement_body(statement: StatementEntry) -> bytes:
    """A statement's Parse body after the client's name (its text and parameter types)."""
    key = statement.key
    return key[: len(key) - len(statement.context)]


def _ignore(data: bytes) -> None:
    pass


def _no_statement(name: bytes) -> bytes | None:
    """Without statement tracking no earlier statement is known."""
    return None
