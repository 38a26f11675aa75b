"""Binary upgrade: logged-in clients move to the new process with their sockets.

The old process sends each client's socket (SCM_RIGHTS) with its session state
(net.session_state) over a SOCK_SEQPACKET socket pair it created for the upgrade, one
message per client, at the first moment the client is between transactions. The new
process wraps the socket in a transport as if it had accepted it and skips the login:
the client keeps its connection, BackendKeyData, session parameters and prepared
statements, and sees nothing.

Clients that cannot move — TLS sessions (their encryption state stays in the old
process), the admin console, session pooling, a state larger than one message — are
disconnected with 57P01 as before and reconnect. So are clients the new process cannot
place: no such pool in its config, or a pool that no longer names statements.

Cancel requests reach the new process (it has the listening sockets); one for a client
it doesn't know goes back over the same channel to the old process, where the client
may still be running a query. With it goes one end of a receipt, a socket pair: the old
process closes its end once the cancel reached its target, and the new process keeps the
client's cancel connection open until then, as PostgreSQL does (a client may send its
next query as soon as that connection closes, and a cancel still on its way would hit
it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pg_doorman.app.dispatch import received_descriptors
from pg_doorman.auth.passthrough import keep_client_key
from pg_doorman.net.session_state import MAX_STATE, SessionState
from pg_doorman.protocol import messages, sqlstate

if TYPE_CHECKING:
    from pg_doorman.app.pooler import PoolEntry
    from pg_doorman.net.client import ClientConnection

logger = logging.getLogger("pg_doorman.upgrade")

_CHANNEL_BUFFER = 1024 * 1024  # asked for; the kernel caps it at net.core.wmem_max
_FD_SIZE = 4
# How often clients that were not ready to move (unsent replies, a full channel) are
# tried again.
RETRY_INTERVAL = 0.02


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The hand-over channel: (the old process's end, the new process's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHANNEL_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CHANNEL_BUFFER)
    ours.setblocking(False)
    return ours, theirs


_CANCEL = struct.Struct("!cii")  # b"C", the BackendKeyData's process id and secret
# How long the new process keeps a cancel connection open for the old process's receipt.
RECEIPT_TIMEOUT = 10.0


class Emigration:
    """The old process's side: send clients to the new process as they get ready, and
    answer the cancel requests the new process forwards for clients still here."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: socket.socket,
        cancel: Callable[[int, int], asyncio.Future[None] | None],
    ) -> None:
        self.loop = loop
        self.channel = channel
        self.cancel = cancel
        channel.setblocking(False)
        self.open = True
        self.moved = 0
        loop.add_reader(channel.fileno(), self._read_cancels)
        self._receipt_space = socket.CMSG_SPACE(_FD_SIZE)
        # Clients between transactions that could not go yet: tried again shortly.
        self._later: set[ClientConnection] = set()
        self._timer: asyncio.TimerHandle | None = None
        # Cancel requests read from the channel and still on their way to their target.
        self.delivering: set[asyncio.Future[None]] = set()

    def take(self, client: ClientConnection) -> bool:
        """Move `client` now, or as soon as it can go (True); False when it cannot
        move at all and must be told to reconnect."""
        if not self.open:
            return False
        blocker = client.move_blocker()
        if blocker is not None:
            logger.debug("client %s stays (%s)", client.name, blocker)
            return False
        session = client.export_session()
        if session is None:
            if client.server is None:
                # Unsent replies or a half-read message: soon.
                self._later.add(client)
                self._arm()
            # In a transaction: its end brings it back here (closing_after_transaction).
            return True
        return self._send(client, session)

    def _send(self, client: ClientConnection, session: SessionState) -> bool:
        payload = session.encode()
        if len(payload) > MAX_STATE:
            logger.info(
                "client %s: its session (%d bytes of state) is too large to move",
                client.name,
                len(payload),
            )
            return False
        transport = client.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return False
        rights = sock.fileno().to_bytes(_FD_SIZE, sys.byteorder)
        try:
            self.channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except (BlockingIOError, InterruptedError):
            logger.debug("client %s: the channel to the new process is full; soon", client.name)
            self._later.add(client)
            self._arm()
            return True
        except OSError as exc:
            logger.warning("upgrade: the new process takes no more clients (%s)", exc)
            self.close()
            return False
        self.moved += 1
        logger.debug("client %s moved to the new process", client.name)
        client.leave_for_successor()
        return True

    def _read_cancels(self) -> None:
        try:
            data, ancillary, _, _ = self.channel.recvmsg(64, self._receipt_space)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        receipts = received_descriptors(ancillary)
        try:
            if not data:  # the new process is gone: nothing moves there any more
                self.close()
                return
            if len(data) != _CANCEL.size or data[:1] != b"C":
                return
            _, pid, secret = _CANCEL.unpack(data)
            delivering = self.cancel(pid, secret)
            if delivering is not None:
                self.delivering.add(delivering)
                delivering.add_done_callback(self.delivering.discard)
                if receipts:
                    # The receipt closes once the cancel reached its target.
                    delivering.add_done_callback(functools.partial(_close_all, receipts))
                    receipts = []
        finally:
            _close_all(receipts)

    def _arm(self) -> None:
        if self._timer is None and self.open:
            self._timer = self.loop.call_later(RETRY_INTERVAL, self._retry)

    def _retry(self) -> None:
        self._timer = None
        later, self._later = self._later, set()
        for client in later:
            if client.transport_closed or client.closing_after_transaction is None:
                continue
            if not self.take(client):
                client.fail(sqlstate.ADMIN_SHUTDOWN, client.closing_after_transaction)

    def close(self) -> None:
        """No more clients go (the channel failed, or this process exits)."""
        if not self.open:
            return
        self.open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        later, self._later = self._later, set()
        for client in later:
            if not client.transport_closed:
                client.fail(sqlstate.ADMIN_SHUTDOWN, client.closing_after_transaction or "")
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.channel.fileno())
        self.channel.close()
        if self.moved:
            logger.info("upgrade: %d clients moved to the new process", self.moved)

    async def delivered(self, timeout: float = RECEIPT_TIMEOUT) -> None:
        """Until the cancel requests read from the channel have reached their target.
        Any old worker may read one meant for a sibling's client and pass it on: one
        that exits first would drop it, and the query would run on."""
        if self.delivering:
            await asyncio.wait(set(self.delivering), timeout=timeout)


