"""Patroni's REST API, as much of it as the fallback needs: ``GET /cluster`` asked of
several nodes at once, the first good answer wins.

The HTTP exchange is one request per connection (``Connection: close``): the answer is
read to its end and parsed by ``parse_response``, the member list by ``parse_cluster``;
both take bytes and do no I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

# A /cluster answer lists a handful of members; anything this big is not one.
MAX_RESPONSE = 4 * 1024 * 1024


class PatroniApiError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Member:
    """One PostgreSQL node of the cluster, as /cluster lists it."""

    name: str
    role: str  # leader, sync_standby, quorum_standby, replica, standby_leader, ...
    state: str  # running, streaming, stopped, ...
    host: str
    port: int
    # Its tags that are set (true): nofailover, noloadbalance, nosync, ...
    tags: frozenset[str] = frozenset()


def parse_cluster(body: bytes) -> list[Member]:
    """The members of a /cluster answer that say where to connect, in listed order."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PatroniApiError(f"the answer is not JSON: {exc}") from None
    members = document.get("members") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise PatroniApiError('the answer has no "members" list')
    found = []
    for member in members:
        if not isinstance(member, dict):
            continue
        host = member.get("host")
        port = member.get("port", 5432)
        # bool is an int to Python, not to Patroni.
        if not isinstance(host, str) or not host or isinstance(port, bool):
            continue
        if not isinstance(port, int) or not 0 < port < 65536:
            continue
        tags = member.get("tags")
        found.append(
            Member(
                name=str(member.get("name", "")),
                role=str(member.get("role", "")),
                state=str(member.get("state", "")),
                host=host,
                port=port,
                tags=frozenset(str(name) for name, value in tags.items() if value is True)
                if isinstance(tags, dict)
                else frozenset(),
            )
        )
    return found


def parse_response(data: bytes) -> tuple[int, bytes]:
    """Status and body of a complete HTTP/1.x response (read until the server closed)."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise PatroniApiError("incomplete HTTP response")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(None, 2)
    if (
        len(status_line) < 2
        or not status_line[0].startswith(b"HTTP/1.")
        or not status_line[1].isdigit()
    ):
        raise PatroniApiError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = _dechunked(body)
    elif b"content-length" in headers:
        length = headers[b"content-length"]
        if not length.isdigit() or len(body) < int(length):
            raise PatroniApiError("HTTP body shorter than its Content-Length")
        body = body[: int(length)]
    return int(status_line[1]), body


def _dechunked(data: bytes) -> bytes:
    parts: list[bytes] = []
    position = 0
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            raise PatroniApiError("truncated chunked HTTP body")
        size_text = data[position:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise PatroniApiError(f"bad HTTP chunk size {size_text[:20]!r}") from None
        if size == 0:
            return b"".join(parts)
        start = end + 2
        if len(data) < start + size + 2:
            raise PatroniApiError("truncated chunked HTTP body")
        parts.append(data[start : start + size])
        position = start + size + 2


def redacted_url(url: str) -> str:
    """`url` with the password of its user info (HTTP Basic credentials) masked, for the
    log and SHOW CONFIG."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    credentials, _, host = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:********@{host}"))


def request_for(url: str) -> tuple[str, int, bool, bytes]:
    """Host, port, whether TLS, and the request bytes of GET <url>/cluster."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PatroniApiError(f"not an http(s) URL: {redacted_url(url)!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    # As in PgDoorman, a URL may already name the endpoint (http://node:8008/cluster).
    path = parts.path.rstrip("/").removesuffix("/cluster") + "/cluster"
    host_header = parts.netloc.rpartition("@")[2]
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        "Accept: application/json",
        "User-Agent: pg_doorman",
        "Connection: close",
    ]
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines.append(f"Authorization: Basic {base64.b64encode(pair.encode()).decode()}")
    return parts.hostname, port, tls, ("\r\n".join(lines) + "\r\n\r\n").encode()


async def fetch_members(url: str, timeout: float) -> list[Member]:
    """The members /cluster on one Patroni node lists, within `timeout` seconds."""
    host, port, tls, request = request_for(url)
    context = ssl.create_default_context() if tls else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                writer.write(request)
                data = await reader.read(MAX_RESPONSE + 1)
                while data and len(data) <= MAX_RESPONSE:
                    more = await reader.read(MAX_RESPONSE + 1 - len(data))
                    if not more:
                        break
                    data += more
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        raise PatroniApiError(f"no answer within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise PatroniApiError(str(exc) or type(exc).__name__) from None
    if len(data) > MAX_RESPONSE:
        raise PatroniApiError(f"answer larger than {MAX_RESPONSE} bytes")
    status, body = parse_response(data)
    if status != 200:
        raise PatroniApiError(f"HTTP status {status}")
    return parse_cluster(body)


async def fetch_cluster(urls: Sequence[str], timeout: float) -> tuple[str, list[Member]]:
    """Ask every URL at once; the first to answer with a member list wins (its URL and
    the list). PatroniApiError naming each URL's failure when none does."""
    tasks = {asyncio.ensure_future(fetch_members(url, timeout)): url for url in urls}
    failures: list[str] = []
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winner = None
            for task in done:
                error = task.exception()  # retrieved for every task, winner or not
                if error is not None:
                    failures.append(f"{redacted_url(tasks[task])}: {error}")
                elif winner is None:
                    winner = task
            if winner is not None:
                return tasks[winner], winner.result()
    finally:
        for task in pending:
            task.cancel()
    raise PatroniApiError("; ".join(failures) or "no Patroni API URL configured")
