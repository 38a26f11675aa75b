"""GET /cluster: request, response parsing, member list, and the race between URLs
(against real local HTTP servers)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable

import pytest

from pg_doorman.net.patroni_api import (
    Member,
    PatroniApiError,
    fetch_cluster,
    fetch_members,
    parse_cluster,
    parse_response,
    request_for,
)

CLUSTER = {
    "members": [
        {"name": "n1", "role": "leader", "state": "running", "host": "10.0.0.1", "port": 5432},
        {"name": "n2", "role": "sync_standby", "state": "streaming", "host": "10.0.0.2"},
        {"name": "n3", "role": "replica", "state": "streaming", "host": "", "port": 5432},
        {"name": "n4", "role": "replica", "host": "10.0.0.4", "port": True},
        {"name": "n5", "role": "replica", "host": "10.0.0.5", "port": 70000},
        "not a member",
    ],
    "scope": "demo",
}


def test_members_with_an_address_in_listed_order() -> None:
    assert parse_cluster(json.dumps(CLUSTER).encode()) == [
        Member("n1", "leader", "running", "10.0.0.1", 5432),
        Member("n2", "sync_standby", "streaming", "10.0.0.2", 5432),  # port defaults
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"<html>", "not JSON"), (b"[]", 'no "members" list'), (b'{"members": 1}', "no")],
)
def test_an_answer_without_members_is_an_error(body: bytes, message: str) -> None:
    with pytest.raises(PatroniApiError, match=message):
        parse_cluster(body)


def test_response_with_content_length_ignores_what_follows() -> None:
    data = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nServer: x\r\n\r\n{}junk"
    assert parse_response(data) == (200, b"{}")


def test_chunked_response() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = head + b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert parse_response(data) == (200, b"abcde")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", "incomplete"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}", "shorter than its Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "truncated"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    ],
)
def test_malformed_responses(data: bytes, message: str) -> None:
    with pytest.raises(PatroniApiError, match=message):
        parse_response(data)


def test_request_keeps_the_url_path_and_sends_basic_auth() -> None:
    host, port, tls, request = request_for("https://u%40x:p%3Aw@patroni.example:8443/api/")
    assert (host, port, tls) == ("patroni.example", 8443, True)
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /api/cluster HTTP/1.1"
    assert "Host: patroni.example:8443" in lines
    assert "Connection: close" in lines
    assert f"Authorization: Basic {base64.b64encode(b'u@x:p:w').decode()}" in lines
    assert request.endswith(b"\r\n\r\n")
    assert request_for("http://10.0.0.1")[:3] == ("10.0.0.1", 80, False)
    with pytest.raises(PatroniApiError):
        request_for("ftp://10.0.0.1")


Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(respond: Responder) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def answering(body: bytes, status: str = "200 OK", delay: float = 0.0) -> Responder:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(delay)
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    return respond


def test_fetch_from_a_real_server() -> None:
    async def main() -> None:
        server, url = await serve(answering(json.dumps(CLUSTER).encode()))
        async with server:
            members = await fetch_members(url, 2.0)
        assert [m.name for m in members] == ["n1", "n2"]

    asyncio.run(main())


def test_the_first_url_to_answer_wins() -> None:
    async def main() -> None:
        slow, slow_url = await serve(answering(b'{"members": []}', delay=5.0))
        fast, fast_url = await serve(answering(json.dumps(CLUSTER).encode()))
        async with slow, fast:
            started = asyncio.get_running_loop().time()
            url, members = await fetch_cluster([slow_url, fast_url], 5.0)
            assert asyncio.get_running_loop().time() - started < 4.0  # not the slow one
        assert url == fast_url
        assert len(members) == 2

    asyncio.run(main())


def test_every_url_failing_names_each_failure() -> None:
    async def main() -> None:
        broken, broken_url = await serve(answering(b"oops", status="503 Service Unavailable"))
        silent, silent_url = await serve(answering(b"{}", delay=5.0))
        async with broken, silent:
            with pytest.raises(PatroniApiError) as caught:
                await fetch_cluster([broken_url, silent_url], 0.3)
        message = str(caught.value)
        assert f"{broken_url}: HTTP status 503" in message
        assert f"{silent_url}: no answer within 0.3s" in message

    asyncio.run(main())


def test_a_refused_connection_is_an_api_error() -> None:
    async def main() -> None:
        server, url = await serve(answering(b"{}"))
        server.close()
        await server.wait_closed()
        with pytest.raises(PatroniApiError):
            await fetch_members(url, 1.0)

    asyncio.run(main())
