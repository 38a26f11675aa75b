"""`pg_doorman generate --reference` as a command (no PostgreSQL asked; the file loads
as the defaults), and `generate` logging in with a password from libpq's password file."""

from __future__ import annotations

import socket
import stat
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from test_generate import run_pg_doorman

from helpers import ExamplePostgres
from pg_doorman.app.embedded_pg import free_port
from pg_doorman.app.reference_config import SAMPLE_POOL
from pg_doorman.auth.scram import make_scram_verifier
from pg_doorman.config import load_config
from pg_doorman.config.schema import GeneralConfig, TalosConfig, WebConfig

PGPASS_SUPERUSER = "pgpass_superuser"
PGPASS_PASSWORD = "pgpass-secret:with\\escapes"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that accepts TCP connections, to see whether anything connected."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def assert_nobody_connected(sock: socket.socket) -> None:
    # A client that connected is in the accept queue, even if it gave up since.
    with pytest.raises(BlockingIOError):
        sock.accept()[0].close()


def assert_loads_as_defaults(path: Path) -> None:
    checked = run_pg_doorman("-t", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "WARNING" not in checked.stderr, checked.stderr
    config = load_config(path)
    assert config.general == GeneralConfig()
    assert config.web == WebConfig()
    assert config.talos == TalosConfig()
    assert list(config.pools) == [SAMPLE_POOL]
    assert config.warnings == []


@pytest.mark.parametrize(
    ("name", "flags"), [("ref.toml", ()), ("ref.yml", ()), ("ref.yaml", ("-f", "YAML"))]
)
def test_reference_file_loads_as_the_defaults_without_postgres(
    tmp_path: Path, listener: socket.socket, name: str, flags: tuple[str, ...]
) -> None:
    port = str(listener.getsockname()[1])
    out = tmp_path / name
    result = run_pg_doorman(
        "generate", "--reference", "--host", "127.0.0.1", "-p", port, "-o", str(out), *flags
    )
    assert result.returncode == 0, result.stderr
    assert_nobody_connected(listener)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# pg_doorman reference configuration")
    # The format: from -f, else the extension.
    if name.endswith(".toml"):
        assert tomllib.loads(text)["general"]["port"] == 5432
    else:
        assert yaml.safe_load(text)["general"]["port"] == 5432
    assert_loads_as_defaults(out)


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_reference_to_stdout_without_comments(tmp_path: Path, fmt: str) -> None:
    # PGHOST points nowhere: it is not used.
    result = run_pg_doorman(
        "generate", "--reference", "--no-comments", "-f", fmt, env={"PGHOST": "/nonexistent"}
    )
    assert result.returncode == 0, result.stderr
    assert "#" not in result.stdout
    out = tmp_path / f"bare.{fmt}"
    out.write_text(result.stdout, encoding="utf-8")
    assert_loads_as_defaults(out)


def test_russian_comments_are_refused() -> None:
    result = run_pg_doorman("generate", "--reference", "--ru")
    assert result.returncode == 2
    assert "--ru is not supported: the comments are in English only" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------
# The password file


@pytest.fixture
def pgpass_superuser(pg: ExamplePostgres) -> Iterator[str]:
    """A superuser that logs in over TCP with a SCRAM password."""
    pg.create_role(PGPASS_SUPERUSER, password=make_scram_verifier(PGPASS_PASSWORD), superuser=True)
    try:
        yield PGPASS_SUPERUSER
    finally:
        pg.psql(f"DROP ROLE IF EXISTS {PGPASS_SUPERUSER};\n")


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


def write_password_file(path: Path, lines: list[str], mode: int = 0o600) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    path.chmod(mode)
    return path


def generate_with(
    pg: ExamplePostgres, env: Mapping[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_pg_doorman(
        "generate",
        "--host",
        pg.host,
        "-p",
        str(pg.port),
        "-u",
        PGPASS_SUPERUSER,
        "-d",
        "postgres",
        *extra,
        env=env,
    )


def _lines_for(pg: ExamplePostgres, password: str) -> list[str]:
    """A comment, lines for other hosts, ports and users, the matching line with
    `password`, and a catch-all line after it that must lose."""
    host, port = pg.host, pg.port
    return [
        f"# {host}:{port}:postgres:{PGPASS_SUPERUSER}:commented-out",
        f"other.example:{port}:*:{PGPASS_SUPERUSER}:other-host",
        f"{host}:{port + 1}:*:{PGPASS_SUPERUSER}:other-port",
        f"{host}:{port}:*:someone_else:other-user",
        f"{host}:{port}:*:{PGPASS_SUPERUSER}:{_escaped(password)}",
        "*:*:*:*:catch-all",
    ]


def test_password_from_pgpassfile(
    pg: ExamplePostgres, pgpass_superuser: str, tmp_path: Path
) -> None:
    path = write_password_file(tmp_path / "passwords", _lines_for(pg, PGPASS_PASSWORD))
    result = generate_with(pg, {"PGPASSFILE": str(path), "HOME": str(tmp_path / "nohome")})
    assert result.returncode == 0, result.stderr
    users = tomllib.loads(result.stdout)["pools"]["postgres"]["users"]
    assert PGPASS_SUPERUSER in {user["username"] for user in users}
    assert PGPASS_PASSWORD not in result.stderr


def test_password_from_dot_pgpass_in_home(
    pg: ExamplePostgres, pgpass_superuser: str, tmp_path: Path
) -> None:
    write_password_file(tmp_path / ".pgpass", _lines_for(pg, PGPASS_PASSWORD))
    result = generate_with(pg, {"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "postgres" in tomllib.loads(result.stdout)["pools"]


def test_pgpassword_and_flag_win_over_the_file(
    pg: ExamplePostgres, pgpass_superuser: str, tmp_path: Path
) -> None:
    path = write_password_file(tmp_path / "passwords", _lines_for(pg, "stale-password"))
    env = {"PGPASSFILE": str(path)}
    by_variable = generate_with(pg, {**env, "PGPASSWORD": PGPASS_PASSWORD})
    assert by_variable.returncode == 0, by_variable.stderr
    by_flag = generate_with(pg, env, "--password", PGPASS_PASSWORD)
    assert by_flag.returncode == 0, by_flag.stderr

    # Only the file's stale password: refused, and the error says where it came from.
    stale = generate_with(pg, env)
    assert stale.returncode == 1
    assert "password authentication failed" in stale.stderr
    assert f'(password from file "{path}")' in stale.stderr
    assert "stale-password" not in stale.stderr
    # Nothing to do with the password when no server answers: no such hint.
    nobody = run_pg_doorman("generate", "--host", "127.0.0.1", "-p", str(free_port()), env=env)
    assert nobody.returncode == 1
    assert "Connection refused" in nobody.stderr
    assert "password from file" not in nobody.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_file_others_may_read_is_ignored_with_a_warning(
    pg: ExamplePostgres, pgpass_superuser: str, tmp_path: Path, mode: int
) -> None:
    path = write_password_file(tmp_path / "passwords", _lines_for(pg, PGPASS_PASSWORD), mode)
    result = generate_with(pg, {"PGPASSFILE": str(path)})
    assert result.returncode == 1
    assert (
        f'WARNING: password file "{path}" has group or world access; '
        "permissions should be u=rw (0600) or less"
    ) in result.stderr
    assert "the server asks for a password" in result.stderr


def test_directory_is_not_a_password_file(
    pg: ExamplePostgres, pgpass_superuser: str, tmp_path: Path
) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    result = generate_with(pg, {"PGPASSFILE": str(directory)})
    assert result.returncode == 1
    assert f'WARNING: password file "{directory}" is not a plain file' in result.stderr
