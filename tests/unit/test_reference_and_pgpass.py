"""`pg_doorman generate --reference` (every key at its default, with a comment) and
libpq's password file, read as libpq reads it."""

from __future__ import annotations

import re
import stat
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_doorman.app import pgpass
from pg_doorman.app.reference_config import (
    POOL_FIELDS_ELSEWHERE,
    SAMPLE_PASSWORD,
    SAMPLE_POOL,
    SAMPLE_USERNAME,
    reference_tables,
    render_reference,
)
from pg_doorman.auth.md5 import md5_password_hash
from pg_doorman.config import loader, parse_config
from pg_doorman.config.key_docs import SECTION_DOCS
from pg_doorman.config.schema import (
    AuthQueryConfig,
    GeneralConfig,
    PoolConfig,
    TalosConfig,
    UserConfig,
    WebConfig,
)

FORMATS = ("toml", "yaml")

# What the loader accepts, table by table: the single list the reference must cover.
LOADER_KEYS: dict[str, set[str]] = {
    "include": {"files"},
    "general": set(loader._GENERAL_SPEC),
    "web": set(loader._WEB_SPEC),
    "talos": set(loader._TALOS_SPEC),
    "pool": set(loader._POOL_SPEC) - {"users", "auth_query"},
    "user": set(loader._USER_SPEC),
    "auth_query": set(loader._AUTH_QUERY_SPEC),
}
SPECS: dict[str, dict[str, Any]] = {
    "general": loader._GENERAL_SPEC,
    "web": loader._WEB_SPEC,
    "talos": loader._TALOS_SPEC,
    "pool": loader._POOL_SPEC,
    "user": loader._USER_SPEC,
    "auth_query": loader._AUTH_QUERY_SPEC,
}
# Examples that name a file or a PAM service, which the loader opens.
EXAMPLES_THAT_NEED_FILES = {("general", "pg_hba"), ("user", "auth_pam_service")}


def _parse(text: str, fmt: str) -> dict[str, Any]:
    loaded = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _sample_pool() -> dict[str, PoolConfig]:
    user = UserConfig(
        username=SAMPLE_USERNAME, password=md5_password_hash(SAMPLE_PASSWORD, SAMPLE_USERNAME)
    )
    return {SAMPLE_POOL: PoolConfig(name=SAMPLE_POOL, users=[user])}


def _uncommented_toml(text: str) -> dict[str, Any]:
    """The TOML reference with its commented-out keys and tables set."""
    keys_and_tables = re.compile(r"^# (\[[^\]]+\]|[a-z_]+ = .*)$")
    lines = [
        match.group(1) if (match := keys_and_tables.match(line)) else line
        for line in text.splitlines()
    ]
    return tomllib.loads("\n".join(lines))


# ---------------------------------------------------------------------------------------
# --reference


def test_reference_has_every_key_the_loader_accepts() -> None:
    """A key added to the loader without a description, or to the schema without a
    loader entry, shows up here."""
    full = _uncommented_toml(render_reference("toml"))
    pool = full["pools"][SAMPLE_POOL]
    found = {
        "include": set(full["include"]),
        "general": set(full["general"]),
        "web": set(full["web"]),
        "talos": set(full["talos"]),
        "pool": set(pool) - {"users", "auth_query"},
        "user": set(pool["users"][0]),
        "auth_query": set(pool["auth_query"]),
    }
    assert found == LOADER_KEYS
    assert set(full) == {"include", "general", "web", "talos", "pools"}


def test_descriptions_are_of_keys_that_exist() -> None:
    """No description of a key the schema no longer has."""
    schema_keys = {
        "include": {"files"},
        "general": {f.name for f in fields(GeneralConfig)},
        "web": {f.name for f in fields(WebConfig)},
        "talos": {f.name for f in fields(TalosConfig)},
        "pool": {f.name for f in fields(PoolConfig)} - POOL_FIELDS_ELSEWHERE,
        "user": {f.name for f in fields(UserConfig)},
        "auth_query": {f.name for f in fields(AuthQueryConfig)},
    }
    assert {section: set(docs) for section, docs in SECTION_DOCS.items()} == schema_keys


