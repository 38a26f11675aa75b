"""Hostile clients must not hurt the pooler or anyone else.

Honest clients (psycopg 3 and asyncpg, some with prepared statements, some in explicit
transactions) run a fixed workload in a loop and check every answer, while raw-socket
clients log in and send mutated protocol streams: valid simple queries, extended-protocol
batches, COPY FROM STDIN, Flush, Close and Terminate, with a byte flipped, a length made
short, long, negative or huge, an unknown message type, a message cut off (then the
connection dropped, or the rest sent after a pause), a message sent twice, messages of
the wrong phase, a StartupMessage, CancelRequest or SSLRequest in mid-session, or the
connection dropped at a random byte.

A hostile client must get an ErrorResponse with a SQLSTATE or a closed connection; it
may wait only where its stream leaves a message incomplete (as PostgreSQL would). The
honest clients must see no error and no wrong answer, no client may see another's rows,
and at the end the pool's counts must match PostgreSQL's backends, none of them idle in
a transaction, and a new client must be served.

FUZZ_SECONDS (seconds per seed) and PG_DOORMAN_TEST_SEEDS (a factor on the seed count)
make longer runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest

from helpers import EXAMPLE_DB, OWNER_ROLE, ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_rows
from helpers.pooler import PoolerFactory, PoolerProcess
from helpers.seeds import seeds
from pg_doorman.app.embedded_pg import make_dsn

APPLICATION = "fuzz_backend"
DURATION = float(os.environ.get("FUZZ_SECONDS", "10"))
SEEDS = seeds(2)
HOSTILE_CLIENTS = 4
HONEST_CLIENTS = 4  # asyncpg and psycopg, alternating
# A hostile client that waits this long for an answer it is owed has been left hanging.
ANSWER_TIMEOUT = 8.0
HOSTILE_TABLE = "fuzz_hostile"

# PostgreSQL's limits on a frontend message's length word (postgres.c): small
# messages may not exceed 10000 bytes, others 1 GB.
_SMALL_MESSAGE_LIMIT = 10000
_LARGE_MESSAGE_LIMIT = 0x3FFFFFFF
_SMALL_TYPES = frozenset(b"CDEHSXcf")
_FRONTEND_TYPES = frozenset(b"BCDEFHPQSXcdfp")
_MARKER = re.compile(r"h(\d+)-(\d+)")

# --- valid streams -------------------------------------------------------------------


@dataclass
class Step:
    """Part of a plan: bytes to send, a pause, or the connection dropped."""

    kind: str  # "send", "sleep", "drop"
    data: bytes = b""
    seconds: float = 0.0


def valid_stream(rng: random.Random, marker: str) -> list[bytes]:
    """A valid sequence of frontend messages, rows tagged with `marker`."""
    roll = rng.randrange(9)
    name = rng.choice(("", "", "fz1", "fz2"))
    if roll == 0:
        return [w.query(f"select '{marker}' as m")]
    if roll == 1:
        return [
            w.query("begin"),
            w.query(f"insert into {HOSTILE_TABLE} values (1, '{marker}')"),
            w.query(rng.choice(("commit", "rollback", f"select '{marker}'"))),
        ]
    if roll == 2:
        return [
            w.parse(name, "select $1::text as m", (25,)),
            w.bind("", name, [marker]),
            w.describe("P"),
            w.execute(),
            w.sync(),
        ]
    if roll == 3:
        return [
            w.parse(name, "select $1::int + 1 as v"),
            w.describe("S", name),
            w.flush(),
            w.bind("p1", name, [str(rng.randrange(1000))]),
            w.execute("p1", rng.choice((0, 1))),
            w.close("P", "p1"),
            w.close("S", name),
            w.sync(),
        ]
    if roll == 4:
        rows = [f"{i}\t{marker}\n".encode() for i in range(rng.randrange(1, 4))]
        end = w.copy_done() if rng.random() < 0.7 else w.copy_fail("client gave up")
        return [w.query(f"copy {HOSTILE_TABLE} from stdin"), *[w.copy_data(r) for r in rows], end]
    if roll == 5:
        rows = [f"{i}\t{marker}\n".encode() for i in range(2)]
        return [
            w.parse("", f"copy {HOSTILE_TABLE} from stdin"),
            w.bind("", ""),
            w.execute(),
            *[w.copy_data(r) for r in rows],
            w.copy_done(),
            w.sync(),
        ]
    if roll == 6:
        return [
            w.query("begin"),
            w.parse(name, "select $1::text as m"),
            w.bind("", name, [marker]),
            w.execute(),
            w.sync(),
            w.query("commit"),
        ]
    if roll == 7:
        return [w.query(f"select '{marker}' as m; select 1/0; select 2")]
    return [
        w.parse(name, "select id from items where id <= $1 order by id", (23,)),
        w.bind("", name, ["3"], result_formats=[rng.choice((0, 1))]),
        w.execute("", 2),
        w.execute(""),
        w.flush(),
        w.sync(),
    ]


# --- mutations -----------------------------------------------------------------------


def _set_length(message: bytes, length: int) -> bytes:
    return message[:1] + struct.pack("!i", length) + message[5:]


def mutate(rng: random.Random, messages: list[bytes]) -> tuple[str, list[Step]]:
    """One mutation of `messages`: its class and the plan that sends it."""
    kind = rng.choice(MUTATIONS)
    msgs = list(messages)
    i = rng.randrange(len(msgs))
    if kind == "none":
        pass
    elif kind == "flip":
        flipped = bytearray(b"".join(msgs))
        flipped[rng.randrange(len(flipped))] ^= rng.randrange(1, 256)
        return kind, [Step("send", bytes(flipped))]
    elif kind == "length":
        real = len(msgs[i]) - 1
        length = rng.choice(
            (
                real - rng.randrange(1, 5),
                real + rng.randrange(1, 5),
                rng.randrange(0, 4),
                -rng.randrange(1, 1 << 31),
                rng.choice((_SMALL_MESSAGE_LIMIT + 1, 1 << 28, _LARGE_MESSAGE_LIMIT, 0x7FFFFFFF)),
            )
        )
        msgs[i] = _set_length(msgs[i], length)
    elif kind == "unknown_type":
        type_ = rng.choice([t for t in range(256) if t not in _FRONTEND_TYPES])
        msgs.insert(i, bytes([type_]) + struct.pack("!i", 4 + 3) + b"abc")
    elif kind == "truncate_drop":
        cut = msgs[i][: rng.randrange(1, len(msgs[i]))]
        return kind, [Step("send", b"".join(msgs[:i]) + cut), Step("drop")]
    elif kind == "drop_anywhere":
        data = b"".join(msgs)
        return kind, [Step("send", data[: rng.randrange(len(data))]), Step("drop")]
    elif kind == "truncate_pause":
        data = b"".join(msgs)
        at = len(b"".join(msgs[:i])) + rng.randrange(1, len(msgs[i]))
        return kind, [
            Step("send", data[:at]),
            Step("sleep", seconds=rng.uniform(0.05, 0.4)),
            Step("send", data[at:]),
        ]
    elif kind == "duplicate":
        msgs.insert(i, msgs[i])
    elif kind == "wrong_phase":
        msgs.insert(
            i,
            rng.choice(
                (
                    w.copy_data(b"1\tstray\n"),
                    w.copy_done(),
                    w.copy_fail("stray"),
                    w.bind("", "no_such_statement"),
                    w.execute("no_such_portal"),
                    w.describe("S", "no_such_statement"),
                    w.describe("P", "no_such_portal"),
                    w.close("S", "no_such_statement"),
                    w.execute(""),
                    w.sync(),
                    w.flush(),
                )
            ),
        )
    elif kind == "startup_mid_session":
        msgs.insert(
            i,
            rng.choice(
                (
                    w.startup_message({"user": "nobody", "database": EXAMPLE_DB}),
                    w.cancel_request(rng.randrange(1 << 31), rng.randrange(1 << 31)),
                    w.ssl_request(),
                    w.gssenc_request(),
                )
            ),
        )
    else:
        raise AssertionError(kind)
    return kind, [Step("send", b"".join(msgs))]


MUTATIONS = (
    "none",
    "flip",
    "flip",
    "length",
    "length",
    "unknown_type",
    "truncate_drop",
    "truncate_pause",
    "duplicate",
    "wrong_phase",
    "wrong_phase",
    "startup_mid_session",
    "drop_anywhere",
)


def framing(data: bytes, last: bytes = b"") -> str:
    """How PostgreSQL reads `data` as frontend messages: 'complete', 'incomplete' (it
    waits for more), 'invalid' (it closes the connection), or 'swallowed': complete,
    but `last`, the message that ends `data`, is read as part of an earlier message
    (a length made to reach the end), so nothing can answer it."""
    pos = 0
    last_read_alone = not last
    while pos < len(data):
        if pos == len(data) - len(last):
            last_read_alone = True
        if len(data) - pos < 5:
            return "incomplete" if data[pos] in _FRONTEND_TYPES else "invalid"
        type_ = data[pos]
        (length,) = struct.unpack_from("!i", data, pos + 1)
        limit = _SMALL_MESSAGE_LIMIT if type_ in _SMALL_TYPES else _LARGE_MESSAGE_LIMIT
        if type_ not in _FRONTEND_TYPES or length < 4 or length > limit:
            return "invalid"
        pos += 1 + length
    if pos != len(data):
        return "incomplete"
    return "complete" if last_read_alone else "swallowed"


# --- the hostile client ------------------------------------------------------------------


@dataclass
class Findings:
    seed: int
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    honest_ops: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def _read_reply(conn: w.PgWire, probe: str | None, deadline: float) -> str:
    """Read until the probe's ReadyForQuery ('ready'; with no probe, the first one), a
    close ('closed'), or the deadline ('timeout')."""
    seen_probe = probe is None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        try:
            type_, payload = conn.read_message(remaining)
        except TimeoutError:
            return "timeout"
        except (w.ConnectionClosed, ConnectionResetError, BrokenPipeError):
            return "closed"
        except w.PgWireError:
            return "garbled"
        if type_ == b"D" and probe is not None and probe.encode() in w.data_row(payload):
            seen_probe = True
        if type_ == b"Z" and seen_probe:
            return "ready"


def probe_stream(probe: str) -> bytes:
    """What follows a mutated stream, to find out where it left the session: a Sync for
    an extended-protocol batch; a Query that ends a transaction (in a COPY it is taken
    as the COPY's error, and the server then skips to the next Sync when the COPY came
    from an Execute); then a Query whose row marks the end of the answers."""
    return w.sync() + w.query(f"rollback; select '{probe}-a'") + w.sync() + probe_query(probe)


def probe_query(probe: str) -> bytes:
    """The probe's last message, whose row marks the end of the answers."""
    return w.query(f"select '{probe}'")


