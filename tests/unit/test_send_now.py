"""The send SocketWriter writes with: the C helper `_send.send_now` (compiled build) and
its library fallback, on real sockets."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from tests.helpers.implementation import expect_compiled, needs_c_helper

from pg_doorman.net import writer
from pg_doorman.net.writer import send_with_os_write

Send = Callable[[int, bytes], int]

needs_helper = needs_c_helper("pg_doorman.net._send")


def _helper() -> Send:
    from pg_doorman.net import _send

    return _send.send_now


SENDS = [
    pytest.param(lambda: send_with_os_write, id="os.write"),
    pytest.param(_helper, id="C helper", marks=needs_helper),
]


@pytest.fixture(params=SENDS)
def send(request: pytest.FixtureRequest) -> Send:
    factory: Callable[[], Send] = request.param
    return factory()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    for sock in (ours, peer):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def drain(sock: socket.socket) -> bytes:
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def test_what_the_kernel_takes_arrives(
    send: Send, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    data = b"Q\x00\x00\x00\x0dselect 1\x00"
    assert send(ours.fileno(), data) == len(data)
    assert drain(peer) == data


@needs_helper
@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_the_helper_sends_any_buffer(
    pair: tuple[socket.socket, socket.socket], kind: Callable[[bytes], bytes]
) -> None:
    ours, peer = pair
    data = b"Q\x00\x00\x00\x0dselect 1\x00"
    assert _helper()(ours.fileno(), kind(data)) == len(data)
    assert drain(peer) == data


def test_a_full_socket_takes_part_then_nothing(
    send: Send, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    chunk = bytes(range(256)) * 40
    sent = bytearray()
    counts = []
    for _ in range(200):
        count = send(ours.fileno(), chunk)
        counts.append(count)
        sent += chunk[:count]
        if count == 0:
            break
    assert counts[-1] == 0, "the socket never filled"
    assert any(0 < c < len(chunk) for c in counts) or counts[-2] == len(chunk)
    # Exactly the bytes reported sent arrive, in order.
    received = bytearray()
    while len(received) < len(sent):
        more = drain(peer)
        assert more, f"only {len(received)} of {len(sent)} bytes arrived"
        received += more
    assert received == sent


def test_a_closed_peer_is_an_os_error(
    send: Send, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    peer.close()
    with pytest.raises(OSError) as raised:
        send(ours.fileno(), b"x")
    assert raised.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_a_closed_descriptor_is_an_os_error(send: Send) -> None:
    ours, peer = socket.socketpair()
    fd = ours.fileno()
    ours.close()
    peer.close()
    with pytest.raises(OSError) as raised:
        send(fd, b"x")
    assert raised.value.errno == errno.EBADF


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


@needs_helper
def test_the_helper_never_raises_sigpipe() -> None:
    """With SIGPIPE at its default (which kills), a send to a gone peer still only
    fails with EPIPE: the helper asks for no signal."""
    result = _run_child(
        """
        import signal, socket
        from pg_doorman.net._send import send_now
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        ours, peer = socket.socketpair()
        peer.close()
        try:
            send_now(ours.fileno(), b"x")
        except OSError as exc:
            print("errno", exc.errno)
        """
    )
    assert result.returncode == 0, f"child died: {result.returncode} {result.stderr}"
    assert result.stdout.strip() == f"errno {errno.EPIPE}"


@needs_helper
def test_the_helper_never_waits_on_a_blocking_socket() -> None:
    """It keeps the GIL, so it must not block even where the descriptor would."""
    result = _run_child(
        """
        import socket
        from pg_doorman.net._send import send_now
        ours, peer = socket.socketpair()
        ours.setblocking(True)
        counts = [send_now(ours.fileno(), b"x" * 65536) for _ in range(100)]
        print(counts[-1], sum(counts) > 0)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]


@needs_helper
def test_the_helper_rejects_bad_arguments() -> None:
    send_now = _helper()
    with pytest.raises(ValueError, match="invalid file descriptor -1"):
        send_now(-1, b"x")
    with pytest.raises(TypeError, match="takes 2 arguments"):
        send_now(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        send_now(1, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        send_now("1", b"x")  # type: ignore[arg-type]


def test_the_writer_sends_with_the_helper_only_with_the_compiled_build() -> None:
    if expect_compiled():
        assert writer.send_now is _helper()
    else:
        assert writer.send_now is send_with_os_write
