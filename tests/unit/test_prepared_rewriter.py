"""Sans-IO prepared-statement rewriting: registry, server LRU, request and reply rewriting."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.prepared import rewriter as rw
from pg_doorman.prepared.deallocate import parse_deallocate
from pg_doorman.prepared.registry import PoolStatements, ServerStatements, statement_name
from pg_doorman.prepared.rewriter import BatchRewriter, Expectations, close_statement
from pg_doorman.protocol import codes, messages
from pg_doorman.protocol.framing import BackendScanner, FrontendScanner


def msg(t: bytes, body: bytes = b"") -> bytes:
    return messages.build(t, body)


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(stmt: str, portal: str = "") -> bytes:
    return msg(
        b"B", portal.encode() + b"\x00" + stmt.encode() + b"\x00" + b"\x00\x00\x00\x00\x00\x00"
    )


def describe_s(name: str) -> bytes:
    return msg(b"D", b"S" + name.encode() + b"\x00")


def close_s(name: str) -> bytes:
    return msg(b"C", b"S" + name.encode() + b"\x00")


EXECUTE = msg(b"E", b"\x00\x00\x00\x00\x00")
SYNC = messages.SYNC
FLUSH = messages.FLUSH
ROW = msg(b"D", struct.pack("!hi", 1, 1) + b"1")
SELECT_1 = messages.command_complete("SELECT 1")
PARAM_DESC = msg(b"t", b"\x00\x00")
NO_DATA = messages.NO_DATA


def server_name(sql: str, context: bytes = b"") -> bytes:
    return statement_name(sql.encode() + b"\x00\x00\x00" + context)


class Session:
    """One client's rewriter wired to scanners, as the connection shells do it."""

    def __init__(self, server_cache: int = 10) -> None:
        self.registry = PoolStatements(100)
        self.server = ServerStatements(server_cache)
        self.rewriter = BatchRewriter(self.registry, b"")
        self.frontend = FrontendScanner()
        self.frontend.rewriter = self.rewriter
        self.backend = BackendScanner({})
        self.rewriter.attach(self.server)
        self.to_client = bytearray()

    def send(self, data: bytes) -> bytes:
        out = self.frontend.feed(data)
        if self.rewriter.expect and self.rewriter.only_synthetic_due():
            self.to_client += self.rewriter.drain()
        return out

    def reply(self, data: bytes, cuts: list[int] | None = None) -> bytes:
        chunks = [data] if not cuts else split(data, cuts)
        for chunk in chunks:
            self.backend.hook = self.rewriter if self.rewriter.expect else None
            self.to_client += self.backend.feed(chunk)
        return bytes(self.to_client)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return [c for c in chunks if c]


def test_first_parse_is_renamed_and_sent() -> None:
    s = Session()
    out = s.send(parse("a", "select 1") + bind("a") + EXECUTE + SYNC)
    name = server_name("select 1")
    assert out.startswith(msg(b"P", name + b"\x00select 1\x00\x00\x00"))
    assert msg(b"B", b"\x00" + name + b"\x00" + b"\x00" * 6) in out
    reply = messages.PARSE_COMPLETE + messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    assert s.reply(reply) == reply
    assert name in s.server


@settings(max_examples=200)
@given(
    st.sampled_from(["", "p", "portal_1"]),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=0, max_value=120), max_size=8),
)
def test_bind_is_renamed_byte_for_byte_in_any_chunking(
    portal: str, rest: bytes, cuts: list[int]
) -> None:
    """Only the statement name changes; the portal and the parameters behind the name
    (forwarded from the client's own bytes) stay as they were."""
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    name = server_name("select 1")
    stream = msg(b"B", portal.encode() + b"\x00a\x00" + rest) + EXECUTE + SYNC
    out = b"".join(s.send(chunk) for chunk in split(stream, cuts))
    assert out == msg(b"B", portal.encode() + b"\x00" + name + b"\x00" + rest) + EXECUTE + SYNC


