"""A connection to a PostgreSQL backend.

Login is a short coroutine; after that the connection is driven by callbacks only.
`data_received` dispatches on the current mode: relaying to the attached client,
swallowing the reply to a cleanup or probe query, or watching an idle socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from pg_doorman.auth.key_derivation import derive_keys
from pg_doorman.auth.md5 import md5_password_response, md5_salted_response
from pg_doorman.auth.scram import ScramClientSession, ScramError, ScramVerifier
from pg_doorman.net.client import PIN_LISTEN, PIN_LOCKS
from pg_doorman.net.inbox import AwaitableInbox
from pg_doorman.net.server_tls import ServerTls, TlsHandshakeFailed, TlsRefused, connect_tls
from pg_doorman.net.slow_queries import log_slow_query
from pg_doorman.net.sockopts import apply_server_socket_options, set_buffer_sizes
from pg_doorman.net.writer import SocketWriter
from pg_doorman.pool.pool import AcquireError, ConnectTimeout, LoginRefused, Pool
from pg_doorman.prepared.registry import ServerStatements
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import (
    CLEAN_ADVISORY,
    CLEAN_LISTEN,
    CLEAN_PREPARE,
    CLEAN_RESET,
    CLEAN_SET,
    CLEAN_TEMP,
    QUERY_IN_BATCH,
    BackendScanner,
    MessageBuffer,
    cleanup_queries,
)
from pg_doorman.protocol.messages import ProtocolError
from pg_doorman.protocol.text_effects import CALLS_ANY, CALLS_LOCK

if TYPE_CHECKING:
    from pg_doorman.net.client import ClientConnection

logger: Final = logging.getLogger("pg_doorman.server")

# Modes of a server connection.
LOGIN: Final = 0
IDLE: Final = 1
ACTIVE: Final = 2
CLEANUP: Final = 3
PROBE: Final = 4
CLOSED: Final = 5

_MODE_NAMES: Final = {LOGIN: "login", IDLE: "idle", ACTIVE: "active", CLEANUP: "cleanup"}
_MODE_NAMES.update({PROBE: "probe", CLOSED: "closed"})

_READY_I: Final = 0x49  # codes.TX_IDLE, a literal (see protocol/framing.py _Z)
_now: Final = time.monotonic
_NEVER: Final = float("inf")

# Sent after the ReadyForQuery of a transaction-mode transaction that ran LISTEN.
_LISTEN_WARNING: Final = messages.notice_response(
    sqlstate.WARNING,
    "LISTEN has no effect after this transaction in transaction pooling mode",
    "WARNING",
    hint="The connection's server goes back to the pool when the transaction ends,"
    " so notifications never reach this connection. Use a pool with"
    ' pool_mode = "session" for connections that LISTEN, or set listen_fanout = true'
    " (a plain LISTEN outside a transaction) or pin_on_listen = true on this pool.",
)

_DISCARD_TEMP: Final = messages.query("DISCARD TEMP")

# After a transaction that called advisory lock functions (pin_on_advisory_lock): any
# lock left is a session-level one, and a DataRow says there is one. The client's
# statement_timeout does not apply to it (SET LOCAL lasts for this query string's
# implicit transaction): cut short, the check would leave the client pinned.
_HOLDS_LOCKS: Final = messages.query(
    "SET LOCAL statement_timeout = 0;"
    " SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_catalog.pg_backend_pid() LIMIT 1"
)
# _after_lock_calls() results.
_LOCKS_CHECK: Final = 1
_LOCKS_WARN: Final = 2
# What follows the last reply of a transaction (ServerConnection._end_transaction).
_AFTER_LISTEN: Final = 1  # warn that its LISTEN ended with it
_AFTER_LOCK_CHECK: Final = 2  # ask the server about the client's advisory locks
_AFTER_LOCK_WARNING: Final = 4
_AFTER_HELD: Final = 8  # deliver notifications held through it (listen_fanout)
_AFTER_REFUSE: Final = 16  # the FATAL for a message of the client's that was refused
# Sent after the ReadyForQuery of such a transaction with pin_on_advisory_lock off.
_LOCKS_WARNING: Final = messages.notice_response(
    sqlstate.WARNING,
    "session-level advisory locks are released when this transaction ends in"
    " transaction pooling mode",
    "WARNING",
    hint="The connection's server goes back to the pool when the transaction ends, and"
    " the pooler releases the locks its session holds first. Use pg_advisory_xact_lock,"
    ' a pool with pool_mode = "session", or set pin_on_advisory_lock = true on this'
    " pool.",
)

# checkout_state() results.
EXPIRED: Final = 1
NEEDS_PROBE: Final = 2
# The server sent something (its goodbye) that the event loop has not read yet.
SPOKE: Final = 3
# Idle for longer than this, a server's socket is polled at checkout for a goodbye the
# event loop has not read yet. A server back in use within it was just serving, and a
# busy pool's checkouts stay free of the extra system call.
_IDLE_WATCH_AFTER: Final = 0.1
_READABLE: Final = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)


@dataclass
class BackendCredentials:
    """How to log in to the backend for one pool.

    Either an explicit plaintext `password`, or passthrough of what the pooler stores
    for the client: an md5 hash (pass-the-hash) or a SCRAM verifier plus the ClientKey
    recovered from a client's SCRAM login.
    """

    user: str
    password: str | None = None
    md5_hash: str | None = None
    scram_verifier: ScramVerifier | None = None
    scram_client_key: bytes | None = None
    # server_password = "jwt-priv-key-fpath:...": an auth.jwt.TokenSigner that answers a
    # cleartext password request with a token for `user`.
    token_signer: Any = None


class ServerConnection(asyncio.Protocol):
    def __init__(
        self,
        pool: Pool,
        server_id: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pool = pool
        self.server_id = server_id
        self.loop = loop
        self.epoch = pool.epoch
        self.transport: asyncio.Transport | None = None
        # Every write to the server goes through it (net/writer.py).
        self.writer: SocketWriter | None = None
        self.mode = LOGIN
        self.parameters: dict[str, str] = {}
        # Non-reported session parameters SET on behalf of clients (see client.py).
        self.extra_parameters: dict[str, str] = {}
        self.scanner = BackendScanner(self.parameters)
        self.statements = ServerStatements(pool.settings.server_statements_cache_size)
        # Set when the statements the server really has may differ from `statements`.
        self.statements_unknown = False
        self.backend_pid = 0
        self.backend_secret = 0
        self.client: ClientConnection | None = None
        self.closed = False
        self.discarded = False
        # Why this backend must not be reused ("": it may): closed at its check-in.
        self.spoiled = ""
        # The last error relayed from it was FATAL or PANIC: PostgreSQL said why it is
        # closing the session, and its client needs no other word from the pooler.
        self.said_goodbye = False
        self.peer: tuple[str, int] | str = ""
        # The host (or socket directory) and port it was opened at: its pool's, or a
        # Patroni fallback member's. Cancel requests go there.
        self.address: tuple[str, int] = (pool.settings.server_host, pool.settings.server_port)
        self.tls = False
        now = time.monotonic()
        self.created = now
        self.idle_since = now
        self.lifetime_deadline = pool.lifetime_deadline(now)
        self.idle_limit = pool.idle_limit()
        self._expires_at = self.lifetime_deadline
        self._probe_at = _NEVER
        self._look_at = 0.0
        self._fingerprint: tuple[object, ...] | None = None
        self._fingerprint_at = -1
        self._fingerprint_synced: tuple[str, ...] = ()
        self.served_clients = 0
        self.transactions = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.queries = 0
        # Per transaction: when it and the current query started, byte counts at attach.
        self.xact_started = 0.0
        self.query_started = 0.0
        # log_min_duration_statement: the pool's threshold (s) as of this checkout
        # (negative: off), and the bytes that began the request being timed.
        self.slow_query_seconds = -1.0
        self.request_data: bytes | None = None
        self._xact_base_sent = 0
        self._xact_base_received = 0
        self._errors_seen = 0
        self._inbox: MessageBuffer = AwaitableInbox(loop)
        self._pending_replies = 0
        self._after_quiet: Callable[[bool], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        # The transport's buffer to the backend is over its high-water mark: its client
        # is not read from (pause_writing), and nor is the next one (attach).
        self.writing_paused = False
        # Everything the client sent was answered, but it was still inside a message
        # the server ignores (see end_if_over): the transaction ends with that message.
        self.end_deferred = False
        self._quiet_ok = True
        self._captured: bytearray | None = None
        self.sync_pending = False  # its reply is swallowed (send_parameter_sync)
        self._sync_replies = 0  # ReadyForQuery messages of that reply still to come
        self._sync_discarding = False  # the first of them is DISCARD TEMP's
        # The client whose temporary objects this server keeps: they are dropped before
        # another client's transaction, not before its own (see finish()).
        self.temp_owner: ClientConnection | None = None
        self._sync_settles: tuple[str, ...] = ()
        self._sync_notice = b""
        self._sync_tells = False  # the client hears the parameters it sets (a RESET's)
        # Client cancel requests that came while that reply was awaited: PostgreSQL
        # would cancel the pooler's SET, not the client's query queued behind it, so
        # they are sent once it is over (app/pooler.py cancel_here).
        self.cancels_after_sync: list[asyncio.Future[None]] = []
        self._clears_statements = False
        # Polls the socket at checkout (checkout_state): None when there is none.
        self._idle_watch: select.poll | None = None

    # ---- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.writer = SocketWriter(self.transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            settings = self.pool.settings
            apply_server_socket_options(
                sock, settings.tcp_keepalive, settings.tcp_socket_buffer_size
            )
        elif sock is not None and self.pool.settings.unix_socket_buffer_size:
            set_buffer_sizes(sock, self.pool.settings.unix_socket_buffer_size)
        self.peer = transport.get_extra_info("peername") or ""
        if sock is not None:
            self._idle_watch = select.poll()
            self._idle_watch.register(sock.fileno(), _READABLE)

    def data_received(self, data: bytes) -> None:
        # Dispatch on the mode rather than through a stored bound method: switching
        # modes then allocates nothing, and it happens twice per transaction.
        mode = self.mode
        if mode == ACTIVE:
            self._relay(data)
        elif mode == IDLE:
            self._idle_data(data)
        elif mode == LOGIN:
            self._inbox.feed(data)
        elif mode != CLOSED:
            self._quiet_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.mode
        self.closed = True
        self.mode = CLOSED
        if self.writer is not None:
            self.writer.stop()  # the transport closes the descriptor once this returns
        if self._timer is not None:
            self._timer.cancel()
        if isinstance(self._inbox, AwaitableInbox):
            self._inbox.wake()  # a login waiting for a message sees `closed` and fails
        if self.cancels_after_sync:
            self._sync_over()
        if was == ACTIVE and self.client is not None:
            client = self.client
            self.client = None
            client.on_server_lost(self)
        elif was == IDLE:
            with contextlib.suppress(ValueError):
                self.pool.idle.remove(self)
        elif self._after_quiet is not None:
            # A cleanup, probe or captured query ended by the connection going away,
            # also when closed from outside (KILL) during one: the caller still hears.
            done, self._after_quiet = self._after_quiet, None
            done(False)
            return
        if was != LOGIN:
            self._retire("server closed the connection")

    def pause_writing(self) -> None:
        # The backend isn't reading: stop reading from the client feeding it.
        self.writing_paused = True
        client = self.client
        if client is not None:
            client.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        client = self.client
        if client is not None:
            client.resume_reading()

    # ---- login --------------------------------------------------------------

    async def _next_message(self) -> tuple[int, bytes]:
        inbox = self._inbox
        assert isinstance(inbox, AwaitableInbox)
        return await inbox.receive(self._gone)

    def _gone(self) -> Exception | None:
        if self.closed:
            return AcquireError(sqlstate.CONNECTION_FAILURE, "server closed the connection")
        return None

    def _send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def login(self, startup: dict[str, str], creds: BackendCredentials) -> None:
        """Run the startup exchange until the first ReadyForQuery."""
        self._send(messages.startup_message(startup))
        scram: ScramClientSession | None = None
        # Set once the server's SASLFinal checked out: a server that says
        # AuthenticationOk before that never proved it knows the password.
        scram_proven = False
        while True:
            msg_type, body = await self._next_message()
            if msg_type == codes.AUTHENTICATION:
                code, payload = messages.parse_auth_request(body)
                if code == codes.AUTH_OK:
                    if scram is not None and not scram_proven:
                        raise AcquireError(
                            sqlstate.INVALID_PASSWORD,
                            "server ended the SCRAM exchange without its final message: "
                            "it did not prove that it knows the password",
                        )
                    continue
                if code == codes.AUTH_SASL:
                    mechanisms = messages.parse_sasl_mechanisms(payload)
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise AcquireError(
                            sqlstate.FEATURE_NOT_SUPPORTED,
                            f"server offers unsupported SASL mechanisms {mechanisms}",
                        )
                    scram = _scram_session(creds)
                    scram_proven = False
                    self._send(
                        messages.sasl_initial_response("SCRAM-SHA-256", scram.client_first())
                    )
                elif code == codes.AUTH_SASL_CONTINUE:
                    if scram is None:
                        raise AcquireError(sqlstate.PROTOCOL_VIOLATION, "unexpected SASL continue")
                    try:
                        derivation = scram.read_server_first(payload)
                    except ScramError as exc:
                        raise AcquireError(sqlstate.PROTOCOL_VIOLATION, str(exc)) from exc
                    if derivation is not None:  # a PBKDF2 not cached yet: off the loop
                        scram.use_keys(await derive_keys(derivation))
                    self._send(messages.password_message(scram.client_final()))
                elif code == codes.AUTH_SASL_FINAL:
                    if scram is None:
                        raise AcquireError(sqlstate.PROTOCOL_VIOLATION, "unexpected SASL final")
                    try:
                        scram.handle_server_final(payload)
                    except Exception as unproven:  # not `exc`: typed ScramError above
                        raise AcquireError(sqlstate.INVALID_PASSWORD, str(unproven)) from unproven
                    scram_proven = True
                elif code == codes.AUTH_MD5:
                    self._send(messages.password_message(_md5_answer(creds, payload[:4])))
                elif code == codes.AUTH_CLEARTEXT:
                    if creds.token_signer is not None:
                        token: str = creds.token_signer.token_for(creds.user)
                        self._send(messages.password_message(messages.cstring(token)))
                    elif creds.password is None:
                        raise AcquireError(
                            sqlstate.INVALID_AUTHORIZATION,
                            "server asked for a cleartext password but only a hash is "
                            f"configured for user {creds.user!r}; set server_password",
                        )
                    else:
                        self._send(messages.password_message(messages.cstring(creds.password)))
                else:
                    raise AcquireError(
                        sqlstate.FEATURE_NOT_SUPPORTED,
                        f"server requested unsupported authentication method {code}",
                    )
            elif msg_type == codes.PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(body)
                self.parameters[name] = value
            elif msg_type == codes.BACKEND_KEY_DATA:
                self.backend_pid, self.backend_secret = messages.parse_backend_key_data(body)
                self.scanner.notify_from = self.backend_pid
            elif msg_type == codes.READY_FOR_QUERY:
                break
            elif msg_type == codes.ERROR_RESPONSE:
                fields = messages.parse_error_fields(body)
                raise LoginRefused(
                    fields.get("C", sqlstate.CONNECTION_FAILURE),
                    fields.get("M", "server rejected the connection"),
                )
            elif msg_type in (codes.NOTICE_RESPONSE, codes.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise AcquireError(
                    sqlstate.PROTOCOL_VIOLATION,
                    f"unexpected message {chr(msg_type)!r} during server login",
                )
        if len(self._inbox):
            raise await self._spoke_after_login()
        self.mode = IDLE

    async def _spoke_after_login(self) -> AcquireError:
        """Why a login fails whose server sent more after its ReadyForQuery, unasked:
        its FATAL goodbye (pg_terminate_backend, a shutdown) came with it, said as the
        server said it; anything else breaks the protocol."""
        msg_type, body = await self._next_message()  # a goodbye split across reads
        if msg_type != codes.ERROR_RESPONSE:
            return AcquireError(sqlstate.PROTOCOL_VIOLATION, "server sent data after login")
        fields = messages.parse_error_fields(body)
        return AcquireError(
            fields.get("C", sqlstate.CONNECTION_FAILURE),
            "server closed the connection right after login: " + fields.get("M", "no reason given"),
        )

    # ---- pool protocol ------------------------------------------------------

    def is_usable(self, now: float) -> bool:
        return not (self.closed or self.spoiled or now >= self.lifetime_deadline)

    def limit_lifetime(self, deadline: float) -> None:
        """Close this server at `deadline` at the latest (not at its pool's lifetime)."""
        if deadline < self.lifetime_deadline:
            self.lifetime_deadline = deadline
            self._expires_at = min(self._expires_at, deadline)

    def checkout_state(self, now: float) -> int:
        """For an idle server being checked out: 0 use it, EXPIRED, NEEDS_PROBE or
        SPOKE."""
        if now >= self._expires_at or self.closed or self.spoiled:
            return EXPIRED
        if now >= self._look_at:  # one comparison for both checks below
            if now >= self._probe_at:
                return NEEDS_PROBE
            watch = self._idle_watch
            if watch is not None and watch.poll(0):
                # Its goodbye (PostgreSQL shut down, pg_terminate_backend, an
                # idle_session_timeout) came while the event loop was busy: a client's
                # request written to it now would be lost with it.
                return SPOKE
        return 0

    def mark_idle(self, now: float) -> None:
        self.mode = IDLE
        self.idle_since = now
        # Deadlines precomputed here so that checkout is one comparison each.
        expires = self.lifetime_deadline
        if self.served_clients:
            # Only servers that have served a client age out when idle (min_pool_size
            # prewarmed ones wait for their first client).
            expires = min(expires, now + self.idle_limit)
        self._expires_at = expires
        check = self.pool.settings.idle_check_timeout
        probe_at = now + check if check > 0 else _NEVER
        self._probe_at = probe_at
        look_at = now + _IDLE_WATCH_AFTER
        self._look_at = probe_at if probe_at < look_at else look_at

    def params_fingerprint(self, synced: tuple[str, ...]) -> tuple[object, ...]:
        """The server's session parameters as one comparable value, cached until they
        change (ParameterStatus, or the extra parameters being replaced)."""
        changes = self.scanner.param_changes
        fingerprint = self._fingerprint
        if (
            fingerprint is None
            or self._fingerprint_at != changes
            or self._fingerprint_synced is not synced
        ):
            theirs = self.parameters
            fingerprint = (
                tuple(theirs.get(name) for name in synced),
                tuple(sorted(self.extra_parameters.items())),
            )
            self._fingerprint = fingerprint
            self._fingerprint_at = changes
            self._fingerprint_synced = synced
        return fingerprint

    def share_fingerprint(self, equal: tuple[object, ...]) -> None:
        """Keep a client's fingerprint that equals ours (just computed) in its place:
        clients of a pool share theirs, so the next check is an identity test."""
        self._fingerprint = equal

    def set_extra_parameters(self, extra: dict[str, str]) -> None:
        self.extra_parameters = extra
        self._fingerprint = None

    def probe(self, done: Callable[[bool], None]) -> None:
        """Send an empty query and report whether the server answered in time."""
        self._run_quiet([""], done, PROBE)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        logger.debug("closing server %d (%s): %s", self.server_id, self.pool.name, reason)
        self.closed = True
        self.mode = CLOSED
        if self.cancels_after_sync:
            self._sync_over()
        if self.transport is not None:
            if self.writer is not None:
                self.writer.stop()  # Terminate goes behind whatever the transport holds
            with contextlib.suppress(Exception):  # the socket may already be gone
                self.transport.write(messages.TERMINATE)
            self.transport.close()

    def _retire(self, reason: str) -> None:
        """Give the pool slot back (the pool ignores repeats)."""
        self.pool.discard(self, reason)

    # ---- idle ---------------------------------------------------------------

    def _idle_data(self, data: bytes) -> None:
        # An idle backend speaks only to say goodbye (idle_session_timeout,
        # pg_terminate_backend) or to report something we can't attribute: drop it.
        with contextlib.suppress(ValueError):
            self.pool.idle.remove(self)
        self._retire("server sent data while idle")

    # ---- relay --------------------------------------------------------------

    def attach(self, client: ClientConnection, now: float) -> bool:
        """Serve `client` from `now`. True when another client's temporary objects are
        still here: they must be dropped ahead of its transaction (send_parameter_sync)."""
        self.client = client
        self.mode = ACTIVE
        self.served_clients += 1
        self.scanner.notify_as = client.client_id
        self.xact_started = self.query_started = now
        self.slow_query_seconds = self.pool.settings.slow_query_seconds
        self.request_data = None
        self._xact_base_sent = self.bytes_sent
        self._xact_base_received = self.bytes_received
        self.end_deferred = False
        if client.write_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        if self.writing_paused:
            # Still draining what the last client sent (the rest of a failed COPY's
            # data, which PostgreSQL reads and ignores): this one waits for it too.
            client.pause_reading()
        owner = self.temp_owner
        if owner is None or owner is client:
            return False
        self.temp_owner = None
        return True

    def send_parameter_sync(
        self,
        statement: str,
        settles: tuple[str, ...],
        discard_temp: bool = False,
        tell: bool = False,
    ) -> None:
        """SET the client's session parameters before its transaction (`statement`, if
        any), after dropping another client's temporary objects (`discard_temp`); the
        replies are swallowed in front of the relay. `settles` names, for each value the
        statement selects, the synced parameter whose server spelling it is ("" for
        none). With `tell`, the client hears of each parameter the statement changes,
        as after a RESET in a session of its own."""
        assert self.transport is not None
        self.sync_pending = True
        self._sync_settles = settles
        self._sync_notice = b""
        self._sync_tells = tell
        self._inbox = MessageBuffer()
        out = b""
        if discard_temp:
            # A query of its own: a failing SET in the same one would roll it back.
            out = _DISCARD_TEMP
        if statement:
            out += messages.query(statement)
        self._sync_replies = 2 if discard_temp and statement else 1
        self._sync_discarding = discard_temp
        self._send(out)

    def _swallow_sync_reply(self, data: bytes) -> bytes:
        inbox = self._inbox
        inbox.feed(data)
        while True:
            msg = inbox.next_message()
            if msg is None:
                return b""
            msg_type, body = msg
            if msg_type == codes.DATA_ROW and self._sync_settles:
                self._settle_parameters(messages.parse_data_row(body))
            elif msg_type == codes.PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(body)
                self.parameters[name] = value
                self.scanner.param_changes += 1
                if self._sync_tells:
                    self._sync_notice += messages.parameter_status(name, value)
            elif msg_type == codes.ERROR_RESPONSE and self._sync_discarding:
                fields = messages.parse_error_fields(body)
                logger.warning(
                    "server %d (%s): could not drop another client's temporary objects"
                    " (%s); closing it after this transaction",
                    self.server_id,
                    self.pool.name,
                    fields.get("M", "?"),
                )
                self.spoiled = "another client's temporary objects could not be dropped"
            elif msg_type == codes.ERROR_RESPONSE:
                fields = messages.parse_error_fields(body)
                logger.warning(
                    "server %d (%s): could not apply client parameters: %s",
                    self.server_id,
                    self.pool.name,
                    fields.get("M", "?"),
                )
                # The failed statement rolled back every SET in it.
                self.set_extra_parameters({})
                if self.client is not None and fields.get("C") != sqlstate.QUERY_CANCELED:
                    # Refused. A canceled statement (pg_cancel_backend, or a client's
                    # cancel sent before app/pooler.py held them back) says nothing
                    # about the parameters: the client keeps them for its next server.
                    self.client.parameters_refused(self)
            elif msg_type == codes.READY_FOR_QUERY:
                self._sync_discarding = False
                self._sync_replies -= 1
                if self._sync_replies > 0:
                    continue
                self.sync_pending = False
                if self.cancels_after_sync:
                    self._sync_over()
                # The client hears of a spelling it had not been told (its own startup
                # "ISO" is "ISO, MDY") ahead of its transaction's reply.
                notice, self._sync_notice = self._sync_notice, b""
                return notice + inbox.take_rest()

    def _sync_over(self) -> None:
        """The parameter sync is answered (or the server is gone): the cancel requests
        held back meanwhile go now."""
        waiting, self.cancels_after_sync = self.cancels_after_sync, []
        for synced in waiting:
            if not synced.done():
                synced.set_result(None)

    def _settle_parameters(self, values: list[str | None]) -> None:
        """The values set_config() returned: the server's spelling of what it applied."""
        client = self.client
        for name, value in zip(self._sync_settles, values, strict=False):
            if name and value is not None:
                self.parameters[name] = value
                if client is not None:
                    self._sync_notice += client.settle_parameter(name, value)
        self._sync_settles = ()
        self.scanner.param_changes += 1

    def _relay(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Handed on by the pool and not attached yet (a login that learns the
            # pool's parameters takes it on the next loop turn): no one to tell what
            # these bytes mean. The server is closed when it is given back.
            if not self.spoiled:
                self.spoiled = "server sent data between two clients"
            return
        if self.sync_pending:
            try:
                data = self._swallow_sync_reply(data)
            except ProtocolError as exc:
                self._broken(f"invalid data from server: {exc}")
                return
            if not data:
                return
        scanner = self.scanner
        self.bytes_received += len(data)
        rewriter = client.rewriter
        scanner.hook = rewriter if rewriter is not None and rewriter.expect.size else None
        try:
            out = scanner.feed(data)
        except ProtocolError as exc:
            self._broken(f"invalid data from server: {exc}")
            return
        if rewriter is not None:
            if scanner.hook is None and rewriter.leading_queries and scanner.ready_count:
                rewriter.leading_queries = max(rewriter.leading_queries - scanner.ready_count, 0)
            if rewriter.skipped_queries:
                # Skipped after an error in the batch: no ReadyForQuery comes for them.
                client.frontend.pending_ready -= rewriter.skipped_queries
                rewriter.skipped_queries = 0
                if rewriter.skipping:
                    # The server skips on to a Sync not sent yet: the batch is still
                    # open, though a skipped Query closed it on the client's side.
                    client.frontend.batch_open = True
            if rewriter.desynced:
                rewriter.desynced = False
                self.statements_unknown = True
        if scanner.statements_reset:
            # DISCARD ALL or DEALLOCATE ALL ran with nothing of the client's queued
            # behind it (else the rewriter saw to it at its place in the stream): the
            # server has no statements left, and the client's names go too, as in
            # PostgreSQL.
            scanner.statements_reset = False
            self.statements.clear()
            if rewriter is not None:
                rewriter.forget_statements()
        # A check the client's bytes waited for is answered (or can no longer be):
        # they go on after the replies that came before it (below). Read here, where
        # the rewriter is last used: kept for the end, it would cost every reply.
        resume = rewriter is not None and rewriter.resume_due
        frontend = client.frontend
        if scanner.copy_in_started:
            frontend.on_copy_in_started()
            if client.refusal is not None and client.refused_at_copy(out):
                return
        if frontend.copy_in and not scanner.in_copy:
            frontend.on_copy_aborted_by_server()
        if scanner.error_count != self._errors_seen:
            self._count_errors()
        after = 0
        if scanner.ready_count:
            ready = scanner.ready_count
            now = _now()
            stats = self.pool.stats
            if self.slow_query_seconds >= 0.0:
                if now - self.query_started >= self.slow_query_seconds:
                    log_slow_query(self, client, now - self.query_started, ready)
                self.request_data = None
            self.queries += ready
            client.queries += ready
            frontend.pending_ready -= ready
            # _transaction_over(), written out: this runs at every ReadyForQuery, and the
            # call costs the compiled relay 50 instructions per transaction (callgrind).
            ended = (
                frontend.pending_ready <= 0
                and scanner.status == _READY_I
                and not frontend.batch_open
                and not scanner.in_copy
                and not frontend.copy_in
                and not scanner.need
                and not len(scanner.held)
                and not frontend.need
                and not len(frontend.held)
            )
            if not ended and frontend.pending_ready <= 0 and frontend.mid_message:
                self.end_deferred = True  # see end_if_over
                if client.refusal is not None:
                    after = _AFTER_REFUSE  # every reply owed before the refused message came
            if ended and ready == 1 and self.query_started == self.xact_started:
                stats.record_one_query_transaction(
                    now - self.xact_started,
                    self.bytes_sent - self._xact_base_sent,
                    self.bytes_received - self._xact_base_received,
                )
            else:
                if ready == 1:
                    stats.record_query(now - self.query_started)
                else:
                    each = (now - self.query_started) / ready
                    for _ in range(ready):
                        stats.record_query(each)
                if ended:
                    stats.record_transaction(
                        now - self.xact_started,
                        self.bytes_sent - self._xact_base_sent,
                        self.bytes_received - self._xact_base_received,
                    )
                elif frontend.pending_ready > 0:
                    self.query_started = now  # a request sent ahead runs from now on
            if ended:
                after = self._end_transaction(client, now, out)
        elif client.held_notifications is not None and client.pinned_between_transactions():
            # The hub's notifications held while this server, which the client keeps,
            # was inside a message to it (notify()): out now that the message is whole.
            after = _AFTER_HELD
        client.write(out)
        if after:
            self._after_transaction(client, after)
        if resume:
            client.resume_after_check(self)

    def _transaction_over(self, client: ClientConnection) -> bool:
        """Everything `client` sent has been answered, outside a transaction block and
        a COPY, and neither side is inside a message."""
        frontend = client.frontend
        scanner = self.scanner
        return (
            frontend.pending_ready <= 0
            and scanner.status == _READY_I
            and not frontend.batch_open
            and not scanner.in_copy
            and not frontend.copy_in
            and not scanner.need
            and not len(scanner.held)
            and not frontend.need
            and not len(frontend.held)
        )

    def _end_transaction(self, client: ClientConnection, now: float, out: bytes) -> int:
        """The books of a transaction that just ended (its last reply, `out`, still to
        be written to the client): the server goes back to the pool unless the client
        keeps it. Returns the _AFTER_* bits of what follows that write."""
        frontend = client.frontend
        scanner = self.scanner
        frontend.pending_ready = 0
        self.end_deferred = False
        self.transactions += 1
        client.transactions += 1
        self.xact_started = now
        self._xact_base_sent = self.bytes_sent
        self._xact_base_received = self.bytes_received
        after = _AFTER_HELD if client.held_notifications is not None else 0
        undone = scanner.discarded_all
        if undone:
            scanner.discarded_all = False
            # It undid the startup settings the pooler applied for the client too.
            self.set_extra_parameters({})
            if client.listen_hub is not None:
                # DISCARD ALL includes UNLISTEN *: for its listen_fanout LISTENs too.
                client.listen_hub.leave(client)
            if client.pinned_for & PIN_LOCKS:
                client.unpin(PIN_LOCKS, self)  # DISCARD ALL released its locks too
        if not self.pool.settings.session_mode:
            if scanner.cleanup_flags & CLEAN_LISTEN and not (
                client.pinned_for & PIN_LISTEN or self._pin(client)
            ):
                after |= _AFTER_LISTEN  # it ran LISTEN, which ends with the transaction
            locks = 0
            if scanner.cleanup_flags & CALLS_ANY:
                locks = self._after_lock_calls(client)
            if locks == _LOCKS_CHECK:
                after |= _AFTER_LOCK_CHECK  # the server stays out of the pool until known
            else:
                if locks == _LOCKS_WARN:
                    after |= _AFTER_LOCK_WARNING
                if not client.pinned_for or client.closing_after_transaction is not None:
                    # Give the server back before the last write to the client, so
                    # the next waiter starts while these bytes are on their way.
                    client.detach_server(self)
                    self.finish(now)
        elif client.closing_after_transaction is not None:
            # Shutting down (app/pooler.py): a session ends with its transaction; the
            # client is told once this reply is written (detach_server).
            client.detach_server(self)
            self.finish(now)
        if (
            client.server is self
            and client.startup_settings
            and (undone or scanner.cleanup_flags & CLEAN_RESET)
            and not after & _AFTER_LOCK_CHECK  # then once the check has answered
        ):
            # It keeps this server (a session, or pinned): there is no next checkout to
            # set its startup settings again after its DISCARD ALL or RESET, which went
            # back to the server's defaults, not to them as its own session's would.
            self.reapply_startup_settings(client)
        if client.listen_at_commit is not None:
            client.listen_statements_committed(out)  # once it is known pinned
        return after

    def reapply_startup_settings(self, client: ClientConnection) -> None:
        """`client` keeps this server after its RESET or DISCARD ALL: its startup
        settings are set again now, ahead of whatever it sends next."""
        self.scanner.cleanup_flags &= ~CLEAN_RESET
        client.reapply_startup_settings(self)

    def _after_transaction(self, client: ClientConnection, after: int) -> None:
        """What follows a transaction's last reply to `client` (_end_transaction)."""
        if after & _AFTER_LISTEN:
            self._warn_listen(client)
        if after & _AFTER_LOCK_CHECK:
            self._check_locks(client)
        elif after & _AFTER_LOCK_WARNING:
            client.write(_LOCKS_WARNING)
        if after & _AFTER_HELD:
            # Notifications for its LISTENs (listen_fanout) that came during the
            # transaction: after it, as PostgreSQL delivers them.
            client.deliver_held_notifications()
        if after & _AFTER_REFUSE:
            client.refuse_now()

    def end_if_over(self, client: ClientConnection) -> None:
        """The transaction's last reply came while the client was still inside a
        message (the rest of a CopyData, which PostgreSQL ignores once a COPY failed):
        the server could not be given back then, as it must get whole messages. Once
        the client has sent the rest, and nothing else is owed, the transaction ends
        here, as it would have at that reply."""
        if self._transaction_over(client):
            now = _now()
            self.pool.stats.record_transaction(
                now - self.xact_started,
                self.bytes_sent - self._xact_base_sent,
                self.bytes_received - self._xact_base_received,
            )
            after = self._end_transaction(client, now, b"")
            if after:
                self._after_transaction(client, after)

    def _pin(self, client: ClientConnection) -> bool:
        """With pin_on_listen, a client whose transaction ran LISTEN keeps this server
        from now on, so that notifications reach it (True); else False."""
        if not self.pool.settings.pin_on_listen:
            return False
        client.pinned_for |= PIN_LISTEN
        logger.info(
            "pool %s: client %s ran LISTEN; it keeps server %d until it disconnects"
            " (pin_on_listen)",
            self.pool.name,
            client.name,
            self.server_id,
        )
        return True

    def _after_lock_calls(self, client: ClientConnection) -> int:
        """The transaction that just ended called advisory lock functions: whether
        the server's session holds locks must be checked (_LOCKS_CHECK), the client
        warned that they are released at check-in (_LOCKS_WARN), or neither (0)."""
        scanner = self.scanner
        calls = scanner.cleanup_flags & CALLS_ANY
        scanner.cleanup_flags ^= calls
        if calls & CALLS_LOCK:
            scanner.cleanup_flags |= CLEAN_ADVISORY
        if client.closing_after_transaction is not None:
            # It is let go now: its locks are released at check-in. Locks it may hold
            # keep it from moving to an upgrade's new process (move_blocker), which
            # would go on as if it still held them: it is told to reconnect instead.
            if calls & CALLS_LOCK and self.pool.settings.pin_on_advisory_lock:
                client.pinned_for |= PIN_LOCKS
            return 0
        if client.pinned_for & PIN_LISTEN:
            # It keeps this server anyway (and a check would hold back its
            # notifications): its locks too, released when it disconnects.
            if calls & CALLS_LOCK:
                client.pinned_for |= PIN_LOCKS
            return 0
        if not self.pool.settings.pin_on_advisory_lock:
            return _LOCKS_WARN if calls & CALLS_LOCK else 0
        if calls & CALLS_LOCK or client.pinned_for & PIN_LOCKS:
            return _LOCKS_CHECK
        return 0  # an unlock by a client that held no locks here

    def _check_locks(self, client: ClientConnection) -> None:
        """Ask the server whether its session holds advisory locks; meanwhile the
        client's next request waits (ClientConnection.locks_checked decides)."""
        client.await_lock_check(self)
        self.client = None
        self.capture_query(_HOLDS_LOCKS, client.locks_checked, "advisory lock check")

    def _warn_listen(self, client: ClientConnection) -> None:
        """The transaction that just ended ran LISTEN, which cannot outlive it here:
        say so to the client (after its ReadyForQuery, where a notice may come at any
        time) rather than let it wait for notifications that never come."""
        client.write(_LISTEN_WARNING)
        pool = self.pool
        if not pool.listen_warned:
            pool.listen_warned = True
            logger.warning(
                "pool %s: client %s ran LISTEN in transaction pooling mode; it will not"
                " receive notifications (use a session-mode pool for listeners)",
                pool.name,
                client.name,
            )

    def _count_errors(self) -> None:
        scanner = self.scanner
        new = scanner.error_count - self._errors_seen
        self._errors_seen = scanner.error_count
        code = "XX000"
        last = scanner.last_error
        if last is not None:
            # Not kept with the server: PostgreSQL quotes the offending value in its
            # message, and a 40 MB one would stay in memory until the next error.
            scanner.last_error = None
            fields = messages.parse_error_fields(last)
            code = fields.get("C", code)
            # V is the severity not translated (PostgreSQL 9.6 on), S as the server's
            # lc_messages says it.
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                self.said_goodbye = True
        stats = self.pool.stats
        for _ in range(new):
            stats.record_error(code)
        if self.client is not None:
            self.client.errors += new

    def _broken(self, reason: str) -> None:
        logger.error("server %d (%s): %s", self.server_id, self.pool.name, reason)
        client = self.client
        self.client = None
        self.close(reason)
        self._retire(reason)
        if client is not None:
            client.on_server_lost(self, broke_protocol=True)

    @property
    def relay_paused(self) -> bool:
        """Reading from the server stopped because its client reads slowly."""
        return self._reading_paused

    def resume_relay(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_relay(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    # ---- check-in -----------------------------------------------------------

    def finish(self, now: float) -> None:
        """The transaction (or session) is over: clean up, then return to the pool
        (`now`: time.monotonic())."""
        owner = self.client
        self.client = None
        self.request_data = None  # not the read buffer kept while idle
        if self._reading_paused:
            self.resume_relay()
        if self.writing_paused and owner is not None:
            owner.resume_reading()  # paused for this server's sake only (pause_writing)
        if self.closed:
            self._retire("closed")
            return
        scanner = self.scanner
        flags = scanner.cleanup_flags  # read once: most transactions leave none
        if flags & QUERY_IN_BATCH and not self.spoiled:
            # PostgreSQL would fail the next command, another client's (QUERY_IN_BATCH).
            self.spoiled = "a simple query was sent inside an extended-protocol batch"
        if self.spoiled:
            self.close(self.spoiled)
            self._retire(self.spoiled)
            return
        settings = self.pool.settings
        if flags:
            if flags & CLEAN_RESET:
                flags &= ~CLEAN_RESET
                if self.extra_parameters:
                    # Which of them the RESET undid is unknown: RESET ALL undoes the
                    # rest, and the next client's are applied afresh.
                    flags |= CLEAN_SET
            if (
                flags & CLEAN_TEMP
                and owner is not None
                and not owner.pinned_for
                and not settings.session_mode
                and settings.cleanup_server_connections
            ):
                # Its temporary objects stay for the client that made them, as long as
                # it gets this server back; another client's checkout drops them first
                # (client._attach), so nobody else ever sees them.
                flags &= ~CLEAN_TEMP
                self.temp_owner = owner
            scanner.cleanup_flags = flags
        if (
            scanner.status == _READY_I
            and not flags
            and not self.statements_unknown
            and not settings.session_mode
        ):
            self.pool.release(self, now)  # the common case: nothing to undo
            return
        statements = []
        if scanner.status != _READY_I:
            statements.append("ROLLBACK")
        if settings.session_mode:
            statements.append("DISCARD ALL")
        elif settings.cleanup_server_connections:
            statements += cleanup_queries(scanner.cleanup_flags)
        else:
            # Only statements are undone here: the other flags would just mark every
            # later transaction (a LISTEN's, a warning to each of its clients).
            scanner.cleanup_flags &= CLEAN_PREPARE
            if scanner.cleanup_flags & CLEAN_PREPARE:
                # Leftover named statements would collide with the next client's.
                statements.append("DEALLOCATE ALL")
        if self.statements_unknown and "DEALLOCATE ALL" not in statements:
            statements.append("DEALLOCATE ALL")
        if not statements:
            self.pool.release(self, now)
            return
        self._clears_statements = "DEALLOCATE ALL" in statements or "DISCARD ALL" in statements
        self._run_quiet(statements, self._cleanup_done, CLEANUP)

    def _cleanup_done(self, ok: bool) -> None:
        if ok and self.scanner.status == _READY_I:
            if self.scanner.cleanup_flags & CLEAN_SET or self.pool.settings.session_mode:
                self.set_extra_parameters({})  # RESET ALL / DISCARD ALL undid them
            if self._clears_statements:
                self.statements.clear()
                self.statements_unknown = False
            self.scanner.cleanup_flags = 0
            self.pool.release(self, _now())
        else:
            self.close("cleanup failed")
            self._retire("cleanup failed")

    def client_gone(self) -> None:
        """The attached client disconnected."""
        client = self.client
        self.client = None
        self.scanner.reported.clear()  # what it was not told of is no one else's
        if client is None or self.closed:
            self._retire("client gone")
            return
        if client.frontend.paused and self._only_check_due(client):
            # Nothing of the client's reached the server but what the pooler sent to
            # check a statement (rewriter.BatchRewriter.checking): a Sync ends it,
            # and the server is as the client left it before.
            self._run_quiet([], self._check_abandoned, CLEANUP, raw=messages.SYNC)
            return
        if not self.between_requests(client):
            # The server is mid-reply or holds a half-sent batch: its state is unknown.
            self.close("client disconnected while the server was busy")
            self._retire("client gone mid-request")
            return
        self.finish(_now())

    def _only_check_due(self, client: ClientConnection) -> bool:
        frontend = client.frontend
        scanner = self.scanner
        return not (
            frontend.pending_ready > 0
            or frontend.batch_open
            or frontend.need
            or frontend.copy_in
            or scanner.in_copy
            or scanner.mid_message
        )

    def _check_abandoned(self, ok: bool) -> None:
        if ok:
            self.finish(_now())
        else:
            self.close("client disconnected during a statement check")
            self._retire("client gone mid-request")

    def abandon(self, reason: str) -> None:
        """Close this server in the middle of a reply: its client is being cut off
        (proxy_copy_data_timeout), and the rest of the message is no one else's."""
        self.client = None
        self.close(reason)
        self._retire(reason)

    def between_requests(self, client: ClientConnection) -> bool:
        """Nothing of `client`'s is half-sent to this server or still owed by it."""
        frontend = client.frontend
        scanner = self.scanner
        return not (
            frontend.pending_ready > 0
            or frontend.mid_message
            or frontend.batch_open
            or scanner.in_copy
            or scanner.mid_message
        )

    def capture_query(
        self,
        query_message: bytes,
        done: Callable[[ServerConnection, bytes | None], None],
        what: str = "check query",
    ) -> None:
        """Run one query (any messages answered by one ReadyForQuery) and hand its
        complete raw reply to `done`; `what` names it in the log if it fails."""
        captured = bytearray()
        self._captured = captured

        def finished(ok: bool) -> None:
            self._captured = None
            if ok:
                done(self, bytes(captured))
            else:
                reason = f"{what} failed"
                self.close(reason)
                self._retire(reason)
                done(self, None)

        self._run_quiet([], finished, CLEANUP, raw=query_message)

    def _run_quiet(
        self,
        statements: list[str],
        done: Callable[[bool], None],
        mode: int,
        *,
        raw: bytes | None = None,
    ) -> None:
        """Send statements as separate queries and swallow the replies."""
        assert self.transport is not None
        self.mode = mode
        self._inbox = MessageBuffer()
        payload = b"".join(messages.query(s) for s in statements)
        if raw is not None:
            payload += raw
        self._pending_replies = len(statements) + (raw is not None)
        self._after_quiet = done
        self._quiet_ok = True
        self._timer = self.loop.call_later(self.pool.settings.connect_timeout, self._quiet_timeout)
        self._send(payload)

    def _quiet_data(self, data: bytes) -> None:
        if self._captured is not None:
            self._captured += data
        self._inbox.feed(data)
        try:
            while True:
                msg = self._inbox.next_message()
                if msg is None:
                    return
                msg_type, body = msg
                if msg_type == codes.ERROR_RESPONSE and self._captured is None:
                    fields = messages.parse_error_fields(body)
                    logger.warning(
                        "server %d (%s): cleanup query failed: %s",
                        self.server_id,
                        self.pool.name,
                        fields.get("M", "?"),
                    )
                    self._quiet_ok = False
                elif msg_type == codes.PARAMETER_STATUS:
                    name, value = messages.parse_parameter_status(body)
                    self.parameters[name] = value
                    self.scanner.param_changes += 1
                elif msg_type == codes.READY_FOR_QUERY:
                    self.scanner.status = body[0]
                    self._pending_replies -= 1
                    if self._pending_replies == 0:
                        self._quiet_finished(self._quiet_ok and not len(self._inbox))
                        return
        except ProtocolError:
            self._quiet_finished(False)

    def _quiet_timeout(self) -> None:
        self._timer = None
        self._quiet_finished(False)

    def _quiet_finished(self, ok: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._after_quiet = self._after_quiet, None
        self.mode = IDLE
        if done is not None:
            done(ok)

    @property
    def state_name(self) -> str:
        return _MODE_NAMES[self.mode]


def _token_only(creds: BackendCredentials, method: str) -> AcquireError:
    return AcquireError(
        sqlstate.INVALID_AUTHORIZATION,
        f"server asked for {method} for {creds.user!r} but server_password is a JWT "
        "private key, which answers only a cleartext password request",
    )


def _scram_session(creds: BackendCredentials) -> ScramClientSession:
    if creds.token_signer is not None:
        raise _token_only(creds, "SCRAM")
    if creds.password is not None:
        return ScramClientSession(password=creds.password)
    if creds.scram_client_key is not None:
        verifier = creds.scram_verifier
        return ScramClientSession(
            client_key=creds.scram_client_key,
            server_key=verifier.server_key if verifier is not None else None,
        )
    if creds.scram_verifier is not None:
        raise AcquireError(
            sqlstate.INVALID_AUTHORIZATION,
            f"cannot log in to the server as {creds.user!r} with SCRAM yet: passthrough "
            "needs one client to log in with SCRAM first (or set server_password)",
        )
    raise AcquireError(
        sqlstate.INVALID_AUTHORIZATION,
        f"server requires SCRAM for {creds.user!r} but the configured password is an md5 "
        "hash; store the SCRAM verifier from pg_authid or set server_password",
    )


def _md5_answer(creds: BackendCredentials, salt: bytes) -> bytes:
    if creds.token_signer is not None:
        raise _token_only(creds, "an md5 password")
    if creds.password is not None:
        answer = md5_password_response(creds.password, creds.user, salt)
    elif creds.md5_hash is not None:
        answer = md5_salted_response(creds.md5_hash, salt)
    else:
        raise AcquireError(
            sqlstate.INVALID_AUTHORIZATION,
            f"server asked for an md5 password for {creds.user!r} but none is configured "
            "(a SCRAM verifier can't answer md5; set server_password)",
        )
    return messages.cstring(answer)


async def open_server(
    pool: Pool,
    server_id: int,
    creds: BackendCredentials,
    loop: asyncio.AbstractEventLoop,
    at: tuple[str, int] | None = None,
    timeout: float | None = None,
    lifetime: float | None = None,
) -> ServerConnection:
    """Connect and log in to the pool's backend, within connect_timeout.

    `at`, `timeout`, `lifetime`: another host and port than the pool's, another connect
    timeout, a lifetime shorter than the pool's (a Patroni fallback server).
    """
    settings = pool.settings
    startup = {
        "user": settings.server_user,
        "database": settings.server_database,
        "application_name": settings.application_name,
    }
    startup.update(settings.startup_parameters)
    host, port = (settings.server_host, settings.server_port) if at is None else at
    connect_timeout = settings.connect_timeout if timeout is None else timeout
    # Unix-socket backends are local: PostgreSQL offers no TLS there.
    tls = None if host.startswith("/") else cast("ServerTls | None", settings.server_tls)

    def factory() -> ServerConnection:
        return ServerConnection(pool, server_id, loop)

    server: ServerConnection | None = None
    try:
        try:
            async with asyncio.timeout(connect_timeout):
                if host.startswith("/"):
                    path = f"{host.rstrip('/')}/.s.PGSQL.{port}"
                    _, server = await loop.create_unix_connection(factory, path)
                elif tls is not None and tls.tls_first:
                    try:
                        server = await connect_tls(pool, factory, host, port, tls, not tls.required)
                    except TlsHandshakeFailed as failed:
                        # prefer, as libpq: the server said S but the handshake failed;
                        # a new connection without SSLRequest logs in in plain text.
                        if not tls.retries_in_plain:
                            raise
                        logger.warning(
                            "pool %s: %s; server_tls_mode prefer: connecting again without TLS",
                            pool.name,
                            failed,
                        )
                        _, server = await loop.create_connection(factory, host, port)
                else:
                    _, server = await loop.create_connection(factory, host, port)
                try:
                    await server.login(startup, creds)
                except LoginRefused as refused:
                    # PostgreSQL refused the login (28000: a hostssl or hostnossl rule), so
                    # the other transport may pass, as libpq tries it: allow goes from
                    # plain to TLS, prefer from TLS to plain. Only PostgreSQL's refusal:
                    # a login the pooler gave up itself (passthrough without a ClientKey
                    # yet, also 28000) gains nothing, and the retry's late failure would
                    # fail clients who queued meanwhile.
                    # (Named apart from `exc` below, which the compiled build types once.)
                    if tls is None or refused.code != "28000":
                        raise
                    was_tls = server.tls
                    if not (tls.retries_in_plain if was_tls else tls.retries_over_tls):
                        raise
                    server.close(f"login refused {'over' if was_tls else 'without'} TLS")
                    server = None
                    if was_tls:
                        _, server = await loop.create_connection(factory, host, port)
                    else:
                        try:
                            server = await connect_tls(pool, factory, host, port, tls, False)
                        except TlsRefused:
                            raise refused from None
                    await server.login(startup, creds)
        except BaseException as failure:
            # However the attempt ended, the connection given up on never joins the pool.
            if server is not None:
                server.close(f"connect or login failed ({type(failure).__name__})")
            raise
    except TimeoutError:
        raise ConnectTimeout(
            sqlstate.CONNECTION_FAILURE,
            f"timeout connecting to server {host}:{port} (connect timeout {connect_timeout:g}s)",
        ) from None
    except (TlsRefused, TlsHandshakeFailed) as no_tls:  # require, verify-*, allow's retry
        raise AcquireError(sqlstate.CONNECTION_FAILURE, str(no_tls)) from None
    except OSError as exc:
        raise AcquireError(
            sqlstate.CONNECTION_FAILURE,
            f"cannot connect to server {host}:{port}: {exc.strerror or exc}",
        ) from exc
    except ProtocolError as bad_reply:  # e.g. server_port is not PostgreSQL's
        raise AcquireError(
            sqlstate.PROTOCOL_VIOLATION,
            f"server {host}:{port} answered the login with something that is not the "
            f"PostgreSQL protocol: {bad_reply}",
        ) from None
    server.address = (host, port)
    if lifetime is not None:
        server.limit_lifetime(server.created + lifetime)
    return server
