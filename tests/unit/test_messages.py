"""Message builders and parsers, and the startup packet."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_doorman.protocol import codes, messages, sqlstate
from pg_doorman.protocol.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupError,
    StartupMessage,
    parse_startup_packet,
    startup_packet_length,
)


def test_error_response_fields_round_trip() -> None:
    raw = messages.error_response("FATAL", "28P01", "bad password", detail="d", hint="h")
    assert raw[:1] == b"E"
    (length,) = struct.unpack("!I", raw[1:5])
    assert length == len(raw) - 1
    fields = messages.parse_error_fields(raw[5:])
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": "bad password",
        "D": "d",
        "H": "h",
    }


@pytest.mark.parametrize("hint", [None, "use a session pool"])
def test_notice_response_fields_round_trip(hint: str | None) -> None:
    raw = messages.notice_response(sqlstate.WARNING, "careful", "WARNING", hint=hint)
    assert raw[:1] == b"N"
    (length,) = struct.unpack("!I", raw[1:5])
    assert length == len(raw) - 1
    expected = {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"}
    if hint is not None:
        expected["H"] = hint
    assert messages.parse_error_fields(raw[5:]) == expected


def test_fixed_messages() -> None:
    assert messages.ready_for_query(codes.TX_IDLE) == messages.READY_IDLE
    assert messages.build(b"S") == messages.SYNC
    assert messages.auth_request(codes.AUTH_OK) == messages.AUTH_OK
    assert messages.command_complete("SELECT 1") == b"C\x00\x00\x00\x0dSELECT 1\x00"


def test_backend_key_data_round_trip() -> None:
    raw = messages.backend_key_data(42, -7)
    assert messages.parse_backend_key_data(raw[5:]) == (42, -7)


def test_parameter_status_round_trip() -> None:
    raw = messages.parameter_status("TimeZone", "Europe/Berlin")
    assert messages.parse_parameter_status(raw[5:]) == ("TimeZone", "Europe/Berlin")


def test_parameter_status_is_the_same_when_encoded_again_or_not_remembered() -> None:
    """Short pairs come from a bounded memo, long values are encoded each time; both
    give the same bytes, and many distinct values don't grow the memo without end."""
    first = messages.parameter_status("application_name", "app")
    assert messages.parameter_status("application_name", "app") == first
    assert messages.parse_parameter_status(first[5:]) == ("application_name", "app")
    long_value = "x" * 5000
    raw = messages.parameter_status("application_name", long_value)
    assert messages.parse_parameter_status(raw[5:]) == ("application_name", long_value)
    for i in range(3000):
        raw = messages.parameter_status("application_name", f"app-{i}")
        assert messages.parse_parameter_status(raw[5:]) == ("application_name", f"app-{i}")
    assert len(messages._PARAMETER_STATUS) <= messages._PARAMETER_STATUS_MAX
    assert ("application_name", long_value) not in messages._PARAMETER_STATUS


def test_parameter_statuses_are_the_pairs_in_order_and_bounded() -> None:
    """A greeting's run of ParameterStatus messages is each pair's message in the dict's
    order, whether built or remembered; distinct runs don't grow the memo without end,
    and long runs are not kept."""
    params = {"server_version": "18.1", "client_encoding": "UTF8", "application_name": "a"}
    expected = b"".join(messages.parameter_status(k, v) for k, v in params.items())
    assert messages.parameter_statuses(params) == expected
    assert messages.parameter_statuses(dict(params)) == expected
    reordered = dict(reversed(params.items()))
    assert messages.parameter_statuses(reordered) == b"".join(
        messages.parameter_status(k, v) for k, v in reordered.items()
    )
    assert messages.parameter_statuses({}) == b""
    for i in range(600):
        changed = {**params, "application_name": f"app-{i}"}
        run = messages.parameter_statuses(changed)
        assert run == b"".join(messages.parameter_status(k, v) for k, v in changed.items())
    assert len(messages._PARAMETER_STATUSES) <= messages._PARAMETER_STATUSES_MAX
    long_run = {"search_path": "s" * 5000}
    assert messages.parameter_statuses(long_run) == messages.parameter_status(
        "search_path", "s" * 5000
    )
    assert ((("search_path",), ("s" * 5000,))) not in messages._PARAMETER_STATUSES


def test_sasl_initial_response_round_trip() -> None:
    raw = messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert messages.parse_sasl_initial_response(raw[5:]) == ("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_sasl_initial_response_length_mismatch() -> None:
    body = messages.cstring("SCRAM-SHA-256") + struct.pack("!i", 99) + b"short"
    with pytest.raises(messages.ProtocolError):
        messages.parse_sasl_initial_response(body)


def test_negotiate_protocol_version() -> None:
    raw = messages.negotiate_protocol_version(0, ["_pq_.foo"])
    assert raw[:1] == b"v"
    assert raw[5:] == struct.pack("!ii", 0, 1) + b"_pq_.foo\x00"


def test_row_description_and_data_row() -> None:
    desc = messages.row_description([("a", 25), ("b", 23)])
    assert struct.unpack("!h", desc[5:7]) == (2,)
    row = messages.data_row(["x", None])
    assert row[5:] == struct.pack("!h", 2) + struct.pack("!i", 1) + b"x" + struct.pack("!i", -1)


@given(st.lists(st.one_of(st.none(), st.text()), max_size=8))
def test_data_row_round_trip(values: list[str | None]) -> None:
    raw = messages.data_row(values)
    assert messages.parse_data_row(raw[5:]) == values


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"\x00\x01",  # one value announced, none there
        b"\x00\x01\x00\x00\x00\x05abc",  # a value longer than what follows
        b"\x00\x02\x00\x00\x00\x01a\x00\x00",  # the second length cut short
    ],
)
def test_data_row_that_overruns_its_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(messages.ProtocolError):
        messages.parse_data_row(body)