@settings(max_examples=100)
@given(
    st.integers(min_value=0, max_value=600),
    st.binary(max_size=3000),
    st.lists(st.integers(min_value=0, max_value=6000), max_size=8),
)
def test_bind_behind_other_messages_is_renamed_in_any_chunking(
    flushes: int, rest: bytes, cuts: list[int]
) -> None:
    """Messages forwarded as they are ahead of the one rewritten, and parameters behind
    its name, short or beyond the size up to which output is concatenated rather than
    joined: the stream comes out the same but for the name."""
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    name = server_name("select 1")
    lead = FLUSH * flushes
    stream = lead + msg(b"B", b"\x00a\x00" + rest) + EXECUTE + SYNC
    out = b"".join(s.send(chunk) for chunk in split(stream, cuts))
    assert out == lead + msg(b"B", b"\x00" + name + b"\x00" + rest) + EXECUTE + SYNC


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=12))
def test_skipped_parse_gets_synthetic_parse_complete_any_chunking(cuts: list[int]) -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    s.rewriter.named.clear()  # a new client of the same server
    out = s.send(parse("b", "select 1") + describe_s("b") + bind("b") + EXECUTE + SYNC)
    assert not out.startswith(b"P")  # not sent again
    reply = PARAM_DESC + NO_DATA + messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    client_sees = s.reply(reply, cuts)
    assert client_sees == messages.PARSE_COMPLETE + reply


def test_statement_missing_on_server_is_parsed_silently() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    s.rewriter.attach(ServerStatements(10))  # next transaction, another server
    out = s.send(bind("a") + EXECUTE + SYNC)
    assert out.startswith(b"P")  # parsed first ...
    reply = messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    # ... and its ParseComplete never reaches the client.
    assert s.reply(messages.PARSE_COMPLETE + reply) == reply


def test_error_skips_to_sync_and_forgets_failed_parse() -> None:
    s = Session()
    s.send(parse("a", "select 1/0") + bind("a") + EXECUTE + parse("c", "select 3") + SYNC)
    error = messages.error_response("ERROR", "22012", "division by zero")
    # The pooler describes a statement it parses first (StatementEntry.shape): the
    # answer is its own.
    described = PARAM_DESC + NO_DATA
    reply = messages.PARSE_COMPLETE + messages.BIND_COMPLETE + error + messages.READY_IDLE
    assert s.reply(reply[:5] + described + reply[5:]) == reply
    assert server_name("select 1/0") in s.server  # created: its Parse succeeded
    assert server_name("select 3") not in s.server  # skipped by the server


