"""The supervisor accepts every client connection and hands it to the least-loaded worker.

With `general.workers` > 1 the supervisor owns the listening sockets (TCP and the Unix
socket). Each accepted connection goes to the worker with the fewest open clients, as a
file descriptor over that worker's dispatch channel (a SOCK_SEQPACKET socket pair,
SCM_RIGHTS); the worker wraps it in a transport as if it had accepted it itself.

A worker's load is what the supervisor sent it minus what the worker has closed. The
worker publishes its closed count in a shared file mapped by both (`LoadBoard`): no
message, no system call per disconnect, and the supervisor reads exact counts even when
connections arrive faster than the worker takes them. The worker also publishes how
many connections it has taken from its channel: one that falls behind (blocked, or
stopped) gets no more while another keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar, cast

from pg_doorman.app.socket_file import bind_unix_listener
from pg_doorman.config.schema import GeneralConfig
from pg_doorman.net.session_state import MAX_STATE
from pg_doorman.net.sockopts import apply_socket_options

logger = logging.getLogger("pg_doorman.dispatch")

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

# The one byte sent with each descriptor: the socket's family.
_KIND_OF_FAMILY = {socket.AF_INET: b"4", socket.AF_INET6: b"6", socket.AF_UNIX: b"u"}
# Binary upgrade (app.migration): a client an old process handed over, its session
# state after this byte; and, to an old worker, the channel its clients leave by.
KIND_MOVED: Final = b"m"
KIND_SUCCESSOR: Final = b"M"
_MOVED: Final = KIND_MOVED[0]
_SUCCESSOR: Final = KIND_SUCCESSOR[0]
# The largest message on a dispatch channel: a moved client's kind byte and state.
MAX_MESSAGE: Final = 1 + MAX_STATE
_FAMILY_OF_KIND = {kind[0]: int(family) for family, kind in _KIND_OF_FAMILY.items()}
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
_FD_SIZE = 4  # a C int, in host byte order, in SCM_RIGHTS data
# Out of descriptors (EMFILE): try accepting again after this long.
ACCEPT_RETRY_DELAY = 0.1
# Connections sent to a worker and not yet taken from its channel, beyond which it is
# passed over while another worker keeps up. Above a burst's share, so that a worker
# that is merely scheduled late is not passed over.
LAG_LIMIT = 32


class LoadBoard:
    """Two unsigned 64-bit counters per worker in a shared file: the clients it has
    closed, and the connections it has taken from its channel.

    Each worker's counters have one writer (that worker); the supervisor only reads.
    Aligned 8-byte stores and loads don't tear on the platforms we run on, and a stale
    read only makes one dispatch decision slightly off.
    """

    def __init__(self, path: str, count: int, *, create: bool = False) -> None:
        size = 16 * count
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("Q")

    def closed(self, index: int) -> int:
        return int(self._slots[2 * index])

    def set_closed(self, index: int, value: int) -> None:
        self._slots[2 * index] = value

    def received(self, index: int) -> int:
        return int(self._slots[2 * index + 1])

    def set_received(self, index: int, value: int) -> None:
        self._slots[2 * index + 1] = value

    def close(self) -> None:
        self._slots.release()
        self._map.close()


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A dispatch channel: (the supervisor's end, the worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def bind_tcp(host: str | None, port: int) -> list[socket.socket]:
    """Bound, non-blocking TCP sockets (not listening yet) on every address `host`
    resolves to (None or "": every interface). An IPv6 address may be written in
    brackets, as in a URL ("[::1]"). OSError names the address if one cannot bind."""
    name = host[1:-1] if host and host.startswith("[") and host.endswith("]") else host
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(
            name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        # IPv6 only where IPv4 has its own socket (no host: both wildcards); otherwise
        # the system's default, as PgDoorman: "::" also takes IPv4 clients unless
        # net.ipv6.bindv6only is set.
        has_ipv4 = any(family == socket.AF_INET for family, *_ in found)
        seen = set()
        for family, kind, proto, _, address in found:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # As PgDoorman: a second instance can bind the port while this one drains.
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and has_ipv4:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}"
                ) from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_listeners(general: GeneralConfig) -> list[socket.socket]:
    """The pooler's listening sockets: TCP on host:port (every address the host
    resolves to) and, with unix_socket_dir, the Unix socket. The TCP ones carry the
    client socket options, which accepted connections inherit (Linux).

    Every socket is bound before any listens, and TCP listens last: once the TCP port
    accepts (what health checks and supervisors probe), the Unix socket does too."""
    backlog = general.backlog or min(general.max_connections, 4096)
    listeners: list[socket.socket] = []
    try:
        listeners += bind_tcp(general.host, general.port)
        for sock in listeners:
            apply_socket_options(sock, general)
        if general.unix_socket_dir:
            path = os.path.join(general.unix_socket_dir, f".s.PGSQL.{general.port}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(sock)
            try:
                bind_unix_listener(sock, path, general.unix_socket_mode_bits)
            except OSError as exc:
                # Too long a path has no errno, only a message.
                reason = exc.strerror or str(exc)
                raise OSError(exc.errno, f"cannot listen on {path}: {reason}") from None
            sock.setblocking(False)
        for sock in sorted(listeners, key=lambda s: s.family != socket.AF_UNIX):
            sock.listen(backlog)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def received_descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors a recvmsg() brought (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            continue
        for offset in range(0, len(payload) - _FD_SIZE + 1, _FD_SIZE):
            fds.append(int.from_bytes(payload[offset : offset + _FD_SIZE], sys.byteorder))
    return fds


class Dispatcher:
    """The supervisor's side: accept, pick the least-loaded worker, pass the socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[socket.socket],
        board: LoadBoard,
        count: int,
    ) -> None:
        self.loop = loop
        self.listeners = listeners
        self.board = board
        self.channels: list[socket.socket | None] = [None] * count
        self.sent = [0] * count
        self.dropped = 0
        self._next = 0  # where the search for the least-loaded worker starts
        self._accepting = False  # between start() and stop()
        self._paused = False  # out of descriptors: accepting again shortly
        self._reading = False  # the listeners are in the event loop

    # ---- workers ------------------------------------------------------------

    def reset(self, index: int) -> None:
        """A new worker process `index` is about to start: it has no clients yet."""
        self.detach(index)
        self.sent[index] = 0
        self.board.set_closed(index, 0)
        self.board.set_received(index, 0)

    def attach(self, index: int, channel: socket.socket) -> None:
        """Worker `index` serves: send it connections from now on."""
        self.detach(index)
        self.channels[index] = channel
        self._update_reading()

    def detach(self, index: int) -> None:
        """Worker `index` is gone: send it nothing more."""
        channel = self.channels[index]
        if channel is not None:
            self.channels[index] = None
            channel.close()
            self._update_reading()

    def load(self, index: int) -> int:
        return self.sent[index] - self.board.closed(index)

    # ---- accepting ----------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._update_reading()

    def stop(self) -> None:
        """Stop accepting (shutdown): later connections wait in the backlog or are
        refused once the listeners close."""
        self._accepting = False
        self._update_reading()

    def stop_listening(self) -> None:
        """Stop accepting and close the listeners: new connections are refused."""
        self.stop()
        for listener in self.listeners:
            listener.close()

    def close(self) -> None:
        self.stop_listening()
        for index in range(len(self.channels)):
            self.detach(index)

    def _update_reading(self) -> None:
        """Accept while started, not paused, and some worker takes connections. With
        every worker gone (restarting), new connections wait in the listen backlog
        instead of being accepted only to be closed."""
        should = (
            self._accepting
            and not self._paused
            and any(channel is not None for channel in self.channels)
        )
        if should == self._reading:
            return
        self._reading = should
        for listener in self.listeners:
            if listener.fileno() < 0:
                continue
            if should:
                kind = _KIND_OF_FAMILY[listener.family]
                # The socket module's own accept() wraps each connection in a socket
                # object (and looks up its family enum); only the descriptor is passed on.
                accept_fd = listener._accept  # type: ignore[attr-defined]
                self.loop.add_reader(listener.fileno(), self._accept, accept_fd, kind)
            else:
                self.loop.remove_reader(listener.fileno())

    def _accept(self, accept_fd: Callable[[], tuple[int, object]], kind: bytes) -> None:
        # One connection per wakeup. The listener stays readable while more wait (the
        # loop's readiness is level-triggered), so a burst is served one per loop
        # iteration; accepting on until EAGAIN would raise BlockingIOError, and format
        # its message, at every wakeup.
        try:
            fd, _ = accept_fd()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                logger.error("cannot accept connections: %s; retrying", exc.strerror)
                self._pause_accepting()
            # ECONNABORTED and the like: that client is gone, the next may not be.
            return
        try:
            self.dispatch(fd, kind)
        finally:
            os.close(fd)

    def _pause_accepting(self) -> None:
        self._paused = True
        self._update_reading()

        def resume() -> None:
            self._paused = False
            self._update_reading()

        self.loop.call_later(ACCEPT_RETRY_DELAY, resume)

    def dispatch(self, fd: int, kind: bytes) -> bool:
        """Pass the connection `fd` to the least-loaded worker that takes it. The caller
        closes its own copy either way; False if no worker could take it (the client is
        then disconnected). `kind`: the message sent with it (its socket's family, or a
        moved client's state)."""
        if self._send(fd, kind):
            return True
        self.dropped += 1
        logger.warning("no worker could take a new connection: it is closed")
        return False

    def _send(self, fd: int, kind: bytes) -> bool:
        """Pass `fd` with `kind` to the least-loaded worker that takes it now; False if
        none does (every channel full, or no worker serving)."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(_FD_SIZE, sys.byteorder))]
        tried: set[int] | None = None
        while True:
            index = self._least_loaded(tried)
            if index is None:
                return False
            channel = self.channels[index]
            assert channel is not None
            try:
                channel.sendmsg((kind,), rights)
            except (BlockingIOError, InterruptedError):
                # Its queue is full: it is stuck; try another.
                tried = (tried or set()) | {index}
                continue
            except OSError as exc:
                logger.warning("worker %d does not take connections (%s)", index, exc.strerror)
                self.detach(index)
                tried = (tried or set()) | {index}
                continue
            sent = self.sent
            sent[index] = sent[index] + 1  # not `+=`: native ints in the compiled build
            return True

    def send_moved(self, fd: int, state: bytes) -> bool:
        """Pass a client an old process handed over, with its session `state`, to the
        least-loaded worker, as dispatch() passes a new one. The caller closes its own
        copy of `fd` once it went; False if no worker could take it now (their channels
        are full, or none serves): the caller keeps it and tries again, as a session
        is worth more than a new connection, which the client would simply retry."""
        return self._send(fd, KIND_MOVED + state)

    def send_successor(self, index: int, fd: int) -> bool:
        """Give worker `index` the channel to an upgrade's new process (a copy of `fd`)."""
        channel = self.channels[index]
        if channel is None:
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(_FD_SIZE, sys.byteorder))]
        try:
            channel.sendmsg((KIND_SUCCESSOR,), rights)
        except OSError as exc:
            logger.warning("worker %d cannot be told of the new process (%s)", index, exc.strerror)
            return False
        return True

    def lagging(self, index: int) -> bool:
        """Worker `index` has not taken LAG_LIMIT of the connections sent to it."""
        return self.sent[index] - self.board.received(index) > LAG_LIMIT

    def _least_loaded(self, tried: set[int] | None) -> int | None:
        count = len(self.channels)
        best: int | None = None
        best_key = (False, 0)
        # Start after the last choice, so equally loaded workers take turns.
        for step in range(count):
            index = (self._next + step) % count
            if self.channels[index] is None or (tried is not None and index in tried):
                continue
            # A worker that keeps up beats one that lags, whatever their loads.
            key = (self.lagging(index), self.load(index))
            if best is None or key < best_key:
                best, best_key = index, key
        if best is not None:
            self._next = (best + 1) % count
        return best


