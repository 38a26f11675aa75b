"""Builders and parsers for the messages the pooler creates or inspects.

Builders return complete messages (type byte + int32 length + body) as bytes.
Parsers take a message body (without the 5-byte header).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from pg_doorman.memo import remember
from pg_doorman.protocol import codes

_INT32: Final = struct.Struct("!i")
_UINT32: Final = struct.Struct("!I")
_INT16: Final = struct.Struct("!h")
_AUTH_CODE: Final = struct.Struct("!ci")
_KEY_DATA: Final = struct.Struct("!ii")

# Messages that never change: build once.
READY_IDLE: Final = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION: Final = b"Z\x00\x00\x00\x05T"
READY_FAILED: Final = b"Z\x00\x00\x00\x05E"
AUTH_OK: Final = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
SYNC: Final = b"S\x00\x00\x00\x04"
FLUSH: Final = b"H\x00\x00\x00\x04"
TERMINATE: Final = b"X\x00\x00\x00\x04"
PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
BIND_COMPLETE: Final = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE: Final = b"3\x00\x00\x00\x04"
EMPTY_QUERY: Final = b"I\x00\x00\x00\x04"
NO_DATA: Final = b"n\x00\x00\x00\x04"
SSL_REFUSED: Final = b"N"
SSL_ACCEPTED: Final = b"S"

_PARAMETER_STATUS: Final[dict[tuple[str, str], bytes]] = {}
_PARAMETER_STATUS_MAX: Final = 1024
_PARAMETER_STATUS_REMEMBERED: Final = 128  # longest value kept (client-chosen ones can be long)
# Whole greetings' ParameterStatus runs, by their names and values (see parameter_statuses).
_PARAMETER_STATUSES: Final[dict[tuple[tuple[str, ...], tuple[str, ...]], bytes]] = {}
_PARAMETER_STATUSES_MAX: Final = 256
_PARAMETER_STATUSES_REMEMBERED: Final = 4096  # longest run kept


class ProtocolError(Exception):
    """A peer sent bytes that do not form a valid message."""


def build(msg_type: bytes, body: bytes = b"") -> bytes:
    # int.to_bytes rather than struct: the compiled build runs it natively, and the
    # prepared-statement rewrite builds messages per Parse, Describe and Close.
    return msg_type + (len(body) + 4).to_bytes(4, "big") + body


def cstring(value: str) -> bytes:
    return value.encode() + b"\x00"


def ready_for_query(status: int) -> bytes:
    return b"Z\x00\x00\x00\x05" + bytes((status,))


def error_response(
    severity: str,
    code: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse with both the localized (S) and non-localized (V) severity."""
    return build(b"E", _notice_fields(severity, code, message, detail, hint))


def notice_response(
    code: str, message: str, severity: str = "NOTICE", *, hint: str | None = None
) -> bytes:
    return build(b"N", _notice_fields(severity, code, message, None, hint))


