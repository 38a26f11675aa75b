"""A logged-in client's session, as a binary upgrade hands it to the new process.

The new process serves the same connection (the socket itself goes with this state):
the client keeps its BackendKeyData, its session parameters and its prepared
statements, and sees nothing of the move. One JSON document, bytes as base64.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Final

MAGIC = b"PGDM1\x00"
# The largest state that moves: it travels as one datagram, which Linux caps at the
# socket's send buffer (net.core.wmem_default, 208 KiB unless tuned).
MAX_STATE: Final = 192 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(value.encode("ascii"), validate=True)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("expected an integer")
    return value


def _shape_text(shape: bytes | None) -> str | None:
    return None if shape is None else _b64(shape)


def _shape(value: Any) -> bytes | None:
    return None if value is None else _bytes(value)


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("expected an object of strings")
    return dict(value)


@dataclass
class SessionState:
    client_id: int  # the BackendKeyData process id the client knows
    secret: int  # ... and its secret: a cancel request still finds the client
    database: str
    user: str
    application_name: str
    address: str  # "" on the Unix socket
    port: int
    unix: bool
    age: float  # seconds since the client connected
    # What the client was told (ParameterStatus) and what its servers get.
    parameters: dict[str, str]
    extra_parameters: dict[str, str]
    raw_parameters: tuple[str, ...]
    # The pool's server defaults: the new process may not have logged in yet.
    server_parameters: dict[str, str]
    # Protocol-level statements: (client's name, Parse body after the name, the
    # settings it was read under, its result columns as the old process knew them:
    # registry.row_shape, None if not known), and the unnamed one as (body, settings,
    # columns).
    named: list[tuple[bytes, bytes, bytes, bytes | None]] = field(default_factory=list)
    unnamed: tuple[bytes, bytes, bytes | None] | None = None
    # Bytes the client sent that no server has seen yet (a query queued for a server).
    pending: bytes = b""
    # Passthrough credentials learnt at a login (the new process has seen none yet).
    scram_client_key: bytes | None = None
    pam_password: str | None = None
    # The startup part of extra_parameters (from a process that kept only those:
    # all of them).
    startup_settings: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        document = {
            "client_id": self.client_id,
            "secret": self.secret,
            "database": self.database,
            "user": self.user,
            "application_name": self.application_name,
            "address": self.address,
            "port": self.port,
            "unix": self.unix,
            "age": self.age,
            "parameters": self.parameters,
            "extra_parameters": self.extra_parameters,
            "startup_settings": self.startup_settings,
            "raw_parameters": list(self.raw_parameters),
            "server_parameters": self.server_parameters,
            "named": [[_b64(n), _b64(b), _b64(c), _shape_text(s)] for n, b, c, s in self.named],
            "unnamed": None
            if self.unnamed is None
            else [_b64(self.unnamed[0]), _b64(self.unnamed[1]), _shape_text(self.unnamed[2])],
            "pending": _b64(self.pending),
            "scram_client_key": None
            if self.scram_client_key is None
            else _b64(self.scram_client_key),
            "pam_password": self.pam_password,
        }
        return MAGIC + json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        """The state `encode` wrote; ValueError for anything else."""
        if not data.startswith(MAGIC):
            raise ValueError("not a session state (or another version's)")
        try:
            doc = json.loads(data[len(MAGIC) :])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"session state is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("session state is not an object")
        try:
            named = []
            # Without the columns: from a process that did not learn them.
            for item in doc["named"]:
                if not isinstance(item, list) or len(item) not in (3, 4):
                    raise ValueError("a prepared statement is not [name, body, context, shape]")
                shape = _shape(item[3]) if len(item) == 4 else None
                named.append((_bytes(item[0]), _bytes(item[1]), _bytes(item[2]), shape))
            unnamed_doc = doc["unnamed"]
            unnamed = None
            if unnamed_doc is not None:
                if not isinstance(unnamed_doc, list) or len(unnamed_doc) not in (2, 3):
                    raise ValueError("the unnamed statement is not [body, context, shape]")
                shape = _shape(unnamed_doc[2]) if len(unnamed_doc) == 3 else None
                unnamed = (_bytes(unnamed_doc[0]), _bytes(unnamed_doc[1]), shape)
            raw = doc["raw_parameters"]
            if not isinstance(raw, list):
                raise ValueError("raw_parameters is not a list")
            key = doc["scram_client_key"]
            pam = doc["pam_password"]
            age = doc["age"]
            if not isinstance(age, int | float) or isinstance(age, bool):
                raise ValueError("age is not a number")
            unix = doc["unix"]
            if not isinstance(unix, bool):
                raise ValueError("unix is not a boolean")
            return cls(
                client_id=_int(doc["client_id"]),
                secret=_int(doc["secret"]),
                database=_text(doc["database"]),
                user=_text(doc["user"]),
                application_name=_text(doc["application_name"]),
                address=_text(doc["address"]),
                port=_int(doc["port"]),
                unix=unix,
                age=float(age),
                parameters=_strings(doc["parameters"]),
                extra_parameters=_strings(doc["extra_parameters"]),
                startup_settings=_strings(doc.get("startup_settings", doc["extra_parameters"])),
                raw_parameters=tuple(_text(name) for name in raw),
                server_parameters=_strings(doc["server_parameters"]),
                named=named,
                unnamed=unnamed,
                pending=_bytes(doc["pending"]),
                scram_client_key=None if key is None else _bytes(key),
                pam_password=None if pam is None else _text(pam),
            )
        except KeyError as exc:
            raise ValueError(f"session state lacks {exc}") from None
        except (TypeError, ValueError) as exc:  # base64 errors are ValueErrors too
            raise ValueError(f"invalid session state: {exc}") from None
