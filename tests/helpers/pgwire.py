"""A small synchronous PostgreSQL wire-protocol client for tests.

It is deliberately independent from the product's protocol code: parity tests send the
same bytes to PostgreSQL and to the pooler and compare what comes back, so this client
sends exactly what the test builds and keeps every byte it receives.

Builders (``query``, ``parse``, ``bind``, ...) return complete messages as bytes; a
``PgWire`` connection sends them with ``send_raw`` (or ``send(type, payload)``) and reads
replies with ``read_message`` / ``read_until_ready``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

Message = tuple[bytes, bytes]

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")


# --- errors ----------------------------------------------------------------------------


class PgWireError(Exception):
    """Protocol-level trouble (unexpected message, bad server signature, ...)."""


class ConnectionClosed(PgWireError):
    """The peer closed the connection."""


class ServerError(PgWireError):
    """An ErrorResponse, with its fields keyed by their one-letter codes."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)
        super().__init__(f"{self.severity} {self.sqlstate}: {self.message}")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


# --- encoding helpers -------------------------------------------------------------------


def cstr(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return data + b"\x00"


def message(type_: bytes, payload: bytes = b"") -> bytes:
    """A typed message: type byte, int32 length (itself included), payload."""
    return type_ + _I32.pack(len(payload) + 4) + payload


def _untyped(payload: bytes) -> bytes:
    return _I32.pack(len(payload) + 4) + payload


# --- untyped (startup-phase) messages ---------------------------------------------------


def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(protocol)
    for key, value in params.items():
        body += cstr(key) + cstr(value)
    return _untyped(body + b"\x00")


def ssl_request() -> bytes:
    return _untyped(_I32.pack(SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    return _untyped(_I32.pack(GSSENC_REQUEST_CODE))


def cancel_request(pid: int, secret: int | bytes) -> bytes:
    key = _I32.pack(secret) if isinstance(secret, int) else secret
    return _untyped(_I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + key)


# --- frontend messages ------------------------------------------------------------------


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = (
        cstr(name)
        + cstr(sql)
        + struct.pack(f"!h{len(param_types)}I", len(param_types), *param_types)
    )
    return message(b"P", body)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | str | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = cstr(portal) + cstr(statement)
    body += struct.pack(f"!h{len(param_formats)}h", len(param_formats), *param_formats)
    body += struct.pack("!h", len(params))
    for value in params:
        if value is None:
            body += _I32.pack(-1)
        else:
            data = value.encode() if isinstance(value, str) else value
            body += _I32.pack(len(data)) + data
    body += struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)
    return message(b"B", body)


def describe(kind: str, name: str = "") -> bytes:
    """kind: 'S' (statement) or 'P' (portal)."""
    return message(b"D", kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + _I32.pack(max_rows))


def close(kind: str, name: str = "") -> bytes:
    """kind: 'S' (statement) or 'P' (portal)."""
    return message(b"C", kind.encode() + cstr(name))


def sync() -> bytes:
    return message(b"S")


def flush() -> bytes:
    return message(b"H")


def terminate() -> bytes:
    return message(b"X")


def copy_data(data: bytes | str) -> bytes:
    return message(b"d", data.encode() if isinstance(data, str) else data)


def copy_done() -> bytes:
    return message(b"c")


def copy_fail(reason: str) -> bytes:
    return message(b"f", cstr(reason))


def password_message(password: str | bytes) -> bytes:
    return message(b"p", cstr(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


# --- backend message decoding -----------------------------------------------------------


def error_response(code: str, text: str, severity: str = "ERROR") -> bytes:
    """An ErrorResponse as a server sends it: severity, SQLSTATE and message."""
    fields = f"S{severity}\0V{severity}\0C{code}\0M{text}\0\0"
    return message(b"E", fields.encode())


def error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload, keyed by field code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        end = payload.index(b"\x00", pos + 1)
        fields[chr(payload[pos])] = payload[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def data_row(payload: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (size,) = _I32.unpack_from(payload, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos : pos + size])
            pos += size
    return values


def row_description(payload: bytes) -> list[str]:
    """Column names of a RowDescription payload."""
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    names = []
    for _ in range(count):
        end = payload.index(b"\x00", pos)
        names.append(payload[pos:end].decode())
        pos = end + 1 + 18
    return names


def command_tag(payload: bytes) -> str:
    return payload.rstrip(b"\x00").decode()


def rows(messages: Iterable[Message]) -> list[tuple[str | None, ...]]:
    """Text values of every DataRow in `messages`."""
    return [
        tuple(None if v is None else v.decode() for v in data_row(payload))
        for type_, payload in messages
        if type_ == b"D"
    ]


Reply = tuple[bytes, object]


def comparable(messages: Iterable[Message]) -> list[Reply]:
    """Replies as compared: an ErrorResponse or NoticeResponse by its fields, without
    the source file, line and routine of the code that raised it."""
    out: list[Reply] = []
    for type_, payload in messages:
        if type_ in (b"E", b"N"):
            fields = error_fields(payload)
            out.append((type_, sorted((k, v) for k, v in fields.items() if k not in "FLR")))
        else:
            out.append((type_, payload))
    return out


def msg_types(messages: Iterable[Message]) -> str:
    """The message types as one string, e.g. '12TDCZ': handy in assertions."""
    return "".join(t.decode() for t, _ in messages)


def first_error(messages: Iterable[Message]) -> ServerError | None:
    for type_, payload in messages:
        if type_ == b"E":
            return ServerError(error_fields(payload))
    return None


# --- password math (client side and stored verifiers) -----------------------------------


def md5_password_hash(password: str, user: str) -> str:
    """What PostgreSQL stores for an md5 password: 'md5' + md5(password || user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(password: str, user: str, salt: bytes) -> str:
    inner = md5_password_hash(password, user)[3:]
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def _hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier in PostgreSQL's pg_authid format (ASCII passwords)."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(_hmac256(salted, b"Client Key")).digest()
    server_key = _hmac256(salted, b"Server Key")
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


class ScramClient:
    """Client side of SCRAM-SHA-256; with `gs2_header` "p=tls-server-end-point,," and
    the TLS session's `binding` data, of SCRAM-SHA-256-PLUS."""

    def __init__(
        self,
        password: str,
        nonce: str | None = None,
        *,
        gs2_header: str = "n,,",
        binding: bytes = b"",
    ) -> None:
        self.password = password
        self.nonce = nonce or _b64(os.urandom(18))
        self.gs2_header = gs2_header
        self.binding = binding
        # PostgreSQL takes the user from the startup packet and ignores n= here.
        self.client_first_bare = f"n=,r={self.nonce}"
        self._server_signature = b""

    def first_message(self) -> bytes:
        return (self.gs2_header + self.client_first_bare).encode()

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(","))
        server_nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not server_nonce.startswith(self.nonce):
            raise PgWireError("SCRAM server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = _hmac256(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        channel = _b64(self.gs2_header.encode() + self.binding)  # "biws" for "n,,"
        without_proof = f"c={channel},r={server_nonce}"
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode()
        signature = _hmac256(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac256(_hmac256(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify_final(self, server_final: bytes) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.decode().split(","))
        if "e" in attrs:
            raise PgWireError(f"SCRAM server error: {attrs['e']}")
        if base64.b64decode(attrs.get("v", "")) != self._server_signature:
            raise PgWireError("SCRAM server signature mismatch")


# --- the connection ---------------------------------------------------------------------


class PgWire:
    """One raw connection. Every byte sent is in ``sent``; every message read is in
    ``received`` (and the raw bytes in ``raw_received``)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = bytearray()
        self.raw_received = bytearray()
        self.received: list[Message] = []
        self._buf = bytearray()
        self.backend_pid: int | None = None
        self.secret_key: bytes | None = None
        self.parameters: dict[str, str] = {}
        self.status: str | None = None  # last ReadyForQuery status: I, T or E

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> bytes:
        """Send SSLRequest; on "S" go on over TLS. The server's one-byte answer."""
        answer = self.request_ssl()
        if answer == b"S":
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return answer

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        user: str,
        database: str | None = None,
        password: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        protocol: int = PROTOCOL_3_0,
        timeout: float = 10.0,
    ) -> PgWire:
        """Open a connection and log in; raises ServerError when login is refused."""
        conn = cls(host, port, timeout=timeout)
        try:
            conn.startup(user, database, password, params=params, protocol=protocol)
        except BaseException:
            conn.close_socket()
            raise
        return conn

    # -- raw I/O

    def send_raw(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def send(self, type_: bytes, payload: bytes = b"") -> None:
        self.send_raw(message(type_, payload))

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_text())
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(self._timeout_text()) from None
        if not chunk:
            raise ConnectionClosed(
                f"connection closed by peer; last messages: {msg_types(self.received[-20:])!r}"
            )
        self.raw_received += chunk
        self._buf += chunk

    def _timeout_text(self) -> str:
        return f"timed out; last messages received: {msg_types(self.received[-20:])!r}"

    def read_bytes(self, count: int, timeout: float | None = None) -> bytes:
        """Exactly `count` unframed bytes (e.g. the reply to an SSLRequest)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buf) < count:
            self._fill(deadline)
        data = bytes(self._buf[:count])
        del self._buf[:count]
        return data

    def read_message(self, timeout: float | None = None) -> Message:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buf) < 5:
            self._fill(deadline)
        type_, length = _HEADER.unpack_from(self._buf)
        if length < 4:
            raise PgWireError(f"bad message length {length} for type {type_!r}")
        while len(self._buf) < length + 1:
            self._fill(deadline)
        payload = bytes(self._buf[5 : length + 1])
        del self._buf[: length + 1]
        msg = (type_, payload)
        self.received.append(msg)
        self._track(msg)
        return msg

    def _track(self, msg: Message) -> None:
        type_, payload = msg
        if type_ == b"Z":
            self.status = payload.decode()
        elif type_ == b"S":
            key, value, _ = payload.split(b"\x00", 2)
            self.parameters[key.decode()] = value.decode()
        elif type_ == b"K":
            (self.backend_pid,) = _I32.unpack_from(payload)
            self.secret_key = payload[4:]

    def read_until(self, stop_types: bytes, timeout: float | None = None) -> list[Message]:
        """Messages up to and including the first whose type is in `stop_types`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = []
        while True:
            msg = self.read_message(max(deadline - time.monotonic(), 0.001))
            out.append(msg)
            if msg[0] in stop_types:
                return out

    def read_until_ready(self, timeout: float | None = None) -> list[Message]:
        """Messages up to and including the next ReadyForQuery."""
        return self.read_until(b"Z", timeout)

    def read_available(self, wait: float = 0.2) -> list[Message]:
        """Whatever arrives within `wait` seconds (for asserting that nothing more comes)."""
        out = []
        deadline = time.monotonic() + wait
        while True:
            try:
                out.append(self.read_message(max(deadline - time.monotonic(), 0.001)))
            except TimeoutError:
                return out

    def wait_closed(self, timeout: float | None = None) -> list[Message]:
        """Read until the peer closes; returns what arrived before. TimeoutError if it
        stays open."""
        out = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                out.append(self.read_message(max(deadline - time.monotonic(), 0.001)))
            except (ConnectionClosed, ConnectionResetError):
                return out

    # -- conveniences

    def startup(
        self,
        user: str,
        database: str | None = None,
        password: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        protocol: int = PROTOCOL_3_0,
    ) -> list[Message]:
        """Send a StartupMessage, answer trust/cleartext/md5/SCRAM, read to ReadyForQuery."""
        startup_params = {"user": user}
        if database is not None:
            startup_params["database"] = database
        startup_params.update(params or {})
        start = len(self.received)
        self.send_raw(startup_message(startup_params, protocol))
        scram: ScramClient | None = None
        while True:
            type_, payload = self.read_message()
            if type_ == b"E":
                raise ServerError(error_fields(payload))
            if type_ == b"Z":
                return self.received[start:]
            if type_ != b"R":
                continue
            (code,) = _I32.unpack_from(payload)
            if code == AUTH_OK:
                continue
            if password is None:
                raise PgWireError(f"server asks for a password (auth code {code}), none given")
            if code == AUTH_CLEARTEXT:
                self.send_raw(password_message(password))
            elif code == AUTH_MD5:
                self.send_raw(password_message(md5_response(password, user, payload[4:8])))
            elif code == AUTH_SASL:
                mechanisms = payload[4:].split(b"\x00")
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise PgWireError(f"no supported SASL mechanism in {mechanisms!r}")
                scram = ScramClient(password)
                self.send_raw(sasl_initial_response("SCRAM-SHA-256", scram.first_message()))
            elif code == AUTH_SASL_CONTINUE and scram is not None:
                self.send_raw(sasl_response(scram.final_message(payload[4:])))
            elif code == AUTH_SASL_FINAL and scram is not None:
                scram.verify_final(payload[4:])
            else:
                raise PgWireError(f"unsupported authentication request {code}")

    def request_ssl(self) -> bytes:
        """Send SSLRequest and return the one-byte answer (b'S' or b'N')."""
        self.send_raw(ssl_request())
        return self.read_bytes(1)

    def simple_query(self, sql: str, timeout: float | None = None) -> list[Message]:
        """Query + read to ReadyForQuery; ErrorResponses stay in the returned list."""
        self.send_raw(query(sql))
        return self.read_until_ready(timeout)

    def run_prepared(self, statement: str) -> list[Message]:
        """Bind `statement` (no parameters), Execute, Sync; read to ReadyForQuery."""
        self.send_raw(bind("", statement) + execute() + sync())
        return self.read_until_ready()

    def execute_query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Rows of a simple query; raises ServerError if it failed."""
        messages = self.simple_query(sql)
        error = first_error(messages)
        if error is not None:
            raise error
        return rows(messages)

    def close_socket(self) -> None:
        self.sock.close()

    def close(self) -> None:
        """Send Terminate (if the socket still works) and close."""
        try:
            self.send_raw(terminate())
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> PgWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cancel(host: str, port: int, pid: int, secret: int | bytes, timeout: float = 5.0) -> None:
    """Send a CancelRequest and wait for the server to close that connection, which it
    does after acting on the request."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(cancel_request(pid, secret))
        sock.settimeout(timeout)
        try:
            while sock.recv(1024):
                pass
        except ConnectionResetError:
            pass


class TricklingWire(PgWire):
    """A connection that sends every byte in a write of its own, `gap` seconds apart, so
    that the peer reads them one at a time: every message boundary falls between two of
    its reads, at every offset."""

    gap = 0.001

    def send_raw(self, data: bytes) -> None:
        self.sent += data
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(self.gap)
