"""Transaction-pooling edge cases that poolers have been known to get wrong: a server
given back too early or never, statements and cancels crossing between clients, and
messages too large for one read."""

from __future__ import annotations

import functools
import socket
import threading
import time

import psycopg
import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.both import connect, on_both
from helpers.pooler import PoolerFactory, PoolerProcess, PoolShape, serve_a_client


def one_user_pool(pg: ExamplePostgres, size: int) -> dict[str, object]:
    return PoolShape(size).config(pg)["pools"]


def one_evicting_server(pg: ExamplePostgres, pooler: PoolerFactory) -> PoolerProcess:
    """A pool of one server that keeps one prepared statement: nearly every batch
    evicts one."""
    return pooler(**PoolShape(1, server_cache=1).config(pg))


def test_copy_data_after_the_server_ended_the_copy_holds_no_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A bad row ends COPY FROM STDIN at once (ErrorResponse, ReadyForQuery) while the
    client is still sending; PostgreSQL ignores the rest of its CopyData and its
    CopyDone. They must not check the only server out and keep it."""
    proc = pooler(general={"query_wait_timeout": 3000}, pools=one_user_pool(pg, 1))
    conn = connect(proc, pg)
    try:
        conn.send_raw(w.query("create temp table t (a int) on commit drop; copy t from stdin"))
        conn.read_until(b"G")
        conn.send_raw(w.copy_data("bad\n"))
        got = conn.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "22P02" and w.msg_types(got) == "EZ"
        # The rest of the client's COPY: more data than one read, then CopyDone.
        conn.send_raw(w.copy_data("1\n" * 150_000) + w.copy_data("2\n") + w.copy_done())
        assert conn.read_available(0.3) == []
        assert serve_a_client(proc, pg) < 2.0
        assert conn.execute_query("select 'after'") == [("after",)]
    finally:
        conn.close()


@pytest.mark.parametrize("split", [3, 9], ids=["in-a-header", "in-a-body"])
def test_copy_failing_while_a_message_is_half_sent_holds_no_server(
    pg: ExamplePostgres, pooler: PoolerFactory, split: int
) -> None:
    """As above, but the error comes while the client is inside a CopyData message.
    The server must get that message whole before anyone else's bytes, and is given
    back once it has: the client is idle then, and must not keep it."""
    proc = pooler(general={"query_wait_timeout": 3000}, pools=one_user_pool(pg, 1))
    conn = connect(proc, pg)
    try:
        conn.send_raw(w.query("create temp table t (a int) on commit drop; copy t from stdin"))
        conn.read_until(b"G")
        rest = w.copy_data("1\n" * 1000) + w.copy_done()
        conn.send_raw(w.copy_data("bad\n") + rest[:split])
        got = conn.read_until_ready()
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "22P02" and w.msg_types(got) == "EZ"
        conn.send_raw(rest[split:])
        assert conn.read_available(0.3) == []
        assert serve_a_client(proc, pg) < 2.0
        assert conn.execute_query("select 'after'") == [("after",)]
    finally:
        conn.close()


def test_a_copy_the_server_stopped_reading_fails_and_the_client_is_read_again(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """PostgreSQL stops reading a COPY whose row waits on another transaction's lock;
    the pooler then stops reading the client. When the row fails, PostgreSQL answers at
    once and ignores the rest of the data: the client must be read again (its next
    query answered), whether its server was given back at the error or later."""
    proc = pooler(pools=one_user_pool(pg, 2))
    user = pg.md5_user
    blocker = psycopg.connect(pg.dsn(database="example_db"))
    outcome: dict[str, object] = {}

    def copy_then_query() -> None:
        with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
            try:
                with conn.cursor() as cur, cur.copy("copy items from stdin") as copy:
                    copy.write_row((100_000, "duplicate"))
                    for i in range(300_000):
                        copy.write_row((200_000 + i, f"row {i}"))
            except psycopg.errors.UniqueViolation:
                outcome["copy"] = "unique violation"
            outcome["next"] = conn.execute("select 42").fetchone()

    try:
        blocker.execute("insert into items values (100000, 'held')")
        thread = threading.Thread(target=copy_then_query, daemon=True)
        thread.start()
        time.sleep(1.5)  # the COPY waits on the lock, its data piles up in the pooler
        blocker.commit()
        thread.join(30)
        assert outcome == {"copy": "unique violation", "next": (42,)}
    finally:
        blocker.execute("delete from items where id = 100000")
        blocker.commit()
        blocker.close()


def test_a_flush_between_transactions_holds_no_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(general={"query_wait_timeout": 3000}, pools=one_user_pool(pg, 1))
    conn = connect(proc, pg)
    try:
        conn.send_raw(w.flush())
        assert conn.read_available(0.3) == []
        assert serve_a_client(proc, pg) < 2.0
        # Flush as part of a request still works: ParseComplete comes without a Sync.
        conn.send_raw(w.parse("s", "select 5") + w.flush())
        assert conn.read_until(b"1") == [(b"1", b"")]
        assert w.rows(conn.run_prepared("s")) == [("5",)]
    finally:
        conn.close()


def test_a_parse_pipelined_after_sync_keeps_its_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """ReadyForQuery while the client's next request is half sent (here an unnamed
    Parse without its Sync): giving the server back then would let another client
    take it between the two halves."""
    proc = pooler(pools=one_user_pool(pg, 2))
    first = connect(proc, pg)
    second = connect(proc, pg)
    try:
        first.send_raw(
            w.parse("", "select 1")
            + w.bind("", "")
            + w.execute()
            + w.sync()
            # The second request, still without Bind, Execute and Sync.
            + w.parse("", "select 2")
        )
        time.sleep(0.2)
        second.execute_query("begin")
        assert second.execute_query("select 'other'") == [("other",)]
        got = first.run_prepared("") + first.read_until_ready()
        assert w.msg_types(got) == "12DCZ12DCZ"
        assert w.rows(got) == [("1",), ("2",)]
        second.execute_query("commit")
    finally:
        first.close()
        second.close()


def test_large_statements_round_trip_byte_exact(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    """A 40 kB query text, a 40 kB parameter and an 8 kB statement name: the answers
    are PostgreSQL's own. (PostgreSQL refuses a Describe or Close over 10 000 bytes,
    so the name stays below that.)"""
    proc = pooler(pools=one_user_pool(pg, 2))
    name = "n" * 8_000

    def exchange(conn: w.PgWire) -> tuple[list[w.Message], list[w.Message]]:
        conn.send_raw(
            w.parse(name, "select '" + "x" * 40_000 + "'::text || $1::text as v")
            + w.describe("S", name)
            + w.sync()
        )
        prepared = conn.read_until_ready()
        conn.send_raw(
            w.bind("", name, ["y" * 40_000])
            + w.describe("P")
            + w.execute()
            + w.close("S", name)
            + w.sync()
        )
        return prepared, conn.read_until_ready()

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert w.msg_types(pooled[0]) == "1tTZ" and w.msg_types(pooled[1]) == "2TDC3Z"
    assert w.rows(pooled[1]) == [("x" * 40_000 + "y" * 40_000,)]


def test_closing_a_statement_twice_then_describing_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Both Closes succeed, as in PostgreSQL; the statement is then gone for good."""
    proc = pooler(pools=one_user_pool(pg, 2))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        conn.send_raw(w.parse("s", "select 1") + w.sync())
        conn.read_until_ready()
        replies = []
        for message in (w.close("S", "s"), w.close("S", "s"), w.describe("S", "s")):
            conn.send_raw(message + w.sync())
            replies.append(conn.read_until_ready())
        return replies

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(r) for r in pooled] == ["3Z", "3Z", "EZ"]
    assert pooled[:2] == direct[:2]
    error, direct_error = w.first_error(pooled[2]), w.first_error(direct[2])
    assert error is not None and direct_error is not None
    assert (error.sqlstate, error.message) == (direct_error.sqlstate, direct_error.message)


