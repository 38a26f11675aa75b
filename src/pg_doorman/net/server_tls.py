"""TLS to PostgreSQL: the server_tls_* keys resolved per pool, their SSL contexts, and
the SSLRequest exchange that opens a backend connection over TLS.

Not compiled: it runs once per server connection, and the handshake itself is OpenSSL's.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, cast

from pg_doorman.config.schema import GeneralConfig, PoolConfig
from pg_doorman.net.tls import TlsReader, TlsSetupError, ssl_reason
from pg_doorman.pool.pool import AcquireError
from pg_doorman.protocol import messages, sqlstate

if TYPE_CHECKING:
    from pg_doorman.net.server import ServerConnection
    from pg_doorman.pool.pool import Pool

# Modes that send an SSLRequest before anything else; the last three insist on TLS.
_TLS_FIRST: Final = frozenset(("prefer", "require", "verify-ca", "verify-full"))
_TLS_REQUIRED: Final = frozenset(("require", "verify-ca", "verify-full"))
# SSLRequest: length 8, then the code 1234 5679.
SSL_REQUEST: Final = messages.ssl_request()


@dataclass(frozen=True)
class ServerTls:
    """How one pool's server connections use TLS. Equal values need no new servers."""

    mode: str
    ca_cert: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    # Of the files' contents: a renewed certificate at the same path is a change.
    digest: str = ""
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def tls_first(self) -> bool:
        return self.mode in _TLS_FIRST

    @property
    def required(self) -> bool:
        return self.mode in _TLS_REQUIRED

    @property
    def retries_over_tls(self) -> bool:
        """allow: a plain login the server refuses (28000) is tried again over TLS."""
        return self.mode == "allow"

    @property
    def retries_in_plain(self) -> bool:
        """prefer: a failed TLS handshake, or a login over TLS the server refuses
        (28000), is tried again in plain text on a new connection, as libpq does."""
        return self.mode == "prefer"


PLAIN: Final = ServerTls("disable")


def server_tls_for(general: GeneralConfig, pool: PoolConfig, pool_path: str) -> ServerTls:
    """The pool's server TLS settings, each key falling back to [general]'s.

    Raises TlsSetupError naming the key path of a file that cannot be used."""
    mode = pool.server_tls_mode or general.server_tls_mode
    if mode == "disable":
        return PLAIN
    ca_key = "server_tls_ca_cert"
    ca_path = f"{pool_path}.{ca_key}" if pool.server_tls_ca_cert else f"general.{ca_key}"
    ca_cert = pool.server_tls_ca_cert or general.server_tls_ca_cert
    certificate: str | None
    private_key: str | None
    if pool.server_tls_certificate:
        pair_path = pool_path
        certificate, private_key = pool.server_tls_certificate, pool.server_tls_private_key
    else:
        pair_path = "general"
        certificate, private_key = general.server_tls_certificate, general.server_tls_private_key
    verify = mode in ("verify-ca", "verify-full")
    files = [(ca_path, ca_cert if verify else None)]
    files += [
        (f"{pair_path}.server_tls_certificate", certificate),
        (f"{pair_path}.server_tls_private_key", private_key),
    ]
    digest = hashlib.sha256()
    for key, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError as exc:
            raise TlsSetupError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    tls = ServerTls(mode, ca_cert if verify else None, certificate, private_key, digest.hexdigest())
    context = _contexts.get(tls)
    if context is None:
        context = _build_context(tls, ca_path, pair_path)
        if len(_contexts) >= _CONTEXTS_KEPT:
            _contexts.clear()
        _contexts[tls] = context
    return replace(tls, context=context)


# One context per distinct setting, shared by the pools (and users) that have it.
_contexts: dict[ServerTls, ssl.SSLContext] = {}
_CONTEXTS_KEPT: Final = 256