class Receiver:
    """A worker's side: take the connections the supervisor sends."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: socket.socket,
        board: LoadBoard,
        index: int,
        adopt: Callable[[int, int], None],
        adopt_moved: Callable[[int, bytes], None],
        successor: Callable[[int], None],
    ) -> None:
        self.loop = loop
        self.channel = channel
        self.board = board
        self.index = index
        self.adopt = adopt
        self.adopt_moved = adopt_moved
        self.successor = successor
        self.received = 0
        self.closed = 0
        self._space = socket.CMSG_SPACE(_FD_SIZE)
        # Read into: most messages are one byte, a moved client's carries its state.
        self._buffer = bytearray(MAX_MESSAGE)
        self._buffers = [self._buffer]

    def start(self) -> None:
        self.channel.setblocking(False)
        self.loop.add_reader(self.channel.fileno(), self._receive)

    def stop(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.channel.fileno())
        self.channel.close()

    def client_closed(self) -> None:
        """One of the received connections is closed: publish the new count."""
        self.closed += 1
        self.board.set_closed(self.index, self.closed)

    def drain(self) -> None:
        """Take every connection waiting in the channel now (the worker is stopping:
        they are answered like its other clients rather than dropped unanswered)."""
        while self.channel.fileno() != -1 and self._receive_one():
            pass

    def _receive(self) -> None:
        # One message per wakeup, as the supervisor accepts: the channel stays readable
        # while more wait, and reading on until EAGAIN costs an exception each time.
        self._receive_one()

    def _receive_one(self) -> bool:
        """Take one message from the channel; False when none was waiting."""
        try:
            size, ancillary, _, _ = self.channel.recvmsg_into(self._buffers, self._space)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            logger.error("dispatch channel failed: %s", exc)
            self.stop()
            return False
        if not size:
            # The supervisor is gone; the worker notices and shuts down.
            self.stop()
            return False
        kind = self._buffer[0]
        fds = received_descriptors(ancillary)
        if kind == _SUCCESSOR:  # the channel to an upgrade's new process
            for fd in fds:
                self.successor(fd)
            return True
        self.received += len(fds)
        self.board.set_received(self.index, self.received)
        if kind == _MOVED:  # a client an upgrade's old process handed over
            state = bytes(self._buffer[1:size])
            for fd in fds:
                self.adopt_moved(fd, state)
        else:
            for fd in fds:
                self._take(fd, kind)
        return True

    def _take(self, fd: int, kind: int) -> None:
        family = _FAMILY_OF_KIND.get(kind)
        if family is None:
            logger.error("dispatch channel sent an unknown socket kind %r", kind)
            os.close(fd)
            self.client_closed()
            return
        self.adopt(fd, family)


class _Descriptor:
    """A received descriptor, as uvloop's `connect_accepted_socket` reads a socket: its
    family, its type and its number. A `socket.socket` would cost an interpreted enum
    conversion at each of those reads and an interpreted `detach()` at close."""

    def __init__(self, fd: int, family: int) -> None:
        self.fd = fd
        self.family = family
        self.type = _SOCK_STREAM

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        # uvloop calls this when the transport closes. libuv has closed the descriptor
        # by then, and its number may already belong to another connection.
        pass


class _Opening:
    """Drives `loop.connect_accepted_socket` without a task: its first step sets up the
    transport at once, the second ends it once the transport is connected."""

    def __init__(
        self,
        opening: Coroutine[Any, Any, object],
        protocol: _P,
        handle: socket.socket | _Descriptor,
        failed: Callable[[_P, Exception], None],
    ) -> None:
        self.opening = opening
        self.protocol = protocol
        self.handle = handle
        self.failed = failed
        self.started = False

    def step(self, _done: object = None) -> None:
        try:
            waiting = self.opening.send(None)
        except StopIteration:
            return
        except Exception as exc:
            handle = self.handle
            if isinstance(handle, _Descriptor):
                # Once the first step is through, the transport owns the descriptor and
                # has closed it; before that, nobody has.
                if not self.started:
                    with contextlib.suppress(OSError):
                        os.close(handle.fd)
            else:
                handle.close()
            self.failed(self.protocol, exc)
            return
        self.started = True
        waiting.add_done_callback(self.step)


def open_accepted(
    loop: asyncio.AbstractEventLoop,
    protocol: _P,
    fd: int,
    family: int,
    failed: Callable[[_P, Exception], None],
) -> None:
    """Serve a connected socket's descriptor with `protocol`, as if the loop had accepted
    it. `failed` gets the protocol and the error when the loop cannot take it (the
    descriptor is closed then); the protocol's `connection_made` was not called."""
    handle: socket.socket | _Descriptor
    if type(loop).__module__.startswith("uvloop"):
        handle = _Descriptor(fd, family)
    else:
        # asyncio's transports call the socket's own methods.
        try:
            handle = socket.socket(family, _SOCK_STREAM, 0, fileno=fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            failed(protocol, exc)
            return
    opening = loop.connect_accepted_socket(lambda: protocol, cast(socket.socket, handle))
    _Opening(opening, protocol, handle, failed).step()