@pytest.mark.parametrize("comments", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_loads_as_the_defaults(fmt: str, comments: bool) -> None:
    config = parse_config(_parse(render_reference(fmt, comments), fmt))
    assert config.general == GeneralConfig()
    assert config.web == WebConfig()
    assert config.talos == TalosConfig()
    assert config.pools == _sample_pool()
    assert config.warnings == []


def test_both_formats_hold_the_same_settings() -> None:
    toml_text, yaml_text = render_reference("toml"), render_reference("yaml")
    assert _parse(toml_text, "toml") == _parse(yaml_text, "yaml")
    # The commented-out keys too: each example in YAML's spelling at its place.
    for table in reference_tables():
        for key in table.keys:
            if not (table.active and key.active):
                assert re.search(rf"(?m)^ *# +{key.name}: \S", yaml_text), key.name


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_comments_means_none(fmt: str) -> None:
    text = render_reference(fmt, comments=False)
    assert not [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert "#" not in text


def test_every_key_has_a_comment_and_ignored_keys_say_so() -> None:
    text = render_reference("toml")
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^(# )?[a-z_]+ = ", line):
            assert lines[number - 1].startswith("# "), line

    def note_of(name: str) -> str:
        # The comment lines right above the key, other commented-out keys excluded.
        block = re.search(rf"((?:^# (?![a-z_]+ = ).*\n)+)(?:# )?{name} = ", text, re.MULTILINE)
        assert block is not None, name
        return " ".join(line.removeprefix("# ") for line in block.group(1).splitlines())

    for name in (*loader.GENERAL_NOT_APPLICABLE, *loader.GENERAL_NOT_IMPLEMENTED):
        assert "ignored" in note_of(name), name
    for name in loader.WEB_NOT_IMPLEMENTED:
        assert "Not implemented yet, ignored" in note_of(name), name
    assert "ignored" not in note_of("pool_size")


def test_examples_are_values_the_loader_takes() -> None:
    """Uncommenting a key shows a value that would load."""
    context = loader._Context(base_dir=Path.cwd())
    sections = {
        ("include",): "include",
        ("general",): "general",
        ("web",): "web",
        ("talos",): "talos",
        ("pools", SAMPLE_POOL): "pool",
        ("pools", SAMPLE_POOL, "users"): "user",
        ("pools", SAMPLE_POOL, "auth_query"): "auth_query",
    }
    checked = 0
    for table in reference_tables():
        section = sections[table.path]
        for key in table.keys:
            if section == "include" or (section, key.name) in EXAMPLES_THAT_NEED_FILES:
                continue
            SPECS[section][key.name](key.value, key.name, context)
            checked += 1
    assert checked > 100


# ---------------------------------------------------------------------------------------
# The password file


def _escaped(value: str, first: bool = False) -> str:
    text = value.replace("\\", "\\\\").replace(":", "\\:")
    if text == "*":
        text = "\\*"  # the value itself, not the wildcard
    if first and text.startswith("#"):
        text = "\\" + text  # not a comment line
    return text


def _line(host: str, port: int, database: str, user: str, password: str) -> str:
    fields_ = [_escaped(host, first=True), str(port), _escaped(database), _escaped(user)]
    return ":".join([*fields_, _escaped(password)])


def test_first_matching_line_wins_and_wildcards_match_anything() -> None:
    text = "\n".join(
        [
            "# a comment: db1:5432:app:alice:commented",
            "db2:5432:app:alice:other-host",
            "db1:5433:app:alice:other-port",
            "db1:5432:*:alice:first",
            "db1:5432:app:alice:second",
            "*:*:*:*:fallback",
        ]
    )
    assert pgpass.find_password(text, "db1", 5432, "app", "alice") == "first"
    assert pgpass.find_password(text, "db1", 5433, "app", "alice") == "other-port"
    assert pgpass.find_password(text, "db3", 1, "x", "bob") == "fallback"
    assert pgpass.find_password("db1:5432:app:alice:pw\n", "db1", 5432, "app", "bob") is None


def test_escapes_comments_and_line_ends() -> None:
    # "\:" and "\\" in fields and password; the password ends at an unescaped ":".
    text = "h\\:x:5432:d\\\\b:u:p\\:w\\\\d:ignored\r\n"
    assert pgpass.find_password(text, "h:x", 5432, "d\\b", "u") == "p:w\\d"
    # A "#" starts a comment only in the first column.
    assert pgpass.find_password(" #h:1:d:u:pw", " #h", 1, "d", "u") == "pw"
    assert pgpass.find_password("#h:1:d:u:pw", "#h", 1, "d", "u") is None
    # "\*" is a literal star; a field without its ":" (a short line) matches nothing.
    assert pgpass.find_password("\\*:1:d:u:pw", "other", 1, "d", "u") is None
    assert pgpass.find_password("h:1:d:u", "h", 1, "d", "u") is None
    # An empty password is returned as such (libpq takes it as none).
    assert pgpass.find_password("h:1:d:u:", "h", 1, "d", "u") == ""
    # A backslash at the very end of the password stays.
    assert pgpass.find_password("h:1:d:u:pw\\", "h", 1, "d", "u") == "pw\\"


def test_unix_socket_directory_matches_localhost_or_itself() -> None:
    text = "localhost:5432:app:alice:local\n/run/pg:5432:app:bob:by-path\n"
    assert pgpass.find_password(text, "/run/pg", 5432, "app", "alice") == "local"
    assert pgpass.find_password(text, "/run/pg", 5432, "app", "bob") == "by-path"
    # Over TCP, localhost is a host name like any other.
    assert pgpass.find_password(text, "127.0.0.1", 5432, "app", "alice") is None


_FIELD = st.text(
    alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
    min_size=1,
)


@settings(max_examples=300, deadline=None)
@given(
    host=_FIELD,
    port=st.integers(1, 65535),
    database=_FIELD,
    user=_FIELD,
    password=_FIELD,
    other_user=_FIELD,
)
def test_escaped_lines_give_back_their_password(
    host: str, port: int, database: str, user: str, password: str, other_user: str
) -> None:
    line = _line(host, port, database, user, password)
    text = f"# {line}\n{line}\n*:*:*:*:wildcard\n"
    assert pgpass.find_password(text, host, port, database, user) == password
    expected = password if other_user == user else "wildcard"
    assert pgpass.find_password(text, host, port, database, other_user) == expected


def test_file_modes() -> None:
    assert pgpass.file_problem("/h/.pgpass", stat.S_IFREG | 0o600) is None
    assert pgpass.file_problem("/h/.pgpass", stat.S_IFREG | 0o400) is None
    for mode in (0o640, 0o604, 0o610, 0o601):
        problem = pgpass.file_problem("/h/.pgpass", stat.S_IFREG | mode)
        assert problem == (
            'WARNING: password file "/h/.pgpass" has group or world access; '
            "permissions should be u=rw (0600) or less"
        )
    assert pgpass.file_problem("/h/.pgpass", stat.S_IFDIR | 0o700) == (
        'WARNING: password file "/h/.pgpass" is not a plain file'
    )


def test_which_file() -> None:
    assert pgpass.password_file_path({"PGPASSFILE": "/etc/pw"}, "/home/u") == "/etc/pw"
    assert pgpass.password_file_path({"PGPASSFILE": ""}, "/home/u") == "/home/u/.pgpass"
    assert pgpass.password_file_path({}, "/home/u") == "/home/u/.pgpass"
    assert pgpass.password_file_path({}, None) is None