def _close_all(fds: list[int], _: object = None) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class PreviousProcessGone(Exception):
    """The channel to the old process is closed: it has exited."""


def send_cancel(channel: socket.socket, pid: int, secret: int) -> socket.socket | None:
    """Pass a cancel request for a client this process doesn't have to the old process,
    where it may still be in a transaction. Returns this side of the receipt, which
    reads end-of-file once the old process has acted on the request, or None: the
    channel was full (the request was dropped), or no receipt could be made (it went
    without). Raises PreviousProcessGone."""
    if channel.fileno() == -1:
        raise PreviousProcessGone
    pair: tuple[socket.socket, socket.socket] | None = None
    rights: list[tuple[int, int, bytes]] = []
    try:
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = pair[1].fileno().to_bytes(_FD_SIZE, sys.byteorder)
        rights.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, fd))
    except OSError as exc:  # out of descriptors: the request goes without a receipt
        logger.warning("cancel request without a receipt: %s", exc)
    try:
        channel.sendmsg([_CANCEL.pack(b"C", pid, secret)], rights)
    except OSError as exc:
        if pair is not None:
            pair[0].close()
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            logger.warning("cancel request for client id %d dropped: the channel is full", pid)
            return None
        raise PreviousProcessGone from exc
    finally:
        if pair is not None:
            pair[1].close()  # the old process holds its own copy
    if pair is None:
        return None
    pair[0].setblocking(False)
    return pair[0]


