"""A read refused after part of a message went out: the backend scanner stays inside
that message, the frontend scanner passes its end on before the refused one."""

from __future__ import annotations

import struct

import pytest

from pg_doorman.protocol import messages
from pg_doorman.protocol.framing import BackendScanner, FrontendScanner, RefusedMessage
from pg_doorman.protocol.messages import ProtocolError

# A header no peer may send: a negative length.
BROKEN_HEADER = b"D\xff\xff\xff\xf0"


def test_the_backend_scanner_stays_inside_a_row_whose_end_came_with_a_broken_header() -> None:
    row = messages.build(b"D", struct.pack("!hi", 1, 1000) + b"x" * 1000)
    scanner = BackendScanner({})
    assert scanner.feed(row[:-10]) == row[:-10]
    with pytest.raises(ProtocolError):
        scanner.feed(row[-10:] + BROKEN_HEADER)
    # Its last ten bytes never went to the client: it is still inside the row.
    assert scanner.need == 10 and scanner.mid_message


def test_the_frontend_scanner_passes_on_the_end_of_copy_data_before_a_broken_header() -> None:
    # PostgreSQL reads the CopyData whole before it meets the bad header: its end
    # goes on with what else came before (RefusedMessage.forward), and the scanner
    # is past it, at the refused message, where the stream ends.
    copy_data = messages.build(b"d", b"1\n" * 500)
    scanner = FrontendScanner()
    assert scanner.feed(copy_data[:9]) == copy_data[:9]
    with pytest.raises(RefusedMessage) as refused:
        scanner.feed(copy_data[9:] + messages.SYNC + b"\x00" * 5)
    assert refused.value.forward == copy_data[9:] + messages.SYNC
    assert scanner.need == 0 and scanner.terminated