def test_deallocate_all_forgets_only_its_own_clients_statements(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(pools=one_user_pool(pg, 1))  # both clients use the same server
    first = connect(proc, pg)
    second = connect(proc, pg)
    try:
        for conn in (first, second):
            conn.send_raw(w.parse("s", "select 7") + w.sync())
            conn.read_until_ready()
        assert first.simple_query("DEALLOCATE ALL") == [(b"C", b"DEALLOCATE ALL\x00"), (b"Z", b"I")]
        assert w.rows(second.run_prepared("s")) == [("7",)]
        error = w.first_error(first.run_prepared("s"))
        assert error is not None and error.sqlstate == "26000"
    finally:
        first.close()
        second.close()


def test_a_storm_of_cancels_hits_only_its_target(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """100 concurrent cancels for the client holding the only server; another client's
    query, queued for that same server, runs after it and must not be cancelled."""
    proc = pooler(pools=one_user_pool(pg, 1))
    target = connect(proc, pg)
    queued = connect(proc, pg)
    try:
        target.send_raw(w.query("select pg_sleep(3)"))
        time.sleep(0.3)
        queued.send_raw(w.query("select pg_sleep(0.5), 'done'"))
        time.sleep(0.2)
        assert target.backend_pid is not None and target.secret_key is not None
        request = w.cancel_request(target.backend_pid, target.secret_key)

        def cancel() -> None:
            with socket.create_connection((proc.host, proc.port), timeout=5) as sock:
                sock.sendall(request)
                sock.recv(16)  # the pooler closes without answering

        threads = [threading.Thread(target=cancel) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        error = w.first_error(target.read_until_ready())
        assert error is not None and error.sqlstate == "57014"
        got = queued.read_until_ready(timeout=10)
        assert w.first_error(got) is None
        assert w.rows(got) == [("", "done")]
        assert target.execute_query("select 'still here'") == [("still here",)]
    finally:
        target.close()
        queued.close()


def test_an_extended_copy_ended_by_an_error_gives_the_server_back(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """COPY through Parse/Bind/Execute with libpq's early Sync; a bad row; then the
    client's CopyDone and Sync. The answers are PostgreSQL's and the server is free
    after the ReadyForQuery."""
    proc = pooler(general={"query_wait_timeout": 3000}, pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        conn.execute_query("create temp table if not exists t (a int)")
        conn.send_raw(w.parse("", "copy t from stdin") + w.bind("", "") + w.execute() + w.sync())
        started = conn.read_until(b"G")
        conn.send_raw(w.copy_data("bad\n"))
        error = conn.read_until(b"E")
        conn.send_raw(w.copy_data("1\n") + w.copy_done() + w.sync())
        answers = [started, error, conn.read_until_ready(), conn.read_available(0.2)]
        assert conn.execute_query("select count(*) from t") == [("0",)]
        # Still connected: the pooler's only server must be free for others.
        assert serve_a_client(proc, pg) < 2.0
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in pooled] == ["12G", "E", "Z", ""]
    assert [w.msg_types(a) for a in direct] == ["12G", "E", "Z", ""]


def test_extended_copies_with_an_early_sync_keep_the_replies_in_step(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """libpq sends Sync right behind a COPY's Execute, and PostgreSQL ignores it once
    the copy begins: no ReadyForQuery answers it. Counted as due, it put every later
    reply one step behind: the next statement's synthetic ParseComplete was lost, and
    a failed transaction's error swallowed."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def copy(conn: w.PgWire, rows: str) -> list[w.Reply]:
        conn.send_raw(w.parse("", "copy t from stdin") + w.bind("", "") + w.execute() + w.sync())
        replies = conn.read_until(b"GEZ")
        if replies[-1][0] == b"G":
            conn.send_raw(w.copy_data(rows) + w.copy_done() + w.sync())
            replies += conn.read_until_ready()
        elif replies[-1][0] == b"E":
            replies += conn.read_until_ready()
        return w.comparable(replies)

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        conn.execute_query("create temp table if not exists t (a int)")
        conn.execute_query("begin")
        answers = [copy(conn, "1\n"), copy(conn, "2\nbad\n"), copy(conn, "3\n")]
        answers.append(w.comparable(conn.simple_query("rollback")))
        answers.append(copy(conn, "4\n"))
        assert conn.execute_query("select a from t") == [("4",)]
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["12GCZ", "12GEZ", "EZ", "CZ", "12GCZ"]


def test_an_extended_copy_that_evicts_a_statement_keeps_its_server(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The COPY's Parse evicts a statement from a server that keeps one. Its Close
    went out in front of the batch's Sync, which libpq sends right behind the
    Execute: inside the copy, where PostgreSQL ends the connection on anything but
    copy data ("unexpected message type 0x43 during COPY from stdin")."""
    proc = one_evicting_server(pg, pooler)
    run_kept = w.bind("", "kept") + w.execute() + w.sync()

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        conn.execute_query("create temp table if not exists t (a int)")
        conn.send_raw(w.parse("kept", "select 1 as kept") + run_kept)
        answers = [w.comparable(conn.read_until_ready())]
        conn.send_raw(w.parse("", "copy t from stdin") + w.bind("", "") + w.execute() + w.sync())
        replies = conn.read_until(b"GEZ")
        conn.send_raw(w.copy_data("1\n") + w.copy_done() + w.sync())
        answers.append(w.comparable(replies + conn.read_until_ready()))
        conn.send_raw(run_kept)
        answers.append(w.comparable(conn.read_until_ready()))
        assert conn.execute_query("select a from t") == [("1",)]
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["12DCZ", "12GCZ", "2DCZ"]


def test_a_failed_parse_evicted_in_its_own_batch_is_not_taken_for_prepared(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A Parse fails, and a later Parse of its batch evicts it from a server that
    keeps one statement. Its Close never ran either, which once put it back in the
    server's record: the next Parse of that text got a synthetic ParseComplete, and
    its Bind 26000 where PostgreSQL reports the Parse's own error."""
    proc = one_evicting_server(pg, pooler)

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        conn.send_raw(w.parse("", "select nope") + w.parse("", "select 2") + w.sync())
        answers = [w.comparable(conn.read_until_ready())]
        conn.send_raw(w.parse("x", "select nope") + w.bind("", "x") + w.execute() + w.sync())
        answers.append(w.comparable(conn.read_until_ready()))
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["EZ", "EZ"]


def test_a_parse_behind_an_unanswered_batch_gets_postgresqls_answer(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Batches pipelined in one write, each parsing what it runs. The pooler may
    believe the server has a statement because an earlier batch of the write sent its
    Parse; if that Parse fails, or the transaction is failed by then, a synthetic
    ParseComplete would be a lie (then 26000 for the Bind, or a ParseComplete that
    PostgreSQL refuses with 25P02)."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def run(sql: str) -> bytes:
        return w.parse("", sql) + w.bind("", "") + w.execute() + w.sync()

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        answers = []
        conn.send_raw(run("select nope") + run("select nope"))
        answers.append(w.comparable(conn.read_until_ready() + conn.read_until_ready()))
        conn.execute_query("select 1")  # the statement is on the server now
        conn.execute_query("begin")
        conn.send_raw(run("select 1/0") + run("select 1"))
        answers.append(w.comparable(conn.read_until_ready() + conn.read_until_ready()))
        answers.append(w.comparable(conn.simple_query("rollback")))
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["EZEZ", "1EZEZ", "CZ"]


def test_a_failed_parse_does_not_hide_one_queued_behind_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A Parse fails in a failed transaction; a Parse of the same text is already on
    its way behind it. The pooler must not conclude that the server lacks the
    statement: the second one creates it, and a third, sent later, must not be
    refused with 42P05 "already exists"."""
    proc = pooler(pools=one_user_pool(pg, 1))
    sql = "select 77 as queued_behind"

    def exchange(conn: w.PgWire) -> list[list[w.Reply]]:
        conn.execute_query("begin")
        conn.simple_query("select 1/0")
        run = w.parse("", sql) + w.bind("", "") + w.execute() + w.sync()
        conn.send_raw(run + w.query("rollback") + w.parse("", sql))
        answers = [w.comparable(conn.read_until_ready() + conn.read_until_ready())]
        conn.send_raw(w.bind("", "") + w.execute() + w.sync())
        answers.append(w.comparable(conn.read_until_ready()))
        conn.send_raw(run)
        answers.append(w.comparable(conn.read_until_ready()))
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert pooled == direct
    assert [w.msg_types(a) for a in pooled] == ["EZCZ", "12DCZ", "12DCZ"]


def test_an_error_before_a_late_sync_skips_everything_up_to_it(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The error comes back before the client has sent its Sync; what it sends in the
    meantime, in another packet, is skipped as PostgreSQL skips it."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        conn.send_raw(w.parse("a", "select nope") + w.bind("", "a") + w.execute())
        error = conn.read_until(b"E")
        conn.send_raw(w.parse("b", "select 1") + w.bind("", "b") + w.execute())
        skipped = conn.read_available(0.2)
        conn.send_raw(w.sync())
        ready = conn.read_until_ready()
        conn.send_raw(w.parse("b", "select 1") + w.bind("", "b") + w.execute() + w.sync())
        return [error, skipped, ready, conn.read_until_ready()]

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in pooled] == ["E", "", "Z", "12DCZ"]
    assert pooled == direct


def test_a_query_skipped_after_an_error_leaves_the_batch_open(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A Query sent inside an extended-protocol batch behind a message that fails is
    skipped, as everything up to the Sync is: the server still waits for that Sync.
    The Query closed the batch on the client's side, and once the server's replies
    had answered all else (the previous batch's ReadyForQuery came with the error)
    the transaction was taken for over: its server went back to the pool (closed,
    for the Query inside a batch), and the rest of the batch ran on another one,
    which did not skip it."""
    proc = pooler(pools=one_user_pool(pg, 2))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        conn.send_raw(
            w.parse("", "select 1") + w.bind("", "") + w.execute() + w.sync()
            + w.parse("", "select nope") + w.bind("", "") + w.execute()
            + w.query("select 2")
        )  # fmt: skip
        first = conn.read_until_ready() + conn.read_until(b"E")
        conn.send_raw(w.parse("", "select 3") + w.bind("", "") + w.execute() + w.sync())
        return [first, conn.read_until_ready()]

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in direct] == ["12DCZE", "Z"]
    assert pooled == direct


# A reset and the next command in one write, as drivers' pools send them: "u" is
# prepared behind the DISCARD ALL and used at once.
_RESET_THEN_PREPARE = (
    w.query("DISCARD ALL") + w.parse("u", "select 3") + w.bind("", "u") + w.execute() + w.sync()
)


def test_discard_all_and_deallocate_all_forget_the_clients_statements(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Run by the server (DISCARD ALL, and DEALLOCATE ALL inside a transaction), they
    end the client's statements as in PostgreSQL; a statement prepared behind them in
    the same pipeline survives."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        got = []
        conn.send_raw(w.parse("s", "select 1") + w.sync())
        conn.read_until_ready()
        got.append(conn.simple_query("DISCARD ALL"))
        got.append(conn.run_prepared("s"))
        conn.send_raw(w.parse("t", "select 2") + w.sync())
        conn.read_until_ready()
        conn.execute_query("begin")
        got.append(conn.simple_query("deallocate all"))
        conn.execute_query("commit")
        got.append(conn.run_prepared("t"))
        conn.send_raw(_RESET_THEN_PREPARE)
        got.append(conn.read_until_ready() + conn.read_until_ready())
        got.append(conn.run_prepared("u"))
        return got

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in pooled] == ["CZ", "EZ", "CZ", "EZ", "CZ12DCZ", "2DCZ"]
    assert [_comparable(a) for a in pooled] == [_comparable(a) for a in direct]
    assert w.rows(pooled[5]) == [("3",)]


def _comparable(messages: list[tuple[bytes, bytes]]) -> list[object]:
    """Messages with each error reduced to its SQLSTATE and text: the pooler's own
    errors don't name a source file and line of PostgreSQL's."""
    out: list[object] = []
    for msg_type, payload in messages:
        if msg_type == b"E":
            fields = w.error_fields(payload)
            out.append((msg_type, fields["C"], fields["M"]))
        else:
            out.append((msg_type, payload))
    return out


def test_statements_prepared_behind_a_reset_in_one_write_stay_usable(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A reset sent in front of the next command, in one write (as a driver's pool
    does with DISCARD ALL). The server then has exactly the statements parsed behind
    it: the pooler must neither forget those (it would prepare them again and get
    42P05, "already exists") nor trust that it still has the ones from before (the
    Bind would get 26000)."""
    proc = pooler(pools=one_user_pool(pg, 1))
    conn = connect(proc, pg)
    try:
        for _ in range(3):  # the first time "u" is new to the server, then it is not
            conn.send_raw(_RESET_THEN_PREPARE)
            got = conn.read_until_ready() + conn.read_until_ready()
            assert w.msg_types(got) == "CZ12DCZ"
            assert w.rows(conn.run_prepared("u")) == [("3",)]
        # A statement the client prepared before the reset, bound behind it in the same
        # write: PostgreSQL answers 26000. Behind a query not answered yet the pooler
        # parses the statement again, and as it knows the statement's result columns,
        # checks them first: the Bind waits for that answer, which comes after the
        # reset's, so "x" is gone by then, as in PostgreSQL.
        conn.send_raw(w.query("DISCARD ALL"))
        conn.read_until_ready()
        conn.send_raw(w.parse("x", "select 5") + w.sync())
        conn.read_until_ready()
        conn.send_raw(w.query("DISCARD ALL") + w.bind("", "x") + w.execute() + w.sync())
        got = conn.read_until_ready() + conn.read_until_ready()
        assert w.msg_types(got) == "CZEZ"
        error = w.first_error(got)
        assert error is not None and error.sqlstate == "26000", error
        # Inside a transaction, with DEALLOCATE ALL.
        conn.execute_query("begin")
        conn.send_raw(w.query("deallocate all") + w.parse("v", "select 4") + w.sync())
        assert w.msg_types(conn.read_until_ready() + conn.read_until_ready()) == "CZ1Z"
        assert w.rows(conn.run_prepared("v")) == [("4",)]
        conn.execute_query("commit")
        assert w.rows(conn.run_prepared("v")) == [("4",)]
    finally:
        conn.close()


def test_an_error_ahead_of_a_recheck_leaves_the_statement_usable(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Behind a simple query, a statement the server already has is closed and parsed
    again; when an error ahead makes the server skip both, the pooler no longer knows
    whether the server has it, and resets the server's statements at check-in."""
    proc = pooler(pools=one_user_pool(pg, 1))
    conn = connect(proc, pg)
    try:
        conn.send_raw(w.parse("s", "select 1") + w.sync())
        conn.read_until_ready()
        for reset in ("select 'not a reset'", "DISCARD ALL"):
            conn.send_raw(
                w.query(reset)
                + w.parse("e", "select nope")
                + w.parse("s", "select 1")
                + w.bind("", "s")
                + w.execute()
                + w.sync()
            )
            got = conn.read_until_ready() + conn.read_until_ready()
            error = w.first_error(got)
            assert error is not None and error.sqlstate == "42703"
            assert w.msg_types(got).endswith("EZ")
            # Whether "s" survived depends on the query (as in PostgreSQL): close it
            # either way, and the server must run it whether it had it or not.
            conn.send_raw(
                w.close("S", "s")
                + w.parse("s", "select 1")
                + w.bind("", "s")
                + w.execute()
                + w.sync()
            )
            assert w.rows(conn.read_until_ready()) == [("1",)]
    finally:
        conn.close()


def test_a_simple_query_inside_an_extended_batch(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A Query in the middle of Parse/Bind/Execute messages, and statements used behind
    it (which the pooler closes and parses again, in case the query was a reset): the
    answers are PostgreSQL's."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        conn.send_raw(w.parse("s", "select 1") + w.sync())
        conn.read_until_ready()
        conn.send_raw(
            w.bind("", "s")
            + w.execute()
            + w.query("select 2")
            + w.parse("s2", "select 3")
            + w.bind("", "s2")
            + w.execute()
            + w.bind("", "s")
            + w.execute()
            + w.sync()
        )
        batch = conn.read_until_ready() + conn.read_until_ready()
        conn.send_raw(w.bind("", "s2") + w.execute() + w.bind("", "s") + w.execute() + w.sync())
        return [batch, conn.read_until_ready()]

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in pooled] == ["2DCTDCZ12DC2DCZ", "2DC2DCZ"]
    assert pooled == direct


def test_the_rest_of_a_batch_after_an_early_error_is_ignored(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """The server's error comes back before the client has sent the rest of its batch
    (here: after a Flush). PostgreSQL ignores everything up to the Sync, so nothing
    in it may be answered, synthetically or not, and no name it sets may stick."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        answers = []
        conn.send_raw(w.parse("known", "select 1") + w.sync())
        answers.append(conn.read_until_ready())
        conn.send_raw(w.parse("", "select nope") + w.flush())
        answers.append(conn.read_until(b"E"))
        # "select 1" is on the server already: the pooler must not answer this Parse.
        conn.send_raw(
            w.parse("again", "select 1")
            + w.parse("new", "select 2")
            + w.bind("", "known")
            + w.execute()
            + w.sync()
        )
        answers.append(conn.read_until_ready())
        for name in ("again", "new", "known"):
            conn.send_raw(w.bind("", name) + w.execute() + w.sync())
            answers.append(conn.read_until_ready())
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert [w.msg_types(a) for a in direct] == ["1Z", "E", "Z", "EZ", "EZ", "2DCZ"]
    assert [w.comparable(a) for a in pooled] == [w.comparable(a) for a in direct]


def test_the_poolers_own_errors_fail_the_transaction_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """An error the pooler answers itself (here: a Bind of a statement the client never
    prepared) fails the server's transaction where PostgreSQL would have failed it: an
    INSERT earlier in the same implicit transaction is rolled back, and a transaction
    block is left failed, so COMMIT rolls back."""
    proc = pooler(pools=one_user_pool(pg, 1))
    admin = connect(pg, pg)
    try:
        admin.execute_query("create table refusals (x int)")

        def exchange(conn: w.PgWire) -> list[list[w.Message]]:
            answers = []
            insert = w.parse("", "insert into refusals values (1)") + w.bind("", "") + w.execute()
            conn.send_raw(insert + w.bind("", "ghost") + w.execute() + w.sync())
            answers.append(conn.read_until_ready())
            conn.send_raw(w.query("begin"))
            answers.append(conn.read_until_ready())
            conn.send_raw(insert + w.sync())
            answers.append(conn.read_until_ready())
            conn.send_raw(w.describe("S", "ghost") + w.sync())
            answers.append(conn.read_until_ready())
            conn.send_raw(w.query("commit"))
            answers.append(conn.read_until_ready())
            conn.send_raw(w.query("select count(*) from refusals"))
            answers.append(conn.read_until_ready())
            return answers

        direct, pooled = on_both(pg, proc, exchange)
        assert w.rows(direct[-1]) == [("0",)]
        assert w.command_tag(direct[-2][0][1]) == "ROLLBACK"
        assert [w.comparable(a) for a in pooled] == [w.comparable(a) for a in direct]
    finally:
        admin.execute_query("drop table refusals")
        admin.close()


def test_a_name_set_again_behind_a_failed_batch_keeps_its_new_meaning(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """Two batches in one write: the first fails before its Parse, the second parses
    the same text again. Undoing the first Parse must not undo the second."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire) -> list[list[w.Message]]:
        answers = []
        conn.send_raw(w.parse("", "select 'before'") + w.parse("s", "select 's'") + w.sync())
        answers.append(conn.read_until_ready())
        fails = w.execute("no such portal")
        conn.send_raw(
            fails
            + w.parse("", "select 'again'")
            + w.close("S", "s")
            + w.sync()
            + w.parse("", "select 'again'")
            + w.close("S", "s")
            + w.sync()
        )
        answers.append(conn.read_until_ready() + conn.read_until_ready())
        conn.send_raw(w.bind("", "") + w.execute() + w.bind("", "s") + w.sync())
        answers.append(conn.read_until_ready())
        return answers

    direct, pooled = on_both(pg, proc, exchange)
    assert w.rows(direct[-1]) == [("again",)]
    assert w.first_error(direct[-1]) is not None  # "s" was closed by the second batch
    assert [w.comparable(a) for a in pooled] == [w.comparable(a) for a in direct]


def test_deallocate_inside_a_transaction_answered_as_postgresql_does(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """pgx deallocates evicted statements with SQL, inside transactions too. The server
    does not know the client's name, so the pooler answers; in a failed block the
    server's 25P02 comes first. Sent whole and one byte per write."""
    proc = pooler(pools=one_user_pool(pg, 1))

    def exchange(conn: w.PgWire, trickle: bool) -> list[list[w.Message]]:
        def send(data: bytes) -> None:
            if trickle:
                for i in range(len(data)):
                    conn.send_raw(data[i : i + 1])
            else:
                conn.send_raw(data)

        answers = []
        conn.send_raw(w.parse("gone", "select 1") + w.parse("kept", "select 2") + w.sync())
        answers.append(conn.read_until_ready())
        conn.send_raw(w.query("begin"))
        answers.append(conn.read_until_ready())
        send(w.query("DEALLOCATE gone"))
        answers.append(conn.read_until_ready())
        send(w.query("deallocate gone"))  # now unknown: PostgreSQL's error
        answers.append(conn.read_until_ready())
        send(w.query("deallocate kept"))  # the block has failed: 25P02
        answers.append(conn.read_until_ready())
        conn.send_raw(w.query("rollback"))
        answers.append(conn.read_until_ready())
        conn.send_raw(w.query("begin"))
        answers.append(conn.read_until_ready())
        send(w.query("deallocate kept"))
        answers.append(conn.read_until_ready())
        conn.send_raw(w.bind("", "kept") + w.execute() + w.sync())  # deallocated
        answers.append(conn.read_until_ready())
        conn.send_raw(w.query("commit"))
        answers.append(conn.read_until_ready())
        return answers

    for trickle in (False, True):
        direct, pooled = on_both(pg, proc, functools.partial(exchange, trickle=trickle))
        assert [w.msg_types(a) for a in direct] == [
            "11Z",
            "CZ",
            "CZ",
            "EZ",
            "EZ",
            "CZ",
            "CZ",
            "CZ",
            "EZ",
            "CZ",
        ]
        assert [w.comparable(a) for a in pooled] == [w.comparable(a) for a in direct]
