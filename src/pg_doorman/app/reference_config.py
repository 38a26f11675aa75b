"""`pg_doorman generate --reference`: every configuration key at its default, each with
a comment saying what it does, as TOML or YAML.

The keys and defaults come from the dataclasses of config/schema.py, the comments from
config/key_docs.py, and what is ignored or needs a restart from the loader's and the
schema's sets; nothing here lists keys itself. A key unset by default is written
commented out with an example value, so the file loads as the defaults (but for the
sample pool and user, which show the per-pool and per-user keys).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import MISSING, dataclass, fields
from typing import Any

from pg_doorman.app.generated_config import quoted, toml_key
from pg_doorman.auth.md5 import md5_password_hash
from pg_doorman.config import loader
from pg_doorman.config.key_docs import SECTION_DOCS, Example, KeyDoc
from pg_doorman.config.schema import (
    RESTART_REQUIRED,
    AuthQueryConfig,
    GeneralConfig,
    PoolConfig,
    TalosConfig,
    UserConfig,
    WebConfig,
)

SAMPLE_POOL = "exampledb"
SAMPLE_USERNAME = "example_user"
SAMPLE_PASSWORD = "example_password"
# The loader reads [include] itself; it has no dataclass.
INCLUDE_DEFAULTS: dict[str, Example] = {"files": []}
# PoolConfig fields that are not keys of the pool's table: its name is the table's, and
# users and auth_query are tables of their own.
POOL_FIELDS_ELSEWHERE = frozenset({"name", "users", "auth_query"})
WIDTH = 88
_PLAIN_YAML_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Value = str | int | bool | list[str] | dict[str, str]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


_IGNORED = _sentence(loader.NOT_IMPLEMENTED)
_NOT_APPLICABLE = _sentence(loader.NOT_APPLICABLE)
_RESTART = "Needs a restart (a reload keeps the running value)."


@dataclass(frozen=True)
class ReferenceKey:
    name: str
    value: Value
    active: bool  # False: unset by default, written commented out with an example
    doc: str


@dataclass(frozen=True)
class ReferenceTable:
    path: tuple[str, ...]
    keys: tuple[ReferenceKey, ...]
    doc: str = ""
    array: bool = False  # one entry of a list ([[...]] in TOML)
    active: bool = True  # False: the whole table written commented out


def _default(field: Any) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


def _key(section: str, name: str, default: Any, status: str, restart: bool) -> ReferenceKey:
    doc: KeyDoc | None = SECTION_DOCS[section].get(name)
    if doc is None:
        raise ValueError(f"{section}.{name}: no description in config/key_docs.py")
    text = " ".join(part for part in (doc.text, status, _RESTART if restart else "") if part)
    if default is None:
        if doc.example is None:
            raise ValueError(f"{section}.{name}: unset by default and no example value")
        return ReferenceKey(name, doc.example, False, text)
    if default is MISSING:
        raise ValueError(f"{section}.{name}: required, and no sample value")
    return ReferenceKey(name, default, True, text)


def _status(section: str, name: str) -> str:
    not_implemented = {
        "general": loader.GENERAL_NOT_IMPLEMENTED,
        "pool": loader.POOL_NOT_IMPLEMENTED,
        "web": loader.WEB_NOT_IMPLEMENTED,
    }.get(section, frozenset())
    not_applicable = {
        "general": loader.GENERAL_NOT_APPLICABLE,
        "pool": loader.POOL_NOT_APPLICABLE,
    }.get(section, frozenset())
    if name in not_implemented:
        return _IGNORED
    if name in not_applicable:
        return _NOT_APPLICABLE
    return ""


def _keys(
    section: str,
    cls: type[Any],
    samples: dict[str, Value] | None = None,
    skip: frozenset[str] = frozenset(),
) -> tuple[ReferenceKey, ...]:
    keys = []
    for field in fields(cls):
        if field.name in skip:
            continue
        default = (samples or {}).get(field.name, _default(field))
        restart = f"{section}.{field.name}" in RESTART_REQUIRED
        keys.append(_key(section, field.name, default, _status(section, field.name), restart))
    return tuple(keys)


def reference_tables() -> list[ReferenceTable]:
    """The reference configuration, table by table, in the order it is written."""
    include = tuple(
        _key("include", name, default, "", False) for name, default in INCLUDE_DEFAULTS.items()
    )
    sample_user: dict[str, Value] = {
        "username": SAMPLE_USERNAME,
        "password": md5_password_hash(SAMPLE_PASSWORD, SAMPLE_USERNAME),
    }
    pool = ("pools", SAMPLE_POOL)
    return [
        ReferenceTable(("include",), include, "Other configuration files merged into this one."),
        ReferenceTable(("general",), _keys("general", GeneralConfig)),
        ReferenceTable(
            ("web",),
            _keys("web", WebConfig),
            "Metrics over HTTP (old name of the section: prometheus).",
        ),
        ReferenceTable(
            ("talos",),
            _keys("talos", TalosConfig),
            "Logins as user talos with a token that names a client and its roles.",
        ),
        ReferenceTable(
            pool,
            _keys("pool", PoolConfig, skip=POOL_FIELDS_ELSEWHERE),
            f"One pool per database name clients connect to. This sample, {SAMPLE_POOL}, "
            "serves the database of that name at server_host:server_port.",
        ),
        ReferenceTable(
            (*pool, "users"),
            _keys("user", UserConfig, samples=sample_user),
            f"The users of the pool, one entry each; {SAMPLE_USERNAME} is a sample.",
            array=True,
        ),
        ReferenceTable(
            (*pool, "auth_query"),
            tuple(
                ReferenceKey(key.name, key.value, True, key.doc)
                for key in _keys("auth_query", AuthQueryConfig, samples=_auth_query_examples())
            ),
            "Users that are not in users, looked up in PostgreSQL when they log in. "
            "Off unless set.",
            active=False,
        ),
    ]


def _auth_query_examples() -> dict[str, Value]:
    """The required keys of auth_query, shown with their examples."""
    examples: dict[str, Value] = {}
    for field in fields(AuthQueryConfig):
        example = SECTION_DOCS["auth_query"][field.name].example
        if _default(field) is MISSING and example is not None:
            examples[field.name] = example
    return examples


HEADER = (
    "pg_doorman reference configuration, written by `pg_doorman generate --reference`:",
    "every key of the file at its default, with what it does. A key that is unset by",
    "default is shown commented out, with an example value. The pool and the user are",
    'samples. Durations are milliseconds (strings such as "5s" or "10m" work too), sizes',
    'bytes ("64KB", "1MB" work too). The whole story: docs/configuration.md.',
)


def _wrap(text: str, indent: str) -> list[str]:
    if not text:
        return []
    width = max(WIDTH - len(indent) - 2, 40)
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width, break_on_hyphens=False)]


def _toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(quoted(item) for item in value) + "]"
    if not value:
        return "{}"
    return "{ " + ", ".join(f"{toml_key(k)} = {quoted(v)}" for k, v in value.items()) + " }"


def _yaml_key(name: str) -> str:
    return name if _PLAIN_YAML_KEY.fullmatch(name) else quoted(name)


def _yaml_value(value: Value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{quoted(k)}: {quoted(v)}" for k, v in value.items()) + "}"
    return _toml_value(value)  # scalars and lists are written alike


def render_toml(tables: list[ReferenceTable], comments: bool = True) -> str:
    out: list[str] = [f"# {line}" for line in HEADER] if comments else []
    for table in tables:
        if not table.active and not comments:
            continue
        if out:
            out.append("")
        out += _wrap(table.doc, "") if comments else []
        name = ".".join(toml_key(part) for part in table.path)
        head = f"[[{name}]]" if table.array else f"[{name}]"
        out.append(head if table.active else f"# {head}")
        # A commented-out table keeps its shape behind "# ", ready to be uncommented.
        off = "" if table.active else "# "
        for key in table.keys:
            shown = table.active and key.active
            if not shown and not comments:
                continue
            out += _wrap(key.doc, off) if comments else []
            line = f"{key.name} = {_toml_value(key.value)}"
            out.append(line if shown else f"# {line}")
    return "\n".join(out) + "\n"


def render_yaml(tables: list[ReferenceTable], comments: bool = True) -> str:
    out: list[str] = [f"# {line}" for line in HEADER] if comments else []
    opened: set[tuple[str, ...]] = set()
    for table in tables:
        if not table.active and not comments:
            continue
        if out:
            out.append("")
        for depth in range(1, len(table.path)):
            parent = table.path[:depth]
            if parent not in opened:
                opened.add(parent)
                out.append(f"{'  ' * (depth - 1)}{_yaml_key(parent[-1])}:")
        indent = "  " * (len(table.path) - 1)
        off = "" if table.active else "# "  # as in render_toml
        out += _wrap(table.doc, indent) if comments else []
        out.append(f"{indent}{off}{_yaml_key(table.path[-1])}:")
        opened.add(table.path)
        key_indent = indent + "  "
        for number, key in enumerate(table.keys):
            shown = table.active and key.active
            if not shown and not comments:
                continue
            lead = key_indent
            if table.array:
                lead = key_indent + ("- " if number == 0 else "  ")
            note_indent = key_indent if number == 0 else " " * len(lead)
            if not table.active:
                note_indent = f"{indent}#   "
            out += _wrap(key.doc, note_indent) if comments else []
            line = f"{_yaml_key(key.name)}: {_yaml_value(key.value)}"
            if shown:
                out.append(f"{lead}{line}")
            elif not table.active:
                out.append(f"{indent}# {lead[len(indent) :]}{line}")
            else:
                out.append(f"{' ' * len(lead)}# {line}")
    return "\n".join(out) + "\n"


def render_reference(fmt: str, comments: bool = True) -> str:
    tables = reference_tables()
    if fmt == "yaml":
        return render_yaml(tables, comments)
    return render_toml(tables, comments)
