"""Configuration: PgDoorman's TOML/YAML format, loaded into frozen dataclasses.

``load_config(path)`` reads a file (and its ``include.files``), ``parse_config(mapping)``
validates an already-parsed mapping. Both raise :class:`ConfigError` with the key path of
the first problem and return a :class:`Config` whose ``warnings`` list everything that was
accepted but deserves an operator's attention.
"""

from .loader import ConfigError, load_config, parse_config
from .schema import (
    ADMIN_DATABASES,
    POOL_MODES,
    RESTART_REQUIRED,
    AuthQueryConfig,
    Config,
    GeneralConfig,
    PoolConfig,
    PoolOverride,
    TalosConfig,
    UserConfig,
    WebConfig,
)
from .units import format_byte_size, format_duration_ms, parse_byte_size, parse_duration_ms

__all__ = [
    "ADMIN_DATABASES",
    "POOL_MODES",
    "RESTART_REQUIRED",
    "AuthQueryConfig",
    "Config",
    "ConfigError",
    "GeneralConfig",
    "PoolConfig",
    "PoolOverride",
    "TalosConfig",
    "UserConfig",
    "WebConfig",
    "format_byte_size",
    "format_duration_ms",
    "load_config",
    "parse_byte_size",
    "parse_config",
    "parse_duration_ms",
]
