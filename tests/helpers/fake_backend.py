"""Stand-ins for PostgreSQL on a local port, for server behaviour a real one won't show
on demand (broken replies, refused or never-answered logins, unanswered probes)."""

from __future__ import annotations

import socket
import struct
import threading

from . import ExamplePostgres
from . import pgwire as w
from .listen import md5_user_pool


def login_ok(pid: int = 4242) -> bytes:
    """What a trusting PostgreSQL answers a startup packet with, for backend `pid`."""
    return (
        w.message(b"R", struct.pack("!i", 0))
        + w.message(b"S", w.cstr("server_version") + w.cstr("18.0"))
        + w.message(b"S", w.cstr("client_encoding") + w.cstr("UTF8"))
        + w.message(b"K", struct.pack("!ii", pid, 99))
        + w.message(b"Z", b"I")
    )


LOGIN_OK = login_ok()
# The reply to any query: one row, one column, the text "1".
ONE_ROW = (
    w.message(b"T", struct.pack("!h", 1) + w.cstr("x") + bytes(18))
    + w.message(b"D", struct.pack("!hi", 1, 1) + b"1")
    + w.message(b"C", w.cstr("SELECT 1"))
    + w.message(b"Z", b"I")
)


def stand_in_pool(
    backend: FakeBackend, pg: ExamplePostgres, pool_size: int = 1
) -> dict[str, object]:
    """The pools of a pooler whose md5 user's pool is served by `backend`."""
    return md5_user_pool(pg, pool_size, server_host="127.0.0.1", server_port=backend.port)


def read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_startup(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!i", read_exact(sock, 4))
    return read_exact(sock, length - 4)


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    msg_type = read_exact(sock, 1)
    (length,) = struct.unpack("!i", read_exact(sock, 4))
    return msg_type, read_exact(sock, length - 4)


class FakeBackend:
    """Listens on 127.0.0.1 and runs serve() for each connection in a thread of its
    own; counts the connections it got and those still open."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.accepted, self.open

    def serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            with sock:
                self.serve(sock)
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                self.open -= 1


class QueryBackend(FakeBackend):
    """Lets anyone in and answers each query with reply(): one row unless a subclass
    says otherwise (None: no answer at all)."""

    def serve(self, sock: socket.socket) -> None:
        read_startup(sock)  # anyone is welcome
        sock.sendall(LOGIN_OK)
        while True:
            msg_type, body = read_message(sock)
            if msg_type == b"X":
                return
            text = body.rstrip(b"\x00")
            reply = self.reply(text)
            if reply is not None:
                sock.sendall(reply)
                self.answered(text)

    def reply(self, text: bytes) -> bytes | None:
        """The answer to a query whose text is `text`."""
        return ONE_ROW

    def answered(self, text: bytes) -> None:
        """Called once the answer to `text` is sent."""


class GatedLoginBackend(FakeBackend):
    """Answers a login only once `gate` is set, then every query with one row;
    `login_started` is set when the first startup packet has arrived."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.login_started = threading.Event()
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        read_startup(sock)
        self.login_started.set()
        if not self.gate.wait(30):
            return
        sock.sendall(LOGIN_OK)
        while read_message(sock)[0] != b"X":
            sock.sendall(ONE_ROW)
