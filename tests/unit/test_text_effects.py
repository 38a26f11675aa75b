"""Reading statement texts for what they may leave on the session unseen by the tags
(protocol.text_effects: advisory lock calls, temporary tables, set_config), and the
client scanner that does it for each Query, in whatever pieces it arrives."""

from __future__ import annotations

import pytest

from helpers import pgwire as w
from pg_doorman import implementation
from pg_doorman.prepared.registry import PoolStatements
from pg_doorman.protocol import framing
from pg_doorman.protocol.framing import FrontendScanner
from pg_doorman.protocol.text_effects import (
    CALLS_LOCK,
    CALLS_UNLOCK,
    MAY_CREATE_TEMP,
    SETS_PARAMETERS,
    candidates_with_find,
    text_effects,
)

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
    assert_effects(text, found)


def assert_effects(text: str, found: int) -> None:
    data = text.encode()
    assert text_effects(data, 0, len(data)) == found
    # Read within a larger buffer, as the scanner reads a message's text.
    framed = b"Q\x00\x00\x00\x00" + data + b"\x00pg_advisory_lock(1) temp set_config(1,2,3)"
    assert text_effects(framed, 5, 5 + len(data)) == found


def feed_in_pieces(stream: bytes, cuts: list[int]) -> int:
    scanner = FrontendScanner()
    scanner.watch_texts = True
    out = b""
    start = 0
    for cut in [*cuts, len(stream)]:
        out += scanner.feed(stream[start:cut])
        start = cut
    assert out == stream  # forwarded unchanged
    return scanner.effects_seen


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
    assert scanner.effects_seen == 0
    scanner.watch_texts = True
    scanner.feed(w.query("select pg_advisory_unlock(1)"))
    assert scanner.effects_seen == UNLOCK


def test_without_a_rewriter_parse_texts_are_read() -> None:
    scanner = FrontendScanner()
    scanner.watch_texts = True
    batch = (
        w.parse("", "select pg_try_advisory_lock($1)")
        + w.bind("", "", [b"1"])
        + w.execute()
        + w.sync()
    )
    scanner.feed(batch)
    assert scanner.effects_seen == LOCK


def test_a_prepared_statement_carries_its_calls() -> None:
    registry = PoolStatements(100)
    body = b"s1\x00select pg_advisory_unlock($1)\x00\x00\x00"
    entry = registry.lookup(body, 3, b"")
    assert entry.text_effects == UNLOCK
    plain = registry.lookup(b"\x00select 1\x00\x00\x00", 1, b"")
    assert plain.text_effects == 0


TEMP = MAY_CREATE_TEMP
SESSION_SET = SETS_PARAMETERS