def check_received(conn: w.PgWire, me: int, context: str, findings: Findings) -> None:
    for type_, payload in conn.received:
        if type_ == b"E":
            code = w.error_fields(payload).get("C", "")
            if not re.fullmatch(r"[0-9A-Z]{5}", code):
                findings.problem(f"{context}: ErrorResponse without a SQLSTATE: {payload!r}")
        elif type_ == b"D":
            for value in w.data_row(payload):
                if value is None:
                    continue
                found = _MARKER.search(value.decode(errors="replace"))
                # A flipped byte may turn its own marker into another's.
                if found and int(found.group(1)) != me and value not in conn.sent:
                    findings.problem(f"{context}: another client's row {value!r}")


def hostile(
    host: str,
    port: int,
    user: str,
    password: str,
    me: int,
    seed: int,
    deadline: float,
    findings: Findings,
    diagnose: Callable[[int], str] | None = None,
) -> None:
    """Sessions of mutated streams until the deadline."""
    rng = random.Random(seed)
    op = 0
    while time.monotonic() < deadline:
        try:
            conn = w.PgWire.connect(host, port, user, EXAMPLE_DB, password, timeout=ANSWER_TIMEOUT)
        except (w.PgWireError, OSError) as exc:
            findings.problem(f"hostile {me}: login failed: {exc!r}")
            return
        try:
            for _ in range(rng.randrange(1, 6)):
                op += 1
                marker = f"h{me}-{op}"
                kind, plan = mutate(rng, valid_stream(rng, marker))
                probe = f"h{me}-{op}-probe"
                last = probe_query(probe)
                context = f"seed {seed} hostile {me} op {op} {kind}"
                start = len(conn.received)
                sent = b""
                dropped = False
                try:
                    for step in plan:
                        if step.kind == "send":
                            conn.send_raw(step.data)
                            sent += step.data
                        elif step.kind == "sleep":
                            time.sleep(step.seconds)
                        else:
                            dropped = True
                    if not dropped:
                        conn.send_raw(probe_stream(probe))
                        sent += probe_stream(probe)
                except OSError:
                    outcome = "closed"
                else:
                    if dropped:
                        outcome = "dropped"
                    else:
                        # Where PostgreSQL would wait for the rest of a message or
                        # never read the probe, a short wait shows whether the pooler
                        # refused the stream instead.
                        shape = framing(sent, last)
                        wait = ANSWER_TIMEOUT if shape in ("complete", "invalid") else 1.0
                        outcome = _read_reply(conn, probe, time.monotonic() + wait)
                with findings.lock:
                    findings.ops[kind] += 1
                    findings.outcomes[f"{kind}:{outcome}"] += 1
                got = w.msg_types(conn.received[start:])
                shape = framing(sent, last)
                if outcome == "timeout" and shape in ("complete", "invalid"):
                    findings.problem(
                        f"{context}: no answer in {ANSWER_TIMEOUT}s to a stream PostgreSQL "
                        f"reads as {shape}; got {got!r}; sent {sent!r}; plan "
                        f"{[(st.kind, len(st.data), st.seconds) for st in plan]}; "
                        f"{diagnose(conn.sock.getsockname()[1]) if diagnose else ''}"
                    )
                if outcome == "garbled":
                    findings.problem(f"{context}: unreadable reply; sent {sent!r}")
                check_received(conn, me, context, findings)
                if outcome != "ready":
                    break
        finally:
            if rng.random() < 0.5:
                conn.close()
            else:
                conn.close_socket()


