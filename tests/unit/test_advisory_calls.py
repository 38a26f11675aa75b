"""Reading statement texts for session-level advisory lock calls (protocol.advisory),
and the client scanner that does it for each Query, in whatever pieces it arrives."""

from __future__ import annotations

import pytest

from helpers import pgwire as w
from pg_doorman import implementation
from pg_doorman.prepared.registry import PoolStatements
from pg_doorman.protocol.advisory import (
    CALLS_LOCK,
    CALLS_UNLOCK,
    advisory_calls,
    mentions_with_find,
)
from pg_doorman.protocol.framing import FrontendScanner

LOCK = CALLS_LOCK
UNLOCK = CALLS_UNLOCK


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("select pg_advisory_lock(1)", LOCK),
        ("select pg_advisory_lock_shared(1, 2)", LOCK),
        ("select pg_try_advisory_lock($1)", LOCK),
        ("select pg_try_advisory_lock_shared($1)", LOCK),
        ("select pg_advisory_unlock(1)", UNLOCK),
        ("select pg_advisory_unlock_shared(1)", UNLOCK),
        ("select pg_advisory_unlock_all()", UNLOCK),
        ("select pg_advisory_lock(1), pg_advisory_unlock(2)", LOCK | UNLOCK),
        # Spelt as PostgreSQL takes them.
        ("SELECT PG_ADVISORY_LOCK(1)", LOCK),
        ("SELECT PG_TRY_ADVISORY_LOCK(1)", LOCK),
        ("select pg_catalog.pg_advisory_lock(1)", LOCK),
        ('select "pg_advisory_lock"(1)', LOCK),
        ("select pg_advisory_lock (1)", LOCK),
        ("select pg_advisory_lock\n(1)", LOCK),
        ("select pg_advisory_lock/* the key */(1)", LOCK),
        ("pg_advisory_lock", LOCK),  # the whole text (a Parse's may end there)
        ("select 1 where pg_try_advisory_lock(7)", LOCK),
        # Inside another call: found the same.
        ("select coalesce(pg_advisory_unlock(1), false)", UNLOCK),
        # Transaction-level locks end with the transaction: not reported.
        ("select pg_advisory_xact_lock(1)", 0),
        ("select pg_try_advisory_xact_lock_shared(1)", 0),
        ("SELECT PG_ADVISORY_XACT_LOCK(1)", 0),
        # Other names that contain the words.
        ("select my_pg_advisory_lock(1)", 0),
        ("select pg_advisory_locks from t", 0),
        ("select pg_advisory_lockx(1)", 0),
        ("select pg_advisory_unlock_everything(1)", 0),
        ("select pg_try_advisory_unlock(1)", 0),
        ("select advisory_lock(1)", 0),
        ("select 1", 0),
        ("", 0),
        ("select Pg_Advisory_Lock(1)", LOCK),
        ("select pg_ADVISORY_unlock_ALL()", UNLOCK),
        # In a text where an upper-case spelling comes first, a later one is found too.
        ("select pg_advisory_xact_lock(1), PG_ADVISORY_LOCK(2)", LOCK),
        ("select PG_ADVISORY_XACT_LOCK(1), pg_advisory_unlock(2)", UNLOCK),
    ],
)
def test_advisory_calls(text: str, found: int) -> None:
    data = text.encode()
    assert advisory_calls(data, 0, len(data)) == found
    # Read within a larger buffer, as the scanner reads a message's text.
    framed = b"Q\x00\x00\x00\x00" + data + b"\x00pg_advisory_lock(1)"
    assert advisory_calls(framed, 5, 5 + len(data)) == found


def feed_in_pieces(stream: bytes, cuts: list[int]) -> int:
    scanner = FrontendScanner()
    scanner.watch_advisory = True
    out = b""
    start = 0
    for cut in [*cuts, len(stream)]:
        out += scanner.feed(stream[start:cut])
        start = cut
    assert out == stream  # forwarded unchanged
    return scanner.advisory_seen


def test_the_scanner_reads_a_query_split_anywhere() -> None:
    padding = "x" * 70_000
    text = f"select '{padding}', pg_advisory_lock(1)"
    stream = w.query(text) + w.query("select 1")
    at = stream.index(b"pg_advisory_lock")
    assert feed_in_pieces(stream, []) == LOCK
    # Cut in every place in and around the name, and in many pieces.
    for cut in range(at - 10, at + 25):
        assert feed_in_pieces(stream, [cut]) == LOCK, cut
        assert feed_in_pieces(stream, [100, 40_000, cut]) == LOCK, cut
    assert feed_in_pieces(stream, list(range(1, len(stream), 7))) == LOCK
    # What follows the Query is not read as its rest (a Bind's parameters never are).
    other = w.query(f"select '{padding}'") + w.bind("", "s", ["pg_advisory_lock(1)"])
    assert feed_in_pieces(other, [3, 50_000]) == 0
    assert feed_in_pieces(other, [len(other) - 30]) == 0


def test_the_scanner_reads_only_when_watching() -> None:
    scanner = FrontendScanner()
    scanner.feed(w.query("select pg_advisory_lock(1)"))
    assert scanner.advisory_seen == 0
    scanner.watch_advisory = True
    scanner.feed(w.query("select pg_advisory_unlock(1)"))
    assert scanner.advisory_seen == UNLOCK


def test_without_a_rewriter_parse_texts_are_read() -> None:
    scanner = FrontendScanner()
    scanner.watch_advisory = True
    batch = (
        w.parse("", "select pg_try_advisory_lock($1)")
        + w.bind("", "", [b"1"])
        + w.execute()
        + w.sync()
    )
    scanner.feed(batch)
    assert scanner.advisory_seen == LOCK


def test_a_prepared_statement_carries_its_calls() -> None:
    registry = PoolStatements(100)
    body = b"s1\x00select pg_advisory_unlock($1)\x00\x00\x00"
    entry = registry.lookup(body, 3, b"")
    assert entry.advisory_calls == UNLOCK
    plain = registry.lookup(b"\x00select 1\x00\x00\x00", 1, b"")
    assert plain.advisory_calls == 0


@pytest.mark.skipif(implementation.ACTIVE != "compiled", reason="the C helper is built with it")
def test_the_c_helper_agrees_with_find() -> None:
    from pg_doorman.protocol import _advisory

    texts = [b"", b"advisory", b"advisory_", b"xADVISORY_x", b"AdVisory_", b"pg_advisory_lock(1)"]
    texts += [b"_advisory_", b"advisory__", b"advisor_y_", b"adv@sory_", b"\xc1DVISORY_"]
    texts.append(b"x" * 100 + b"advisory_" + b"y" * 100)
    # Every byte in every place of the word: only the letters' other case matches.
    word = b"advisory_"
    for i in range(len(word)):
        for byte in range(256):
            texts.append(b"q" + word[:i] + bytes([byte]) + word[i + 1 :] + b"q")
    for text in texts:
        for start in range(len(text) + 2):
            for end in (*range(start, min(len(text) + 3, start + 12)), len(text), len(text) + 5):
                assert _advisory.mentions(text, start, end) == mentions_with_find(
                    text, start, end
                ), (text, start, end)
    with pytest.raises(TypeError):
        _advisory.mentions(bytearray(b"advisory_"), 0, 9)  # type: ignore[arg-type]