def _build_context(tls: ServerTls, ca_path: str, pair_path: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.mode in ("verify-ca", "verify-full"):
        context.check_hostname = tls.mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=tls.ca_cert)
        except OSError as exc:  # ssl.SSLError included
            raise TlsSetupError(
                ca_path, f"cannot load the CA {tls.ca_cert!r}: {ssl_reason(exc)}"
            ) from None
    else:
        # require and below encrypt without checking who answers, as libpq does.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None:
        try:
            context.load_cert_chain(tls.certificate, tls.private_key)
        except OSError as exc:
            raise TlsSetupError(
                f"{pair_path}.server_tls_certificate",
                f"cannot load the certificate {tls.certificate!r} with the key "
                f"{tls.private_key!r}: {ssl_reason(exc)}",
            ) from None
    return context


def _handshake_failure(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = ssl_reason(exc)
    if reason:
        return reason
    # The event loop reports a peer that hung up mid-handshake without a message.
    if isinstance(exc, ConnectionError):
        return "the server closed the connection"
    return type(exc).__name__


class TlsRefused(Exception):
    """The server answered N to SSLRequest."""


class TlsHandshakeFailed(Exception):
    """The server answered S to SSLRequest, then the TLS handshake failed (no common
    protocol version or cipher, an alert, the server hung up)."""


class _Negotiation(asyncio.Protocol):
    """Sends SSLRequest and waits for the one-byte answer."""

    def __init__(self, answer: asyncio.Future[bytes]) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(SSL_REQUEST)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        # Nothing may be read past the answer until TLS is up: bytes that came with it
        # would be taken as the server's, though anyone on the path could have sent them.
        assert self.transport is not None
        self.transport.pause_reading()
        self.answer.set_result(data)

    def eof_received(self) -> bool | None:
        self._gone(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(exc)

    def _gone(self, exc: Exception | None) -> None:
        if not self.answer.done():
            reason = str(exc) if exc is not None else "the server closed the connection"
            self.answer.set_exception(ConnectionResetError(reason))


async def connect_tls(
    pool: Pool,
    factory: Callable[[], ServerConnection],
    host: str,
    port: int,
    tls: ServerTls,
    plain_if_refused: bool,
) -> ServerConnection:
    """Connect, ask for TLS and run the handshake; returns the connection, not yet
    logged in. A server that answers N gets the startup in plain text when
    `plain_if_refused` (prefer), otherwise TlsRefused. A handshake that fails raises
    TlsHandshakeFailed, the connection closed."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    transport, negotiation = await loop.create_connection(lambda: _Negotiation(answer), host, port)
    where = f"{host}:{port}"
    try:
        reply = await answer
        if reply not in (b"S", b"N"):
            if len(reply) > 1:
                what = "sent data after its answer to SSLRequest"
            else:
                what = f"answered SSLRequest with {reply!r}"
            raise AcquireError(sqlstate.PROTOCOL_VIOLATION, f"server {where} {what}")
        if reply == b"N":
            if not plain_if_refused:
                raise TlsRefused(
                    f"server {where} does not support TLS (server_tls_mode {tls.mode})"
                )
            server = factory()
            transport.set_protocol(server)
            server.connection_made(transport)
            transport.resume_reading()
            return server
        assert tls.context is not None
        started = time.monotonic()
        try:
            secure = await loop.start_tls(transport, negotiation, tls.context, server_hostname=host)
        except BaseException as exc:
            pool.tls_handshake_errors += 1
            if isinstance(exc, OSError):
                raise TlsHandshakeFailed(
                    f"TLS handshake with server {where} failed: {_handshake_failure(exc)}"
                ) from None
            raise
        if secure is None:
            pool.tls_handshake_errors += 1
            raise TlsHandshakeFailed(f"server {where} closed during the TLS handshake")
        pool.tls_handshakes += 1
        pool.tls_handshake_seconds += time.monotonic() - started
        server = factory()
        server.tls = True
        secure.set_protocol(TlsReader(server))
        server.connection_made(secure)
        return server
    except BaseException:
        transport.close()
        raise