# --- honest clients ----------------------------------------------------------------------


async def honest_asyncpg(dsn: str, me: int, deadline: float, findings: Findings) -> None:
    rng = random.Random(me)
    table = f"fuzz_honest_{me}"
    conn = await asyncpg.connect(dsn)
    try:
        inserted = 0
        while time.monotonic() < deadline:
            n = rng.randrange(1_000_000)
            assert await conn.fetchval("select $1::int + 1", n) == n + 1
            async with conn.transaction():
                await conn.execute(f"insert into {table} values ($1)", n)
                inserted += 1
                assert await conn.fetchval(f"select count(*) from {table}") == inserted
            stmt = await conn.prepare("select $1::text || '-honest'")
            assert await stmt.fetchval(f"a{me}") == f"a{me}-honest"
            findings.honest_ops["asyncpg"] += 1
    finally:
        await conn.close()


async def honest_psycopg(dsn: str, me: int, deadline: float, findings: Findings) -> None:
    rng = random.Random(me)
    table = f"fuzz_honest_{me}"
    # Every statement prepared on the server at its first run.
    prepare = 0 if me % 4 == 1 else None
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, prepare_threshold=prepare
    ) as conn:
        inserted = 0
        while time.monotonic() < deadline:
            n = rng.randrange(1_000_000)
            cur = await conn.execute("select %s::int + 1", (n,))
            assert await cur.fetchone() == (n + 1,)
            async with conn.transaction():
                await conn.execute(f"insert into {table} values (%s)", (n,))
                inserted += 1
                cur = await conn.execute(f"select count(*) from {table}")
                assert await cur.fetchone() == (inserted,)
            async with conn.cursor() as cur:
                await cur.executemany("select %s::int", [(i,) for i in range(3)])
            findings.honest_ops["psycopg"] += 1


