"""One server connection that LISTENs for every listening client of a pool.

With `listen_fanout`, a transaction-mode client's plain `LISTEN channel` between
transactions (protocol/listen.py) does not run on a pooled server, where it would end
with the transaction. The pool's hub runs it once on a server connection of its own,
outside the pool, and passes each notification on to the clients that listen on its
channel: at once to a client between transactions, after the current transaction to
one in a transaction (as PostgreSQL delivers them). `UNLISTEN` and a client leaving
drop its channels; the hub UNLISTENs a channel nobody listens on any more and closes
its connection when no channel is left.

A client's `LISTEN` is answered once the hub's server has run it, so a NOTIFY sent after
the answer always reaches the client. If the hub's connection is lost, notifications
may have been lost with it: every client listening through it is disconnected (at once
between transactions, else when its transaction ends), as it would be with a server of
its own, so that it reconnects and LISTENs again rather than wait for what never comes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from pg_doorman.pool.pool import AcquireError
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import MessageBuffer
from pg_doorman.protocol.listen import (
    LISTEN,
    UNLISTEN,
    UNLISTEN_ALL,
    channel_of,
    statement_for,
)
from pg_doorman.protocol.messages import ProtocolError

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler
    from pg_doorman.net.client import ClientConnection
    from pg_doorman.pool.pool import Pool

logger: Final = logging.getLogger("pg_doorman.listen")

# How often a hub waiting to open its connection looks whether its pool was resumed.
_PAUSED_POLL: Final = 0.05
# Notifications are passed on byte for byte, so the connection reads them in UTF8,
# the only client_encoding of clients that listen through it.
_SET_ENCODING: Final = "SET client_encoding TO 'UTF8'"
# What the listening server may send besides notifications, errors and ReadyForQuery:
# nothing to act on.
_IGNORED: Final = frozenset((codes.COMMAND_COMPLETE, codes.NOTICE_RESPONSE, codes.PARAMETER_STATUS))
LOST_MESSAGE: Final = (
    "the server connection that delivered this client's notifications was lost;"
    " reconnect and LISTEN again"
)


@dataclass
class _Command:
    """A statement sent to the hub's server; `waiters` are told how it went."""

    sql: str
    waiters: list[ClientConnection] = field(default_factory=list)
    channel: str = ""
    error: bytes | None = None


