"""The admin console's input edges: comments, a Terminate right after a query, NUL
bytes, very long commands, and secrets in URLs kept out of SHOW CONFIG."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import ExamplePostgres
from helpers import pgwire as w
from helpers.console import admin_console as admin
from helpers.console import show_table
from helpers.pooler import PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import find_pg_bin


def tags(got: list[w.Message]) -> list[str]:
    return [w.command_tag(p) for t, p in got if t == b"C"]


def test_comments_are_skipped_as_postgresql_skips_them(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        for text in (
            "-- what runs\nSHOW VERSION",
            "/* a block */ SHOW VERSION /* another */",
            "SHOW VERSION -- trailing",
            "SHOW /* inside */ VERSION",
            "/* nested /* twice */ still a comment */ SHOW VERSION",
            "-- it's not a quote\nSHOW VERSION",
        ):
            got = console.simple_query(text)
            assert w.first_error(got) is None, text
            assert w.rows(got)[0][0].startswith("pg_doorman "), text  # type: ignore[union-attr]
        # A `;` inside a comment separates nothing; a comment-only query is empty.
        got = console.simple_query("/* ; */ SHOW VERSION; -- ; SHOW USERS")
        assert tags(got) == ["SHOW"] and w.first_error(got) is None
        got = console.simple_query("-- nothing else")
        assert w.msg_types(got) == "IZ"
        # Inside quotes `--` is text.
        got = console.simple_query("SET application_name = '-- not a comment'; SHOW VERSION")
        assert tags(got) == ["SET", "SHOW"]
    finally:
        console.close()


def psql_file(proc: PoolerProcess, script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_pg_bin() / "psql"), "-X", "-A", "-v", "ON_ERROR_STOP=1", "-h", proc.host,
         "-p", str(proc.port), "-U", "admin", "-d", "pgdoorman", "-f", str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": "admin"},
        timeout=30,
    )  # fmt: skip


def test_psql_script_with_comments_runs(
    pg: ExamplePostgres, pooler: PoolerFactory, tmp_path: Path
) -> None:
    proc = pooler()
    script = tmp_path / "check.sql"
    script.write_text("SHOW VERSION; -- which build\nSHOW USERS /* the pools */;\n")
    result = psql_file(proc, script)
    assert result.returncode == 0, result.stderr
    assert "pg_doorman " in result.stdout and pg.md5_user.name in result.stdout


def test_query_sent_with_terminate_is_answered_first(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        console.send_raw(w.query("SHOW VERSION") + w.terminate() + w.query("SHOW USERS"))
        got = console.wait_closed()
    finally:
        console.close_socket()
    # The query before the Terminate gets its answer; nothing after it runs.
    assert w.msg_types(got) == "TDCZ"


def test_nul_inside_a_query_is_a_protocol_error(pg: ExamplePostgres, pooler: PoolerFactory) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        console.send_raw(w.message(b"Q", b"SHOW\x00 VERSION\x00"))
        got = console.read_until_ready()
        error = w.first_error(got)
        # As PostgreSQL: ERROR 08P01, the session goes on.
        assert error is not None and error.sqlstate == "08P01" and error.severity == "ERROR"
        assert "\x00" not in error.message and set(w.error_fields(got[0][1])) <= set("SVCMDH")
        assert show_table(console, "VERSION")
    finally:
        console.close()


def test_a_very_long_command_is_not_echoed_whole(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler()
    console = admin(proc)
    try:
        text = "FROBNICATE " + "x" * 100_000
        error = w.first_error(console.simple_query(text))
        assert error is not None and error.sqlstate == "42601"
        assert error.message.startswith("unsupported admin command: FROBNICATE xxx")
        assert len(error.message) < 1_000
        assert show_table(console, "VERSION")
    finally:
        console.close()
    assert "x" * 1_000 not in proc.log_text()


def test_show_config_hides_passwords_in_patroni_urls(
    pg: ExamplePostgres, pooler: PoolerFactory
) -> None:
    proc = pooler(
        general={"patroni_api_urls": ["http://patroni:g3n-s3cret@127.0.0.1:1/"]},
        pools={"example_db": {"patroni_api_urls": ["https://ops:p00l%3As3cret@127.0.0.1:2"]}},
    )
    console = admin(proc)
    try:
        rows = {r["key"]: r["value"] for r in show_table(console, "CONFIG")}
    finally:
        console.close()
    assert rows["general.patroni_api_urls"] == '["http://patroni:********@127.0.0.1:1/"]'
    assert rows["pools.example_db.patroni_api_urls"] == '["https://ops:********@127.0.0.1:2"]'
    assert not [key for key, value in rows.items() if value and "s3cret" in value]
