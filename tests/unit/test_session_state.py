"""The session state a binary upgrade hands over with each client's socket, and the
channel that carries both (app.migration), over real sockets."""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import replace

import pytest

from pg_doorman.app.migration import Immigration, channel_pair
from pg_doorman.net.session_state import MAGIC, SessionState


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
        extra_parameters={"statement_timeout": "4321"},
        raw_parameters=("DateStyle",),
        server_parameters={"server_version": "16.4", "DateStyle": "ISO, MDY"},
        named=[(b"s1", b"select $1\x00\x00\x01\x00\x00\x00\x17", b"search_path=a")],
        unnamed=(b"select 2\x00\x00\x00", b""),
        pending=b"Q\x00\x00\x00\x0dselect 1\x00",
        scram_client_key=bytes(range(32)),
        pam_password=None,
    )
    return replace(session, **changes)  # type: ignore[arg-type]


def test_a_session_survives_encoding() -> None:
    session = a_session()
    assert SessionState.decode(session.encode()) == session
    bare = a_session(named=[], unnamed=None, pending=b"", scram_client_key=None, pam_password="pw")
    assert SessionState.decode(bare.encode()) == bare


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
        ("raw_parameters", "DateStyle"),
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