# --- the run -----------------------------------------------------------------------------


def prepare_tables(pg: ExamplePostgres) -> None:
    tables = [f"fuzz_honest_{i}" for i in range(HONEST_CLIENTS)]
    sql = f'SET ROLE "{OWNER_ROLE}";\n'
    for table in tables:
        sql += f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int);\n"
    sql += f"DROP TABLE IF EXISTS {HOSTILE_TABLE}; CREATE TABLE {HOSTILE_TABLE} (n int, m text);\n"
    pg.psql(sql, database=EXAMPLE_DB)


def fuzz_pooler(pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str) -> PoolerProcess:
    user = pg.md5_user
    size = 2 if pool_mode == "transaction" else HOSTILE_CLIENTS + HONEST_CLIENTS + 2
    return pooler(
        general={"server_prepared_statements_cache_size": 5, "query_wait_timeout": 60_000},
        pools={
            EXAMPLE_DB: {
                "application_name": APPLICATION,
                "pool_mode": pool_mode,
                "users": [{"username": user.name, "pool_size": size}],
            }
        },
    )


def run_fuzz(
    host: str,
    port: int,
    pg: ExamplePostgres,
    seed: int,
    honest: bool,
    diagnose: Callable[[int], str] | None = None,
) -> Findings:
    user = pg.md5_user
    findings = Findings(seed)
    deadline = time.monotonic() + DURATION
    rng = random.Random(seed)
    dsn = make_dsn(host, port, user.name, user.password, EXAMPLE_DB)

    async def main() -> None:
        honest_tasks: list[Coroutine[Any, Any, None]] = []
        if honest:
            for i in range(HONEST_CLIENTS):
                run = honest_asyncpg if i % 2 == 0 else honest_psycopg
                honest_tasks.append(run(dsn, i, deadline, findings))
        hostile_tasks = [
            asyncio.to_thread(
                hostile,
                host,
                port,
                user.name,
                user.password,
                me,
                rng.randrange(1 << 30),
                deadline,
                findings,
                diagnose,
            )
            for me in range(HOSTILE_CLIENTS)
        ]
        await asyncio.gather(*honest_tasks, *hostile_tasks)

    asyncio.run(main())
    return findings


