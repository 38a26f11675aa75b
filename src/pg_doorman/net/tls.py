"""Client-facing TLS: the server-side SSL context built from `[general]` tls_* keys.

Built at startup and again at a reload that changes the settings or the files'
contents, and used for every SSLRequest on a TCP connection. Not compiled: it runs once
per (re)load, and the handshake itself is OpenSSL's. Also the reader that every TLS
connection, to clients and to servers, delivers its data through.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl

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
    return context


def client_tls_identity(general: GeneralConfig) -> tuple[object, ...]:
    """What the client TLS context is built from: the settings and the files' contents,
    so that a renewed certificate at the same path counts as a change. Read after
    `client_tls_context` succeeded for the same settings."""
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
