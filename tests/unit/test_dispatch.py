"""The supervisor's dispatch of accepted connections to workers, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from helpers.sockets import connect, loopback_listener
from pg_doorman.app.dispatch import (
    LAG_LIMIT,
    Dispatcher,
    LoadBoard,
    Receiver,
    bind_listeners,
    channel_pair,
    open_accepted,
)
from pg_doorman.config.schema import GeneralConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SOCK_SEQPACKET")

WORKERS = 3


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def board(tmp_path: Path) -> Iterator[LoadBoard]:
    board = LoadBoard(str(tmp_path / "load"), WORKERS, create=True)
    yield board
    board.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with loopback_listener() as sock:
        yield sock


def adopting(adopted: list[socket.socket]) -> Callable[[int, int], None]:
    """A receiver's adopt callback that keeps each descriptor as a socket."""

    def adopt(fd: int, family: int) -> None:
        adopted.append(socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd))

    return adopt


def _unexpected(*args: object) -> None:
    raise AssertionError(f"no upgrade message was sent, got {args}")


# A receiver's callbacks for the messages of a binary upgrade, in tests without one.
_NO_UPGRADE = (_unexpected, _unexpected)


def received_fd(channel: socket.socket) -> tuple[bytes, int]:
    data, ancillary, _, _ = channel.recvmsg(1, socket.CMSG_SPACE(4))
    ((level, kind, payload),) = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    return data, int.from_bytes(payload[:4], sys.byteorder)


def test_load_board_is_shared_between_mappings(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    writer = LoadBoard(path, 2, create=True)
    reader = LoadBoard(path, 2)
    writer.set_closed(1, 12345678901)
    assert (reader.closed(0), reader.closed(1)) == (0, 12345678901)
    writer.close()
    reader.close()


def test_each_connection_goes_to_the_least_loaded_worker(
    loop: asyncio.AbstractEventLoop, board: LoadBoard, listener: socket.socket
) -> None:
    dispatcher = Dispatcher(loop, [], board, WORKERS)
    workers = [channel_pair() for _ in range(WORKERS)]
    for index, (ours, _) in enumerate(workers):
        dispatcher.attach(index, ours)
    peers = []
    for _ in range(6):
        client, accepted = connect(listener)
        peers.append(client)
        assert dispatcher.dispatch(accepted.fileno(), b"4")
        accepted.close()
    assert [dispatcher.load(i) for i in range(WORKERS)] == [2, 2, 2]
    # Worker 1 closes both of its clients: the next two connections are its own.
    board.set_closed(1, 2)
    for _ in range(2):
        client, accepted = connect(listener)
        peers.append(client)
        dispatcher.dispatch(accepted.fileno(), b"4")
        accepted.close()
    assert dispatcher.sent == [2, 4, 2]
    # What arrives is a working socket for the client's connection.
    _, theirs = workers[1]
    for _ in range(4):
        kind, fd = received_fd(theirs)
        assert kind == b"4"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd) as sock:
            sock.sendall(b"hello")
    for client in (peers[1], peers[4], peers[6], peers[7]):
        assert client.recv(5) == b"hello"
    dispatcher.close()
    for client in peers:
        client.close()
    for _, theirs in workers:
        theirs.close()


def test_a_gone_worker_is_skipped_and_a_full_one_passed_over(
    loop: asyncio.AbstractEventLoop, board: LoadBoard, listener: socket.socket
) -> None:
    dispatcher = Dispatcher(loop, [], board, 2)
    first, first_theirs = channel_pair()
    second, second_theirs = channel_pair()
    dispatcher.attach(0, first)
    dispatcher.attach(1, second)
    first_theirs.close()  # worker 0 died
    client, accepted = connect(listener)
    assert dispatcher.dispatch(accepted.fileno(), b"4")
    assert dispatcher.channels[0] is None and dispatcher.sent == [0, 1]
    # Worker 1 stops reading: once its queue is full, nothing takes connections.
    accepted_list = [accepted]
    clients = [client]
    while True:
        client, accepted = connect(listener)
        clients.append(client)
        accepted_list.append(accepted)
        if not dispatcher.dispatch(accepted.fileno(), b"4"):
            break
        assert len(clients) < 100_000
    assert dispatcher.dropped == 1
    assert dispatcher.channels[1] is not None  # full is not gone
    for sock in [*clients, *accepted_list, second_theirs]:
        sock.close()
    dispatcher.close()


