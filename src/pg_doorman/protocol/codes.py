"""Message type bytes and protocol numbers, as plain ints for cheap comparisons."""

from collections.abc import Iterable
from typing import Final

# Frontend and backend message type bytes (ord values).
AUTHENTICATION: Final = 0x52  # R
BACKEND_KEY_DATA: Final = 0x4B  # K
BIND: Final = 0x42  # B
BIND_COMPLETE: Final = 0x32  # 2
CLOSE: Final = 0x43  # C (frontend)
CLOSE_COMPLETE: Final = 0x33  # 3
COMMAND_COMPLETE: Final = 0x43  # C (backend)
COPY_BOTH_RESPONSE: Final = 0x57  # W
COPY_DATA: Final = 0x64  # d
COPY_DONE: Final = 0x63  # c
COPY_FAIL: Final = 0x66  # f
COPY_IN_RESPONSE: Final = 0x47  # G
COPY_OUT_RESPONSE: Final = 0x48  # H (backend)
DATA_ROW: Final = 0x44  # D (backend)
DESCRIBE: Final = 0x44  # D (frontend)
EMPTY_QUERY_RESPONSE: Final = 0x49  # I
ERROR_RESPONSE: Final = 0x45  # E (backend)
EXECUTE: Final = 0x45  # E (frontend)
FLUSH: Final = 0x48  # H (frontend)
FUNCTION_CALL: Final = 0x46  # F
FUNCTION_CALL_RESPONSE: Final = 0x56  # V
NEGOTIATE_PROTOCOL_VERSION: Final = 0x76  # v
NO_DATA: Final = 0x6E  # n
NOTICE_RESPONSE: Final = 0x4E  # N
NOTIFICATION_RESPONSE: Final = 0x41  # A
PARAMETER_DESCRIPTION: Final = 0x74  # t
PARAMETER_STATUS: Final = 0x53  # S (backend)
PARSE: Final = 0x50  # P
PARSE_COMPLETE: Final = 0x31  # 1
PASSWORD_MESSAGE: Final = 0x70  # p (also SASL responses)
PORTAL_SUSPENDED: Final = 0x73  # s
QUERY: Final = 0x51  # Q
READY_FOR_QUERY: Final = 0x5A  # Z
ROW_DESCRIPTION: Final = 0x54  # T
SYNC: Final = 0x53  # S (frontend)
TERMINATE: Final = 0x58  # X

# Transaction status bytes carried by ReadyForQuery.
TX_IDLE: Final = 0x49  # I
TX_IN_BLOCK: Final = 0x54  # T
TX_FAILED: Final = 0x45  # E

# Startup packet codes.
PROTOCOL_3_0: Final = 196608
PROTOCOL_3_2: Final = 196610
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# Authentication request subtypes.
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# Largest message either side may send; beyond this the peer is broken or hostile.
MAX_MESSAGE_SIZE: Final = 256 * 1024 * 1024
# PostgreSQL itself caps startup packets at 10000 bytes.
MAX_STARTUP_PACKET: Final = 10000
# PostgreSQL refuses a longer length word at once for the frontend messages in
# SMALL_FRONTEND_TYPES (its PQ_SMALL_MESSAGE_LIMIT), before reading their bodies.
SMALL_MESSAGE_MAX: Final = 10000


def type_table(types: Iterable[int]) -> bytes:
    """A 256-byte membership table: `table[msg_type]` is 1 for the given types.

    Indexing bytes is a native operation in the compiled build, where a frozenset
    lookup boxes and hashes the type byte; interpreted, the two cost about the same.
    """
    table = bytearray(256)
    for code in types:
        table[code] = 1
    return bytes(table)


# Close, Describe, Execute, Flush, Sync, Terminate, CopyDone and CopyFail: messages of
# a few bytes, whose length word may not exceed SMALL_MESSAGE_MAX. One that does is
# garbage read as a length: waiting for that many bytes would hold the server for good.
SMALL_FRONTEND_TYPES: Final = type_table(b"CDEHSXcf")

# First bytes of a Query text that could be a DEALLOCATE, which the pooler may answer
# itself (checked before the text is parsed).
MAY_START_DEALLOCATE: Final = type_table(b"dD \t\n\r")
# Longest Query body the pooler reads as a DEALLOCATE (prepared/deallocate.py).
DEALLOCATE_MAX: Final = 201
