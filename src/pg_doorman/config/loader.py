"""Read PgDoorman-format configuration (TOML or YAML) into a validated :class:`Config`.

Runs once per start or reload, so it favours plain code and precise messages over speed.
Every problem is either a :class:`ConfigError` whose message starts with the key path,
or a line in ``Config.warnings`` (unknown keys, deprecated names, settings accepted but
not implemented): nothing in the file is ignored silently.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_doorman.auth import pam

from .schema import (
    ADMIN_DATABASES,
    POOL_MODES,
    AuthQueryConfig,
    Config,
    GeneralConfig,
    PoolConfig,
    TalosConfig,
    UserConfig,
    WebConfig,
)
from .units import parse_byte_size, parse_duration_ms

__all__ = ["ConfigError", "load_config", "parse_config"]

# PyYAML is imported only to read a YAML file: it adds about 1.4 MiB to the resident
# memory of every pooler process, and a TOML configuration has no use for it.
if TYPE_CHECKING:
    import yaml

NOT_IMPLEMENTED = "not implemented yet, ignored"
# Worker ids live in the top bits of a 31-bit cancel key (see net/ids.py).
MAX_WORKERS = 64
NOT_APPLICABLE = "PgDoorman runtime tuning with no meaning here, ignored"
UNKNOWN_KEY = "unknown key, ignored"

# PostgreSQL's cap on a StartupMessage body is 10 000 bytes; PgDoorman keeps 512 of them
# for user/database/application_name and leaves the rest to startup_parameters.
STARTUP_PARAMETERS_BUDGET = 10_000 - 512
# Keys the pooler sets itself or that PostgreSQL treats specially in a StartupMessage.
RESERVED_STARTUP_PARAMETERS = frozenset(
    {"user", "database", "replication", "options", "role", "session_authorization"}
)
# A Unix socket address holds 108 bytes on Linux, the terminating NUL included (libpq
# needs it there too).
_UNIX_PATH_MAX = 107
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NUMERIC_KEY = re.compile(r"[0-9]+")


class ConfigError(Exception):
    """An invalid configuration. ``str(error)`` starts with ``key_path`` when there is one."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path
        self.message = message


# ---------------------------------------------------------------------------------------
# Public entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read ``path`` (YAML for .yaml/.yml, TOML otherwise), its include files, validate."""
    file = Path(path)
    data = _read_document(file, "")
    ctx = _Context(base_dir=file.absolute().parent)
    data = _expand_includes(data, ctx.base_dir, (file.resolve(),), None, ctx)
    return _build(data, os.fspath(path), ctx)


def parse_config(
    data: dict[str, Any], *, source: str = "<memory>", base_dir: Path | None = None
) -> Config:
    """Validate an already-parsed mapping exactly as :func:`load_config` does.

    ``base_dir`` anchors relative paths (include files, ``pg_hba = {path=...}``); the
    current directory when None. Null values are dropped, as in YAML files.
    """
    ctx = _Context(base_dir=base_dir if base_dir is not None else Path.cwd())
    cleaned = _drop_nulls(data)
    if not isinstance(cleaned, dict):
        raise ConfigError("", f"{source}: expected a mapping of sections, got {_show(data)}")
    cleaned = _expand_includes(cleaned, ctx.base_dir, (), None, ctx)
    return _build(cleaned, source, ctx)


# ---------------------------------------------------------------------------------------
# Files, includes


def _is_yaml(file: Path) -> bool:
    return file.suffix.lower() in (".yaml", ".yml")