def test_message_types() -> None:
    data = messages.EMPTY_QUERY + messages.READY_IDLE
    assert messages.message_types(data) == [codes.EMPTY_QUERY_RESPONSE, codes.READY_FOR_QUERY]


# ---- startup packets -------------------------------------------------------


def test_startup_message() -> None:
    raw = messages.startup_message({"user": "u", "database": "d"})
    assert startup_packet_length(raw[:4]) == len(raw)
    # The client's buffer as it is: the first four bytes of a bytearray holding more.
    assert startup_packet_length(bytearray(raw + messages.SSL_REFUSED)) == len(raw)
    request = parse_startup_packet(raw)
    assert request == StartupMessage(0, {"user": "u", "database": "d"}, [])
    assert not request.needs_negotiation


def test_startup_protocol_3_2_negotiates() -> None:
    raw = messages.startup_message({"user": "u", "_pq_.x": "1"}, version=codes.PROTOCOL_3_2)
    request = parse_startup_packet(raw)
    assert isinstance(request, StartupMessage)
    assert request.minor_version == 2
    assert request.protocol_options == ["_pq_.x"]
    assert request.needs_negotiation
    assert request.parameters == {"user": "u"}


def test_special_requests() -> None:
    ssl = struct.pack("!ii", 8, codes.SSL_REQUEST_CODE)
    gss = struct.pack("!ii", 8, codes.GSSENC_REQUEST_CODE)
    assert isinstance(parse_startup_packet(ssl), SSLRequest)
    assert isinstance(parse_startup_packet(gss), GSSEncRequest)
    assert parse_startup_packet(messages.cancel_request(5, -9)) == CancelRequest(5, -9)


@pytest.mark.parametrize("length", [0, 7, 10001, -1])
def test_bad_startup_lengths(length: int) -> None:
    with pytest.raises(StartupError) as info:
        startup_packet_length(struct.pack("!i", length))
    assert info.value.code == sqlstate.PROTOCOL_VIOLATION


def test_protocol_2_refused() -> None:
    raw = struct.pack("!ii", 9, 2 << 16) + b"\x00"
    with pytest.raises(StartupError) as info:
        parse_startup_packet(raw)
    assert info.value.code == sqlstate.FEATURE_NOT_SUPPORTED


def test_odd_parameter_list_refused() -> None:
    body = struct.pack("!i", codes.PROTOCOL_3_0) + b"user\x00"
    raw = struct.pack("!i", len(body) + 4) + body
    with pytest.raises(StartupError):
        parse_startup_packet(raw)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (b"user\x00", "invalid startup packet layout"),  # a name without its value
        (b"user\x00u", "invalid startup packet layout"),  # a value without its NUL
        (b"user\x00u\x00", "invalid startup packet layout"),  # no terminator
        (
            b"user\x00u\x00\x00database\x00d\x00\x00",
            "invalid startup packet layout: expected terminator as last byte",
        ),
        (b"user\x00u\x00\x00x", "invalid startup packet layout: expected terminator as last byte"),
        (b"user\x00\xff\x00\x00", "invalid UTF-8 in startup packet"),
        (b"\xc3\x00u\x00\x00", "invalid UTF-8 in startup packet"),
    ],
)
def test_malformed_parameter_lists_are_refused(pairs: bytes, message: str) -> None:
    body = struct.pack("!i", codes.PROTOCOL_3_0) + pairs
    with pytest.raises(StartupError) as info:
        parse_startup_packet(struct.pack("!i", len(body) + 4) + body)
    assert info.value.code == sqlstate.PROTOCOL_VIOLATION
    assert info.value.message == message


def test_empty_values_and_utf8_in_parameters() -> None:
    body = struct.pack("!i", codes.PROTOCOL_3_0) + (
        b"user\x00u\x00application_name\x00\x00_pq_.opt\x00v\x00options\x00-c x=\xc3\xa9\x00\x00"
    )
    request = parse_startup_packet(struct.pack("!i", len(body) + 4) + body)
    assert request == StartupMessage(
        0, {"user": "u", "application_name": "", "options": "-c x=\u00e9"}, ["_pq_.opt"]
    )


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda s: "\x00" not in s and not s.startswith("_pq_.")),
        st.text().filter(lambda s: "\x00" not in s),
        max_size=8,
    )
)
def test_startup_parameters_round_trip(params: dict[str, str]) -> None:
    raw = messages.startup_message(params)
    request = parse_startup_packet(raw)
    assert isinstance(request, StartupMessage)
    assert request.parameters == params
