"""Admin console on the virtual databases `pgdoorman` / `pgbouncer` (simple query only).

Queries are run one after another by a small task per console, because PAUSE waits for
transactions to finish; every other command answers at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from pg_doorman import __version__
from pg_doorman.admin.show import TEXT, Columns, Rows, ShowTables, TableUnavailable
from pg_doorman.app.logsetup import apply_log_filter
from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.framing import MessageBuffer
from pg_doorman.protocol.messages import ProtocolError

if TYPE_CHECKING:
    from pg_doorman.app.pooler import Pooler
    from pg_doorman.net.client import ClientConnection

logger = logging.getLogger("pg_doorman.admin")

_SET = re.compile(r"set\s+([a-z_][a-z0-9_.]*)\s*(?:=|\s+to\s+)\s*(.+)", re.IGNORECASE | re.DOTALL)
# Session settings drivers send right after connecting: accepted and ignored, so that
# tools which always send them can still use the console.
_SESSION_SETTINGS = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "extra_float_digits",
        "intervalstyle",
        "search_path",
        "statement_timeout",
        "timezone",
    }
)


class AdminError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def result(columns: Columns, rows: Rows, tag: str) -> bytes:
    parts = [messages.row_description(columns)]
    for row in rows:
        parts.append(messages.data_row(None if v is None else str(v) for v in row))
    parts.append(messages.command_complete(tag))
    return b"".join(parts)


# One piece of a query: quoted text (to its end when unclosed; a doubled quote reads as
# two pieces), a `--` comment, a `/*` that opens one, a `;`, plain text, any other char.
_PIECE = re.compile(r"""'[^']*(?:'|\Z)|"[^"]*(?:"|\Z)|--[^\n]*|/\*|;|[^'";/-]+|.""", re.DOTALL)
_COMMENT_MARK = re.compile(r"/\*|\*/")


def split_statements(text: str) -> list[str]:
    """The statements of one Query: `text` cut at the semicolons outside quoted text
    (`SET application_name = 'a;b'` is one statement) and comments, each trimmed, empty
    ones left out. Comments (`-- ...` to the end of the line, `/* ... */`, nested as in
    PostgreSQL) count as a space: psql sends them along with the statements of a script."""
    parts: list[str] = []
    current: list[str] = []
    position, end = 0, len(text)
    while position < end:
        piece = _PIECE.match(text, position)
        assert piece is not None  # `.` matches any character
        token = piece.group()
        position = piece.end()
        if token == ";":
            parts.append("".join(current))
            current = []
        elif token == "/*":
            depth = 1
            while depth and (mark := _COMMENT_MARK.search(text, position)) is not None:
                depth += 1 if mark.group() == "/*" else -1
                position = mark.end()
            if depth:
                position = end  # unclosed: a comment to the end
            current.append(" ")
        elif token.startswith("--"):
            current.append(" ")
        else:
            current.append(token)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


# How much of a statement an error message repeats.
_QUOTED_CHARS: Final = 200


def _quoted(statement: str) -> str:
    """`statement` as an error message repeats it: its start only, when it is long."""
    if len(statement) <= _QUOTED_CHARS:
        return statement
    return f"{statement[:_QUOTED_CHARS]}... ({len(statement)} characters)"


def _shortened(message: str) -> str:
    """An error message that repeats what the client sent (a log level, a database
    name) cut to a readable length."""
    if len(message) <= 4 * _QUOTED_CHARS:
        return message
    return f"{message[: 4 * _QUOTED_CHARS]}..."


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


# What PAUSE waits for, by the count each worker reports under that key.
_PAUSE_WAITS: Final = (
    (
        "busy",
        "waiting for {} active server connections to be released "
        "(their transactions to finish); new transactions queue meanwhile",
    ),
    (
        "opening",
        "waiting for {} server connections being opened or checked; they are closed once ready",
    ),
)


