"""The first packet a client sends: SSL/GSS negotiation, cancel, or startup."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pg_doorman.protocol import codes, sqlstate

_INT32: Final = struct.Struct("!i")
_TWO_INT32: Final = struct.Struct("!ii")


class StartupError(Exception):
    """A bad startup packet; answered with a FATAL error of `code` and a close."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


class StartupMessage:
    # A plain class: a dataclass's generated __init__ would run interpreted at every
    # login, even in the compiled build.
    __slots__ = ("encoded_parameters", "minor_version", "parameters", "protocol_options")

    def __init__(
        self,
        minor_version: int,
        parameters: dict[str, str],
        protocol_options: list[str] | None = None,
        encoded_parameters: bytes = b"",
    ) -> None:
        self.minor_version = minor_version
        self.parameters = parameters
        # Protocol options (`_pq_.*`) the client asked for; we support none of them.
        self.protocol_options = protocol_options if protocol_options is not None else []
        # The packet's name/value section as sent (b"" when built otherwise): logins
        # sending the same one share what their settings come to (Pool.login_parameters).
        self.encoded_parameters = encoded_parameters

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StartupMessage):
            return NotImplemented
        return (self.minor_version, self.parameters, self.protocol_options) == (
            other.minor_version,
            other.parameters,
            other.protocol_options,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable fields, as the dataclass had

    def __repr__(self) -> str:
        return (
            f"StartupMessage({self.minor_version!r}, {self.parameters!r}, "
            f"{self.protocol_options!r})"
        )

    @property
    def needs_negotiation(self) -> bool:
        return self.minor_version > 0 or bool(self.protocol_options)


StartupPacket = SSLRequest | GSSEncRequest | CancelRequest | StartupMessage


def startup_packet_length(header: bytes | bytearray) -> int:
    """Validate the length word of a startup packet (its first 4 bytes; `header` may
    hold more)."""
    length = int(_INT32.unpack_from(header, 0)[0])
    if length < 8 or length > codes.MAX_STARTUP_PACKET:
        raise StartupError(sqlstate.PROTOCOL_VIOLATION, f"invalid startup packet length {length}")
    return length


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse a whole startup packet (length word included)."""
    (code,) = _INT32.unpack_from(packet, 4)
    if code == codes.SSL_REQUEST_CODE:
        return SSLRequest()
    if code == codes.GSSENC_REQUEST_CODE:
        return GSSEncRequest()
    if code == codes.CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "invalid cancel request length")
        pid, secret = _TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise StartupError(
            sqlstate.FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0",
        )
    # Unpacked first: compiled, a call with `*args` is a generic call of the class.
    encoded = packet[8:]
    parameters, options = _parse_parameters(encoded)
    return StartupMessage(minor, parameters, options, encoded)


def _parse_parameters(raw: bytes) -> tuple[dict[str, str], list[str]]:
    """Name/value pairs, each NUL-terminated, closed by an empty name."""
    # One decode and one split for the whole list, not one per name and value: NUL is
    # a character of its own in UTF-8, so the whole decodes exactly when every part
    # does. (A packet both malformed and not UTF-8 is refused for its UTF-8.)
    try:
        fields = raw.decode().split("\x00")
    except UnicodeDecodeError as exc:
        raise StartupError(sqlstate.PROTOCOL_VIOLATION, "invalid UTF-8 in startup packet") from exc
    params: dict[str, str] = {}
    options: list[str] = []
    # fields[last] is what follows the last NUL; fields before it each ended with one.
    last = len(fields) - 1
    i = 0
    while True:
        if i >= last:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "invalid startup packet layout")
        name = fields[i]
        if not name:
            if i != last - 1 or fields[last]:
                raise StartupError(
                    sqlstate.PROTOCOL_VIOLATION,
                    "invalid startup packet layout: expected terminator as last byte",
                )
            return params, options
        if i + 1 >= last:
            raise StartupError(sqlstate.PROTOCOL_VIOLATION, "invalid startup packet layout")
        if name.startswith("_pq_."):
            options.append(name)
        else:
            params[name] = fields[i + 1]
        i += 2