def _notice_fields(
    severity: str, code: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    """The fields an ErrorResponse and a NoticeResponse share, with their terminator."""
    parts = [b"S", cstring(severity), b"V", cstring(severity), b"C", cstring(code)]
    parts += [b"M", cstring(message)]
    if detail:
        parts += [b"D", cstring(detail)]
    if hint:
        parts += [b"H", cstring(hint)]
    parts.append(b"\x00")
    return b"".join(parts)


def parameter_status(name: str, value: str) -> bytes:
    # Every login's greeting repeats the same dozen or so: encode each short pair once.
    if len(value) > _PARAMETER_STATUS_REMEMBERED:
        return build(b"S", cstring(name) + cstring(value))
    key = (name, value)
    message = _PARAMETER_STATUS.get(key)
    if message is None:
        message = build(b"S", cstring(name) + cstring(value))
        remember(_PARAMETER_STATUS, key, message, _PARAMETER_STATUS_MAX)
    return message


def parameter_statuses(parameters: dict[str, str]) -> bytes:
    """A ParameterStatus per parameter, in the dict's order, as one run of bytes.

    Logins to one pool mostly report the same dozen or so parameters with the same
    values: the run is remembered by its names and values, so that a login builds two
    tuples instead of looking up each pair."""
    key = (tuple(parameters), tuple(parameters.values()))
    run = _PARAMETER_STATUSES.get(key)
    if run is None:
        run = b"".join([parameter_status(name, value) for name, value in parameters.items()])
        if len(run) <= _PARAMETER_STATUSES_REMEMBERED:
            remember(_PARAMETER_STATUSES, key, run, _PARAMETER_STATUSES_MAX)
    return run


def backend_key_data(pid: int, secret: int) -> bytes:
    return build(b"K", _KEY_DATA.pack(pid, secret))


def command_complete(tag: str) -> bytes:
    return build(b"C", cstring(tag))


def auth_request(code: int, payload: bytes = b"") -> bytes:
    return build(b"R", _INT32.pack(code) + payload)


def auth_md5(salt: bytes) -> bytes:
    return auth_request(codes.AUTH_MD5, salt)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    return auth_request(codes.AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return auth_request(codes.AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return auth_request(codes.AUTH_SASL_FINAL, data)


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = _INT32.pack(newest_minor) + _INT32.pack(len(unsupported))
    return build(b"v", body + b"".join(cstring(name) for name in unsupported))


def query(sql: str) -> bytes:
    return build(b"Q", cstring(sql))


def password_message(payload: bytes) -> bytes:
    return build(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return build(b"p", cstring(mechanism) + _INT32.pack(len(data)) + data)


def startup_message(params: Mapping[str, str], version: int = codes.PROTOCOL_3_0) -> bytes:
    body = _INT32.pack(version)
    body += b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(codes.SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _INT32.pack(16) + _INT32.pack(codes.CANCEL_REQUEST_CODE) + _KEY_DATA.pack(pid, secret)


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    parts = [_INT16.pack(len(columns))]
    for name, oid in columns:
        # table oid 0, column 0, type oid, size -1, modifier -1, format text
        parts.append(cstring(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0))
    return build(b"T", b"".join(parts))


def data_row(values: Iterable[str | None]) -> bytes:
    items = list(values)
    parts = [_INT16.pack(len(items))]
    for value in items:
        if value is None:
            parts.append(_INT32.pack(-1))
        else:
            raw = value.encode()
            parts.append(_INT32.pack(len(raw)) + raw)
    return build(b"D", b"".join(parts))


# ---- parsers ---------------------------------------------------------------


def read_cstring(body: bytes, pos: int) -> tuple[str, int]:
    """Decode a NUL-terminated string at pos; return it and the position after the NUL."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    return body[pos:end].decode("utf-8", "replace"), end + 1


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    end = len(body)
    while pos < end and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstring(body, pos + 1)
        fields[code] = value
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name, value


def parse_data_row(body: bytes) -> list[str | None]:
    """A DataRow's values as text (None for NULL); ProtocolError if they overrun it."""
    if len(body) < 2:
        raise ProtocolError("DataRow too short")
    count = _INT16.unpack_from(body, 0)[0]
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        if pos + 4 > len(body):
            raise ProtocolError("DataRow truncated")
        size = _INT32.unpack_from(body, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
            continue
        if pos + size > len(body):
            raise ProtocolError("DataRow truncated")
        values.append(body[pos : pos + size].decode("utf-8", "replace"))
        pos += size
    return values


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) < 8:
        raise ProtocolError("BackendKeyData too short")
    pid, secret = _KEY_DATA.unpack_from(body, 0)
    return pid, secret


def parse_auth_request(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("Authentication message too short")
    (code,) = _INT32.unpack_from(body, 0)
    return code, body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    return [m.decode() for m in payload.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mechanism, pos = read_cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("SASLInitialResponse too short")
    (length,) = _INT32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if length != -1 and length != len(data):
        raise ProtocolError("SASLInitialResponse length mismatch")
    return mechanism, data


def parse_command_tag(body: bytes) -> str:
    return body.rstrip(b"\x00").decode("ascii", "replace")


def parse_query_text(body: bytes) -> str:
    return body.rstrip(b"\x00").decode("utf-8", "replace")


def message_types(data: bytes) -> list[int]:
    """Type bytes of the complete messages in data."""
    types = []
    pos = 0
    while len(data) - pos >= 5:
        (length,) = _UINT32.unpack_from(data, pos + 1)
        types.append(data[pos])
        pos += 1 + length
    return types


def first_error_message(data: bytes) -> str | None:
    """The message (M field) of the first ErrorResponse among the complete messages in
    data, or None when there is none."""
    pos = 0
    while len(data) - pos >= 5:
        (length,) = _UINT32.unpack_from(data, pos + 1)
        if data[pos] == codes.ERROR_RESPONSE:
            return parse_error_fields(data[pos + 5 : pos + 1 + length]).get("M", "")
        pos += 1 + length
    return None