def test_the_unix_socket_listens_before_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness probes connect over TCP: by the time the TCP port accepts, the Unix
    socket must accept too (a client right behind the probe found no socket file)."""
    listened: list[socket.AddressFamily] = []

    class RecordingSocket(socket.socket):
        def listen(self, *args: int) -> None:
            listened.append(self.family)
            if self.family == socket.AF_INET:
                # The Unix socket is already connectable when TCP starts listening.
                path = tmp_path / ".s.PGSQL.0"
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(path))
            super().listen(*args)

    monkeypatch.setattr(socket, "socket", RecordingSocket)
    general = GeneralConfig(host="127.0.0.1", port=0, unix_socket_dir=str(tmp_path))
    listeners = bind_listeners(general)
    try:
        assert listened == [socket.AF_UNIX, socket.AF_INET]
    finally:
        for sock in listeners:
            sock.close()


def test_the_unix_socket_gets_the_configured_mode(tmp_path: Path) -> None:
    general = GeneralConfig(
        host="127.0.0.1", port=0, unix_socket_dir=str(tmp_path), unix_socket_mode="0o640"
    )
    listeners = bind_listeners(general)
    try:
        assert os.stat(tmp_path / ".s.PGSQL.0").st_mode & 0o777 == 0o640
    finally:
        for sock in listeners:
            sock.close()


def test_the_dispatcher_accepts_and_the_receiver_adopts(
    loop: asyncio.AbstractEventLoop, board: LoadBoard, tmp_path: Path
) -> None:
    """End to end on one loop: a listener bound from the config, the supervisor's
    accept loop, the channel, and a worker's receiver answering on the adopted socket."""
    general = GeneralConfig(host="127.0.0.1", port=0, unix_socket_dir=str(tmp_path))
    listeners = bind_listeners(general)
    assert sorted(s.family for s in listeners) == sorted([socket.AF_INET, socket.AF_UNIX])
    tcp = next(s for s in listeners if s.family == socket.AF_INET)
    dispatcher = Dispatcher(loop, listeners, board, WORKERS)
    adopted: list[socket.socket] = []
    receivers = []
    for index in range(WORKERS):
        ours, theirs = channel_pair()
        dispatcher.attach(index, ours)
        receiver = Receiver(loop, theirs, board, index, adopting(adopted), *_NO_UPGRADE)
        receiver.start()
        receivers.append(receiver)
    dispatcher.start()

    async def clients() -> list[bytes]:
        address = tcp.getsockname()
        tcp_pair = [await asyncio.open_connection(*address) for _ in range(2)]
        unix_path = str(tmp_path / f".s.PGSQL.{general.port}")
        unix_pair = await asyncio.open_unix_connection(unix_path)
        while len(adopted) < 3:
            await asyncio.sleep(0.01)
        for sock in adopted:
            sock.sendall(sock.family.name.encode() + b"\n")
        answers = [await reader.readline() for reader, _ in [*tcp_pair, unix_pair]]
        for _, writer in [*tcp_pair, unix_pair]:
            writer.close()
        return answers

    answers = loop.run_until_complete(asyncio.wait_for(clients(), 10))
    assert answers == [b"AF_INET\n", b"AF_INET\n", b"AF_UNIX\n"]
    # One connection per worker: all were equally (un)loaded, so they took turns.
    assert dispatcher.sent == [1, 1, 1]
    receivers[0].client_closed()
    assert dispatcher.load(0) == 0 and board.closed(0) == 1
    for sock in adopted:
        sock.close()
    for receiver in receivers:
        receiver.stop()
    dispatcher.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_burst_of_connections_is_all_served(
    loop_kind: str, board: LoadBoard, listener: socket.socket
) -> None:
    """The supervisor accepts and the worker receives one connection per wakeup; a
    burst queued at once in the backlog and in the channels is still all handed over,
    because the loop reports the listener and the channel ready again."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        event_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        event_loop = asyncio.new_event_loop()
    burst = 300
    dispatcher = Dispatcher(event_loop, [listener], board, WORKERS)
    adopted: list[socket.socket] = []
    receivers = []
    for index in range(WORKERS):
        ours, theirs = channel_pair()
        dispatcher.attach(index, ours)
        receivers.append(
            Receiver(event_loop, theirs, board, index, adopting(adopted), *_NO_UPGRADE)
        )
    listener.listen(1024)
    address = listener.getsockname()
    # All queued in the listener's backlog before the loop runs.
    clients = [socket.create_connection(address) for _ in range(burst)]
    try:
        dispatcher.start()
        for receiver in receivers:
            receiver.start()

        async def served() -> None:
            while len(adopted) < burst:
                await asyncio.sleep(0.01)

        event_loop.run_until_complete(asyncio.wait_for(served(), 10))
        assert sum(dispatcher.sent) == burst == sum(r.received for r in receivers)
        assert all(receiver.received > 0 for receiver in receivers)
        assert dispatcher.dropped == 0
    finally:
        for sock in [*adopted, *clients]:
            sock.close()
        for receiver in receivers:
            receiver.stop()
        dispatcher.close()
        event_loop.close()


def test_with_every_worker_gone_connections_wait_in_the_backlog(
    loop: asyncio.AbstractEventLoop, board: LoadBoard
) -> None:
    """No worker to take a connection (all restarting): leave new connections queued
    in the listen backlog rather than accepting and closing them."""
    general = GeneralConfig(host="127.0.0.1", port=0)
    listeners = bind_listeners(general)
    dispatcher = Dispatcher(loop, listeners, board, 1)
    dispatcher.start()

    async def connect_and_wait() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection(*listeners[0].getsockname())
        await asyncio.sleep(0.2)
        return writer

    writer = loop.run_until_complete(connect_and_wait())
    assert dispatcher.sent == [0] and dispatcher.dropped == 0
    ours, theirs = channel_pair()
    dispatcher.attach(0, ours)  # a worker is back: the queued connection goes to it

    async def taken() -> None:
        while dispatcher.sent != [1]:
            await asyncio.sleep(0.01)

    loop.run_until_complete(asyncio.wait_for(taken(), 5))
    kind, fd = received_fd(theirs)
    assert kind == b"4"
    os.close(fd)
    writer.close()
    dispatcher.close()
    theirs.close()


def test_a_worker_that_stops_taking_connections_is_passed_over(
    loop: asyncio.AbstractEventLoop, board: LoadBoard, listener: socket.socket
) -> None:
    """Worker 0 stops reading its channel (blocked or stopped); worker 1 keeps up.
    Once worker 0 lags LAG_LIMIT connections behind, everything goes to worker 1,
    although worker 1 then holds more clients; when worker 0 catches up it gets
    connections again."""
    dispatcher = Dispatcher(loop, [], board, 2)
    (first, first_theirs), (second, second_theirs) = channel_pair(), channel_pair()
    second_theirs.setblocking(False)
    dispatcher.attach(0, first)
    dispatcher.attach(1, second)
    taken_by_second = 0
    peers = []

    def connect_one() -> None:
        nonlocal taken_by_second
        client, accepted = connect(listener)
        peers.append(client)
        assert dispatcher.dispatch(accepted.fileno(), b"4")
        accepted.close()
        with contextlib.suppress(BlockingIOError):
            while True:
                _, fd = received_fd(second_theirs)
                os.close(fd)
                taken_by_second += 1
        board.set_received(1, taken_by_second)

    for _ in range(100):
        connect_one()
    assert dispatcher.sent == [LAG_LIMIT + 1, 100 - LAG_LIMIT - 1]
    assert dispatcher.lagging(0) and not dispatcher.lagging(1)
    # Worker 0 takes what was queued for it: it is preferred again (fewer clients).
    for _ in range(LAG_LIMIT + 1):
        os.close(received_fd(first_theirs)[1])
    board.set_received(0, LAG_LIMIT + 1)
    connect_one()
    assert dispatcher.sent[0] == LAG_LIMIT + 2
    dispatcher.close()
    for sock in [*peers, first_theirs, second_theirs]:
        sock.close()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class Echo(asyncio.Protocol):
    """Answers each read with the same bytes; closes its transport on `bye`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.made = False
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if data == b"bye":
            self.transport.close()
        else:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_adopted_descriptor_is_served_and_closed_once(
    loop_kind: str, listener: socket.socket
) -> None:
    """A worker serves a received descriptor with its protocol, without a socket object
    on uvloop; closing the transport closes the descriptor, and nothing closes its
    number again once another socket has it."""
    loop = new_loop(loop_kind)
    failures: list[Exception] = []
    try:
        listener.listen(4)
        tcp_peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        unix_peer, unix_ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        served = [
            (tcp_peer, accepted.detach(), int(socket.AF_INET)),
            (unix_peer, unix_ours.detach(), int(socket.AF_UNIX)),
        ]

        async def exchange() -> None:
            for peer, fd, family in served:
                echo = Echo(loop)
                open_accepted(loop, echo, fd, family, lambda _, exc: failures.append(exc))
                peer.setblocking(False)
                await loop.sock_sendall(peer, b"ping")
                assert await loop.sock_recv(peer, 16) == b"ping"
                assert echo.made
                await loop.sock_sendall(peer, b"bye")
                await asyncio.wait_for(echo.lost, 5)
                assert await loop.sock_recv(peer, 16) == b""  # the pooler's side closed
                await asyncio.sleep(0.01)
                assert not is_open(fd)
                # The next socket may get the same number; it must stay open.
                successor = socket.socket()
                try:
                    await asyncio.sleep(0.01)
                    gc.collect()
                    assert is_open(successor.fileno())
                finally:
                    successor.close()
                peer.close()

        loop.run_until_complete(asyncio.wait_for(exchange(), 10))
        assert failures == []
    finally:
        loop.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_descriptor_the_loop_cannot_serve_is_closed_and_reported(loop_kind: str) -> None:
    loop = new_loop(loop_kind)
    failures: list[tuple[Echo, Exception]] = []
    try:
        fd = os.open(os.devnull, os.O_RDONLY)  # not a socket
        echo = Echo(loop)

        async def adopt() -> None:
            open_accepted(
                loop, echo, fd, int(socket.AF_INET), lambda p, exc: failures.append((p, exc))
            )
            await asyncio.sleep(0.01)

        loop.run_until_complete(adopt())
        assert [(p, type(exc)) for p, exc in failures] == [(echo, OSError)]
        assert failures[0][1].errno == errno.ENOTSOCK
        assert not echo.made
        assert not is_open(fd)
    finally:
        loop.close()


