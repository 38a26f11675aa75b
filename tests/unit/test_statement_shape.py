"""Result columns of prepared statements: what is compared, and a check's hold."""

from __future__ import annotations

import struct

from pg_doorman.prepared import rewriter as rw
from pg_doorman.prepared.registry import PoolStatements, ServerStatements, row_shape
from pg_doorman.prepared.rewriter import BatchRewriter
from pg_doorman.protocol import framing, messages


def column(name: bytes, type_oid: int, typmod: int = -1, table: int = 0, fmt: int = 0) -> bytes:
    return name + b"\x00" + struct.pack("!IhIhih", table, 0, type_oid, 4, typmod, fmt)


def description(*columns: bytes) -> bytes:
    return struct.pack("!h", len(columns)) + b"".join(columns)


def test_what_postgresql_compares_counts() -> None:
    base = row_shape(description(column(b"v", 23)))
    # Where a column comes from and how it is sent don't count.
    assert row_shape(description(column(b"v", 23, table=99, fmt=1))) == base
    # Its type, typmod and name do, and so does the number of columns.
    assert row_shape(description(column(b"v", 700))) != base
    assert row_shape(description(column(b"v", 23, typmod=8))) != base
    assert row_shape(description(column(b"w", 23))) != base
    assert row_shape(description(column(b"v", 23), column(b"w", 23))) != base
    # No columns is a row type; NoData (b"") is none.
    assert row_shape(description()) != b""


def test_literal_copies_agree() -> None:
    assert framing._DROP == rw.DROP
    assert framing._HAS_PREFIX == rw.HAS_PREFIX
    assert framing._CAPTURE == rw.CAPTURE
    assert framing._HOLD == rw.HOLD


