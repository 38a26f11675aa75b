"""Client TLS and ALPN, as PostgreSQL 17 negotiates it: after an SSLRequest ALPN is
optional, but an offer without `postgresql` is refused with a no_application_protocol
alert; direct TLS refuses that offer the same way."""

from __future__ import annotations

import socket
import ssl

import psycopg
import pytest
from test_tls import (  # noqa: F401 (certs: a fixture)
    Certs,
    certs,
    client_context,
    connections_row,
    tls_dsn,
    tls_general,
)

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.pooler import PoolerFactory, PoolerProcess

REFUSAL_LOG = "TLS handshake refused: the client's ALPN offer"


def alpn_context(files: Certs, protocols: list[str] | None) -> ssl.SSLContext:
    context = client_context(files)
    if protocols is not None:
        context.set_alpn_protocols(protocols)
    return context


def tls_login(
    proc: PoolerProcess, pg: ExamplePostgres, context: ssl.SSLContext, *, direct: bool
) -> str | None:
    """Log in over TLS (after an SSLRequest, or direct) and run a query; the ALPN
    protocol the pooler selected."""
    conn = w.PgWire(proc.host, proc.port)
    try:
        if direct:
            conn.sock = context.wrap_socket(conn.sock, server_hostname="127.0.0.1")
        else:
            assert conn.start_tls(context, server_hostname="127.0.0.1") == b"S"
        user = pg.md5_user
        conn.startup(user.name, "example_db", user.password)
        assert conn.execute_query("select 1") == [("1",)]
        assert isinstance(conn.sock, ssl.SSLSocket)
        return conn.sock.selected_alpn_protocol()
    finally:
        conn.close()


def refused_handshake(proc: PoolerProcess, context: ssl.SSLContext, *, direct: bool) -> str:
    """What the client's TLS layer says when the pooler refuses its hello."""
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        if not direct:
            sock.sendall(w.ssl_request())
            assert sock.recv(1) == b"S"
        with pytest.raises(ssl.SSLError) as refused:
            context.wrap_socket(sock, server_hostname="127.0.0.1")
    return str(refused.value)


@pytest.mark.parametrize("direct", [False, True], ids=["ssl_request", "direct"])
def test_an_alpn_offer_without_postgresql_is_refused_with_an_alert(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    certs: Certs,  # noqa: F811 (the fixture)
    direct: bool,
) -> None:
    """As PostgreSQL 17: a client that offers ALPN but not postgresql means another
    protocol; its handshake ends with a no_application_protocol alert, before any
    session, and counts as a login error. Other clients are served on."""
    proc = pooler(general=tls_general(certs))
    context = alpn_context(certs, ["http/1.1", "h2"])
    assert "alert no application protocol" in refused_handshake(proc, context, direct=direct)
    log = proc.log_text()
    assert f"{REFUSAL_LOG} ('http/1.1', 'h2') lacks postgresql" in log
    assert connections_row(proc)["errors"] == "1"
    # An offer that includes postgresql gets it; after an SSLRequest, ALPN is optional.
    offers: list[tuple[list[str] | None, str | None]] = [
        (["http/1.1", "postgresql"], "postgresql"),
        (["postgresql"], "postgresql"),
    ]
    if not direct:
        offers.append((None, None))
    for protocols, selected in offers:
        context = alpn_context(certs, protocols)
        assert tls_login(proc, pg, context, direct=direct) == selected, protocols
    assert proc.log_text().count(REFUSAL_LOG) == 1
    user = pg.md5_user
    negotiation = "direct" if direct else "postgres"
    dsn = tls_dsn(proc, user.name, user.password, certs, sslnegotiation=negotiation)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_hello_in_two_records_is_read_whole(
    pg: ExamplePostgres,
    pooler: PoolerFactory,
    certs: Certs,  # noqa: F811 (the fixture)
) -> None:
    """A client may split its hello over several TLS records: the ALPN offer in the
    second one is still seen, and a split hello offering postgresql gets it."""
    proc = pooler(general=tls_general(certs))
    refused_hello = split_hello(alpn_context(certs, ["h2"]))
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
        sock.sendall(refused_hello)
        assert sock.recv(64) == b"\x15\x03\x03\x00\x02\x02\x78"  # fatal no_application_protocol
    assert f"{REFUSAL_LOG} ('h2') lacks postgresql" in proc.log_text()

    context = alpn_context(certs, ["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
        sock.sendall(w.ssl_request())
        assert sock.recv(1) == b"S"
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(split_records(outgoing.read()))
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        assert tls.selected_alpn_protocol() == "postgresql"


def split_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return split_records(outgoing.read())


def split_records(record: bytes) -> bytes:
    """One handshake record as two, the message cut after its first 40 bytes."""
    header, body = record[:3], record[5:]
    assert len(body) == int.from_bytes(record[3:5], "big")
    first, second = body[:40], body[40:]
    return (
        header
        + len(first).to_bytes(2, "big")
        + first
        + header
        + len(second).to_bytes(2, "big")
        + second
    )