@functools.cache
def _yaml_loader() -> type[yaml.SafeLoader]:
    import yaml

    class YamlLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses duplicate keys instead of keeping the last one."""

        def construct_mapping(
            self, node: yaml.MappingNode, deep: bool = False
        ) -> dict[Hashable, Any]:
            seen: set[Hashable] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the base class reports unhashable keys itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return YamlLoader


def _read_document(file: Path, key_path: str) -> dict[str, Any]:
    try:
        # utf-8-sig: a byte-order mark left by some Windows editors is not an error.
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(key_path, f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(key_path, f"{file}: not UTF-8 text ({exc.reason})") from None
    data: object
    if _is_yaml(file):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError(key_path, f"{file}: YAML syntax error{where}: {problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(key_path, f"{file}: YAML syntax error: {exc}") from None
        data = {} if data is None else _drop_nulls(data)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message already ends with "(at line N, column M)".
            raise ConfigError(key_path, f"{file}: TOML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(key_path, f"{file}: expected a mapping of sections, got {_show(data)}")
    return data


def _drop_nulls(value: object) -> object:
    """YAML nulls mean "not set" (PgDoorman converts YAML to TOML, which has no null)."""
    if isinstance(value, dict):
        return {str(k): _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _expand_includes(
    data: dict[str, Any],
    base_dir: Path,
    chain: tuple[Path, ...],
    including: Path | None,
    ctx: _Context,
) -> dict[str, Any]:
    """Merge ``include.files`` (relative to the including file) after ``data``, in order.

    ``chain`` holds the files being expanded (to catch cycles); ``including`` is the
    file ``data`` came from when it is itself an include, for error messages.
    """
    merged = {key: value for key, value in data.items() if key != "include"}
    if "include" not in data:
        return merged
    section = _table(data["include"], "include")
    for key in section:
        if key != "files":
            ctx.warn(_join("include", key), UNKNOWN_KEY)
    files = _string_list(section.get("files", []), "include.files", ctx)
    origin = f" (in {including})" if including is not None else ""
    for index, name in enumerate(files):
        key_path = f"include.files[{index}]"
        file = base_dir / name
        resolved = file.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in (*chain, resolved))
            raise ConfigError(key_path, f"include cycle: {cycle}")
        try:
            document = _read_document(file, key_path)
        except ConfigError as exc:
            raise ConfigError(key_path, exc.message + origin) from None
        document = _expand_includes(document, file.parent, (*chain, resolved), file, ctx)
        merged = _deep_merge(merged, document)
    return merged


def _deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key, lists concatenate (as PgDoorman's merge does), else overlay wins."""
    result = dict(base)
    for key, value in overlay.items():
        old = result.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            result[key] = _deep_merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            result[key] = old + value
        else:
            result[key] = value
    return result


# ---------------------------------------------------------------------------------------
# Value parsers: (value, key path, context) -> parsed value, or ConfigError.


@dataclass
class _Context:
    base_dir: Path
    warnings: list[str] = field(default_factory=list)

    def warn(self, key_path: str, message: str) -> None:
        self.warnings.append(f"{key_path}: {message}")


Parser = Callable[[object, str, _Context], Any]


def _join(path: str, key: str) -> str:
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _table(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a table, got {_show(value)}")
    return value


def _string(value: object, path: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_show(value)}")
    return value


def _name(value: object, path: str, ctx: _Context) -> str:
    text = _string(value, path, ctx)
    if not text.strip():
        raise ConfigError(path, f"expected a non-empty string, got {text!r}")
    return text


def _bool(value: object, path: str, ctx: _Context) -> bool:
    # Real booleans only, as in PgDoorman: a quoted "yes" or a 1 is a mistake to report.
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_show(value)}")
    return value


def _int_range(low: int, high: int | None, what: str) -> Parser:
    def parse(value: object, path: str, ctx: _Context) -> int:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= low
            and (high is None or value <= high)
        ):
            return value
        raise ConfigError(path, f"expected {what}, got {_show(value)}")

    return parse


_non_negative = _int_range(0, None, "a non-negative integer")
_positive = _int_range(1, None, "a positive integer")
_port = _int_range(1, 65535, "a port number 1..65535")
_percent = _int_range(0, 100, "a percentage 0..100")


def _duration(value: object, path: str, ctx: _Context) -> int:
    try:
        return parse_duration_ms(value)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _positive_duration(value: object, path: str, ctx: _Context) -> int:
    """A duration that must not be 0: a zero connect or wait timeout fails every login
    that needs a new server at once."""
    ms = _duration(value, path, ctx)
    if ms == 0:
        raise ConfigError(path, "must be greater than 0")
    return ms


def _duration_or_off(value: object, path: str, ctx: _Context) -> int:
    """A duration, or -1 (also "-1" or "off"): the feature is off."""
    if value == -1 or (isinstance(value, str) and value.strip().lower() in ("-1", "off")):
        return -1
    try:
        return parse_duration_ms(value)
    except ValueError as exc:
        raise ConfigError(path, f"{exc}; or -1 (off)") from None


