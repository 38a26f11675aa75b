"""The `[web]` HTTP listener: `GET /metrics` (Prometheus) and `GET /health`.

A deliberately small HTTP/1.1 server: one request per connection, bounded headers and
a read deadline, so a slow or hostile scraper costs one socket and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pg_doorman.admin.snapshot import Snapshot
from pg_doorman.app.dispatch import bind_tcp
from pg_doorman.net.sockopts import INHERITS_SOCKET_OPTIONS, set_buffer_sizes
from pg_doorman.web.metrics import render

logger = logging.getLogger("pg_doorman.web")

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WebServer:
    def __init__(
        self,
        snapshot: Callable[[], Awaitable[Snapshot]],
        healthy: Callable[[], bool],
        host: str,
        port: int,
        buffer_size: int = 0,
    ) -> None:
        self._snapshot = snapshot
        self._healthy = healthy
        self.host = host
        self.port = port
        # general.tcp_socket_buffer_size, as on the pooler's own connections (0: the
        # kernel's autotuning).
        self.buffer_size = buffer_size
        self._servers: list[asyncio.Server] = []
        self.scrapes = 0

    async def start(self) -> None:
        # Bound as the pooler's listeners are: "::" takes IPv4 too, "[::1]" is read.
        sockets = bind_tcp(self.host, self.port)
        if self.buffer_size:
            # Before listening, so that the window scale offered to scrapers fits.
            for sock in sockets:
                set_buffer_sizes(sock, self.buffer_size)
        try:
            for sock in sockets:
                self._servers.append(
                    await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST_HEAD)
                )
        except BaseException:
            self.close()
            for sock in sockets:
                sock.close()
            raise
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def set_buffer_size(self, size: int) -> None:
        """A new tcp_socket_buffer_size (reload): for the connections accepted from now
        on, which inherit it from the listener (Linux); 0 leaves the buffers as they are."""
        self.buffer_size = size
        if size:
            for server in self._servers:
                for sock in server.sockets:
                    set_buffer_sizes(sock, size)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.buffer_size and not INHERITS_SOCKET_OPTIONS:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                set_buffer_sizes(sock, self.buffer_size)
        head = b""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        header = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(ConnectionError):
            writer.write(header + (b"" if head_only(head) else body))
            await writer.drain()
        writer.close()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if target == "/metrics":
            self.scrapes += 1
            try:
                snapshot = await self._snapshot()
            except Exception as exc:  # workers restarting: say so, keep serving
                logger.warning("metrics unavailable: %s", exc)
                return "503 Service Unavailable", "text/plain", b"metrics unavailable\n"
            body = await asyncio.get_running_loop().run_in_executor(None, render, snapshot)
            return "200 OK", METRICS_CONTENT_TYPE, body
        if target == "/health":
            if not self._healthy():
                return "503 Service Unavailable", "text/plain", b"shutting down or degraded\n"
            return "200 OK", "text/plain", b"OK\n"
        return "404 Not Found", "text/plain", b"not found; try /metrics or /health\n"


def head_only(head: bytes) -> bool:
    return head.startswith(b"HEAD ")
