"""Client-facing TLS: the server-side SSL context built from `[general]` tls_* keys.

Built at startup and again at a reload that changes the settings or the files'
contents, and used for every SSLRequest on a TCP connection. Not compiled: it runs once
per (re)load, and the handshake itself is OpenSSL's. Also the reader that every TLS
connection, to clients and to servers, delivers its data through.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import weakref
from collections.abc import Coroutine
from typing import Any, cast

from pg_doorman.config.schema import GeneralConfig


class TlsSetupError(Exception):
    """A certificate, key or CA file that cannot be used; `key` names the config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def client_tls_context(general: GeneralConfig) -> ssl.SSLContext | None:
    """The context for TLS with clients, or None when TLS is not offered (no
    certificate, or tls_mode "disable"): every SSLRequest is then answered N."""
    if general.tls_certificate is None or general.tls_mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # What PostgreSQL 17 negotiates; direct TLS requires it (negotiated_postgresql).
    # OpenSSL goes on without ALPN when the client offers only other protocols: such a
    # hello is refused before it gets here (net/client_hello.py).
    context.set_alpn_protocols([ALPN_PROTOCOL])
    try:
        context.load_cert_chain(general.tls_certificate, general.tls_private_key)
    except OSError as exc:  # ssl.SSLError included
        raise TlsSetupError(
            "tls_certificate",
            f"cannot load the certificate {general.tls_certificate!r} with the key "
            f"{general.tls_private_key!r}: {ssl_reason(exc)}",
        ) from None
    if general.tls_mode == "verify-full":
        try:
            context.load_verify_locations(cafile=general.tls_ca_cert)
        except OSError as exc:
            raise TlsSetupError(
                "tls_ca_cert", f"cannot load the CA {general.tls_ca_cert!r}: {ssl_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    end_point = _server_end_point(general.tls_certificate)
    if end_point is not None:
        _END_POINTS[context] = end_point
    return context


# The tls-server-end-point channel binding data of each context's certificate.
_END_POINTS: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()


def tls_end_point(context: ssl.SSLContext) -> bytes | None:
    """What SCRAM-SHA-256-PLUS binds a login to over TLS with `context` (RFC 5929's
    tls-server-end-point); None when the certificate allows no binding."""
    return _END_POINTS.get(context)


def _server_end_point(certificate_file: str) -> bytes | None:
    """The hash of the certificate the pooler presents (the file's first) with the
    hash function of its signature, SHA-256 in place of MD5 or SHA-1, as PostgreSQL
    computes it; None for a signature without one (Ed25519), where PostgreSQL offers
    no binding either."""
    # Imported here, as in auth/jwt.py: a pooler without client TLS never loads them.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        with open(certificate_file, "rb") as file:
            certificate = x509.load_pem_x509_certificate(file.read())
    except (OSError, ValueError):
        return None  # loaded by OpenSSL all the same (another encoding): no binding
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None:
        return None
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return certificate.fingerprint(algorithm)


def client_tls_identity(general: GeneralConfig) -> tuple[object, ...]:
    """What the client TLS context is built from: the settings and the files' contents,
    so that a renewed certificate at the same path counts as a change."""
    if general.tls_certificate is None or general.tls_mode == "disable":
        return (None,)
    files = [general.tls_certificate, general.tls_private_key]
    if general.tls_mode == "verify-full":
        files.append(general.tls_ca_cert)
    digest = hashlib.sha256()
    for path in files:
        if path is not None:
            try:
                with open(path, "rb") as file:
                    digest.update(hashlib.sha256(file.read()).digest())
            except OSError:
                digest.update(b"unreadable")
    return (general.tls_mode, *files, digest.hexdigest())


ALPN_PROTOCOL = "postgresql"


def negotiated_postgresql(transport: asyncio.BaseTransport) -> bool:
    """Whether the TLS session agreed on the postgresql ALPN protocol."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_PROTOCOL


async def start_tls_with_hello(
    opening: Coroutine[Any, Any, asyncio.Transport | None],
    transport: asyncio.Transport,
    hello: bytes,
) -> asyncio.Transport | None:
    """Finish `opening` (a server-side `loop.start_tls` on `transport`, not started yet)
    when the client's TLS hello was read before it: the hello goes to the TLS layer as
    soon as the layer is in place, ahead of anything read after it."""
    try:
        # Sets the TLS layer as the transport's protocol, and schedules its
        # connection_made and the transport's resume_reading.
        waiting = opening.send(None)
    except StopIteration as stop:
        return cast("asyncio.Transport | None", stop.value)
    layer = cast(asyncio.BufferedProtocol, transport.get_protocol())

    def give_hello() -> None:
        # After those two, before the loop next reads the socket.
        if transport.is_closing():
            return  # gone already: `opening` hears of it from the TLS layer
        view = memoryview(hello)
        while view:
            buffer = memoryview(layer.get_buffer(len(view))).cast("B")
            count = min(len(buffer), len(view))
            buffer[:count] = view[:count]
            layer.buffer_updated(count)
            view = view[count:]

    loop = asyncio.get_running_loop()
    loop.call_soon(give_hello)
    while True:
        # `opening` waits on `waiting` and takes its outcome from it when resumed; this
        # coroutine only waits for it to be done, as a task would before resuming it.
        ready: asyncio.Future[None] = loop.create_future()
        waiting.add_done_callback(functools.partial(_set_done, ready))
        try:
            await ready
        except asyncio.CancelledError:
            waiting.cancel()  # so that `opening` cleans up and ends cancelled too
        try:
            waiting = opening.send(None)
        except StopIteration as stop:
            return cast("asyncio.Transport | None", stop.value)


def _set_done(ready: asyncio.Future[None], _done: object) -> None:
    if not ready.done():
        ready.set_result(None)


class HandshakeLimiter:
    """tls_rate_limit_per_second: handshakes start at most `rate` a second on average,
    with bursts of rate/100 (PgDoorman refills its bucket every 10 ms). A handshake
    over the limit waits for its slot rather than being refused."""

    def __init__(self, rate: int) -> None:
        self.interval = 1.0 / rate
        # How far behind the clock a slot may start: rate/100 - 1 intervals, so that
        # rate/100 handshakes asked for together all start at once.
        self.burst = (max(1, rate // 100) - 1) * self.interval
        self._next_free = float("-inf")

    def delay(self, now: float) -> float:
        """Seconds the handshake asked for at `now` must wait; its slot is taken."""
        start = max(self._next_free, now - self.burst)
        self._next_free = start + self.interval
        return max(0.0, start - now)


def tls_required(general: GeneralConfig) -> bool:
    """Whether a plain TCP login is refused (tls_mode require or verify-full)."""
    return general.tls_mode in ("require", "verify-full")


def ssl_reason(exc: OSError) -> str:
    """What went wrong with a certificate file or a handshake, in a few words."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


# Decrypted bytes land here and are copied out at once, so every TLS connection of the
# process can share it (the event loop runs one read at a time).
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class TlsReader(asyncio.BufferedProtocol):
    """Hands a TLS connection's data to a plain Protocol.

    Given a plain Protocol, the event loop's TLS layer decrypts each read into a new
    256 KiB bytes object: an mmap, an mremap and a munmap per read, about a third of
    the pooler's CPU per transaction over TLS. Given a BufferedProtocol, it decrypts
    into the buffer it is handed."""

    __slots__ = ("inner",)

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.data_received(bytes(_READ_BUFFER[:nbytes]))

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
