"""A small blocking PostgreSQL client for the command line (`pg_doorman generate`).

It logs in (trust, cleartext password, md5 or SCRAM-SHA-256; TLS on request) and runs
simple queries whose results it returns as text. It reuses the pooler's own protocol
and authentication code, so the package needs no database driver to run it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

from pg_doorman.auth.md5 import md5_password_response
from pg_doorman.auth.scram import AuthenticationFailed, ScramClientSession, ScramError
from pg_doorman.protocol import codes
from pg_doorman.protocol import messages as msg

_HEADER = struct.Struct("!cI")
# Catalog rows are small; anything bigger than this is not a PostgreSQL talking to us.
_MAX_MESSAGE = 64 * 1024 * 1024


class ConnectError(Exception):
    """The connection or the login failed; the message says why (never the password).
    `password_used`: the server had asked for the password when it failed."""

    def __init__(self, message: str, *, password_used: bool = False) -> None:
        super().__init__(message)
        self.password_used = password_used


class QueryError(Exception):
    """PostgreSQL answered a query with an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class ConnectParams:
    host: str  # a name, an address, or a Unix socket directory (starts with "/")
    port: int
    user: str
    database: str
    password: str | None = None
    tls: bool = False  # require TLS, as libpq's sslmode=require: encrypted, not verified
    timeout: float = 10.0

    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _server_error(body: bytes) -> tuple[str, str]:
    fields = msg.parse_error_fields(body)
    return fields.get("C", ""), fields.get("M", "unknown error")


class BlockingConnection:
    """One logged-in connection. Use `connect`, then `query`, then `close`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")

    @classmethod
    def connect(cls, params: ConnectParams) -> BlockingConnection:
        sock = _open_socket(params)
        try:
            if params.tls:
                sock = _start_tls(sock, params)
            conn = cls(sock)
            conn._login(params)
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server may be gone already
            self._sock.sendall(msg.TERMINATE)
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages

    def _read(self) -> tuple[int, bytes]:
        try:
            header = self._reader.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise ConnectError("the server closed the connection")
            kind, length = _HEADER.unpack(header)
            if length < 4 or length > _MAX_MESSAGE:
                raise ConnectError(f"invalid message length {length} from the server")
            body = self._reader.read(length - 4)
        except OSError as exc:  # a timeout, a reset
            raise ConnectError(f"cannot read from the server: {exc.strerror or exc}") from exc
        if len(body) < length - 4:
            raise ConnectError("the server closed the connection")
        return kind[0], body

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectError(f"cannot send to the server: {exc.strerror or exc}") from exc

    # -- login

    def _login(self, params: ConnectParams) -> None:
        self._send(
            msg.startup_message(
                {
                    "user": params.user,
                    "database": params.database,
                    "application_name": "pg_doorman generate",
                    "client_encoding": "UTF8",
                }
            )
        )
        scram: ScramClientSession | None = None
        password_used = False
        while True:
            kind, body = self._read()
            if kind == codes.ERROR_RESPONSE:
                raise ConnectError(_server_error(body)[1], password_used=password_used)
            if kind == codes.READY_FOR_QUERY:
                return
            if kind != codes.AUTHENTICATION:
                continue  # ParameterStatus, BackendKeyData, notices
            code, payload = msg.parse_auth_request(body)
            if code == codes.AUTH_OK:
                continue
            password = params.password
            if password is None:
                raise ConnectError(
                    f'the server asks for a password for user "{params.user}": '
                    "give --password or set PGPASSWORD"
                )
            password_used = True
            if code == codes.AUTH_CLEARTEXT:
                self._send(msg.password_message(msg.cstring(password)))
            elif code == codes.AUTH_MD5:
                answer = md5_password_response(password, params.user, payload[:4])
                self._send(msg.password_message(msg.cstring(answer)))
            elif code == codes.AUTH_SASL:
                if "SCRAM-SHA-256" not in msg.parse_sasl_mechanisms(payload):
                    raise ConnectError("the server offers no SASL mechanism this client knows")
                scram = ScramClientSession(password=password)
                self._send(msg.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif code in (codes.AUTH_SASL_CONTINUE, codes.AUTH_SASL_FINAL) and scram is not None:
                try:
                    if code == codes.AUTH_SASL_CONTINUE:
                        self._send(msg.password_message(scram.handle_server_first(payload)))
                    else:
                        scram.handle_server_final(payload)
                except (ScramError, AuthenticationFailed) as exc:
                    raise ConnectError(f"SCRAM login failed: {exc}", password_used=True) from exc
            else:
                raise ConnectError(f"the server asks for an unsupported login method ({code})")

    # -- queries

    def query(self, sql: str) -> list[list[str | None]]:
        """Run `sql` (simple protocol); its rows as text. QueryError on an error."""
        self._send(msg.query(sql))
        rows: list[list[str | None]] = []
        error: QueryError | None = None
        while True:
            kind, body = self._read()
            if kind == codes.DATA_ROW:
                rows.append(msg.parse_data_row(body))
            elif kind == codes.ERROR_RESPONSE:
                error = QueryError(*_server_error(body))
            elif kind == codes.READY_FOR_QUERY:
                break
        if error is not None:
            raise error
        return rows


def _open_socket(params: ConnectParams) -> socket.socket:
    try:
        if params.host.startswith("/"):
            if params.tls:
                raise ConnectError("TLS is not used over a Unix socket: give a TCP --host")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(params.timeout)
            try:
                sock.connect(f"{params.host}/.s.PGSQL.{params.port}")
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((params.host, params.port), timeout=params.timeout)
    except OSError as exc:
        raise ConnectError(f"cannot connect: {exc.strerror or exc}") from exc


def _start_tls(sock: socket.socket, params: ConnectParams) -> socket.socket:
    try:
        sock.sendall(msg.ssl_request())
        answer = sock.recv(1)
    except OSError as exc:
        raise ConnectError(f"cannot ask for TLS: {exc.strerror or exc}") from exc
    if answer != msg.SSL_ACCEPTED:
        raise ConnectError("the server does not accept TLS connections (--ssl)")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        return context.wrap_socket(sock, server_hostname=params.host)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectError(f"TLS handshake failed: {exc}") from exc