def _parse(name: str, sql: str) -> bytes:
    return messages.build(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def _bind(name: str) -> bytes:
    return messages.build(b"B", b"\x00" + name.encode() + b"\x00" + b"\x00" * 6)


EXECUTE = messages.build(b"E", b"\x00\x00\x00\x00\x00")
PARAMS = messages.build(b"t", b"\x00\x00")
INT_ROWS = messages.build(b"T", description(column(b"v", 23)))
REAL_ROWS = messages.build(b"T", description(column(b"v", 700)))


class Client:
    """A rewriter between scanners, on a server of its own."""

    def __init__(self, registry: PoolStatements) -> None:
        self.rewriter = BatchRewriter(registry, b"")
        self.server = ServerStatements(10)
        self.rewriter.attach(self.server)
        self.frontend = framing.FrontendScanner()
        self.frontend.rewriter = self.rewriter
        self.backend = framing.BackendScanner({})

    def reply(self, data: bytes) -> bytes:
        self.backend.hook = self.rewriter if self.rewriter.expect else None
        return self.backend.feed(data)


def _learnt() -> tuple[PoolStatements, Client]:
    """A client that prepared `s`, on a server that has let it go since."""
    registry = PoolStatements(10)
    client = Client(registry)
    out = client.frontend.feed(_parse("s", "select v") + messages.SYNC)
    # A Describe of the statement, added behind its first Parse, teaches its columns.
    assert out.endswith(messages.build(b"D", b"S" + statement(client) + b"\x00") + messages.SYNC)
    reply = messages.PARSE_COMPLETE + PARAMS + INT_ROWS + messages.READY_IDLE
    assert client.reply(reply) == messages.PARSE_COMPLETE + messages.READY_IDLE
    client.server.forget(statement(client))
    return registry, client


def statement(client: Client) -> bytes:
    return client.rewriter.named[b"s"].name


def test_same_columns_let_the_held_bytes_go_on() -> None:
    _, client = _learnt()
    out = client.frontend.feed(_bind("s") + EXECUTE + messages.SYNC)
    name = statement(client)
    assert out == b"".join(
        (
            client.rewriter.named[b"s"].parse_message,
            messages.build(b"D", b"S" + name + b"\x00"),
            messages.FLUSH,
        )
    )
    assert client.frontend.paused
    assert client.frontend.feed(messages.FLUSH) == b""  # joins the bytes held
    assert client.reply(messages.PARSE_COMPLETE + PARAMS + INT_ROWS) == b""
    assert client.rewriter.resume_due and not client.rewriter.take_resume_bytes()
    again = client.frontend.feed(client.frontend.resume())
    assert again.startswith(b"B") and name in again
    assert again.endswith(EXECUTE + messages.SYNC + messages.FLUSH)


def test_changed_columns_refuse_the_held_message() -> None:
    registry, client = _learnt()
    generation = registry.generation
    name = statement(client)
    client.frontend.feed(_bind("s") + EXECUTE + messages.SYNC)
    assert client.reply(messages.PARSE_COMPLETE + PARAMS + REAL_ROWS) == b""
    assert registry.generation == generation + 1  # its text gets a new statement
    assert name not in client.server
    # The statement parsed under the old name is closed before the held bytes go on.
    assert client.rewriter.take_resume_bytes() == messages.build(b"C", b"S" + name + b"\x00")
    out = client.frontend.feed(client.frontend.resume())
    assert out == messages.build(b"D", b"SDOORMAN_refused\x00") + messages.SYNC
    refused = messages.error_response("ERROR", "26000", "x")
    got = client.reply(messages.CLOSE_COMPLETE + refused + messages.READY_IDLE)
    fields = messages.parse_error_fields(got[5 : -len(messages.READY_IDLE)])
    assert (fields["C"], fields["M"], fields["R"]) == (
        "0A000",
        "cached plan must not change result type",
        "RevalidateCachedQuery",
    )


# ---- statements that came with a binary upgrade's clients ----------------------------

BODY = b"select v\x00\x00\x00"  # a Parse body after the client's name
INT_SHAPE = row_shape(description(column(b"v", 23)))
REAL_SHAPE = row_shape(description(column(b"v", 700)))


def test_a_moved_statement_teaches_the_pool_its_columns() -> None:
    """Not known here yet: the pool takes the columns the old process knew, so that
    its first Parse here checks them rather than learning what the text gives now."""
    registry = PoolStatements(10)
    entry = registry.moved_in(BODY, b"", INT_SHAPE)
    assert entry is registry.lookup(BODY, 0, b"") and entry.shape == INT_SHAPE
    # Another client's, moved with the same columns or none known, shares it.
    assert registry.moved_in(BODY, b"", INT_SHAPE) is entry
    assert registry.moved_in(BODY, b"", None) is entry


def test_a_moved_statement_known_here_with_other_columns_is_its_clients_own() -> None:
    """Known here with other columns: the client's entry is its own, under a name no
    server has, and a Bind of it is checked and refused; the pool's is untouched."""
    registry = PoolStatements(10)
    here = registry.moved_in(BODY, b"", REAL_SHAPE)
    moved = registry.moved_in(BODY, b"", INT_SHAPE)
    assert moved is not here and moved.shape == INT_SHAPE and here.shape == REAL_SHAPE
    assert moved.name != here.name and moved.query == here.query
    assert moved.parse_message == messages.build(b"P", moved.name + b"\x00" + BODY)
    assert registry.lookup(BODY, 0, b"") is here  # clients' Parses get the pool's
    client = Client(registry)
    client.rewriter.named[b"s"] = moved
    out = client.frontend.feed(_bind("s") + EXECUTE + messages.SYNC)
    assert out == moved.parse_message + messages.build(b"D", b"S" + moved.name + b"\x00") + (
        messages.FLUSH
    )
    generation = registry.generation
    assert client.reply(messages.PARSE_COMPLETE + PARAMS + REAL_ROWS) == b""
    assert registry.generation == generation  # the pool's statement is as it was
    assert client.rewriter.take_resume_bytes() == messages.build(b"C", b"S" + moved.name + b"\x00")
    assert client.frontend.feed(client.frontend.resume()).startswith(
        messages.build(b"D", b"SDOORMAN_refused\x00")
    )