def test_drain_takes_every_connection_waiting_in_the_channel(
    loop: asyncio.AbstractEventLoop, board: LoadBoard
) -> None:
    """A stopping worker takes what the supervisor already sent, so that those clients
    are answered like the others instead of losing their connection unanswered."""
    ours, theirs = channel_pair()
    adopted: list[socket.socket] = []
    receiver = Receiver(loop, theirs, board, 0, adopting(adopted), *_NO_UPGRADE)
    receiver.start()  # the loop does not run here: only drain() reads
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for _, server_side in pairs:
            socket.send_fds(ours, [b"u"], [server_side.fileno()])
        receiver.drain()
        assert len(adopted) == 3 and receiver.received == 3
        for (client_side, _), sock in zip(pairs, adopted, strict=True):
            sock.sendall(b"x")
            assert client_side.recv(1) == b"x"  # the very connection, passed whole
        receiver.stop()
        receiver.drain()  # a closed channel: nothing to take, nothing logged
    finally:
        for sock in adopted:
            sock.close()
        for pair in pairs:
            for sock in pair:
                sock.close()
        ours.close()


def test_an_upgrade_moves_clients_with_their_state_and_names_the_successor(
    loop: asyncio.AbstractEventLoop, board: LoadBoard
) -> None:
    """A moved client arrives with its session state (here about 190 kB, near the
    largest that moves) and counts as sent to and taken by that worker; an old worker
    gets the channel to the new process; connections before and after are unaffected."""
    dispatcher = Dispatcher(loop, [], board, 1)
    ours, theirs = channel_pair()
    dispatcher.attach(0, ours)
    adopted: list[socket.socket] = []
    moved: list[tuple[socket.socket, bytes]] = []
    successors: list[socket.socket] = []

    def adopt_moved(fd: int, state: bytes) -> None:
        moved.append((socket.socket(fileno=fd), state))

    def successor(fd: int) -> None:
        successors.append(socket.socket(fileno=fd))

    receiver = Receiver(loop, theirs, board, 0, adopting(adopted), adopt_moved, successor)
    receiver.start()  # the loop does not run here: only drain() reads
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    state = os.urandom(190 * 1024)
    try:
        assert dispatcher.dispatch(pairs[0][1].fileno(), b"u")
        assert dispatcher.send_moved(pairs[1][1].fileno(), state)
        assert dispatcher.send_successor(0, pairs[2][1].fileno())
        receiver.drain()
        assert len(adopted) == 1 and len(successors) == 1
        assert [got for _, got in moved] == [state]
        assert dispatcher.sent[0] == 2 and receiver.received == 2
        for (client_side, _), sock in zip(
            pairs, [adopted[0], moved[0][0], successors[0]], strict=True
        ):
            sock.sendall(b"x")
            assert client_side.recv(1) == b"x"
        dispatcher.detach(0)
        assert not dispatcher.send_moved(pairs[1][1].fileno(), b"state")
        assert not dispatcher.send_successor(0, pairs[2][1].fileno())
    finally:
        for sock in [*adopted, *successors, *(s for s, _ in moved)]:
            sock.close()
        for pair in pairs:
            for sock in pair:
                sock.close()
        receiver.stop()
