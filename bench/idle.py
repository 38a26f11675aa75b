"""Many idle clients: each completes startup and authentication, then sits still.

A minimal wire-protocol client (trust, cleartext, md5, SCRAM-SHA-256). SCRAM's salted
password is computed once per (salt, iterations): thousands of logins would otherwise
spend minutes in PBKDF2 here rather than in the pooler being measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

_INT32 = struct.Struct("!i")
_PROTOCOL_3 = 196608


class LoginError(RuntimeError):
    pass


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + _INT32.pack(len(payload) + 4) + payload


def startup_packet(user: str, database: str) -> bytes:
    body = _INT32.pack(_PROTOCOL_3)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return _INT32.pack(len(body) + 4) + body


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    (length,) = _INT32.unpack_from(header, 1)
    return header[:1], await reader.readexactly(length - 4)


def _error_text(payload: bytes) -> str:
    parts = {f[:1]: f[1:].decode(errors="replace") for f in payload.split(b"\0") if f}
    return f"{parts.get(b'C', '')} {parts.get(b'M', '')}".strip()


@dataclass
class Credentials:
    user: str
    password: str
    database: str
    _salted: dict[tuple[bytes, int], bytes] = field(default_factory=dict)

    def salted_password(self, salt: bytes, iterations: int) -> bytes:
        key = (salt, iterations)
        if key not in self._salted:
            self._salted[key] = hashlib.pbkdf2_hmac(
                "sha256", self.password.encode(), salt, iterations
            )
        return self._salted[key]


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


async def _scram(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, creds: Credentials
) -> None:
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = ("n,," + first_bare).encode()
    mechanism = b"SCRAM-SHA-256\0"
    writer.write(_message(b"p", mechanism + _INT32.pack(len(first)) + first))
    kind, payload = await _read_message(reader)
    if kind != b"R" or _INT32.unpack_from(payload)[0] != 11:
        raise LoginError(f"expected SASLContinue, got {kind!r} {_error_text(payload)}")
    server_first = payload[4:].decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise LoginError("server nonce does not extend ours")
    salted = creds.salted_password(base64.b64decode(attrs["s"]), int(attrs["i"]))
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    client_key = _hmac(salted, b"Client Key")
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    writer.write(_message(b"p", final))
    kind, payload = await _read_message(reader)
    if kind != b"R" or _INT32.unpack_from(payload)[0] != 12:
        raise LoginError(f"expected SASLFinal, got {kind!r} {_error_text(payload)}")
    expected = _hmac(_hmac(salted, b"Server Key"), auth_message)
    if payload[4:] != b"v=" + base64.b64encode(expected):
        raise LoginError("server signature does not verify")


async def login(
    host: str, port: int, creds: Credentials
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and authenticate; return once ReadyForQuery arrives."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(startup_packet(creds.user, creds.database))
        while True:
            kind, payload = await _read_message(reader)
            if kind == b"R":
                code = _INT32.unpack_from(payload)[0]
                if code == 0:
                    continue
                if code == 3:
                    writer.write(_message(b"p", creds.password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5((creds.password + creds.user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
                    writer.write(_message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    if b"SCRAM-SHA-256\0" not in payload[4:]:
                        raise LoginError(f"no SCRAM-SHA-256 among {payload[4:]!r}")
                    await _scram(reader, writer, creds)
                else:
                    raise LoginError(f"unsupported authentication request {code}")
            elif kind == b"E":
                raise LoginError(_error_text(payload))
            elif kind == b"Z":
                return reader, writer
            # S (ParameterStatus), K (BackendKeyData), N (notice): nothing to do.
    except BaseException:
        writer.close()
        raise


@dataclass
class IdleClients:
    """Up to `count` logged-in connections, opened `concurrency` at a time."""

    host: str
    port: int
    creds: Credentials
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    async def open(self, count: int, concurrency: int = 100) -> None:
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                try:
                    _, writer = await asyncio.wait_for(login(self.host, self.port, self.creds), 30)
                except (OSError, LoginError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    text = f"{type(exc).__name__}: {exc}"[:200]
                    self.errors[text] = self.errors.get(text, 0) + 1
                    # Give up early on a target that refuses everyone.
                    if not self.writers and sum(self.errors.values()) >= 50:
                        return
                else:
                    self.writers.append(writer)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def close(self) -> None:
        terminate = _message(b"X", b"")
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.write(terminate)
                writer.close()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
        self.writers.clear()