def pool_numbers(proc: PoolerProcess, user: str) -> dict[str, int]:
    (pool,) = [
        r for r in admin_rows(proc, "POOLS") if r["database"] == EXAMPLE_DB and r["user"] == user
    ]
    numbers = {
        k: int(pool[k] or 0)
        for k in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")
    }
    numbers["servers"] = sum(
        1
        for r in admin_rows(proc, "SERVERS")
        if r["database_name"] == EXAMPLE_DB and r["user"] == user
    )
    return numbers


def backend_states(pg: ExamplePostgres, user: str) -> list[str]:
    """The state of each backend the pooler holds for `user` (no one else logs in as it)."""
    out = pg.psql(
        "select state from pg_stat_activity where backend_type = 'client backend' "
        f"and usename = '{user}' and datname = '{EXAMPLE_DB}'"
    )
    return out.splitlines()


def assert_settled(proc: PoolerProcess, pg: ExamplePostgres, context: str) -> None:
    user = pg.md5_user
    deadline = time.monotonic() + 10
    while True:
        numbers = pool_numbers(proc, user.name)
        states = backend_states(pg, user.name)
        settled = (
            numbers["cl_active"] == numbers["cl_waiting"] == numbers["sv_active"] == 0
            and numbers["sv_login"] == 0
            and numbers["servers"] == numbers["sv_idle"] + numbers["sv_used"] == len(states)
            and all(s == "idle" for s in states)
        )
        if settled:
            break
        assert time.monotonic() < deadline, f"{context}: pool {numbers}, backends {states}"
        time.sleep(0.2)
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)
        assert conn.execute("select count(*) from items").fetchone() == (100,)
    assert proc.running
    log = proc.log_text()
    for marker in ("Traceback", "internal error", "unexpected error"):
        assert marker not in log, (
            f"{context}: {marker!r} in the log:\n{log[log.index(marker) - 2000 :][:5000]}"
        )


