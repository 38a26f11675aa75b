"""net/client_hello.py: where a client's TLS hello ends and which ALPN protocols it
offers, read from hellos that OpenSSL itself writes."""

from __future__ import annotations

import itertools
import ssl

import pytest

from pg_doorman.net.client_hello import ClientHello, read_client_hello


def hello_record(protocols: list[str] | None) -> bytes:
    context = ssl.create_default_context()
    if protocols is not None:
        context.set_alpn_protocols(protocols)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="db.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def in_records(record: bytes, *cuts: int) -> bytes:
    """`record`'s handshake bytes again, as one record per piece between `cuts`."""
    header, body = record[:3], record[5:]
    bounds = [0, *cuts, len(body)]
    return b"".join(
        header + (end - start).to_bytes(2, "big") + body[start:end]
        for start, end in itertools.pairwise(bounds)
    )


@pytest.mark.parametrize(
    ("protocols", "offered"),
    [
        (None, None),
        (["postgresql"], (b"postgresql",)),
        (["http/1.1", "postgresql"], (b"http/1.1", b"postgresql")),
        (["h2"], (b"h2",)),
    ],
)
def test_the_alpn_offer_is_read(protocols: list[str] | None, offered: object) -> None:
    record = hello_record(protocols)
    assert read_client_hello(record) == ClientHello(len(record), offered)  # type: ignore[arg-type]


def test_more_bytes_are_awaited_until_the_hello_is_whole() -> None:
    record = hello_record(["postgresql"])
    for size in (0, 1, 4, 5, 6, len(record) - 1):
        assert read_client_hello(record[:size]) is None, size
    # Bytes after it are not part of it.
    assert read_client_hello(record + b"\x14\x03\x03") == ClientHello(len(record), (b"postgresql",))


def test_a_hello_split_over_records_is_read_across_them() -> None:
    split = in_records(hello_record(["h2", "postgresql"]), 2, 40)
    for size in range(len(split)):
        assert read_client_hello(split[:size]) is None, size
    assert read_client_hello(split) == ClientHello(len(split), (b"h2", b"postgresql"))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",  # not a TLS record
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff" + b"\x16\x03\x01\x00\x01\x00",  # 16 MiB
        b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",  # a hello too short to read
    ],
)
def test_what_is_no_readable_hello_goes_to_openssl_whole(data: bytes) -> None:
    assert read_client_hello(data) == ClientHello(len(data), None)


def test_a_hello_in_many_tiny_records_is_left_to_openssl() -> None:
    """Clients write a hello in a record or a few; one in a record per byte is not
    buffered up to its end."""
    header = b"\x01\x00\x01\x00"  # a ClientHello of 256 bytes
    tiny = b"".join(b"\x16\x03\x01\x00\x01" + bytes([byte]) for byte in header + bytes(256))
    assert read_client_hello(tiny[:100]) == ClientHello(100, None)
