"""The client's TLS hello, read before OpenSSL sees it: where it ends in the bytes
received, and which ALPN protocols it offers.

Python's ssl module gives no say over ALPN selection: a client that offers only other
protocols is served without ALPN. PostgreSQL refuses such a handshake (RFC 7301's
no_application_protocol alert), so the pooler reads the offer itself, sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_HANDSHAKE_RECORD: Final = 0x16
_CLIENT_HELLO: Final = 1
_ALPN_EXTENSION: Final = 16
# A record holds at most 2^14 bytes of plaintext (RFC 8446 5.1).
_MAX_RECORD: Final = 1 << 14
# A longer hello is left to OpenSSL, which has limits of its own.
_MAX_HELLO: Final = 1 << 16
# Clients put their hello in one record, or a few when it is large: more than this
# is left to OpenSSL too.
_MAX_RECORDS: Final = 16

# A fatal no_application_protocol alert (RFC 7301 3.2) in a plaintext record: what
# OpenSSL sends when the server's ALPN choice fails, before any key is agreed.
NO_APPLICATION_PROTOCOL_ALERT: Final = b"\x15\x03\x03\x00\x02\x02\x78"


@dataclass(frozen=True, slots=True)
class ClientHello:
    # How many of the bytes received carry the hello: everything received when the
    # bytes are no readable hello (OpenSSL then refuses them in its own words).
    end: int
    # The ALPN protocols offered, in the client's order; None without the extension
    # or when the hello cannot be read.
    alpn: tuple[bytes, ...] | None


def read_client_hello(data: bytes | bytearray) -> ClientHello | None:
    """The hello at the start of `data`, or None while more bytes are needed.

    Called again as each piece of the hello arrives: it walks the record headers and
    copies nothing until the hello is whole, so a client that sends it a byte at a
    time costs little each time."""
    fragments: list[tuple[int, int]] = []  # where each record's payload lies
    received = 0  # handshake bytes in those records
    size = 0  # of the whole handshake message, once its header is in
    offset = 0
    while True:
        if len(fragments) == _MAX_RECORDS:
            return ClientHello(len(data), None)
        if len(data) < offset + 5:
            return None
        length = (data[offset + 3] << 8) | data[offset + 4]
        if data[offset] != _HANDSHAKE_RECORD or length == 0 or length > _MAX_RECORD:
            return ClientHello(len(data), None)
        end = offset + 5 + length
        if len(data) < end:
            return None
        fragments.append((offset + 5, end))
        received += length
        offset = end
        if size == 0:
            if received < 4:
                continue
            header = b"".join(data[start : min(stop, start + 4)] for start, stop in fragments)
            if header[0] != _CLIENT_HELLO:
                return ClientHello(len(data), None)
            size = 4 + int.from_bytes(header[1:4], "big")
            if size > _MAX_HELLO:
                return ClientHello(len(data), None)
        if received >= size:
            message = b"".join(data[start:stop] for start, stop in fragments)
            return ClientHello(offset, _alpn_offer(message[4:size]))


def _alpn_offer(body: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocol names in a ClientHello's body (RFC 8446 4.1.2)."""
    try:
        at = 2 + 32  # legacy_version, random
        at += 1 + body[at]  # legacy_session_id
        at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
        at += 1 + body[at]  # legacy_compression_methods
        if at == len(body):
            return None  # no extensions at all
        extensions_end = at + 2 + int.from_bytes(body[at : at + 2], "big")
        at += 2
        while at + 4 <= extensions_end:
            kind = int.from_bytes(body[at : at + 2], "big")
            size = int.from_bytes(body[at + 2 : at + 4], "big")
            at += 4
            if kind == _ALPN_EXTENSION:
                return _protocol_names(body[at : at + size])
            at += size
    except IndexError:
        pass
    return None


def _protocol_names(extension: bytes) -> tuple[bytes, ...] | None:
    """ProtocolNameList: a 2-byte length, then names each behind a 1-byte length."""
    if len(extension) < 2 or int.from_bytes(extension[:2], "big") != len(extension) - 2:
        return None
    names: list[bytes] = []
    at = 2
    while at < len(extension):
        size = extension[at]
        name = extension[at + 1 : at + 1 + size]
        if size == 0 or len(name) != size:
            return None
        names.append(name)
        at += 1 + size
    return tuple(names)
