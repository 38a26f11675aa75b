"""Framing: any chunking of a valid stream gives the same bytes and the same decisions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.protocol import codes, messages
from pg_doorman.protocol.framing import (
    CLEAN_ADVISORY,
    CLEAN_DECLARE,
    CLEAN_LISTEN,
    CLEAN_PREPARE,
    CLEAN_RESET,
    CLEAN_SET,
    CLEAN_TEMP,
    BackendScanner,
    FrontendScanner,
    MessageBuffer,
    RefusedMessage,
    cleanup_queries,
    joined,
    joined_with_rest,
    tag_cleanup_effect,
)
from pg_doorman.protocol.messages import ProtocolError
from pg_doorman.protocol.text_effects import CALLS_LOCK, CALLS_UNLOCK


def msg(t: bytes, body: bytes = b"") -> bytes:
    return messages.build(t, body)


def data_row(size: int) -> bytes:
    return msg(b"D", struct.pack("!hi", 1, size) + b"x" * size)


BACKEND_STREAM = b"".join(
    [
        msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18),
        data_row(3),
        data_row(70000),
        msg(b"S", b"TimeZone\x00UTC\x00"),
        messages.command_complete("SELECT 2"),
        messages.command_complete("SET"),
        msg(b"N", b"SNOTICE\x00Mhello\x00\x00"),
        messages.command_complete("DECLARE CURSOR"),
        messages.READY_IN_TRANSACTION,
        messages.error_response("ERROR", "22012", "division by zero"),
        messages.READY_FAILED,
        messages.command_complete("ROLLBACK"),
        messages.READY_IDLE,
    ]
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return [c for c in chunks if c]


def run_backend(chunks: list[bytes]) -> tuple[bytes, BackendScanner, list[tuple[int, int]]]:
    params: dict[str, str] = {}
    scanner = BackendScanner(params)
    out = bytearray()
    readies = []
    for chunk in chunks:
        out += scanner.feed(chunk)
        if scanner.ready_count:
            readies.append((scanner.ready_count, scanner.status))
    return bytes(out), scanner, readies


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(BACKEND_STREAM)), max_size=40))
def test_backend_scanner_any_chunking(cuts: list[int]) -> None:
    out, scanner, readies = run_backend(split(BACKEND_STREAM, cuts))
    assert out == BACKEND_STREAM
    assert sum(count for count, _ in readies) == 3
    assert scanner.status == codes.TX_IDLE
    assert scanner.parameters == {"TimeZone": "UTC"}
    assert scanner.error_count == 1
    assert scanner.cleanup_flags == CLEAN_SET | CLEAN_DECLARE
    assert not scanner.mid_message


@pytest.mark.parametrize(
    ("tag", "flags"),
    [
        ("SELECT 1", 0),
        ("SELECT", 0),  # the shortest tag recognised in place
        ("SELEC", 0),
        ("", 0),
        ("SET", CLEAN_SET),
        ("SELECT INTO", 0),  # still a SELECT tag: no cleanup, as before
        ("DECLARE CURSOR", CLEAN_DECLARE),
    ],
)
def test_backend_scanner_command_tags(tag: str, flags: int) -> None:
    scanner = BackendScanner({})
    stream = messages.command_complete(tag) + messages.READY_IDLE
    assert scanner.feed(stream) == stream
    assert scanner.cleanup_flags == flags
    assert scanner.ready_count == 1


def test_backend_scanner_streams_large_rows_without_holding_them() -> None:
    row = data_row(1_000_000)
    scanner = BackendScanner({})
    # A first chunk with the header and part of the body is passed through at once.
    assert scanner.feed(row[:1000]) == row[:1000]
    assert scanner.mid_message
    assert scanner.feed(row[1000:500_000]) == row[1000:500_000]
    assert scanner.feed(row[500_000:] + messages.READY_IDLE) == row[500_000:] + messages.READY_IDLE
    assert scanner.ready_count == 1
    assert not scanner.mid_message


def test_backend_scanner_holds_partial_decoded_message() -> None:
    scanner = BackendScanner({})
    z = messages.READY_IN_TRANSACTION
    assert scanner.feed(data_row(1) + z[:3]) == data_row(1)
    assert scanner.ready_count == 0
    assert scanner.feed(z[3:]) == z
    assert scanner.ready_count == 1
    assert scanner.status == codes.TX_IN_BLOCK


def test_backend_scanner_copy_states() -> None:
    scanner = BackendScanner({})
    scanner.feed(msg(b"G", b"\x00\x00\x00"))
    assert scanner.in_copy and scanner.copy_in_started == 1
    scanner.feed(messages.command_complete("COPY 3") + messages.READY_IDLE)
    assert not scanner.in_copy
    scanner.feed(msg(b"H", b"\x00\x00\x00") + msg(b"d", b"1\n"))
    assert scanner.in_copy
    scanner.feed(msg(b"c") + messages.command_complete("COPY 1"))
    assert not scanner.in_copy


@pytest.mark.parametrize("msg_type", [b"D", b"Z", b"C", b"E", b"S", b"G", b"H"])
@pytest.mark.parametrize("length", [0, 3, codes.MAX_MESSAGE_SIZE + 1])
def test_backend_scanner_rejects_bad_lengths(msg_type: bytes, length: int) -> None:
    # Every type, including those the scanner decodes (ReadyForQuery, CommandComplete,
    # ErrorResponse, ParameterStatus, COPY starts), whole in the chunk or not.
    scanner = BackendScanner({})
    with pytest.raises(ProtocolError):
        scanner.feed(msg_type + struct.pack("!I", length) + b"\x00" * 8)


@pytest.mark.parametrize("length", [0x8000_0000, 0xFFFF_FFFF])
def test_scanners_reject_lengths_with_the_high_bit_set(length: int) -> None:
    # The compiled build reads the length into a 64-bit machine integer: a header
    # with the top bit set is a huge length, not a negative one.
    header = struct.pack("!I", length)
    with pytest.raises(ProtocolError):
        BackendScanner({}).feed(b"D" + header + b"\x00" * 8)
    with pytest.raises(ProtocolError):
        FrontendScanner().feed(b"d" + header + b"\x00" * 8)


def test_scanners_pass_the_largest_message_through_in_pieces() -> None:
    # A message of the largest allowed size is forwarded as it comes, never held:
    # after its header the scanner counts the bytes still due.
    length = codes.MAX_MESSAGE_SIZE
    body = b"\x00" * 1000
    for scanner, msg_type in ((BackendScanner({}), b"D"), (FrontendScanner(), b"d")):
        first = msg_type + struct.pack("!I", length) + body
        assert scanner.feed(first) == first
        assert scanner.need == length - 4 - len(body)
        assert scanner.feed(body) == body
        assert scanner.need == length - 4 - 2 * len(body)
        assert scanner.mid_message


@pytest.mark.parametrize("length", [4, 6, 7])
def test_backend_scanner_rejects_ready_for_query_of_another_length(length: int) -> None:
    scanner = BackendScanner({})
    with pytest.raises(ProtocolError):
        scanner.feed(b"Z" + struct.pack("!I", length) + b"I" * (length - 4))
    assert scanner.ready_count == 0


def frontend_stream() -> bytes:
    return b"".join(
        [
            messages.query("select 1"),
            msg(b"P", b"stmt\x00select $1\x00\x00\x00"),
            msg(b"B", b"\x00stmt\x00" + b"\x00" * 6),
            msg(b"E", b"\x00\x00\x00\x00\x00"),
            messages.SYNC,
            msg(b"P", b"\x00select 2\x00\x00\x00"),
            msg(b"B", b"\x00\x00" + b"\x00" * 6),
            msg(b"E", b"\x00\x00\x00\x00\x00"),
            messages.FLUSH,
        ]
    )


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_frontend_scanner_any_chunking(cuts: list[int]) -> None:
    stream = frontend_stream()
    scanner = FrontendScanner()
    out = bytearray()
    for chunk in split(stream, cuts):
        out += scanner.feed(chunk)
    assert bytes(out) == stream
    assert scanner.pending_ready == 2
    assert scanner.batch_open  # the last batch has no Sync yet
    assert scanner.named_parse_seen
    assert scanner.flush_seen
    assert not scanner.mid_message


def test_frontend_scanner_stops_at_terminate() -> None:
    scanner = FrontendScanner()
    data = messages.query("select 1") + messages.TERMINATE + messages.query("select 2")
    assert scanner.feed(data) == messages.query("select 1")
    assert scanner.terminated


def test_frontend_scanner_rejects_server_message_types() -> None:
    scanner = FrontendScanner()
    with pytest.raises(ProtocolError):
        scanner.feed(messages.READY_IDLE)


def test_a_refused_frontend_message_lets_the_whole_messages_before_it_through() -> None:
    # PostgreSQL runs what came before a bad message: the client forwards it.
    scanner = FrontendScanner()
    before = messages.query("select 1") + msg(b"P", b"\x00select 2\x00\x00\x00") + messages.SYNC
    for bad in (b"e\x00\x00\x00\x04", b"S\x00\x00\x4e\x20", b"e"):
        scanner = FrontendScanner()
        with pytest.raises(RefusedMessage) as refused:
            scanner.feed(before + bad)
        assert refused.value.forward == before
        assert scanner.pending_ready == 2 and scanner.terminated
        # It keeps the refused bytes: nothing counts the client between requests.
        assert scanner.mid_message and scanner.need == 0


def test_frontend_scanner_syncs_ignored_during_copy_in() -> None:
    scanner = FrontendScanner()
    # Extended-protocol COPY as libpq sends it: Sync right after Execute.
    scanner.feed(msg(b"P", b"\x00copy t from stdin\x00\x00\x00") + msg(b"B", b"\x00" * 8))
    scanner.feed(msg(b"E", b"\x00\x00\x00\x00\x00") + messages.SYNC)
    assert scanner.pending_ready == 1
    scanner.on_copy_in_started()  # the backend ignored that Sync
    assert scanner.pending_ready == 0
    scanner.feed(msg(b"d", b"1\n") + messages.SYNC)  # also ignored while copying
    assert scanner.pending_ready == 0 and not scanner.batch_open
    scanner.feed(msg(b"c") + messages.SYNC)
    assert scanner.pending_ready == 1
    assert not scanner.batch_open and not scanner.copy_in


def test_frontend_scanner_simple_copy_keeps_batch_closed() -> None:
    scanner = FrontendScanner()
    scanner.feed(messages.query("copy t from stdin"))
    scanner.on_copy_in_started()
    assert scanner.pending_ready == 1
    scanner.feed(msg(b"d", b"1\n") + msg(b"c"))
    assert not scanner.batch_open and not scanner.copy_in
    assert scanner.pending_ready == 1


def test_frontend_scanner_large_parse_is_held_until_complete() -> None:
    scanner = FrontendScanner()
    big = msg(b"P", b"s\x00" + b"x" * 100_000 + b"\x00\x00\x00")
    assert scanner.feed(big[:10]) == b""
    assert len(scanner.held) == 10
    assert scanner.feed(big[10:50_000]) == b""
    assert scanner.feed(big[50_000:]) == big
    assert len(scanner.held) == 0
    assert scanner.named_parse_seen


def test_message_buffer_yields_messages() -> None:
    buf = MessageBuffer()
    stream = messages.AUTH_OK + messages.parameter_status("a", "b") + messages.READY_IDLE
    for byte in stream:
        buf.feed(bytes([byte]))
    got = []
    while (m := buf.next_message()) is not None:
        got.append(m)
    assert [t for t, _ in got] == [
        codes.AUTHENTICATION,
        codes.PARAMETER_STATUS,
        codes.READY_FOR_QUERY,
    ]
    assert got[1][1] == b"a\x00b\x00"


@given(st.lists(st.one_of(st.just(b""), st.binary(max_size=1500)), max_size=10))
def test_joined_is_join(parts: list[bytes]) -> None:
    assert joined(list(parts)) == b"".join(parts)
    assert type(joined(list(parts))) is bytes


@given(
    st.lists(st.one_of(st.just(b""), st.binary(max_size=1500)), min_size=1, max_size=6),
    st.binary(max_size=3000),
    st.integers(min_value=0, max_value=3000),
    st.integers(min_value=0, max_value=3000),
)
def test_joined_with_rest_is_join(parts: list[bytes], data: bytes, start: int, upto: int) -> None:
    start, upto = sorted((min(start, len(data)), min(upto, len(data))))
    out = joined_with_rest(list(parts), data, start, upto)
    assert out == b"".join([*parts, data[start:upto]])
    assert type(out) is bytes


def test_message_buffer_whole_chunks_and_length_limits() -> None:
    buf = MessageBuffer()
    buf.feed(messages.SYNC)  # length 4: an empty body
    assert buf.next_message() == (codes.SYNC, b"")
    assert len(buf) == 0 and buf.next_message() is None
    buf.feed(messages.READY_IDLE + messages.SYNC[:3])
    assert buf.next_message() == (codes.READY_FOR_QUERY, b"I")
    assert buf.next_message() is None  # three bytes of the next one wait for the rest
    buf.feed(messages.SYNC[3:])
    assert buf.next_message() == (codes.SYNC, b"")
    for header in (b"S\x00\x00\x00\x03", b"Q" + (codes.MAX_MESSAGE_SIZE + 1).to_bytes(4, "big")):
        bad = MessageBuffer()
        bad.feed(header)
        with pytest.raises(ProtocolError):
            bad.next_message()


def test_message_buffer_rejects_negative_length() -> None:
    buf = MessageBuffer()
    buf.feed(b"Q\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        buf.next_message()


@pytest.mark.parametrize(
    ("tag", "before", "after"),
    [
        (b"SET", 0, CLEAN_SET),
        # RESET x looks like RESET ALL: other SETs may remain. It is noted, as it may
        # have undone the settings the pooler applied for the client.
        (b"RESET", CLEAN_SET | CLEAN_DECLARE, CLEAN_SET | CLEAN_DECLARE | CLEAN_RESET),
        (b"RESET", 0, CLEAN_RESET),
        (b"DISCARD ALL", CLEAN_RESET | CLEAN_SET, 0),
        (b"DECLARE CURSOR", 0, CLEAN_DECLARE),
        (b"CLOSE CURSOR ALL", CLEAN_DECLARE, 0),
        (b"PREPARE", 0, CLEAN_PREPARE),
        (b"DEALLOCATE ALL", CLEAN_PREPARE | CLEAN_SET, CLEAN_SET),
        (b"DISCARD ALL", CLEAN_SET | CLEAN_PREPARE | CLEAN_DECLARE | CLEAN_LISTEN, 0),
        (b"LISTEN", 0, CLEAN_LISTEN),
        # A DO block's SETs are tagged DO.
        (b"DO", 0, CLEAN_SET),
        (b"DO", CLEAN_TEMP, CLEAN_TEMP | CLEAN_SET),
        (b"DROP TABLE", 0, 0),
        (b"DELETE 1", 0, 0),
        # Any of these may have created a temporary object.
        (b"CREATE TABLE", 0, CLEAN_TEMP),
        (b"CREATE VIEW", CLEAN_SET, CLEAN_SET | CLEAN_TEMP),
        (b"CREATE SEQUENCE", 0, CLEAN_TEMP),
        (b"CREATE INDEX", 0, 0),
        (b"DISCARD TEMP", CLEAN_TEMP | CLEAN_LISTEN, CLEAN_LISTEN),
        (b"DISCARD ALL", CLEAN_TEMP, 0),
        # It releases the advisory locks; calls sent with it may still come after it.
        (b"DISCARD ALL", CLEAN_ADVISORY | CALLS_LOCK | CALLS_UNLOCK, CALLS_LOCK | CALLS_UNLOCK),
        (b"SELECT 1", CLEAN_SET, CLEAN_SET),
        (b"INSERT 0 1", 0, 0),
    ],
)
def test_tag_cleanup_effect(tag: bytes, before: int, after: int) -> None:
    assert tag_cleanup_effect(tag, before) == after


def test_cleanup_queries_order() -> None:
    flags = CLEAN_SET | CLEAN_PREPARE | CLEAN_DECLARE | CLEAN_LISTEN | CLEAN_TEMP
    assert cleanup_queries(flags | CLEAN_ADVISORY) == [
        "RESET SESSION AUTHORIZATION",
        "RESET ROLE",
        "RESET ALL",
        "DEALLOCATE ALL",
        "CLOSE ALL",  # before the temporary tables its cursors may read
        "UNLISTEN *",
        "DISCARD TEMP",
        "SELECT pg_catalog.pg_advisory_unlock_all()",
    ]
    assert cleanup_queries(0) == []
    # A lock function called in a transaction that never ended (its client left).
    assert cleanup_queries(CALLS_LOCK) == ["SELECT pg_catalog.pg_advisory_unlock_all()"]
    assert cleanup_queries(CALLS_UNLOCK) == []


def test_the_literal_copies_of_protocol_constants_agree() -> None:
    """The hot-path modules spell some constants of codes as literals, which mypyc
    inlines (a copy made as `codes.X` is a module global read at each use)."""
    from pg_doorman.net import client, server
    from pg_doorman.protocol import framing

    copies = {
        "_MAX": codes.MAX_MESSAGE_SIZE,
        "_SMALL_MAX": codes.SMALL_MESSAGE_MAX,
        "_DEALLOCATE_MAX": codes.DEALLOCATE_MAX,
        "_Z": codes.READY_FOR_QUERY,
        "_E": codes.ERROR_RESPONSE,
        "_C": codes.COMMAND_COMPLETE,
        "_S": codes.PARAMETER_STATUS,
        "_G": codes.COPY_IN_RESPONSE,
        "_H": codes.COPY_OUT_RESPONSE,
        "_W": codes.COPY_BOTH_RESPONSE,
        "_QUERY": codes.QUERY,
        "_SYNC": codes.SYNC,
        "_FUNCTION_CALL": codes.FUNCTION_CALL,
        "_EXECUTE": codes.EXECUTE,
        "_TERMINATE": codes.TERMINATE,
        "_PARSE": codes.PARSE,
        "_COPY_DONE": codes.COPY_DONE,
        "_COPY_FAIL": codes.COPY_FAIL,
        "_FLUSH": codes.FLUSH,
        "_COPY_DATA": codes.COPY_DATA,
    }
    assert {name: getattr(framing, name) for name in copies} == copies
    assert client._DEALLOCATE_MAX == codes.DEALLOCATE_MAX
    assert server._READY_I == codes.TX_IDLE


def notification_from(pid: int, payload: bytes = b"hello") -> bytes:
    return msg(b"A", struct.pack("!i", pid) + b"chan\x00" + payload + b"\x00")


def test_a_notification_of_the_server_s_own_session_names_its_client() -> None:
    """The sender pid of a NotificationResponse its own backend sent becomes the pid the
    client was given, wherever the reads cut the stream; others' pass untouched, and
    nothing changes while no client is served (notify_as 0)."""

    def notifications(own: int) -> bytes:
        """Two notifications of the session `own` around one of another's."""
        return b"".join(
            [
                notification_from(own),
                data_row(20),
                notification_from(777, b"x" * 300),
                notification_from(own, b"y" * 300),
                messages.READY_IDLE,
            ]
        )

    stream, expected = notifications(4242), notifications(9001)
    for cut in range(1, len(stream)):
        for second in (cut + 1, cut + 7, len(stream)):
            scanner = BackendScanner({})
            scanner.notify_from = 4242
            scanner.notify_as = 9001
            out = b"".join(scanner.feed(part) for part in split(stream, [cut, second]))
            assert out == expected, (cut, second)
            assert scanner.need == 0 and scanner.status == codes.TX_IDLE
    idle = BackendScanner({})
    idle.notify_from = 4242
    assert idle.feed(stream) == stream