class _HubConnection(asyncio.Protocol):
    """The hub's server connection after its login."""

    def __init__(self, hub: ListenHub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self.hub.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.lost("server closed the connection")


class ListenHub:
    def __init__(self, pooler: Pooler, pool: Pool) -> None:
        self.pooler = pooler
        self.pool = pool
        # Who listens on what; a client is in both from its LISTEN on, also while the
        # hub's server still runs it.
        self.subscribers: dict[str, set[ClientConnection]] = {}
        self.channels_of: dict[ClientConnection, set[str]] = {}
        # Channels the last statement sent for was LISTEN: what the server will listen
        # on once it has run everything sent.
        self._listening: set[str] = set()
        self._in_flight: deque[_Command] = deque()
        self._unsent: list[_Command] = []
        self._inbox = MessageBuffer()
        self.connection: _HubConnection | None = None
        # For SHOW SERVERS.
        self.server_id = 0
        self.backend_pid = 0
        self.tls = False
        self.application_name = ""
        self.opened_at = 0.0
        self.statements_sent = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        self._task: asyncio.Task[None] | None = pooler.loop.create_task(self._open())

    # ---- what clients ask -----------------------------------------------------

    def listen(self, client: ClientConnection, channel: str) -> bool:
        """Subscribe `client` to `channel`. True when that is done now; else the hub
        answers the client later (ClientConnection.listen_answered)."""
        self._subscribe(client, channel)
        if channel in self._listening:
            pending = self._pending_listen(channel)
            if pending is None:
                return True
            pending.waiters.append(client)  # answered with the LISTEN already on its way
            return False
        self._listening.add(channel)
        self._send(_Command(statement_for(LISTEN, channel), [client], channel))
        return False

    def unlisten(self, client: ClientConnection, op: int, channel: str) -> None:
        """UNLISTEN `channel` (or all, UNLISTEN_ALL) for `client`: done at once."""
        channels = self.channels_of.get(client)
        if channels is None:
            return
        for name in list(channels) if op == UNLISTEN_ALL else [channel]:
            if name in channels:
                self._unsubscribe(client, name)
        self._close_if_unused()

    def leave(self, client: ClientConnection) -> None:
        """`client` is gone: its channels go with it."""
        self.unlisten(client, UNLISTEN_ALL, "")

    # ---- subscriptions --------------------------------------------------------

    def _subscribe(self, client: ClientConnection, channel: str) -> None:
        self.subscribers.setdefault(channel, set()).add(client)
        self.channels_of.setdefault(client, set()).add(channel)
        client.listen_hub = self

    def _unsubscribe(self, client: ClientConnection, channel: str) -> None:
        channels = self.channels_of.get(client)
        if channels is not None:
            channels.discard(channel)
            if not channels:
                del self.channels_of[client]
                if client.listen_hub is self:
                    client.listen_hub = None
        listeners = self.subscribers.get(channel)
        if listeners is None:
            return
        listeners.discard(client)
        if not listeners:
            del self.subscribers[channel]
            if channel in self._listening:
                self._listening.discard(channel)
                self._send(_Command(statement_for(UNLISTEN, channel)))

    def _pending_listen(self, channel: str) -> _Command | None:
        """The last LISTEN of `channel` sent or to be sent and not yet answered."""
        for queue in (self._unsent, self._in_flight):
            for command in reversed(queue):
                if command.channel == channel:
                    return command
        return None

    def _close_if_unused(self) -> None:
        if not self.subscribers and not self._in_flight and not self._unsent:
            self.close("no client listens any more")

    # ---- the server connection --------------------------------------------------

    async def _open(self) -> None:
        pool = self.pool
        try:
            while pool.paused and not pool.closed:  # PAUSE: no new server until RESUME
                await asyncio.sleep(_PAUSED_POLL)
            server = await self.pooler.connect_server(pool)
        except AcquireError as refused:
            self._task = None
            self._fail_all(
                messages.error_response("ERROR", refused.code, refused.message),
                f"could not open its server connection: {refused.message}",
            )
            return
        except asyncio.CancelledError:
            self._task = None
            return
        except Exception as exc:  # unexpected: the LISTENs waiting still get an answer
            logger.exception("pool %s: unexpected error opening the listening server", pool.name)
            self._task = None
            self._fail_all(
                messages.error_response("ERROR", sqlstate.INTERNAL_ERROR, str(exc)),
                f"could not open its server connection: {exc}",
            )
            return
        self._task = None
        transport = server.transport
        if self.closed or server.closed or transport is None:
            server.close("not needed for LISTEN any more")
            if not self.closed:
                self._fail_all(
                    messages.error_response(
                        "ERROR", sqlstate.CONNECTION_FAILURE, "server closed the connection"
                    ),
                    "its server connection closed after login",
                )
            return
        if server.writer is not None:
            server.writer.stop()  # all writes go through the transport from now on
        connection = _HubConnection(self)
        connection.transport = transport
        transport.set_protocol(connection)
        self.connection = connection
        self.server_id = server.server_id
        self.backend_pid = server.backend_pid
        self.tls = server.tls
        self.application_name = server.parameters.get("application_name", "")
        self.opened_at = server.created
        logger.info(
            "pool %s: server %d (pid %d) listens for the pool's clients (listen_fanout)",
            pool.name,
            self.server_id,
            self.backend_pid,
        )
        unsent, self._unsent = self._unsent, []
        encoding = server.parameters.get("client_encoding", "").upper()
        if encoding not in ("UTF8", "UNICODE"):
            unsent.insert(0, _Command(_SET_ENCODING))
        self._write(unsent)

    def _send(self, command: _Command) -> None:
        if self.closed:
            return  # its clients are being disconnected
        if self.connection is None:
            self._unsent.append(command)
        else:
            self._write([command])

    def _write(self, commands: list[_Command]) -> None:
        if not commands:
            return
        connection = self.connection
        assert connection is not None and connection.transport is not None
        self._in_flight.extend(commands)
        self.statements_sent += len(commands)
        data = b"".join(messages.query(c.sql) for c in commands)
        self.bytes_sent += len(data)
        connection.transport.write(data)

    def received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        inbox = self._inbox
        inbox.feed(data)
        try:
            while True:
                message = inbox.next_message()
                if message is None:
                    return
                msg_type, body = message
                if msg_type == codes.NOTIFICATION_RESPONSE:
                    self._notify(messages.build(b"A", body), body)
                elif msg_type == codes.ERROR_RESPONSE:
                    fields = messages.parse_error_fields(body)
                    if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                        # The server's goodbye (pg_terminate_backend, a shutdown), also
                        # while a statement runs: lost for the reason it gives.
                        self.lost(f"server closed the connection: {fields.get('M', '?')}")
                        return
                    if not self._in_flight:
                        logger.warning(
                            "pool %s: listening server %d: %s",
                            self.pool.name,
                            self.server_id,
                            fields.get("M", "?"),
                        )
                        continue
                    self._in_flight[0].error = body
                elif msg_type == codes.READY_FOR_QUERY:
                    if not self._in_flight:
                        raise ProtocolError("ReadyForQuery with no query running")
                    self._answer(self._in_flight.popleft())
                elif msg_type not in _IGNORED:
                    raise ProtocolError(f"unexpected message {chr(msg_type)!r}")
        except ProtocolError as exc:
            self.lost(f"invalid data from server: {exc}")

    def _answer(self, command: _Command) -> None:
        if command.error is not None:
            fields = messages.parse_error_fields(command.error)
            logger.warning(
                "pool %s: listening server %d: %s failed: %s",
                self.pool.name,
                self.server_id,
                command.sql,
                fields.get("M", "?"),
            )
            error = messages.build(b"E", command.error)
            for client in command.waiters:
                self._unsubscribe(client, command.channel)
                client.listen_answered(error)
            self._close_if_unused()
            return
        for client in command.waiters:
            client.listen_answered(None)
        self._close_if_unused()

    def _notify(self, notification: bytes, body: bytes) -> None:
        channel = channel_of(body)
        listeners = self.subscribers.get(channel) if channel is not None else None
        if not listeners:
            return  # UNLISTENed since it was sent
        self.pool.notifications_passed += len(listeners)
        for client in list(listeners):
            client.notify(notification)

    def lost(self, reason: str) -> None:
        """The server connection went away (or broke the protocol): notifications may
        have been lost with it, so every client listening here is disconnected."""
        if self.closed:
            return
        logger.warning(
            "pool %s: listening server %d lost (%s); disconnecting its %d listening clients",
            self.pool.name,
            self.server_id,
            reason,
            len(self.channels_of),
        )
        clients = self._forget_all()
        self.close(reason)
        for client in clients:
            client.disconnect_listener(LOST_MESSAGE)

    def _fail_all(self, error: bytes, reason: str) -> None:
        """The connection could not be opened: every LISTEN waiting for it fails with
        `error` (nothing had been listened on yet)."""
        logger.warning("pool %s: LISTEN through the pool failed: %s", self.pool.name, reason)
        clients = self._forget_all()
        self.close(reason)
        for client in clients:
            client.listen_answered(error)

    def _forget_all(self) -> list[ClientConnection]:
        """Drop every subscription and queued statement; the clients that had any."""
        clients = list(self.channels_of)
        self._in_flight.clear()
        self._unsent.clear()
        self.subscribers.clear()
        self.channels_of.clear()
        self._listening.clear()
        for client in clients:
            if client.listen_hub is self:
                client.listen_hub = None
        return clients

    def close(self, reason: str) -> None:
        """Close the connection; clients still listening are the caller's to tell."""
        if self.closed:
            return
        self.closed = True
        self.pooler.listen_hub_closed(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        connection = self.connection
        if connection is not None and connection.transport is not None:
            logger.info(
                "pool %s: listening server %d closed (%s)", self.pool.name, self.server_id, reason
            )
            transport = connection.transport
            if not transport.is_closing():
                transport.write(messages.TERMINATE)
                transport.close()