def _byte_size(value: object, path: str, ctx: _Context) -> int:
    try:
        return parse_byte_size(value)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _choice(*choices: str) -> Parser:
    expected = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"

    def parse(value: object, path: str, ctx: _Context) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise ConfigError(path, f"expected {expected}, got {_show(value)}")

    return parse


_pool_mode = _choice(*POOL_MODES)
_log_level = _choice("trace", "debug", "info", "warn", "warning", "error", "off")
_tls_mode = _choice("allow", "disable", "require", "verify-full")
_server_tls_mode = _choice("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _string_list(value: object, path: str, ctx: _Context) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list of strings, got {_show(value)}")
    return [_string(item, f"{path}[{i}]", ctx) for i, item in enumerate(value)]


def _cidr_list(value: object, path: str, ctx: _Context) -> list[str]:
    items = _string_list(value, path, ctx)
    for i, item in enumerate(items):
        # A bare address must not pass: PgDoorman's pg_hba turns unparsable addresses
        # into "matches everything", so be strict about the CIDR form everywhere.
        try:
            if "/" not in item:
                raise ValueError(item)
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"{path}[{i}]",
                f"expected a network in CIDR form like '10.0.0.0/8' or '::1/128', got {item!r}",
            ) from None
    return items


def _url_list(value: object, path: str, ctx: _Context) -> list[str]:
    items = _string_list(value, path, ctx)
    for i, item in enumerate(items):
        if not item.startswith(("http://", "https://")):
            raise ConfigError(f"{path}[{i}]", f"expected an http:// or https:// URL, got {item!r}")
    return items


def _unix_socket_mode(value: object, path: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        # YAML reads an unquoted 0600 as the number 384: insist on the quoted form.
        raise ConfigError(
            path, f'expected an octal mode as a quoted string like "0660", got {_show(value)}'
        )
    text = value.strip()
    digits = text.lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits):
        raise ConfigError(path, f'expected an octal mode like "0660", got {value!r}')
    if int(digits, 8) > 0o777:
        raise ConfigError(path, f"{value!r} sets bits outside 0o777 (setuid/setgid/sticky)")
    return text


def _pg_hba(value: object, path: str, ctx: _Context) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        for key in value:
            if key not in ("path", "content"):
                ctx.warn(_join(path, key), UNKNOWN_KEY)
        if ("path" in value) == ("content" in value):
            raise ConfigError(path, "expected a table with exactly one of 'path' or 'content'")
        if "content" in value:
            text = _string(value["content"], _join(path, "content"), ctx)
        else:
            name = _name(value["path"], _join(path, "path"), ctx)
            file = ctx.base_dir / name
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(_join(path, "path"), f"cannot read {file}: {reason}") from None
    else:
        raise ConfigError(
            path,
            f"expected rule text, or a table {{path=...}} or {{content=...}}, got {_show(value)}",
        )
    if not any(line.split("#", 1)[0].strip() for line in text.splitlines()):
        # PostgreSQL refuses such a file too; only leaving pg_hba out turns it off.
        raise ConfigError(path, "contains no rules, so every client login would be rejected")
    return text


def startup_parameter_text(key: str, raw: object) -> str:
    """The text a startup parameter is sent with; ValueError saying why it can't be."""
    if key.lower() in RESERVED_STARTUP_PARAMETERS:
        raise ValueError("reserved: the pooler sets this parameter itself")
    if key.lower().startswith("_pq_."):
        raise ValueError("the '_pq_.' prefix is reserved for protocol extensions")
    if not _GUC_NAME.fullmatch(key):
        raise ValueError(
            "not a valid parameter name (letters, digits, '_' and '.'; no leading digit)"
        )
    # PostgreSQL spells booleans on/off; YAML turns a bare `off` into false.
    if isinstance(raw, bool):
        text = "on" if raw else "off"
    elif isinstance(raw, int | float | str):
        text = str(raw)
    else:
        raise ValueError(f"expected a string, got {_show(raw)}")
    if "\0" in text:
        raise ValueError("value contains a NUL byte")
    return text