def test_the_bits_are_the_cleanup_flags() -> None:
    assert SETS_PARAMETERS == framing.CLEAN_SET
    assert MAY_CREATE_TEMP == framing.CLEAN_TEMP
    assert not (CALLS_LOCK | CALLS_UNLOCK) & (
        framing.CLEAN_SET
        | framing.CLEAN_PREPARE
        | framing.CLEAN_DECLARE
        | framing.CLEAN_LISTEN
        | framing.CLEAN_TEMP
        | framing.CLEAN_ADVISORY
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        # Temporary tables whose tag is SELECT n, or made out of sight of the tags.
        ("create temp table t as select 1", TEMP),
        ("CREATE TEMPORARY TABLE t AS SELECT 1", TEMP),
        ("create local temp table t as select 1", TEMP),
        ("select 1 as a into temp t", TEMP),
        ("SELECT 1 AS a INTO TEMPORARY TABLE t", TEMP),
        ("create table pg_temp.t as select 1", TEMP),
        ('create table "pg_temp".t as select 1', TEMP),
        ("create table pg_temp_3.t as select 1", TEMP),
        ("do $$ begin execute 'create temp table t (a int)'; end $$", TEMP),
        ("create temp\ntable t as select 1", TEMP),
        ("create temp /* kept */ table t as select 1", TEMP),
        ("create temporary table if not exists t as select 1", TEMP),
        ("CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", TEMP),
        ("create global temporary sequence s", TEMP),
        ("select 1 into\n  temp t", TEMP),
        ("select 1 INTO TEMP", TEMP),
        ("temp", TEMP),  # the rest of a text cut there may name the table
        ("Temp", TEMP),
        # Other words that contain it.
        ("select attempts, template, temperature, contempt from t", 0),
        ("select temp_buffers, temps, tempo, x_temp from t", 0),
        ("show temp_tablespaces", 0),
        ("select 1", 0),
        # The word alone: a column, a value, DISCARD TEMP.
        ("select * from readings where kind = 'temp' and x = 1", 0),
        ("select temp, temp as t from weather where temp > 30", 0),
        ("discard temp;", 0),
        ("select 1 from pinto temp where true", 0),
        ("select 'temp table'", TEMP),  # in a string: a false alarm
        # set_config at session level, or not plainly local.
        ("select set_config('app.user', 'alice', false)", SESSION_SET),
        ("SELECT SET_CONFIG('statement_timeout', '5s', FALSE)", SESSION_SET),
        ("select pg_catalog.set_config('a.b', 'c', false)", SESSION_SET),
        ("SELECT pg_catalog.set_config('search_path', '', false);", SESSION_SET),  # pg_dump
        ("select \"set_config\"('a.b', 'c', false)", SESSION_SET),
        ("select set_config ( 'a.b' , 'c' , false )", SESSION_SET),
        ("select set_config('a.b', $1, $2)", SESSION_SET),
        ("select set_config('a.b', 'c', $3)", SESSION_SET),
        ("select set_config('a.b', 'c', 1 = 1)", SESSION_SET),
        ("select set_config('a.b', 'c')", SESSION_SET),  # PostgreSQL refuses it: harmless
        ("select set_config('a.b', $$c$$, true)", SESSION_SET),
        ("select set_config('a.b', E'it\\'s, true', false)", SESSION_SET),
        ("select set_config('a.b', 'c', /* local */ true)", SESSION_SET),
        ("select set_config /* x */ ('a.b', 'c', true)", SESSION_SET),
        ("select set_config('a.b', 'c', true", SESSION_SET),  # cut short
        ("select set_config", SESSION_SET),
        (
            "select set_config('a.b', 'c', true), set_config('d.e', 'f', false)",
            SESSION_SET,
        ),
        # Local to the transaction: nothing outlives it.
        ("select set_config('app.user', 'alice', true)", 0),
        ("SELECT set_config('request.jwt.claims', $1, TRUE)", 0),
        ("select set_config($1, $2, true)", 0),
        ("select set_config('a.b', 'c', 'on')", 0),
        ("select set_config('a.b', 'c', 't')", 0),
        ("select set_config('a.b', 'c', true::boolean)", 0),
        ("select set_config('a.b', 'it''s, false', true)", 0),
        ("select set_config('a.b', format('%s,%s', 1, 2), true)", 0),
        ("select set_config('a.b', (select string_agg(x, ',') from t), true)", 0),
        ("select set_config('a.b', 'c', true) from t where x = any(array[1,2])", 0),
        # Names that are not the function.
        ("select my_set_config('a', 'b', false)", 0),
        ("select set_configs('a', 'b', false)", 0),
        ("select set_config from t", 0),
        ("select 'set_config'", 0),
        # All three together.
        (
            "select pg_advisory_lock(1), set_config('a.b', 'c', false) into temp t",
            CALLS_LOCK | SESSION_SET | TEMP,
        ),
    ],
)
def test_temporary_tables_and_set_config(text: str, found: int) -> None:
    assert_effects(text, found)


def test_the_scanner_reads_set_config_across_reads() -> None:
    padding = "x" * 70_000
    stream = w.query(f"select '{padding}', set_config('a.b', 'c', false)") + w.query("select 1")
    at = stream.index(b"set_config")
    assert feed_in_pieces(stream, []) == SESSION_SET
    for cut in range(at - 10, at + 35):
        assert feed_in_pieces(stream, [cut]) == SESSION_SET, cut
    # Local, but cut where its arguments cannot be read whole: counted as session-level.
    local = w.query(f"select '{padding}', set_config('a.b', 'c', true)")
    assert feed_in_pieces(local, []) == 0
    assert feed_in_pieces(local, [local.index(b"'c'")]) == SESSION_SET
    stream = w.query(f"select '{padding}' into temp t")
    for cut in range(len(stream) - 20, len(stream)):
        assert feed_in_pieces(stream, [cut]) == TEMP, cut