def test_synthetic_parse_complete_not_sent_after_error() -> None:
    s = Session()
    s.send(parse("c", "select 3") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    s.send(parse("x", "select nope") + parse("c2", "select 3") + SYNC)
    error = messages.error_response("ERROR", "42703", "column does not exist")
    # PostgreSQL skips the second Parse: no ParseComplete for it, real or synthetic.
    assert s.reply(error + messages.READY_IDLE) == error + messages.READY_IDLE
    assert server_name("select nope") not in s.server


def test_unknown_statement_error_and_skip() -> None:
    s = Session()
    out = s.send(bind("ghost") + EXECUTE + parse("p", "select 1") + SYNC)
    # In place of the Bind, a message the server must fail on, so that it skips the
    # rest and fails its transaction as PostgreSQL would; the rest is not sent.
    refusal = messages.build(b"D", b"SDOORMAN_refused\x00")
    assert out == refusal + SYNC
    servers_error = messages.error_response(
        "ERROR", "26000", 'prepared statement "DOORMAN_refused" does not exist'
    )
    client_sees = s.reply(servers_error + messages.READY_IDLE)
    assert client_sees[:1] == b"E" and client_sees.endswith(messages.READY_IDLE)
    fields = messages.parse_error_fields(client_sees[5:-6])
    assert fields["C"] == "26000"
    assert fields["M"] == 'prepared statement "ghost" does not exist'
    assert "p" not in {k.decode() for k in s.rewriter.named}


def test_synthetic_answers_ride_with_the_server_reply() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    s.rewriter.named.clear()
    s.send(parse("b", "select 1") + bind("b") + EXECUTE + SYNC)
    assert not s.to_client  # nothing written on its own
    reply = messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    assert s.reply(reply) == messages.PARSE_COMPLETE + reply


def test_close_is_answered_locally() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    out = s.send(close_s("a") + SYNC)
    assert out == SYNC
    assert s.reply(messages.READY_IDLE) == messages.CLOSE_COMPLETE + messages.READY_IDLE
    assert b"a" not in s.rewriter.named


def test_several_synthetic_answers_go_out_together_in_order() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    out = s.send(parse("b", "select 1") + close_s("a") + bind("b") + EXECUTE + SYNC)
    assert not out.startswith(b"P")  # both answered by the pooler
    reply = messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    assert s.reply(reply) == messages.PARSE_COMPLETE + messages.CLOSE_COMPLETE + reply


def test_eviction_close_goes_ahead_of_the_next_batch() -> None:
    s = Session(server_cache=1)
    name_a, name_b = server_name("select 'a'"), server_name("select 'b'")
    out = s.send(parse("a", "select 'a'") + parse("b", "select 'b'") + bind("a") + EXECUTE + SYNC)
    # 'a' was evicted by 'b' but used again by the Bind: it stays and 'b' goes instead,
    # closed ahead of the next batch (behind the Execute it could land inside a COPY).
    assert close_statement(name_a) not in out and close_statement(name_b) not in out
    assert s.server.pending_close == [name_b]
    visible = messages.PARSE_COMPLETE * 2 + messages.BIND_COMPLETE + ROW + SELECT_1
    assert s.reply(visible + messages.READY_IDLE) == visible + messages.READY_IDLE
    s.to_client.clear()
    out = s.send(parse("c", "select 'c'") + SYNC)
    assert out.startswith(close_statement(name_b) + b"P")
    reply = messages.CLOSE_COMPLETE + messages.PARSE_COMPLETE + messages.READY_IDLE
    assert s.reply(reply) == messages.PARSE_COMPLETE + messages.READY_IDLE
    assert list(s.server._names) == [server_name("select 'c'")]
    assert s.server.pending_close == [name_a]


def test_no_close_goes_out_while_a_copy_may_be_running() -> None:
    """libpq sends Sync right behind a COPY FROM STDIN's Execute; PostgreSQL ends the
    connection when a Close arrives during the copy."""
    s = Session(server_cache=1)
    name_a = server_name("select 'a'")
    s.send(parse("a", "select 'a'") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    out = s.send(parse("", "copy t from stdin") + bind("") + EXECUTE + SYNC)
    assert close_statement(name_a) not in out
    assert s.server.pending_close == [name_a]
    s.reply(messages.PARSE_COMPLETE + messages.BIND_COMPLETE + msg(b"G", b"\x00\x00\x00"))
    assert s.send(msg(b"d", b"1\n") + msg(b"c")) == msg(b"d", b"1\n") + msg(b"c")
    s.reply(messages.command_complete("COPY 1") + messages.READY_IDLE)
    out = s.send(bind("a") + EXECUTE + SYNC)
    assert out.startswith(close_statement(name_a) + b"P")  # closed, then parsed again
    assert out.endswith(msg(b"B", b"\x00" + name_a + b"\x00" + b"\x00" * 6) + EXECUTE + SYNC)


def test_flush_sends_synthetic_parse_complete_at_once() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    assert s.send(parse("b", "select 1") + FLUSH) == FLUSH
    assert bytes(s.to_client) == messages.PARSE_COMPLETE


def test_leading_simple_query_is_answered_first() -> None:
    s = Session()
    s.send(messages.query("select 1") + parse("a", "select 2") + SYNC)
    reply = (
        msg(b"T", b"\x00\x00")
        + ROW
        + SELECT_1
        + messages.READY_IDLE
        + messages.PARSE_COMPLETE
        + messages.READY_IDLE
    )
    assert s.reply(reply) == reply
    assert not s.rewriter.expect


def test_expectations_queue_order_and_reuse() -> None:
    q = Expectations()
    assert not q and len(q) == 0
    q.append(rw.SYNTH, b"x")
    q.append(rw.BIND)
    q.append(rw.SYNC)
    assert q and len(q) == 3
    assert (q.first_kind(), q.first_payload()) == (rw.SYNTH, b"x")
    assert not q.all_synthetic()
    q.popleft()
    assert (q.first_kind(), q.first_payload()) == (rw.BIND, b"")
    q.replace_first(rw.SYNC)
    assert q.first_kind() == rw.SYNC
    q.popleft()
    q.popleft()
    assert not q and q.head == 0 and q.popped == 3
    assert len(q.kinds) == 3  # emptied: the slots stay for the next batch
    q.append(rw.SYNTH)
    assert q.all_synthetic()  # the spare slots' old BIND and SYNC are not pending
    q.append(rw.SYNC)
    assert q.void_syncs_after_head() == 1  # the pending SYNC only, not the spare slot's
    assert len(q) == 2 and q.syncs == 0 and q.all_synthetic()
    for _ in range(40):
        q.append(rw.BIND)
    while q:
        q.popleft()
    assert q.kinds == [] and q.payloads == []  # a long queue gives its storage back


def test_expectations_compact_while_never_empty() -> None:
    q = Expectations()
    q.append(rw.BIND, b"0")
    for i in range(1, 10_000):
        q.append(rw.BIND, str(i).encode())
        q.popleft()
        assert q.first_payload() == str(i).encode()
    assert len(q) == 1
    assert len(q.kinds) <= 128  # consumed entries are dropped, not kept forever


def test_pipelined_batches_that_never_drain_stay_correct_and_bounded() -> None:
    s = Session()
    s.send(parse("a", "select 1") + SYNC)
    s.reply(messages.PARSE_COMPLETE + messages.READY_IDLE)
    s.to_client.clear()
    batch_reply = messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    s.send(bind("a") + EXECUTE + SYNC)  # one batch always in flight ahead
    for _ in range(500):
        s.send(bind("a") + EXECUTE + SYNC)
        s.reply(batch_reply)
    assert bytes(s.to_client) == batch_reply * 500
    assert len(s.rewriter.expect) == 3  # the batch still in flight: Bind, Execute, Sync
    assert len(s.rewriter.expect.kinds) <= 128


def test_registry_shares_by_content_and_context() -> None:
    registry = PoolStatements(2)
    body = b"a\x00select 1\x00\x00\x00"
    first = registry.lookup(body, 2, b"")
    assert registry.lookup(b"zz\x00select 1\x00\x00\x00", 3, b"") is first
    assert registry.lookup(body, 2, b"search_path=x") is not first
    registry.lookup(b"\x00select 2\x00\x00\x00", 1, b"")
    assert len(registry) == 2  # bounded
    assert first.name.startswith(b"DOORMAN_")


def test_repeated_unnamed_parse_stays_correct_across_statements() -> None:
    s = Session()
    reply = messages.BIND_COMPLETE + ROW + SELECT_1 + messages.READY_IDLE
    for sql in ("select 1", "select 1", "select 2", "select 1", "select 2"):
        s.to_client.clear()
        out = s.send(parse("", sql) + bind("") + EXECUTE + SYNC)
        name = server_name(sql)
        assert msg(b"B", b"\x00" + name + b"\x00" + b"\x00" * 6) in out
        if out.startswith(b"P"):  # first time on this server
            assert s.reply(messages.PARSE_COMPLETE + reply) == messages.PARSE_COMPLETE + reply
        else:
            assert s.reply(reply) == messages.PARSE_COMPLETE + reply
    assert s.registry.lookup(b"\x00select 1\x00\x00\x00", 1, b"").hits == 2


def test_repeated_parse_after_registry_eviction_registers_again() -> None:
    registry = PoolStatements(1)
    first, second = BatchRewriter(registry, b""), BatchRewriter(registry, b"")
    for rewriter in (first, second):
        rewriter.attach(ServerStatements(10))
    first.frontend(codes.PARSE, parse("", "select 1"), 0, len(parse("", "select 1")))
    second.frontend(codes.PARSE, parse("", "select 2"), 0, len(parse("", "select 2")))
    assert [e.query for e in registry.entries()] == [b"select 2"]
    # The same Parse again: the client's remembered entry was evicted, so it is
    # looked up (and registered) again rather than reused.
    first.frontend(codes.PARSE, parse("", "select 1"), 0, len(parse("", "select 1")))
    assert [e.query for e in registry.entries()] == [b"select 1"]


def test_long_parse_is_not_remembered() -> None:
    s = Session()
    sql = "select 1 -- " + "x" * 10_000
    s.send(parse("", sql) + SYNC)
    assert s.rewriter._last_parse == b""
    s.send(parse("", "select 1") + SYNC)
    assert s.rewriter._last_parse.startswith(b"\x00select 1\x00")


def test_server_lru() -> None:
    lru = ServerStatements(2)
    lru.add(b"a")
    lru.add(b"b")
    lru.add(b"c")
    assert lru.pending_close == [b"a"] and b"a" not in lru
    assert lru.has(b"a")  # revived before its Close went out
    assert lru.pending_close == [b"b"]
    lru.forget(b"c")
    assert b"c" not in lru
    lru.restore(b"b")
    assert b"b" not in lru  # its Close is still to go out: it will be gone
    assert lru.take_pending_close() == [b"b"]
    lru.restore(b"b")  # that Close was skipped after all
    assert b"b" in lru


def test_server_lru_evicts_the_least_recently_used() -> None:
    lru = ServerStatements(2)
    lru.add(b"a")
    lru.add(b"b")
    assert lru.has(b"a")  # a is now the newest
    lru.add(b"c")
    assert lru.take_pending_close() == [b"b"]
    assert lru.has(b"a") and lru.has(b"a")  # used again in a row
    lru.add(b"d")
    assert lru.take_pending_close() == [b"c"]
    assert lru.has(b"d") and lru.has(b"a")
    lru.forget(b"a")
    lru.add(b"e")
    assert lru.take_pending_close() == []  # a's slot was freed, nothing evicted
    lru.add(b"a")
    assert lru.take_pending_close() == [b"d"]
    assert b"a" in lru and b"e" in lru and lru.hits == 5


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"DEALLOCATE ALL", (True, b"")),
        (b"  deallocate all ; ", (True, b"")),
        (b"deallocate prepare all", (True, b"")),
        (b'deallocate "Stmt ""1"""', (False, b'Stmt "1"')),
        (b"DEALLOCATE MyStmt", (False, b"mystmt")),
        (b"deallocate prepare s1;", (False, b"s1")),
        (b"deallocate", None),
        (b"select 1", None),
        (b"deallocate a b", None),
    ],
)
def test_parse_deallocate(query: bytes, expected: tuple[bool, bytes] | None) -> None:
    assert parse_deallocate(query) == expected


def test_sync_ignored_during_copy_in_is_not_expected() -> None:
    """libpq's Sync behind a COPY's Execute gets no ReadyForQuery: PostgreSQL ignores
    it once the copy begins. The next batch's synthetic ParseComplete still comes first."""
    s = Session()
    batch = parse("c", "copy t from stdin") + bind("c") + EXECUTE + SYNC
    s.send(batch)
    copy_in = msg(b"G", b"\x00\x00\x01\x00\x00")
    s.reply(messages.PARSE_COMPLETE + messages.BIND_COMPLETE + copy_in)
    s.frontend.on_copy_in_started()  # as the server connection calls it on CopyInResponse
    s.send(msg(b"d", b"1\n") + msg(b"c") + SYNC)
    s.reply(messages.command_complete("COPY 1") + messages.READY_IDLE)
    assert not s.rewriter.expect
    s.to_client.clear()
    s.rewriter.named.clear()
    out = s.send(batch)
    assert not out.startswith(b"P")  # the server has it
    reply = messages.BIND_COMPLETE + copy_in
    assert s.reply(reply) == messages.PARSE_COMPLETE + reply
