"""`pg_doorman generate` against the real PostgreSQL, and the PgDoorman command-line
flags the pooler accepts (-n, -F debug, LOG_FORMAT, -l INFO) or refuses clearly."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import EXAMPLE_DB, EXAMPLE_PASSWORD, ExamplePostgres
from helpers.pooler import SRC_DIR, PoolerFactory, PoolerProcess
from pg_doorman.app.embedded_pg import free_port, quote_ident
from pg_doorman.auth.scram import make_scram_verifier

GEN_SUPERUSER = "gen_superuser"
GEN_PASSWORD = "gen-secret-Ω"
# A database whose name needs quoting in TOML and YAML alike.
ODD_DB = 'gen "odd" db ü'


def run_pg_doorman(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pg_doorman", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture
def gen_superuser(pg: ExamplePostgres) -> Iterator[str]:
    """A superuser that logs in with a SCRAM password, and an oddly named database."""
    pg.create_role(GEN_SUPERUSER, password=make_scram_verifier(GEN_PASSWORD), superuser=True)
    pg.create_database(ODD_DB)
    try:
        yield GEN_SUPERUSER
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {quote_ident(ODD_DB)};\n")
        pg.psql(f"DROP ROLE IF EXISTS {quote_ident(GEN_SUPERUSER)};\n")


def generate(pg: ExamplePostgres, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_pg_doorman(
        "generate",
        "--host",
        pg.host,
        "-p",
        str(pg.port),
        "-u",
        GEN_SUPERUSER,
        "-d",
        "postgres",
        *extra,
        env={"PGPASSWORD": GEN_PASSWORD},
        cwd=cwd,
    )


def stored_passwords(pg: ExamplePostgres) -> dict[str, str]:
    out = pg.psql("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL")
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def serve_generated(path: Path, workdir: Path, args: tuple[str, ...]) -> PoolerProcess:
    """A pooler started from the generated file, unchanged but for its listen port."""
    text = path.read_text(encoding="utf-8")
    port = free_port()
    if path.suffix == ".toml":
        text, count = re.subn(r"(?m)^port = 6432$", f"port = {port}", text)
        config: dict[str, Any] = tomllib.loads(text)
    else:
        text, count = re.subn(r"(?m)^  port: 6432$", f"  port: {port}", text)
        config = yaml.safe_load(text)
    assert count == 1
    config["general"]["host"] = "127.0.0.1"  # where the tests connect; it listens on all
    proc = PoolerProcess(config, workdir, args=args, config_name=path.name)
    proc.config_path.write_text(text, encoding="utf-8")
    return proc.start()


def query_items(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM items").fetchone()
    assert row is not None
    return int(row[0])


def test_generated_toml_serves_md5_and_scram_users(
    pg: ExamplePostgres, gen_superuser: str, tmp_path: Path
) -> None:
    out = tmp_path / "generated.toml"
    result = generate(pg, "-o", str(out), "--pool-size", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    # It holds password hashes: private from the start, and never on stderr.
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    stored = stored_passwords(pg)
    for secret in (GEN_PASSWORD, *stored.values()):
        assert secret not in result.stderr
    assert "example_user_trust" in result.stderr  # left out: no password

    checked = run_pg_doorman("-t", str(out))
    assert checked.returncode == 0, checked.stderr

    text = out.read_text(encoding="utf-8")
    assert text.startswith("# pg_doorman configuration generated")
    config = tomllib.loads(text)
    assert {EXAMPLE_DB, "postgres", ODD_DB} <= set(config["pools"])
    assert not {"template0", "template1"} & set(config["pools"])
    pool = config["pools"][EXAMPLE_DB]
    assert (pool["server_host"], pool["server_port"]) == (pg.host, pg.port)
    assert pool["pool_mode"] == "transaction"
    users = {u["username"]: u for u in pool["users"]}
    # Login roles with a password, with exactly what PostgreSQL stores; no NOLOGIN owner,
    # no passwordless trust user.
    assert set(users) == {"example_user_md5", "example_user_scram", GEN_SUPERUSER}
    for name, user in users.items():
        assert user["password"] == stored[name]
        assert user["pool_size"] == 7
    assert config["pools"][ODD_DB]["users"] == pool["users"]

    proc = serve_generated(out, tmp_path / "pooler", ("-n", "-F", "debug", "-l", "INFO"))
    try:
        assert query_items(proc.dsn(pg.md5_user.name, EXAMPLE_PASSWORD)) == 100
        assert query_items(proc.dsn(pg.scram_user.name, EXAMPLE_PASSWORD)) == 100
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            query_items(proc.dsn(pg.scram_user.name, "wrong"))
    finally:
        proc.stop()
    assert proc.problems() == []


def test_generated_yaml_loads_and_serves_in_session_mode(
    pg: ExamplePostgres, gen_superuser: str, tmp_path: Path
) -> None:
    out = tmp_path / "generated.yml"  # the format comes from the extension
    result = generate(pg, "-o", str(out), "-s", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    checked = run_pg_doorman("-t", str(out))
    assert checked.returncode == 0, checked.stderr
    config = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert config["pools"][ODD_DB]["pool_mode"] == "session"
    assert config["pools"][EXAMPLE_DB]["pool_mode"] == "session"

    proc = serve_generated(out, tmp_path / "pooler", ("-l", "debug"))
    try:
        assert query_items(proc.dsn(pg.scram_user.name, EXAMPLE_PASSWORD)) == 100
    finally:
        proc.stop()
    assert proc.problems() == []


def test_format_flag_to_stdout_without_comments(
    pg: ExamplePostgres, gen_superuser: str, tmp_path: Path
) -> None:
    as_yaml = generate(
        pg, "-f", "yaml", "--no-comments", "--server-host", "db.internal", cwd=tmp_path
    )
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert "#" not in as_yaml.stdout
    config = yaml.safe_load(as_yaml.stdout)
    assert config["pools"][EXAMPLE_DB]["server_host"] == "db.internal"
    assert ODD_DB in config["pools"]

    # -f wins over the extension; the file is TOML although named .yaml.
    out = tmp_path / "named.yaml"
    as_toml = generate(pg, "-f", "toml", "-o", str(out), cwd=tmp_path)
    assert as_toml.returncode == 0, as_toml.stderr
    assert tomllib.loads(out.read_text(encoding="utf-8"))["pools"][ODD_DB]["users"]


def test_output_file_is_private_even_if_it_existed(
    pg: ExamplePostgres, gen_superuser: str, tmp_path: Path
) -> None:
    out = tmp_path / "existing.toml"
    out.write_text("previous content\n")
    out.chmod(0o644)
    result = generate(pg, "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text(encoding="utf-8").startswith("# pg_doorman configuration")
    assert [p.name for p in tmp_path.iterdir()] == ["existing.toml"]  # no temporary left


def test_non_superuser_gets_a_clear_error(pg: ExamplePostgres, tmp_path: Path) -> None:
    out = tmp_path / "never.toml"
    result = run_pg_doorman(
        "generate",
        "--host",
        pg.host,
        "--port",
        str(pg.port),
        "--user",
        pg.md5_user.name,  # logs in with md5
        "--database",
        EXAMPLE_DB,
        "-o",
        str(out),
        env={"PGPASSWORD": EXAMPLE_PASSWORD},
    )
    assert result.returncode == 1
    assert "pg_shadow" in result.stderr and "superuser" in result.stderr, result.stderr
    assert f'"{pg.md5_user.name}"' in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_wrong_password_and_unreachable_server(pg: ExamplePostgres, tmp_path: Path) -> None:
    wrong = run_pg_doorman(
        "generate",
        env={
            "PGHOST": pg.host,
            "PGPORT": str(pg.port),
            "PGUSER": pg.scram_user.name,
            "PGPASSWORD": "wrong-password",
            "PGDATABASE": EXAMPLE_DB,
        },
    )
    assert wrong.returncode == 1
    assert "password authentication failed" in wrong.stderr
    assert "wrong-password" not in wrong.stderr

    nobody = run_pg_doorman("generate", "--host", "127.0.0.1", "-p", str(free_port()))
    assert nobody.returncode == 1
    assert "cannot log in to PostgreSQL at 127.0.0.1" in nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_unix_socket_and_trust(pg: ExamplePostgres, tmp_path: Path) -> None:
    """The superuser logs in over the Unix socket without a password (trust)."""
    out = tmp_path / "socket.toml"
    result = run_pg_doorman(
        "generate",
        "--host",
        str(pg.socket_dir),
        "-p",
        str(pg.port),
        "-u",
        pg.superuser,
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(out.read_text())["pools"][EXAMPLE_DB]["server_host"] == str(pg.socket_dir)
    assert run_pg_doorman("-t", str(out)).returncode == 0


def test_russian_comments_are_refused() -> None:
    result = run_pg_doorman("generate", "--ru")
    assert result.returncode == 2
    assert "--ru is not supported" in result.stderr


def _serve_one_client(proc: PoolerProcess, pg: ExamplePostgres) -> list[str]:
    """Log in once through `proc`, stop it; its log lines."""
    user = pg.md5_user
    with psycopg.connect(proc.dsn(user.name, user.password)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    proc.stop()
    return [line for line in proc.log_text().splitlines() if line]


def test_pgdoorman_logging_flags_and_variables(pooler: PoolerFactory, pg: ExamplePostgres) -> None:
    # -n and NO_COLOR change nothing; -F debug is text; -l 1 is tracing's ERROR.
    quiet = pooler(args=("-n", "-F", "DEBUG", "-l", "1"), env={"NO_COLOR": "1"})
    assert not any("connected" in line for line in _serve_one_client(quiet, pg))

    # PgDoorman's variables are the defaults of -F and -l.
    structured = pooler(args=(), env={"LOG_FORMAT": "structured"})
    entries = [json.loads(line) for line in _serve_one_client(structured, pg)]
    assert any("connected" in entry["message"] for entry in entries)
    assert {entry["level"] for entry in entries} <= {"INFO", "WARNING", "ERROR"}

    by_variable = pooler(args=(), env={"LOG_LEVEL": "Error"})
    assert not any("connected" in line for line in _serve_one_client(by_variable, pg))
    verbose = pooler(args=("-l", "INFO"), env={"LOG_LEVEL": "error"})  # -l wins
    assert any("connected" in line for line in _serve_one_client(verbose, pg))


def test_bad_log_format_variable_is_refused(tmp_path: Path) -> None:
    result = run_pg_doorman("-t", str(tmp_path / "x.toml"), env={"LOG_FORMAT": "fancy"})
    assert result.returncode == 2
    assert "LOG_FORMAT" in result.stderr


def test_inherit_fd_and_generate_docs_are_refused() -> None:
    inherit = run_pg_doorman("pg_doorman.toml", "--inherit-fd", "3")
    assert inherit.returncode == 2
    assert "--inherit-fd" in inherit.stderr and "Binary upgrade" in inherit.stderr
    docs = run_pg_doorman("generate-docs")
    assert docs.returncode == 2
    assert "generate-docs" in docs.stderr and "not supported" in docs.stderr
