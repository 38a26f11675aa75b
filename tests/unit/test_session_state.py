"""The session state a binary upgrade hands over with each client's socket, and the
channel that carries both (app.migration), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from dataclasses import replace

import pytest

from pg_doorman.app.dispatch import received_descriptors
from pg_doorman.app.migration import (
    Emigration,
    Immigration,
    PreviousProcessGone,
    channel_pair,
    send_cancel,
)
from pg_doorman.net.session_state import MAGIC, MAX_STATE, SessionState


def a_session(**changes: object) -> SessionState:
    session = SessionState(
        client_id=(1 << 24) | 7,
        secret=-123456,
        database="example_db",
        user="alice",
        application_name="app",
        address="127.0.0.1",
        port=54321,
        unix=False,
        age=12.5,
        parameters={"DateStyle": "ISO, MDY", "application_name": "app"},
        extra_parameters={"statement_timeout": "4321", "search_path": "app, public"},
        startup_settings={"statement_timeout": "4321"},
        raw_parameters=("DateStyle",),
        server_parameters={"server_version": "16.4", "DateStyle": "ISO, MDY"},
        named=[
            (b"s1", b"select $1\x00\x00\x01\x00\x00\x00\x17", b"search_path=a", b"\x00\x01?"),
            (b"s2", b"select\x00\x00\x00", b"", None),  # its columns not known
        ],
        unnamed=(b"select 2\x00\x00\x00", b"", b""),  # b"": no row (NoData)
        pending=b"Q\x00\x00\x00\x0dselect 1\x00",
        scram_client_key=bytes(range(32)),
        pam_password=None,
    )
    return replace(session, **changes)


def test_a_session_survives_encoding() -> None:
    session = a_session()
    assert SessionState.decode(session.encode()) == session
    bare = a_session(named=[], unnamed=None, pending=b"", scram_client_key=None, pam_password="pw")
    assert SessionState.decode(bare.encode()) == bare


def test_statements_from_a_process_that_carried_no_columns_are_read() -> None:
    """The state of a version before the result columns were carried: the statements
    arrive with their columns not known."""
    import json

    document = json.loads(a_session().encode()[len(MAGIC) :])
    document["named"] = [item[:3] for item in document["named"]]
    document["unnamed"] = document["unnamed"][:2]
    session = SessionState.decode(MAGIC + json.dumps(document).encode())
    assert [(n, s) for n, _, _, s in session.named] == [(b"s1", None), (b"s2", None)]
    assert session.unnamed == (b"select 2\x00\x00\x00", b"", None)


def test_settings_from_a_process_that_carried_only_startup_ones_are_read() -> None:
    """The state of a version whose extra parameters were the startup settings alone:
    they stay the startup settings."""
    import json

    document = json.loads(a_session().encode()[len(MAGIC) :])
    del document["startup_settings"]
    session = SessionState.decode(MAGIC + json.dumps(document).encode())
    assert session.startup_settings == session.extra_parameters
    assert session.extra_parameters == {"statement_timeout": "4321", "search_path": "app, public"}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"PGDM0\x00{}", "not a session state"),
        (MAGIC + b"{not json", "not valid JSON"),
        (MAGIC + b"[]", "not an object"),
        (MAGIC + b"{}", "lacks 'named'"),
    ],
)
def test_what_is_not_a_session_state_is_refused(data: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SessionState.decode(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("client_id", "7"),
        ("unix", 1),
        ("age", "old"),
        ("parameters", {"a": 1}),
        ("named", [["czE=", "eA=="]]),
        ("named", [["not base64!", "eA==", ""]]),
        ("named", [["czE=", "eA==", "", 7]]),
        ("named", [["czE=", "eA==", "", None, None]]),
        ("raw_parameters", "DateStyle"),
        ("startup_settings", {"a": 1}),
        ("unnamed", ["eA=="]),
    ],
)
def test_a_field_of_the_wrong_kind_is_refused(field: str, value: object) -> None:
    import json

    document = json.loads(a_session().encode()[len(MAGIC) :])
    document[field] = value
    with pytest.raises(ValueError, match="invalid session state"):
        SessionState.decode(MAGIC + json.dumps(document).encode())


def _send(channel: socket.socket, payload: bytes, fd: int | None) -> None:
    rights = (
        []
        if fd is None
        else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
    )
    channel.sendmsg([payload], rights)


def test_the_channel_carries_sockets_with_their_sessions() -> None:
    """A client's socket arrives with its session; one with a state that is not one
    is told to reconnect (57P01) and closed; a message without a socket is skipped;
    the old process closing its end stops the reading."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = channel_pair()
        arrived: list[tuple[int, int, SessionState]] = []
        immigration = Immigration(loop, theirs, lambda *args: arrived.append(args))
        immigration.start()
        good_client, good_pooler_side = socket.socketpair()
        bad_client, bad_pooler_side = socket.socketpair()
        ours.setblocking(True)
        _send(ours, a_session().encode(), good_pooler_side.fileno())
        _send(ours, b"garbage", bad_pooler_side.fileno())
        _send(ours, a_session().encode(), None)
        good_pooler_side.close()  # the old process lets its descriptors go
        bad_pooler_side.close()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if arrived:
                break
        assert len(arrived) == 1
        fd, family, session = arrived[0]
        assert family == socket.AF_UNIX and session == a_session()
        with socket.socket(fileno=fd) as moved:
            moved.sendall(b"hello")
            assert good_client.recv(5) == b"hello"
        bad_client.settimeout(5)
        reply = bad_client.recv(4096)
        assert reply[:1] == b"E" and b"57P01" in reply and b"reconnect" in reply
        assert bad_client.recv(10) == b""  # closed
        ours.close()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if theirs.fileno() == -1:
                break
        assert theirs.fileno() == -1
        assert immigration.received == 1
        good_client.close()
        bad_client.close()

    asyncio.run(main())


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