def test_a_prepared_statement_carries_its_temp_tables_and_settings() -> None:
    registry = PoolStatements(100)
    entry = registry.lookup(b"s1\x00create temp table t as select $1::int\x00\x00\x00", 3, b"")
    assert entry.text_effects == TEMP
    entry = registry.lookup(b"s2\x00select set_config('a.b', $1, false)\x00\x00\x00", 3, b"")
    assert entry.text_effects == SESSION_SET


@pytest.mark.skipif(implementation.ACTIVE != "compiled", reason="the C helper is built with it")
def test_the_c_helper_agrees_with_find() -> None:
    from pg_doorman.protocol import _text_effects

    texts = [b"", b"advisory", b"advisory_", b"xADVISORY_x", b"AdVisory_", b"pg_advisory_lock(1)"]
    texts += [b"_advisory_", b"advisory__", b"advisor_y_", b"adv@sory_", b"\xc1DVISORY_"]
    texts += [b"set_config", b"SET_CONFIG(", b"set_confi", b"et_config", b"set_config_advisory_"]
    texts += [b"temp", b"TEMP", b"tem", b"emp", b"pg_temp", b"xtempx", b"TeMp set_config temp"]
    texts.append(b"x" * 100 + b"advisory_" + b"y" * 100 + b"set_config" + b"temp")
    # Every byte in every place of each word: only the letters' other case matches.
    for word in (b"advisory_", b"set_config", b"temp"):
        for i in range(len(word)):
            for byte in range(256):
                texts.append(b"q" + word[:i] + bytes([byte]) + word[i + 1 :] + b"q")
    for text in texts:
        for start in range(len(text) + 2):
            for end in (*range(start, min(len(text) + 3, start + 13)), len(text), len(text) + 5):
                assert _text_effects.candidates(text, start, end) == candidates_with_find(
                    text, start, end
                ), (text, start, end)
    with pytest.raises(TypeError):
        _text_effects.candidates(bytearray(b"advisory_"), 0, 9)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        # A DO block's SETs are known by its tag (test_framing.py); what else it does
        # is read from its text as from any other.
        ("do $$ begin set statement_timeout = '5s'; end $$", 0),
        ("do $$ begin create temp table t (a int); end $$", TEMP),
        ("do $$ begin perform set_config('a.b', 'c', false); end $$", SESSION_SET),
        ("select 1; do $$ begin perform pg_advisory_lock(1); end $$", CALLS_LOCK),
    ],
)
def test_do_blocks(text: str, found: int) -> None:
    assert_effects(text, found)


@pytest.mark.parametrize("name", ["", "s1"])
def test_a_parse_text_is_read_after_the_statement_name(name: str) -> None:
    scanner = FrontendScanner()
    scanner.watch_texts = True
    scanner.feed(w.parse(name, "select set_config('a.b', 'c', false)") + w.sync())
    assert scanner.effects_seen == SESSION_SET
    # The name itself is not read as text.
    scanner.effects_seen = 0
    scanner.feed(w.parse("temp", "select 1") + w.parse("pg_temp", "select 1") + w.sync())
    assert scanner.effects_seen == 0


PGBENCH_TEXTS = [
    b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
    b"UPDATE pgbench_accounts SET abalance = abalance + -1 WHERE aid = 1;",
    b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)"
    b" VALUES (1, 1, 1, -1, CURRENT_TIMESTAMP);",
    b"BEGIN;",
    b"END;",
]


@pytest.mark.parametrize("text", PGBENCH_TEXTS)
def test_common_texts_stop_at_the_quick_test(text: bytes) -> None:
    """No word found: nothing is lowered or read further."""
    assert candidates_with_find(text, 0, len(text)) == 0
    if implementation.ACTIVE == "compiled":
        from pg_doorman.protocol import _text_effects

        assert _text_effects.candidates(text, 0, len(text)) == 0
    assert text_effects(text, 0, len(text)) == 0
