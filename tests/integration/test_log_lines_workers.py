"""The connection and disconnection lines of a pooler with two workers, in the text and
the JSON format: each line whole and in its format, stamped with the time it was
written, the worker's tag or field and its process id, and gone while `SET log_level`
says warn, back after."""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Callable

import psycopg

from helpers import EXAMPLE_DB, ExamplePostgres, UserSpec
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import show_table
from helpers.pooler import PoolerFactory, PoolerProcess

WORKERS = 2
TEXT_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(?P<ms>\d{3}) INFO    \[w(?P<worker>[01])\] "
    r"pg_doorman\.client: client #c\d+ (?:connected \((?P<in>[\w.]+)@"
    + EXAMPLE_DB
    + r"\) from 127\.0\.0\.1|disconnected \((?P<out>[\w.]+)@"
    + EXAMPLE_DB
    + r"\) after \d+\.\ds)"
)
JSON_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3}Z")


def _start(pooler: PoolerFactory, *args: str) -> PoolerProcess:
    proc = pooler(general={"workers": WORKERS}, args=("-l", "info", *args))
    proc.wait_for_log(f"all {WORKERS} workers ready", timeout=30)
    return proc


def _visit(proc: PoolerProcess, user: UserSpec) -> tuple[float, float]:
    """A client's whole connection; when it began and when its last line was written."""
    begun = time.time()
    with psycopg.connect(proc.dsn(user.name, user.password), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    return begun, time.time()


def _three_clients(
    proc: PoolerProcess, pg: ExamplePostgres, logged: Callable[[str], int]
) -> tuple[float, float]:
    """md5 user at info, scram user at warn, trust user at info again; the md5 user's
    connection's time span."""
    span = _visit(proc, pg.md5_user)
    deadline = time.monotonic() + 10
    while logged(pg.md5_user.name) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    console = admin(proc)
    try:
        assert w.first_error(console.simple_query("SET log_level = 'warn'")) is None
        _visit(proc, pg.scram_user)
        # Its disconnection is handled after it got its last answer, maybe after the next
        # SET: only once the pooler lists it no more was its line dropped at warn.
        deadline = time.monotonic() + 10
        while any(r["user"] == pg.scram_user.name for r in show_table(console, "CLIENTS")):
            assert time.monotonic() < deadline, "the scram user's client is still listed"
            time.sleep(0.05)
        assert w.first_error(console.simple_query("SET log_level = 'info'")) is None
        _visit(proc, pg.trust_user)
    finally:
        console.close()
    deadline = time.monotonic() + 10
    while logged(pg.trust_user.name) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return span[0], time.time()


def _is_worker(proc: PoolerProcess, pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        parent = next(line for line in status if line.startswith("PPid:"))
    return pid != proc.pid and int(parent.split()[1]) == proc.pid


def test_text_lines_of_two_workers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = _start(pooler)

    def client_lines() -> list[str]:
        # The pooled database's clients (the admin console's own client is logged too).
        return [
            line
            for line in proc.log_text().splitlines()
            if "pg_doorman.client:" in line and f"@{EXAMPLE_DB})" in line
        ]

    def logged(user: str) -> int:
        return sum(f"({user}@" in line for line in client_lines())

    begun, ended = _three_clients(proc, pg, logged)
    users: list[str] = []
    stamps: list[float] = []
    for line in client_lines():
        match = TEXT_LINE.fullmatch(line)
        assert match is not None, line
        users.append(match["in"] or match["out"])
        stamps.append(time.mktime(time.strptime(match["time"], "%Y-%m-%d %H:%M:%S")))
    md5, trust = pg.md5_user.name, pg.trust_user.name
    assert users == [md5, md5, trust, trust]
    assert int(begun) <= stamps[0] <= stamps[1] <= ended


def test_json_lines_of_two_workers(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = _start(pooler, "-F", "structured")

    def client_entries() -> list[dict[str, object]]:
        entries = []
        for line in proc.log_text().splitlines():
            if '"logger": "pg_doorman.client"' in line and f"@{EXAMPLE_DB})" in line:
                entries.append(json.loads(line))
        return entries

    def logged(user: str) -> int:
        return sum(f"({user}@" in str(entry["message"]) for entry in client_entries())

    begun, ended = _three_clients(proc, pg, logged)
    entries = client_entries()
    assert [str(entry["message"]).split(" ")[2] for entry in entries] == [
        "connected",
        "disconnected",
        "connected",
        "disconnected",
    ]
    for entry in entries:
        assert list(entry) == ["timestamp", "level", "logger", "message", "pid", "worker"]
        assert entry["level"] == "INFO" and entry["worker"] in (0, 1)
        pid = entry["pid"]
        assert isinstance(pid, int) and _is_worker(proc, pid)
        match = JSON_TIME.fullmatch(str(entry["timestamp"]))
        assert match is not None, entry
        second = calendar.timegm(time.strptime(match[1], "%Y-%m-%dT%H:%M:%S"))
        assert int(begun) <= second <= ended
    assert pg.scram_user.name not in " ".join(str(entry["message"]) for entry in entries)
