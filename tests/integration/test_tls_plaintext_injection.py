"""Client TLS: plaintext sent behind an encryption request, with a certificate
configured (the pooler would answer S), is refused as PostgreSQL refuses it."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import trustme

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory

# PostgreSQL's words for the refusal (CVE-2021-23214), per request kind.
UNENCRYPTED_DATA = {
    "ssl": "received unencrypted data after SSL request",
    "gssenc": "received unencrypted data after GSSAPI encryption request",
}


def server_certificate(root: Path) -> dict[str, str]:
    """[general] keys offering TLS with a fresh certificate for 127.0.0.1."""
    server = trustme.CA().issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    server.private_key_pem.write_to_path(str(root / "server.key"))
    return {
        "tls_certificate": str(root / "server.pem"),
        "tls_private_key": str(root / "server.key"),
    }


def reply_to(host: str, port: int, first_write: bytes) -> bytes:
    """Everything the peer sends back to `first_write` until it hangs up."""
    received = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(first_write)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def fatal_fields(reply: bytes) -> dict[str, str]:
    """The fields of the ErrorResponse in `reply`, after PostgreSQL's one-byte N."""
    if reply[:1] in (b"N", b"S"):
        reply = reply[1:]
    assert reply[:1] == b"E", reply
    return w.error_fields(reply[5:])


@pytest.mark.parametrize("request_kind", ["ssl", "gssenc"])
def test_startup_packet_behind_an_encryption_request_is_refused_in_plaintext(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path, request_kind: str
) -> None:
    """An SSLRequest answered S is followed by the TLS hello: a StartupMessage that came
    with the request was sent before any encryption, maybe by someone in the middle."""
    proc = pooler(general=server_certificate(tmp_path))
    request = w.ssl_request() if request_kind == "ssl" else w.gssenc_request()
    injected = w.startup_message({"user": pg.trust_user.name, "database": "example_db"})
    from_pooler = reply_to(proc.host, proc.port, request + injected)
    from_postgres = reply_to(pg.host, pg.port, request + injected)
    assert from_pooler[:1] != b"S", "TLS offered over a stream holding plaintext"
    assert b"R\x00\x00\x00\x08\x00\x00\x00\x00" not in from_pooler  # never AuthenticationOk
    pooler_error, postgres_error = fatal_fields(from_pooler), fatal_fields(from_postgres)
    assert postgres_error["M"] == UNENCRYPTED_DATA[request_kind]
    for field in "SCMD":
        assert pooler_error.get(field) == postgres_error.get(field), field
    # The connection after it logs in as usual.
    conn = w.PgWire.connect(proc.host, proc.port, pg.trust_user.name, "example_db")
    conn.close()