def report(findings: Findings) -> str:
    return (
        f"seed {findings.seed}: hostile ops {dict(findings.ops)}, honest rounds "
        f"{dict(findings.honest_ops)}, outcomes {dict(sorted(findings.outcomes.items()))}"
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_hostile_clients_hurt_no_one(
    pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str, seed: int
) -> None:
    prepare_tables(pg)
    proc = fuzz_pooler(pg, pooler, pool_mode)

    def diagnose(client_port: int) -> str:
        clients = [r for r in admin_rows(proc, "CLIENTS") if r["port"] == str(client_port)]
        return f"client {clients}, servers {admin_rows(proc, 'SERVERS')}"

    findings = run_fuzz(proc.host, proc.port, pg, seed, honest=True, diagnose=diagnose)
    context = report(findings)
    print(context)
    assert not findings.problems, "\n".join(findings.problems[:20]) + "\n" + context
    assert sum(findings.ops.values()) > 20 and sum(findings.honest_ops.values()) > 4, context
    assert_settled(proc, pg, context)


def test_the_oracle_holds_for_postgresql(pg: ExamplePostgres) -> None:
    """The hostile clients' checks, against PostgreSQL itself: what they demand of the
    pooler, PostgreSQL does."""
    prepare_tables(pg)
    findings = run_fuzz(pg.host, pg.port, pg, 7, honest=False)
    print(report(findings))
    assert not findings.problems, "\n".join(findings.problems[:20]) + "\n" + report(findings)


# --- defects the hostile clients found -------------------------------------------------


def one_server(pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str) -> PoolerProcess:
    return pooler(
        pools={
            EXAMPLE_DB: {
                "pool_mode": pool_mode,
                "users": [{"username": pg.md5_user.name, "pool_size": 1}],
            }
        }
    )


def login(proc: PoolerProcess, pg: ExamplePostgres) -> w.PgWire:
    user = pg.md5_user
    return w.PgWire.connect(proc.host, proc.port, user.name, EXAMPLE_DB, user.password, timeout=5)


@pytest.mark.parametrize(
    "message",
    [
        w.message(b"S", b"\x00" * 20_000),
        w.message(b"H", b"\x00" * 20_000),
        w.execute() + b"\x00" * 20_000,
    ],
    ids=["sync", "flush", "execute"],
)
@pytest.mark.parametrize("in_batch", [False, True], ids=["alone", "in-a-batch"])
def test_a_small_message_with_a_huge_length_is_refused_at_once(
    pg: ExamplePostgres, pooler: PoolerFactory, message: bytes, in_batch: bool
) -> None:
    """PostgreSQL refuses a Sync, Flush, Execute, ... whose length word exceeds 10000
    bytes as soon as it reads the word; the pooler does too, rather than wait for the
    bytes (holding its server) while the client waits for an answer."""
    proc = one_server(pg, pooler, "transaction")
    conn = login(proc, pg)
    batch = w.parse("", "select 1") + w.bind("", "") + w.execute() if in_batch else b""
    header = message[:1] + struct.pack("!i", len(message) - 1)
    conn.send_raw(batch + header + message[5:100])  # the rest is never sent
    error = w.first_error(conn.wait_closed())
    assert error is not None and error.sqlstate == "08P01", conn.received
    # Its server serves the next client.
    other = login(proc, pg)
    assert other.execute_query("select 42") == [("42",)]
    other.close()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_an_invalid_message_type_is_refused_before_its_length_arrives(
    pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str
) -> None:
    """A byte that starts no frontend message is refused as PostgreSQL refuses it:
    at once, not once four more bytes came (a client that sends no more would wait
    for good)."""
    proc = one_server(pg, pooler, pool_mode)
    for before in (b"", w.parse("", "select 1") + w.bind("", "") + w.execute()):
        conn = login(proc, pg)
        conn.send_raw(before + b"e'\x00")
        error = w.first_error(conn.wait_closed())
        assert error is not None and error.sqlstate == "08P01", conn.received
    other = login(proc, pg)
    assert other.execute_query("select 42") == [("42",)]
    other.close()


def test_a_sync_after_copy_data_sent_without_waiting_is_answered(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    """A client sends an extended-protocol COPY FROM STDIN with its data and CopyDone
    in one write, and its Sync and next query after the server said the COPY began:
    every one of them is answered, and the server is not given back before."""
    prepare_tables(pg)
    proc = one_server(pg, pooler, "transaction")
    conn = login(proc, pg)
    conn.send_raw(
        w.parse("", f"copy {HOSTILE_TABLE} from stdin")
        + w.bind("", "")
        + w.execute()
        + w.copy_data(b"1\tpipelined\n")
        + w.copy_done()
    )
    assert w.msg_types(conn.read_until(b"G")) == "12G"
    # The query's answer comes a while after the Sync's, in a read of its own.
    conn.send_raw(w.sync() + w.query("select pg_sleep(0.5), 'after the copy'"))
    first = conn.read_until_ready()
    assert w.msg_types(first) == "CZ" and first[0][1] == b"COPY 1\x00", first
    assert w.rows(conn.read_until_ready()) == [("", "after the copy")]
    assert conn.execute_query(f"select m from {HOSTILE_TABLE}") == [("pipelined",)]
    conn.close()
    other = login(proc, pg)
    assert other.execute_query("select 42") == [("42",)]
    other.close()