def _startup_parameters(value: object, path: str, ctx: _Context) -> dict[str, str]:
    table = _table(value, path)
    result: dict[str, str] = {}
    for key, raw in table.items():
        try:
            result[key] = startup_parameter_text(key, raw)
        except ValueError as exc:
            raise ConfigError(_join(path, key), str(exc)) from None
    size = startup_size(result)
    if size > STARTUP_PARAMETERS_BUDGET:
        raise ConfigError(
            path, f"takes {size} bytes in a StartupMessage, more than {STARTUP_PARAMETERS_BUDGET}"
        )
    return result


def startup_size(parameters: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 2 for k, v in parameters.items())


def _read_keys(
    table: Mapping[str, Any],
    path: str,
    spec: Mapping[str, Parser],
    ctx: _Context,
    *,
    not_implemented: frozenset[str] = frozenset(),
    not_applicable: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    hints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Parse the keys of one table that ``spec`` knows; warn about all the others
    (``hints`` adds, per unknown key, where the setting belongs instead).

    Keys in ``not_implemented``/``not_applicable`` warn only when their value would
    change something: a PgDoorman file that spells out the defaults loads quietly.
    """
    values: dict[str, Any] = {}
    for key, raw in table.items():
        key_path = _join(path, key)
        name = key
        if aliases and key in aliases:
            name = aliases[key]
            if name in table:
                raise ConfigError(key_path, f"old name of {name}; set only one of them")
            ctx.warn(key_path, f"deprecated name, use {name}")
        parser = spec.get(name)
        if parser is None:
            hint = hints.get(key) if hints else None
            ctx.warn(key_path, f"{UNKNOWN_KEY}; {hint}" if hint else UNKNOWN_KEY)
            continue
        value = values[name] = parser(raw, key_path, ctx)
        if _is_inert(name, value, defaults or {}):
            continue
        if name in not_implemented:
            ctx.warn(key_path, NOT_IMPLEMENTED)
        elif name in not_applicable:
            ctx.warn(key_path, NOT_APPLICABLE)
    return values


# Values that ask for nothing beyond what pg_doorman does anyway (no TLS, no limit).
_INERT_VALUES: dict[str, tuple[object, ...]] = {
    "tls_mode": ("allow", "disable"),
    "max_db_connections": (0,),
    "reserve_pool_size": (0,),
    "min_guaranteed_pool_size": (0,),
}


def _is_inert(name: str, value: object, defaults: Mapping[str, Any]) -> bool:
    if name in defaults and value == defaults[name]:
        return True
    return value in _INERT_VALUES.get(name, ())


def _field_defaults(cls: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            result[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            result[f.name] = f.default_factory()
    return result


def _require(values: Mapping[str, Any], path: str, *keys: str) -> None:
    for key in keys:
        if key not in values:
            raise ConfigError(_join(path, key), "required key is missing")


def _check_pair(
    path: str, first: str, first_value: object, second: str, second_value: object
) -> None:
    """Two keys that only make sense together (certificate and private key)."""
    if first_value is not None and second_value is None:
        raise ConfigError(_join(path, first), f"set without {_join(path, second)}")
    if second_value is not None and first_value is None:
        raise ConfigError(_join(path, second), f"set without {_join(path, first)}")


# ---------------------------------------------------------------------------------------
# [general]

_GENERAL_SPEC: dict[str, Parser] = {
    "host": _name,
    "port": _port,
    "backlog": _non_negative,
    "max_connections": _positive,
    "unix_socket_dir": _name,
    "unix_socket_mode": _unix_socket_mode,
    "connect_timeout": _positive_duration,
    "query_wait_timeout": _positive_duration,
    "client_login_timeout": _duration,
    "idle_timeout": _duration,
    "server_lifetime": _duration,
    "retain_connections_time": _duration,
    "retain_connections_max": _non_negative,
    "server_idle_check_timeout": _duration,
    "shutdown_timeout": _duration,
    "proxy_copy_data_timeout": _duration,
    "tcp_keepalives_idle": _non_negative,
    "tcp_keepalives_interval": _non_negative,
    "tcp_keepalives_count": _non_negative,
    "tcp_so_linger": _non_negative,
    "tcp_no_delay": _bool,
    "tcp_user_timeout": _non_negative,
    "tcp_socket_buffer_size": _byte_size,
    "log_level": _log_level,
    "log_client_connections": _bool,
    "log_client_disconnections": _bool,
    "log_min_duration_statement": _duration_or_off,
    "syslog_prog_name": _name,
    "daemon_pid_file": _name,
    "worker_threads": _positive,
    "workers": _int_range(0, MAX_WORKERS, f"a number of processes from 0 to {MAX_WORKERS}"),
    "message_size_to_be_stream": _byte_size,
    "max_memory_usage": _byte_size,
    "max_concurrent_creates": _positive,
    "server_round_robin": _bool,
    "sync_server_parameters": _bool,
    "pooler_check_query": _name,
    "admin_username": _name,
    "admin_password": _string,
    "prepared_statements": _bool,
    "prepared_statements_cache_size": _non_negative,
    "server_prepared_statements_cache_size": _non_negative,
    "client_anonymous_prepared_cache_size": _non_negative,
    "pg_hba": _pg_hba,
    "hba": _cidr_list,
    "startup_parameters": _startup_parameters,
    "unix_socket_buffer_size": _byte_size,
    "tls_certificate": _name,
    "tls_private_key": _name,
    "tls_ca_cert": _name,
    "tls_mode": _tls_mode,
    "tls_rate_limit_per_second": _non_negative,
    "server_tls_mode": _server_tls_mode,
    "server_tls_ca_cert": _name,
    "server_tls_certificate": _name,
    "server_tls_private_key": _name,
    "scaling_warm_pool_ratio": _percent,
    "scaling_fast_retries": _non_negative,
    "scaling_max_parallel_creates": _positive,
    "patroni_api_urls": _url_list,
    "fallback_cooldown": _duration,
    "patroni_api_timeout": _duration,
    "fallback_connect_timeout": _duration,
    "fallback_lifetime": _duration,
    "worker_cpu_affinity_pinning": _bool,
    "worker_stack_size": _byte_size,
    "max_blocking_threads": _positive,
    "tokio_global_queue_interval": _positive,
    "tokio_event_interval": _positive,
    "query_interner_gc_interval_seconds": _positive,
    "query_interner_anon_idle_ttl_seconds": _non_negative,
}

# Documented PgDoorman settings nothing here acts on yet: its thread count.
GENERAL_NOT_IMPLEMENTED = frozenset({"worker_threads"})
# scaling_fast_retries: PgDoorman's threads spin this many times for a server another
# thread is about to return; on one event loop nothing can return meanwhile, and a
# returned server goes straight to the longest-waiting client.
GENERAL_NOT_APPLICABLE = frozenset(
    {
        "scaling_fast_retries",
        "worker_cpu_affinity_pinning",
        "worker_stack_size",
        "max_blocking_threads",
        "tokio_global_queue_interval",
        "tokio_event_interval",
        "query_interner_gc_interval_seconds",
        "query_interner_anon_idle_ttl_seconds",
    }
)
_GENERAL_ALIASES = {"client_prepared_statements_cache_size": "client_anonymous_prepared_cache_size"}
# Keys PgDoorman's own files and pages put in [general], where PgDoorman ignores them too.
_GENERAL_HINTS = {
    "talos": "[talos] is a top-level section",
    "pool_mode": "pool_mode belongs in [pools.<name>] or a user",
}


def _general(value: object, path: str, ctx: _Context) -> GeneralConfig:
    values = _read_keys(
        _table(value, path),
        path,
        _GENERAL_SPEC,
        ctx,
        not_implemented=GENERAL_NOT_IMPLEMENTED,
        not_applicable=GENERAL_NOT_APPLICABLE,
        defaults=_field_defaults(GeneralConfig),
        aliases=_GENERAL_ALIASES,
        hints=_GENERAL_HINTS,
    )
    general = GeneralConfig(**values)
    _check_general(general, path)
    return general


def _check_general(g: GeneralConfig, path: str) -> None:
    if g.prepared_statements and g.prepared_statements_cache_size == 0:
        raise ConfigError(
            _join(path, "prepared_statements_cache_size"),
            "must be greater than 0 while prepared_statements is true",
        )
    if g.pg_hba is not None and g.hba:
        raise ConfigError(_join(path, "hba"), f"cannot be combined with {_join(path, 'pg_hba')}")
    _check_pair(path, "tls_certificate", g.tls_certificate, "tls_private_key", g.tls_private_key)
    mode_path = _join(path, "tls_mode")
    if g.tls_mode in ("require", "verify-full") and g.tls_certificate is None:
        raise ConfigError(mode_path, f"{g.tls_mode!r} needs tls_certificate and tls_private_key")
    if g.tls_mode == "verify-full" and g.tls_ca_cert is None:
        raise ConfigError(mode_path, "'verify-full' needs tls_ca_cert")
    if g.tls_mode == "disable" and g.tls_certificate is not None:
        raise ConfigError(mode_path, "'disable' cannot be combined with tls_certificate")
    rate = g.tls_rate_limit_per_second
    if rate and (rate < 100 or rate % 100):
        raise ConfigError(
            _join(path, "tls_rate_limit_per_second"), f"must be 0 or a multiple of 100, got {rate}"
        )
    _check_server_tls(
        path,
        g.server_tls_mode,
        g.server_tls_ca_cert,
        g.server_tls_certificate,
        g.server_tls_private_key,
    )
    if g.unix_socket_dir:
        socket_path = os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}")
        if len(os.fsencode(socket_path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                _join(path, "unix_socket_dir"),
                f"the socket path {socket_path!r} is longer than the {_UNIX_PATH_MAX} bytes "
                "a Unix socket address holds",
            )


def _check_server_tls(
    path: str, mode: str | None, ca_cert: str | None, certificate: str | None, key: str | None
) -> None:
    if mode in ("verify-ca", "verify-full") and ca_cert is None:
        raise ConfigError(_join(path, "server_tls_mode"), f"{mode!r} needs server_tls_ca_cert")
    _check_pair(path, "server_tls_certificate", certificate, "server_tls_private_key", key)


# ---------------------------------------------------------------------------------------
# [pools.<name>], users, auth_query


def _pam_service(value: object, path: str, ctx: _Context) -> str:
    """A service of /etc/pam.d, or (containing "/") a service file, relative to the
    config file's directory; libpam must be there to use it."""
    service = _name(value, path, ctx)
    if "/" in service:
        service = str(ctx.base_dir / service)
    try:
        pam.check_service(service)
    except pam.PamUnavailable as exc:
        raise ConfigError(path, str(exc)) from None
    return service


_USER_SPEC: dict[str, Parser] = {
    "username": _name,
    "password": _string,
    "pool_size": _positive,
    "min_pool_size": _non_negative,
    "pool_mode": _pool_mode,
    "server_username": _name,
    "server_password": _string,
    "server_lifetime": _duration,
    "auth_pam_service": _pam_service,
}


def _user(value: object, path: str, ctx: _Context) -> UserConfig:
    values = _read_keys(
        _table(value, path),
        path,
        _USER_SPEC,
        ctx,
        defaults=_field_defaults(UserConfig),
    )
    _require(values, path, "username", "password")
    user = UserConfig(**values)
    if user.min_pool_size > user.pool_size:
        raise ConfigError(
            _join(path, "min_pool_size"),
            f"{user.min_pool_size} is larger than pool_size {user.pool_size}",
        )
    if user.server_password is not None and user.server_username is None:
        raise ConfigError(_join(path, "server_password"), "set without server_username")
    return user


def _users(value: object, path: str, ctx: _Context) -> list[UserConfig]:
    entries: list[tuple[str, object]]
    if isinstance(value, list):
        entries = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        # Legacy TOML form [pools.db.users.0], [pools.db.users.1]: ordered by number.
        numbered: list[tuple[int, str, object]] = []
        for key, item in value.items():
            if not _NUMERIC_KEY.fullmatch(key):
                raise ConfigError(
                    _join(path, key),
                    "user keys must be numbers (users.0, users.1, ...); "
                    "or write the users as a list ([[...users]] in TOML)",
                )
            numbered.append((int(key), _join(path, key), item))
        numbered.sort(key=lambda entry: entry[0])
        entries = [(key_path, item) for _, key_path, item in numbered]
    else:
        raise ConfigError(path, f"expected a list of users, got {_show(value)}")
    users: list[UserConfig] = []
    seen: dict[str, str] = {}
    for key_path, item in entries:
        user = _user(item, key_path, ctx)
        if user.username in seen:
            raise ConfigError(
                _join(key_path, "username"),
                f"duplicate username {user.username!r} (also in {seen[user.username]})",
            )
        seen[user.username] = key_path
        users.append(user)
    return users


_AUTH_QUERY_SPEC: dict[str, Parser] = {
    "query": _name,
    "user": _name,
    "password": _string,
    "database": _name,
    "workers": _positive,
    "server_user": _name,
    "server_password": _string,
    "pool_size": _positive,
    "min_pool_size": _non_negative,
    "cache_ttl": _duration,
    "cache_failure_ttl": _duration,
    "min_interval": _duration,
}


def _auth_query(value: object, path: str, ctx: _Context) -> AuthQueryConfig:
    values = _read_keys(_table(value, path), path, _AUTH_QUERY_SPEC, ctx)
    _require(values, path, "query", "user")
    auth_query = AuthQueryConfig(**values)
    if auth_query.server_password is not None and auth_query.server_user is None:
        raise ConfigError(_join(path, "server_password"), "set without server_user")
    if auth_query.min_pool_size > auth_query.pool_size:
        raise ConfigError(
            _join(path, "min_pool_size"),
            f"{auth_query.min_pool_size} is larger than pool_size {auth_query.pool_size}",
        )
    return auth_query


_POOL_SPEC: dict[str, Parser] = {
    "server_host": _name,
    "server_port": _port,
    "server_database": _name,
    "pool_mode": _pool_mode,
    "application_name": _string,
    # Plain integers (ms) in PgDoorman; unit strings are accepted here as well.
    "connect_timeout": _positive_duration,
    "idle_timeout": _duration,
    "server_lifetime": _duration,
    "cleanup_server_connections": _bool,
    "pin_on_listen": _bool,
    "pin_on_advisory_lock": _bool,
    "listen_fanout": _bool,
    "log_client_parameter_status_changes": _bool,
    "log_min_duration_statement": _duration_or_off,
    "prepared_statements_cache_size": _non_negative,
    "server_prepared_statements_cache_size": _non_negative,
    "startup_parameters": _startup_parameters,
    "users": _users,
    "max_db_connections": _non_negative,
    "min_connection_lifetime": _duration,
    "reserve_pool_size": _non_negative,
    "reserve_pool_timeout": _duration,
    "min_guaranteed_pool_size": _non_negative,
    "scaling_warm_pool_ratio": _percent,
    "scaling_fast_retries": _non_negative,
    "scaling_cooldown_sleep": _duration,
    "server_tls_mode": _server_tls_mode,
    "server_tls_ca_cert": _name,
    "server_tls_certificate": _name,
    "server_tls_private_key": _name,
    "patroni_api_urls": _url_list,
    "fallback_cooldown": _duration,
    "patroni_api_timeout": _duration,
    "fallback_connect_timeout": _duration,
    "fallback_lifetime": _duration,
    "auth_query": _auth_query,
}
# scaling_cooldown_sleep: the pause of PgDoorman's threads between two looks at a full
# burst gate; here a finished server opening wakes the queue (see GENERAL_NOT_APPLICABLE
# for scaling_fast_retries).
POOL_NOT_APPLICABLE = frozenset({"scaling_fast_retries", "scaling_cooldown_sleep"})
POOL_NOT_IMPLEMENTED: frozenset[str] = frozenset()


def _pools(
    value: object, path: str, ctx: _Context, general: GeneralConfig
) -> dict[str, PoolConfig]:
    pools: dict[str, PoolConfig] = {}
    for name, raw in _table(value, path).items():
        pool_path = _join(path, name)
        if not name:
            raise ConfigError(pool_path, "a pool name must not be empty")
        if name in ADMIN_DATABASES:
            ctx.warn(pool_path, "this database name reaches the admin console, never this pool")
        values = _read_keys(
            _table(raw, pool_path),
            pool_path,
            _POOL_SPEC,
            ctx,
            not_implemented=POOL_NOT_IMPLEMENTED,
            not_applicable=POOL_NOT_APPLICABLE,
            defaults=_field_defaults(PoolConfig),
        )
        pool = PoolConfig(name=name, **values)
        _check_pool(pool, pool_path, general, ctx)
        pools[name] = pool
    if not pools:
        ctx.warn(path, "no pools configured; only the admin console is available")
    return pools


def _check_pool(pool: PoolConfig, path: str, general: GeneralConfig, ctx: _Context) -> None:
    if general.prepared_statements and pool.prepared_statements_cache_size == 0:
        raise ConfigError(
            _join(path, "prepared_statements_cache_size"),
            "must be greater than 0 while general.prepared_statements is true",
        )
    if pool.max_db_connections:
        total = sum(user.min_pool_size for user in pool.users)
        if total > pool.max_db_connections:
            raise ConfigError(
                _join(path, "max_db_connections"),
                f"{pool.max_db_connections} is less than the users' min_pool_size sum ({total})",
            )
    _check_server_tls(
        path,
        pool.server_tls_mode,
        pool.server_tls_ca_cert or general.server_tls_ca_cert,
        pool.server_tls_certificate,
        pool.server_tls_private_key,
    )
    size = startup_size(general.startup_parameters | pool.startup_parameters)
    if size > STARTUP_PARAMETERS_BUDGET:
        raise ConfigError(
            _join(path, "startup_parameters"),
            f"with general.startup_parameters takes {size} bytes in a StartupMessage, "
            f"more than {STARTUP_PARAMETERS_BUDGET}",
        )
    auth_query = pool.auth_query
    dedicated_user = auth_query.server_user if auth_query is not None else None
    if dedicated_user is not None and pool.find_user(dedicated_user) is not None:
        # Both would be listed, and measured, as the same pool.
        raise ConfigError(
            _join(_join(path, "auth_query"), "server_user"),
            f"{dedicated_user!r} is also a user of this pool; "
            "the shared pool needs a name of its own",
        )
    if not pool.users and auth_query is None:
        ctx.warn(_join(path, "users"), "no users configured, so no client can use this pool")


# ---------------------------------------------------------------------------------------
# [web] / [prometheus], [talos], the whole document

_WEB_SPEC: dict[str, Parser] = {
    "enabled": _bool,
    "host": _name,
    "port": _port,
    "ui": _bool,
    "ui_anonymous": _bool,
    "log_tap_max_entries": _positive,
    "sso_enabled": _bool,
    "sso_proxy_url": _name,
    "sso_public_key_file": _name,
    "sso_audience": _string_list,
    "sso_allowed_users": _string_list,
    "trusted_proxies": _cidr_list,
    "sso_groups_claim": _name,
    "sso_admin_groups": _string_list,
    "sso_require_https": _bool,
}
WEB_NOT_IMPLEMENTED = frozenset(_WEB_SPEC) - {"enabled", "host", "port"}

_TALOS_SPEC: dict[str, Parser] = {"keys": _string_list, "databases": _string_list}

_SECTIONS = ("general", "pools", "web", "prometheus", "talos")


def _build(data: dict[str, Any], source: str, ctx: _Context) -> Config:
    for key in data:
        if key not in _SECTIONS:
            ctx.warn(_join("", key), UNKNOWN_KEY)
    general = _general(data.get("general", {}), "general", ctx)

    web_path = "web"
    if "prometheus" in data:
        if "web" in data:
            raise ConfigError("prometheus", "old name of [web]; set only one of them")
        web_path = "prometheus"  # the old name, still used by PgDoorman's own sample
    web_values = _read_keys(
        _table(data.get(web_path, {}), web_path),
        web_path,
        _WEB_SPEC,
        ctx,
        not_implemented=WEB_NOT_IMPLEMENTED,
        defaults=_field_defaults(WebConfig),
    )
    web = WebConfig(**web_values)

    talos = TalosConfig()
    if "talos" in data:
        talos = TalosConfig(**_read_keys(_table(data["talos"], "talos"), "talos", _TALOS_SPEC, ctx))
        if talos.keys and not talos.databases:
            ctx.warn("talos.databases", "empty: every talos token will be refused")
        if talos.databases and not talos.keys:
            ctx.warn("talos.keys", "empty: every talos token will be refused")

    pools = _pools(data.get("pools", {}), "pools", ctx, general)
    return Config(
        general=general, pools=pools, web=web, talos=talos, warnings=ctx.warnings, source=source
    )