class AdminConsole:
    def __init__(self, pooler: Pooler, client: ClientConnection) -> None:
        self.pooler = pooler
        self.client = client
        self._inbox = MessageBuffer()
        self._tables = ShowTables(pooler)
        self._queries: deque[str] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._waiting: asyncio.Future[list[dict[str, Any]]] | None = None
        self._cancel_requested = False
        self._terminated = False  # a Terminate came: close once the queries are answered
        # A message refused (not a Query, or not a message): why, for the FATAL that
        # follows the answers to the queries before it, as from PostgreSQL.
        self._refusal: str | None = None
        client.on_cancel = self.cancel

    def greeting(self) -> bytes:
        params = {
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "TimeZone": "Etc/UTC",
            "server_version": __version__,
            "server_encoding": "UTF8",
            "standard_conforming_strings": "on",
            "integer_datetimes": "on",
            "application_name": "pg_doorman",
        }
        return messages.parameter_statuses(params)

    # ---- input --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._terminated:
            return
        self._inbox.feed(data)
        try:
            while (msg := self._inbox.next_message()) is not None:
                msg_type, body = msg
                if msg_type == codes.TERMINATE:
                    # Queries sent before it are answered first, as PostgreSQL does.
                    self._terminated = True
                    if not self._queries and (self._worker is None or self._worker.done()):
                        self.client.close()
                        return
                    break
                if msg_type != codes.QUERY:
                    self._refuse("the admin console supports the simple query protocol only")
                    break
                self._queries.append(messages.parse_query_text(body))
        except ProtocolError as exc:
            self._refuse(f"invalid message: {exc}")
        if (
            self._refusal is not None
            and not self._queries
            and (self._worker is None or self._worker.done())
        ):
            self.client.fail(sqlstate.PROTOCOL_VIOLATION, self._refusal)
            return
        if self._queries and (self._worker is None or self._worker.done()):
            self._worker = self.pooler.loop.create_task(self._work())
            self.pooler.track(self._worker)

    def _refuse(self, reason: str) -> None:
        """Nothing after this message is read; the queries before it are answered."""
        self._terminated = True
        self._refusal = reason

    def cancel(self) -> None:
        """A CancelRequest for this session: stop waiting (PAUSE), if it is."""
        if self._waiting is not None and not self._waiting.done():
            self._cancel_requested = True
            self._waiting.cancel()

    async def _work(self) -> None:
        while self._queries and not self.client.transport_closed:
            text = self._queries.popleft()
            self.client.write(await self._run(text))
        if self._refusal is not None:
            self.client.fail(sqlstate.PROTOCOL_VIOLATION, self._refusal)
        elif self._terminated:
            self.client.close()

    # ---- dispatch -----------------------------------------------------------

    async def _run(self, text: str) -> bytes:
        replies: list[bytes] = []
        if "\x00" in text:
            # PostgreSQL's answer to a Query with bytes after its terminator.
            error = messages.error_response(
                "ERROR", sqlstate.PROTOCOL_VIOLATION, "invalid message format"
            )
            return error + messages.READY_IDLE
        statements = split_statements(text)
        if not statements:
            replies.append(messages.EMPTY_QUERY)
        for statement in statements:
            try:
                replies.append(await self._statement(statement))
            except AdminError as exc:
                replies.append(messages.error_response("ERROR", exc.code, _shortened(exc.message)))
                break
            except Exception:  # a bug here must not leave the console without an answer
                logger.exception("admin command failed: %s", _quoted(statement))
                replies.append(
                    messages.error_response(
                        "ERROR",
                        sqlstate.INTERNAL_ERROR,
                        f"internal error running: {_quoted(statement)}",
                    )
                )
                break
        replies.append(messages.READY_IDLE)
        return b"".join(replies)

    async def _statement(self, statement: str) -> bytes:
        words = statement.split()
        command = words[0].lower()
        args = words[1:]
        if command == "show" and len(args) == 1:
            name = args[0].lower()
            local = self._tables.local.get(name)
            if local is not None:
                return result(*local(), "SHOW")
            from_snapshot = self._tables.from_snapshot.get(name)
            if from_snapshot is not None:
                snapshot = await self.pooler.cluster_snapshot(sockets=name == "sockets")
                try:
                    return result(*from_snapshot(snapshot), "SHOW")
                except TableUnavailable as exc:
                    raise AdminError(sqlstate.FEATURE_NOT_SUPPORTED, str(exc)) from None
        elif command == "set":
            return await self._set(statement)
        elif command in ("pause", "resume", "reconnect", "kill") and len(args) <= 1:
            database = _unquote(args[0]) if args else None
            return await self._control(command, database)
        elif command == "reload" and not args:
            return await self._reload()
        elif command == "shutdown" and not args:
            return self._shutdown()
        elif command == "upgrade" and not args:
            return self._upgrade()
        elif command in ("select", "with") and "pg_catalog" in statement.lower():
            # psql's describe and tab-completion queries: an empty answer, no error.
            return result([("?column?", TEXT)], [], "SELECT 0")
        raise AdminError(sqlstate.SYNTAX_ERROR, f"unsupported admin command: {_quoted(statement)}")

    async def _set(self, statement: str) -> bytes:
        match = _SET.fullmatch(statement)
        if match is None:
            raise AdminError(sqlstate.SYNTAX_ERROR, "expected SET log_level = '<level>'")
        name, value = match.group(1).lower(), _unquote(match.group(2))
        if name == "log_level":
            try:
                apply_log_filter(value)
            except ValueError as exc:
                raise AdminError(sqlstate.SYNTAX_ERROR, f"invalid log_level: {exc}") from None
            await self.pooler.everywhere({"op": "log_level", "value": value})
            logger.info("log level set to %r by the admin console", value)
        elif name not in _SESSION_SETTINGS:
            raise AdminError(
                sqlstate.SYNTAX_ERROR,
                f"only log_level can be SET on the admin console, not {name}; "
                "edit the config file and RELOAD to change other settings",
            )
        return messages.command_complete("SET")

    async def _control(self, command: str, database: str | None) -> bytes:
        from pg_doorman.app.pooler import UnknownDatabase

        scope = f'database "{database}"' if database else "all databases"
        try:
            self.pooler.entries_of(database)  # every worker has the same pools
        except UnknownDatabase as exc:
            raise AdminError(sqlstate.INVALID_CATALOG_NAME, str(exc)) from None
        if command == "resume" and database is not None and self.pooler.paused_all:
            # As PgBouncer: a PAUSE of the whole pooler ends as a whole.
            raise AdminError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                f'database "{database}" is paused by PAUSE or KILL of all databases; '
                "RESUME without a database ends that",
            )
        if command == "pause":
            return await self._pause(database, scope)
        replies = await self.pooler.everywhere({"op": command, "database": database})
        if command == "kill":
            killed = sum(reply.get("killed", 0) for reply in replies)
            logger.warning("KILL %s: %d clients disconnected", scope, killed)
        logger.info("%s %s by the admin console", command.upper(), scope)
        return messages.command_complete(command.upper())

    async def _pause(self, database: str | None, scope: str) -> bytes:
        replies = await self.pooler.everywhere({"op": "pause", "database": database})
        logger.info("PAUSE %s by the admin console", scope)
        # Said before waiting, so the operator knows why the command blocks.
        for key, why in _PAUSE_WAITS:
            count = sum(reply.get(key, 0) for reply in replies)
            if count:
                self.client.write(messages.notice_response("00000", why.format(count)))
        self._waiting = asyncio.ensure_future(
            self.pooler.everywhere({"op": "wait_paused", "database": database}, timeout=None)
        )
        self._cancel_requested = False
        try:
            await self._waiting
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            raise AdminError(
                sqlstate.QUERY_CANCELED,
                "PAUSE canceled while waiting; the pools stay paused until RESUME",
            ) from None
        finally:
            self._waiting = None
        return messages.command_complete("PAUSE")

    async def _reload(self) -> bytes:
        replies = await self.pooler.reload_everywhere()
        errors = [reply["error"] for reply in replies if "error" in reply]
        if errors:
            logger.error("RELOAD failed, the old configuration stays: %s", errors[0])
            raise AdminError("F0000", f"reload failed, the old configuration stays: {errors[0]}")
        out = [messages.notice_response("00000", note) for note in replies[0]["notes"]]
        out.append(messages.command_complete("RELOAD"))
        return b"".join(out)

    def _upgrade(self) -> bytes:
        ok = self.pooler.request_upgrade()
        logger.warning("UPGRADE by the admin console")
        return result([("success", TEXT)], [["t" if ok else "f"]], "UPGRADE")

    def _shutdown(self) -> bytes:
        ok = self.pooler.request_shutdown()
        logger.warning("SHUTDOWN by the admin console")
        return result([("success", TEXT)], [["t" if ok else "f"]], "SHUTDOWN")
