"""log_min_duration_statement: a log line for each request that took that long or longer.

A request is what a client sends up to a ReadyForQuery: a Query message (with all its
statements), or an extended-protocol batch up to its Sync. It is timed from when its
first bytes reach the server (the first of a transaction's, from the checkout) to its
ReadyForQuery. The server connection keeps the bytes that began the request being
timed (a reference, not a copy); only a request that turns out slow is read, here, for
its statement: the Query's text, the Parse's, or, for a Bind of a statement prepared
earlier, the pool's text of that statement. Parameter values are never logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from pg_doorman.protocol import codes

if TYPE_CHECKING:
    from pg_doorman.net.client import ClientConnection
    from pg_doorman.net.server import ServerConnection
    from pg_doorman.prepared.rewriter import BatchRewriter

logger = logging.getLogger("pg_doorman.slow_queries")

# Bytes of a statement's text in its log line.
TEXT_LIMIT: Final = 1024
# Bytes of a message read for it: the text and, ahead of it, a name or two.
_READ_LIMIT: Final = TEXT_LIMIT + 1024
# What may come ahead of the statement in a batch (a Sync ends the request instead).
_AHEAD: Final = frozenset((codes.DESCRIBE, codes.CLOSE, codes.EXECUTE, codes.FLUSH))


def log_slow_query(
    server: ServerConnection, client: ClientConnection, seconds: float, requests: int
) -> None:
    """One line for the request(s) whose ReadyForQuery just came after `seconds`."""
    server.pool.slow_requests += requests
    statement = describe_request(server.request_data, client.rewriter)
    together = f" (with {requests - 1} more request(s) sent with it)" if requests > 1 else ""
    where = f" from {client.address}" if client.address else ""
    logger.info(
        "pool %s: client %s%s: request took %.3f ms on server %d (pid %d)%s: %s",
        server.pool.name,
        client.name,
        where,
        seconds * 1000.0,
        server.server_id,
        server.backend_pid,
        together,
        statement,
    )


def describe_request(data: bytes | None, rewriter: BatchRewriter | None) -> str:
    """The statement of the request that `data` begins, for a log line."""
    if data is None:
        return "(statement not kept: sent while an earlier request was unanswered)"
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or length > codes.MAX_MESSAGE_SIZE:
            break
        # Not the whole of a long text (a copy), and maybe not all of it arrived yet.
        body = data[pos + 5 : pos + 1 + min(length, _READ_LIMIT)]
        cut = pos + 1 + length > len(data) or length > _READ_LIMIT
        if kind == codes.QUERY:
            text, ended = _until_nul(body, 0)
            return _shown(text, cut and not ended)
        if kind == codes.PARSE or kind == codes.BIND:
            # A Parse: the statement's name, then its text; a Bind: the portal's name,
            # then the statement's.
            first_end = body.find(b"\x00")
            if first_end < 0:
                break
            second, ended = _until_nul(body, first_end + 1)
            if kind == codes.PARSE:
                return _shown(second, not ended)
            if not ended:
                break
            return _bound(second, rewriter)
        if kind == codes.FUNCTION_CALL and len(body) >= 4:
            return f"(function call, oid {int.from_bytes(body[:4], 'big')})"
        if kind not in _AHEAD or cut:
            break
        pos += 1 + length
    return "(statement not in the request's first bytes)"


def _until_nul(body: bytes, start: int) -> tuple[bytes, bool]:
    """body[start:] up to its NUL, and whether there was one."""
    end = body.find(b"\x00", start)
    return (body[start:], False) if end < 0 else (body[start:end], True)


def _bound(name: bytes, rewriter: BatchRewriter | None) -> str:
    text = rewriter.statement_text(name) if rewriter is not None else None
    if text is not None:
        return _shown(text, False)
    shown = name.decode("utf-8", "replace")
    return f'(prepared statement "{shown}")' if name else "(the unnamed prepared statement)"


def _shown(text: bytes, cut: bool) -> str:
    """The text on one line: runs of white space as one space, at most TEXT_LIMIT bytes,
    "..." where something is left out."""
    more = cut or len(text) > TEXT_LIMIT
    shown = " ".join(text[:TEXT_LIMIT].decode("utf-8", "replace").split())
    return shown + " ..." if more else shown