class _Client:
    """The part of ClientConnection that Emigration uses, over a real socket."""

    def __init__(self, n: int, sock: socket.socket) -> None:
        self.name = f"#c{n}"
        self.server = None
        self.transport = _Transport(sock)
        self.closing_after_transaction: str | None = "pooler is shut down now"
        self.session = a_session(client_id=n, pending=bytes(3000))
        self.left = 0
        self.failed: list[str] = []

    @property
    def transport_closed(self) -> bool:
        return self.left > 0

    def move_blocker(self) -> str | None:
        return None

    def export_session(self) -> SessionState:
        return self.session

    def leave_for_successor(self) -> None:
        self.left += 1

    def fail(self, code: str, message: str) -> None:
        self.failed.append(code)


def test_clients_wait_while_the_channel_is_full_and_all_arrive() -> None:
    """A new process slower to read than the old one is to send: the channel fills,
    the clients that found it full go a moment later, each exactly once."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = channel_pair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        emigration = Emigration(loop, ours, lambda pid, secret: None)
        pairs = [socket.socketpair() for _ in range(40)]
        clients = [_Client(n, pair[1]) for n, pair in enumerate(pairs)]
        try:
            assert all(emigration.take(client) for client in clients)
            assert sum(client.left for client in clients) < len(clients)  # some wait
            theirs.setblocking(False)
            arrived: list[int] = []
            for _ in range(500):
                await asyncio.sleep(0.005)
                with contextlib.suppress(BlockingIOError):
                    data, ancillary, _, _ = theirs.recvmsg(MAX_STATE + 1, socket.CMSG_SPACE(4))
                    arrived.append(SessionState.decode(data).client_id)
                    for fd in received_descriptors(ancillary):
                        os.close(fd)
                if len(arrived) == len(clients):
                    break
            assert sorted(arrived) == list(range(len(clients)))
            assert [client.left for client in clients] == [1] * len(clients)
            assert not any(client.failed for client in clients)
        finally:
            emigration.close()
            theirs.close()
            for pair in pairs:
                for sock in pair:
                    sock.close()

    asyncio.run(main())


def test_a_cancel_receipt_closes_once_the_old_process_has_acted() -> None:
    """The new process's end of a cancel request's receipt reads end-of-file only when
    the delivery the old process started is done; at once when there was nothing to
    deliver; and a channel whose old end is gone says so."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = channel_pair()
        theirs.setblocking(False)
        asked: list[tuple[int, int]] = []
        delivery: asyncio.Future[None] = loop.create_future()

        def cancel(pid: int, secret: int) -> asyncio.Future[None] | None:
            asked.append((pid, secret))
            return delivery if pid == 7 else None

        emigration = Emigration(loop, ours, cancel)
        try:
            receipt = send_cancel(theirs, 7, -5)
            assert receipt is not None
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_recv(receipt, 1), 0.3)
            assert asked == [(7, -5)]
            delivery.set_result(None)
            assert await asyncio.wait_for(loop.sock_recv(receipt, 1), 5) == b""
            receipt.close()

            idle = send_cancel(theirs, 8, 1)  # nothing to cancel there
            assert idle is not None
            assert await asyncio.wait_for(loop.sock_recv(idle, 1), 5) == b""
            idle.close()
            assert asked == [(7, -5), (8, 1)]
        finally:
            emigration.close()
        with pytest.raises(PreviousProcessGone):  # the old end closed: nobody reads
            send_cancel(theirs, 9, 1)
        theirs.close()
        with pytest.raises(PreviousProcessGone):
            send_cancel(theirs, 9, 1)

    asyncio.run(main())


def test_an_old_worker_waits_for_the_cancels_it_passes_on_before_it_exits() -> None:
    """Every old worker reads the one channel to the new process, so a cancel for one
    worker's client may be read by another that is about to exit; that one must not
    exit (dropping the request) before the request has reached its target."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = channel_pair()
        theirs.setblocking(False)
        delivery: asyncio.Future[None] = loop.create_future()
        emigration = Emigration(loop, ours, lambda pid, secret: delivery)
        receipt = send_cancel(theirs, 7, 1)
        assert receipt is not None
        for _ in range(100):
            if emigration.delivering:
                break
            await asyncio.sleep(0.01)
        assert emigration.delivering == {delivery}
        emigration.close()  # no more requests are read; the one read is still on its way
        waiting = loop.create_task(emigration.delivered())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        delivery.set_result(None)
        await asyncio.wait_for(waiting, 5)
        assert emigration.delivering == set()
        assert await asyncio.wait_for(loop.sock_recv(receipt, 1), 5) == b""
        receipt.close()
        # A delivery that never ends holds the exit only so long.
        stuck: asyncio.Future[None] = loop.create_future()
        emigration.delivering.add(stuck)
        started = loop.time()
        await emigration.delivered(timeout=0.2)
        assert 0.15 < loop.time() - started < 5
        theirs.close()

    asyncio.run(main())
