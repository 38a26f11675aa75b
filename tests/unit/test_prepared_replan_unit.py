"""A statement PostgreSQL refuses because what its text means changed since the
server parsed it: later Parses of any text reach the servers under new names."""

from __future__ import annotations

from pg_doorman.prepared.registry import PoolStatements, ServerStatements, statement_name
from pg_doorman.prepared.rewriter import BatchRewriter
from pg_doorman.protocol import messages
from pg_doorman.protocol.framing import BackendScanner, FrontendScanner

EXECUTE = messages.build(b"E", b"\x00\x00\x00\x00\x00")
SYNC = messages.SYNC
# PostgreSQL's error, fields as it sends them (the routine is never translated).
REPLAN_ERROR = messages.build(
    b"E",
    b"SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00"
    b"Fplancache.c\x00L866\x00RRevalidateCachedQuery\x00\x00",
)


def parse(name: str, sql: str) -> bytes:
    return messages.build(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(stmt: str) -> bytes:
    return messages.build(b"B", b"\x00" + stmt.encode() + b"\x00" + b"\x00" * 6)


class Client:
    def __init__(self, registry: PoolStatements, server: ServerStatements) -> None:
        self.rewriter = BatchRewriter(registry, b"")
        self.frontend = FrontendScanner()
        self.frontend.rewriter = self.rewriter
        self.backend = BackendScanner({})
        self.rewriter.attach(server)

    def send(self, data: bytes) -> bytes:
        return self.frontend.feed(data)

    def reply(self, data: bytes) -> bytes:
        self.backend.hook = self.rewriter if self.rewriter.expect else None
        out = self.backend.feed(data)
        if self.rewriter.expect and self.rewriter.only_synthetic_due():
            out += self.rewriter.drain()
        return out


def _parsed(registry: PoolStatements, server: ServerStatements, sql: str) -> Client:
    client = Client(registry, server)
    client.send(parse("", sql) + SYNC)
    client.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    return client


def test_a_refused_statement_is_parsed_again_under_a_new_name() -> None:
    registry, server = PoolStatements(100), ServerStatements(10)
    client = _parsed(registry, server, "select * from t")
    _parsed(registry, server, "select 2")
    old = statement_name(b"select * from t\x00\x00\x00")
    assert old in server
    client.send(parse("", "select * from t") + bind("") + EXECUTE + SYNC)
    assert client.reply(REPLAN_ERROR + messages.READY_IDLE) == (
        messages.PARSE_COMPLETE + REPLAN_ERROR + messages.READY_IDLE
    )
    # The unnamed statement, parsed again: the server parses it afresh, as PostgreSQL
    # plans each unnamed Parse; so does any other text.
    for sql in ("select * from t", "select 2"):
        out = client.send(parse("", sql) + bind("") + EXECUTE + SYNC)
        assert out.startswith(b"P") and old not in out
        assert out[5:13] == b"DOORMAN_"
        client.reply(
            messages.PARSE_COMPLETE
            + messages.BIND_COMPLETE
            + messages.command_complete("SELECT 0")
            + messages.READY_IDLE
        )
    assert registry.generation == 1


def test_refusals_of_statements_prepared_before_rename_nothing_more() -> None:
    registry, server = PoolStatements(100), ServerStatements(10)
    stale = Client(registry, server)
    stale.send(parse("s", "select * from t") + SYNC)
    stale.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    for _ in range(2):  # the client binds its statement again, as PostgreSQL lets it
        stale.send(bind("s") + EXECUTE + SYNC)
        stale.reply(REPLAN_ERROR + messages.READY_IDLE)
    assert registry.generation == 1


def test_other_refusals_rename_nothing() -> None:
    registry, server = PoolStatements(100), ServerStatements(10)
    client = _parsed(registry, server, "select 1")
    client.send(bind("") + EXECUTE + SYNC)
    other = messages.error_response("ERROR", "0A000", "could not implement GROUP BY")
    client.reply(other + messages.READY_IDLE)
    assert registry.generation == 0