async def wait_for_receipt(loop: asyncio.AbstractEventLoop, receipt: socket.socket) -> None:
    """Until the old process closes its end of a cancel request's receipt (or
    RECEIPT_TIMEOUT passes)."""
    try:
        async with asyncio.timeout(RECEIPT_TIMEOUT):
            while await loop.sock_recv(receipt, 16):
                pass
    except TimeoutError:
        logger.warning("the previous process did not confirm a cancel request in time")
    except OSError:
        pass
    finally:
        receipt.close()


def refuse_moved(fd: int, why: str) -> None:
    """A client the new process cannot serve: told to reconnect, as the old process
    would have told it, and closed."""
    logger.info("a client from the previous process cannot stay (%s): disconnected", why)
    error = messages.error_response(
        "FATAL", sqlstate.ADMIN_SHUTDOWN, "the pooler was upgraded; reconnect", detail=why
    )
    with contextlib.suppress(OSError):
        os.write(fd, error)  # a few bytes into an idle socket's empty buffer
    os.close(fd)


class Immigration:
    """The new process's side: take the clients the old process sends."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: socket.socket,
        arrive: Callable[[int, int, SessionState], None],
    ) -> None:
        self.loop = loop
        self.channel = channel
        self.arrive = arrive
        self.received = 0
        self._space = socket.CMSG_SPACE(_FD_SIZE)
        self._reading = False

    def start(self) -> None:
        self.channel.setblocking(False)
        self.resume()

    def pause(self) -> None:
        """Take no more clients until resume(): whoever places them cannot keep up. The
        old process's sends then find the channel full and are tried again there."""
        if self._reading:
            self._reading = False
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.channel.fileno())

    def resume(self) -> None:
        if not self._reading and self.channel.fileno() != -1:
            self._reading = True
            self.loop.add_reader(self.channel.fileno(), self._receive)

    def stop(self) -> None:
        if self.channel.fileno() == -1:
            return
        self.pause()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.channel.fileno())
        self.channel.close()
        if self.received:
            logger.info("upgrade: %d clients came from the previous process", self.received)

    def _receive(self) -> None:
        while self._reading and self.channel.fileno() != -1:
            try:
                data, ancillary, flags, _ = self.channel.recvmsg(MAX_STATE + 1, self._space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.error("upgrade: the channel from the previous process failed: %s", exc)
                self.stop()
                return
            fds = received_descriptors(ancillary)
            if not data and not fds:
                self.stop()  # the old process is done
                return
            if len(fds) != 1:
                for fd in fds:
                    refuse_moved(fd, "a malformed hand-over")
                logger.error("upgrade: a hand-over message carried %d sockets", len(fds))
                continue
            fd = fds[0]
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                refuse_moved(fd, "its session state was cut short")
                continue
            arrival = unpack_arrival(fd, data)
            if arrival is not None:
                self.received += 1
                self.arrive(fd, *arrival)


def unpack_arrival(fd: int, state: bytes) -> tuple[int, SessionState] | None:
    """The socket family and session of a client handed over; None when the state is
    not one (the client has then been told to reconnect and its socket closed)."""
    try:
        return family_of(fd), SessionState.decode(state)
    except (ValueError, OSError) as exc:
        refuse_moved(fd, str(exc))
        return None


def family_of(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("not a stream socket")
        return int(sock.family)
    finally:
        sock.detach()


def restore_credentials(entry: PoolEntry, session: SessionState) -> None:
    """Passthrough credentials the old process had learnt from a login, which this
    process has not seen yet: its servers log in as the client's did."""
    credentials = entry.credentials
    keep_client_key(credentials, session.scram_client_key)
    if (
        session.pam_password is not None
        and entry.user.auth_pam_service is not None
        and credentials.password is None
    ):
        credentials.password = session.pam_password
