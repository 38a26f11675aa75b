"""The compiled build answers every client exactly as the pure-Python sources do.

Both run the same code, but mypyc's semantics differ from the interpreter's in corners
mypy does not check (tests/unit/test_compiled_rules.py), and those corners sit mostly
on error paths the other tests reach rarely. Here seeded programs, a startup packet
(often malformed) and then messages, valid or not, go to a compiled and a pure-Python
pooler side by side on one PostgreSQL, in transaction and in session mode; the bytes
each answers must be the same, once what is random (BackendKeyData, MD5 salts) and
client ids are masked. `PG_DOORMAN_TEST_SEEDS` multiplies the programs
(tests/helpers/seeds.py).
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time

import pytest

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.implementation import expect_compiled
from helpers.pooler import PoolerFactory
from helpers.seeds import seeds

pytestmark = pytest.mark.skipif(
    not expect_compiled(), reason="needs the compiled build; runs once, with the compiled test run"
)

PROGRAMS = 600
STEP_TIMEOUT = 2.0

PARAMETERS = ["application_name", "client_encoding", "DateStyle", "TimeZone", "search_path"]
VALUES = ["x", "UTF8", "LATIN1", "ISO, DMY", "UTC", "public,pg_catalog", "", "no such"]
QUERIES = [
    "select 1",
    "select 1/0",
    "show application_name",
    "show client_encoding",
    "show DateStyle",
    "begin",
    "commit",
    "set search_path to x",
    "prepare p as select $1::int",
    "execute p(1)",
    "deallocate all",
    "select pg_catalog.set_config('work_mem', '64kB', false)",
]


def _startup(rng: random.Random, user: str) -> bytes:
    """A startup packet: a login as `user` with random parameters, or a malformed one
    (never one whose length promises bytes that are not sent: that only waits)."""
    params = {"user": user, "database": "example_db"}
    for _ in range(rng.randint(0, 3)):
        params[rng.choice(PARAMETERS)] = rng.choice(VALUES)
    if rng.random() < 0.1:
        params["options"] = rng.choice(["-c search_path=public", "-c bogus", "--x=1", "-c a\\ b=c"])
    packet = w.startup_message(params)
    kind = rng.random()
    if kind < 0.06:
        return struct.pack("!i", rng.choice([0, 4, 7, 10_001, -5])) + packet[4:12]
    if kind < 0.12:  # an unknown protocol version, or a minor one to negotiate
        version = rng.choice([0x00020000, 0x00040000, 0x00030001, 0x00030002])
        return packet[:4] + struct.pack("!I", version) + packet[8:]
    if kind < 0.18:  # no user, or no terminator
        if rng.random() < 0.5:
            return w.startup_message({"database": "example_db"})
        return struct.pack("!i", len(packet) - 1) + packet[4:-1]
    if kind < 0.22:  # not valid UTF-8
        body = packet[8:].replace(b"example_db", b"ex\xffmple_db")
        return struct.pack("!i", len(body) + 8) + packet[4:8] + body
    return packet


def _message(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return w.query(rng.choice(QUERIES))
    if kind < 0.7:
        name = rng.choice(["", "s1", "s2"])
        sql = rng.choice(["select $1::int", "select 1", "bad sql", "select $1::int, $2::text"])
        batch = w.parse(name, sql)
        if rng.random() < 0.8:
            params = [rng.choice([b"1", b"x", None]) for _ in range(rng.randint(0, 2))]
            batch += w.bind("", rng.choice([name, "s1", "zz"]), params)
            batch += w.describe("P") + w.execute()
        return batch + w.sync()
    if kind < 0.8:
        return w.describe(rng.choice("SP"), rng.choice(["", "s1", "zz"])) + w.sync()
    if kind < 0.9:
        return w.close(rng.choice("SP"), rng.choice(["", "s1", "zz"])) + w.sync()
    # Broken framing: a type no client sends, or an impossible length.
    length = rng.choice([0, 3, -1, 0x7FFF_FFFF])
    return bytes([rng.choice(b"QPBZT\x00\xff")]) + struct.pack("!i", length) + b"xx"


def program(seed: int, user: str) -> tuple[list[bytes], bool]:
    """The steps, and whether a password request is answered (if not, the next step
    arrives where the password should)."""
    rng = random.Random(seed)
    steps = [_startup(rng, user)] + [_message(rng) for _ in range(rng.randint(0, 5))]
    return steps, rng.random() < 0.8


def _last_message(data: bytes) -> tuple[bytes, bytes] | None:
    """Type and body of the last whole message in `data` (None when one is cut off)."""
    pos, last = 0, None
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or pos + 1 + length > len(data):
            return None
        last = (data[pos : pos + 1], data[pos + 5 : pos + 1 + length])
        pos += 1 + length
    return last if pos == len(data) else None


def run(
    port: int, steps: list[bytes], answer_password: bool, user: str, password: str
) -> list[bytes]:
    """Each step's answer: up to its ReadyForQuery, or until the connection closes. A
    password request ends a step, or is answered (its random salt is masked when
    comparing)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as sock:
        for step in steps:
            try:
                sock.sendall(step)
            except OSError:
                answers.append(b"<not sent>")
                break
            data = b""
            deadline = time.monotonic() + STEP_TIMEOUT
            while True:
                last = _last_message(data)
                if last is not None and last[0] == b"Z":
                    break
                if last is not None and last[0] == b"R" and last[1][:4] == b"\0\0\0\x05":
                    if not answer_password:
                        break
                    answer_password = False  # once
                    salt = last[1][4:8]
                    sock.sendall(w.password_message(w.md5_response(password, user, salt)))
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    chunk, data = b"", data + b"<no answer>"
                except OSError:
                    chunk = b""
                if not chunk:
                    data += b"<closed>"
                    break
                data += chunk
            answers.append(data)
            if data.endswith((b"<closed>", b"<no answer>")):
                break
    return answers


_MASKS = [
    (re.compile(rb"K\x00\x00\x00\x0c.{8}", re.S), b"K<key>"),
    (re.compile(rb"R\x00\x00\x00\x0c\x00\x00\x00\x05.{4}", re.S), b"R<md5 salt>"),
    (re.compile(rb"#c\d+"), b"#c<id>"),
]


def masked(answers: list[bytes]) -> list[bytes]:
    out = []
    for answer in answers:
        for pattern, replacement in _MASKS:
            answer = pattern.sub(replacement, answer)
        out.append(answer)
    return out


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_the_compiled_and_the_pure_python_pooler_answer_alike(
    pg: ExamplePostgres, pooler: PoolerFactory, pool_mode: str
) -> None:
    pools = {"example_db": {"pool_mode": pool_mode}}
    compiled = pooler(pools=pools, env={"PG_DOORMAN_IMPL": "compiled"})
    interpreted = pooler(pools=pools, env={"PG_DOORMAN_IMPL": "python"})
    compiled.wait_for_log("compiled hot path")
    interpreted.wait_for_log("pure-Python hot path")
    users = [pg.trust_user, pg.md5_user]
    disagreements = []
    for seed in seeds(PROGRAMS):
        user = users[seed % 2]
        steps, answer = program(seed, user.name)
        ours = masked(run(compiled.port, steps, answer, user.name, user.password))
        theirs = masked(run(interpreted.port, steps, answer, user.name, user.password))
        if ours != theirs:
            disagreements.append(
                f"seed {seed}: {steps!r}\n compiled: {ours!r}\n python:   {theirs!r}"
            )
    assert not disagreements, "\n".join(disagreements[:5])
