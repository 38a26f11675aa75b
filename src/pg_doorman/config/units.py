"""Durations and byte sizes as PgDoorman writes them in its config files.

A bare integer keeps PgDoorman's meaning (milliseconds, bytes); strings carry a unit.
Both parsers raise ``ValueError`` with a message that reads well after a key path.
"""

from __future__ import annotations

import re

__all__ = [
    "format_byte_size",
    "format_duration_ms",
    "parse_byte_size",
    "parse_duration_ms",
]

_MS_PER_UNIT = {
    "ms": 1,
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
}

_BYTES_PER_UNIT = {
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}

# An integer, optional spaces, an optional unit. No signs and no decimals: PgDoorman
# dropped its fractional forms, and a negative timeout is always a mistake.
_NUMBER_UNIT_RE = re.compile(r"\s*([0-9]+)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)

_DURATION_HINT = (
    "a duration (integer milliseconds, or a string like '500ms', '5s', '1m', '1h', '1d')"
)
_BYTE_SIZE_HINT = "a byte size (integer bytes, or a string like '512B', '64K', '1MB', '1G')"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def parse_duration_ms(value: object) -> int:
    """Return a duration in milliseconds: ``5000``, ``"5000"``, ``"5s"``, ``"1 h"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected {_DURATION_HINT}, got {value} (negative)")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT_RE.fullmatch(value)
        if match:
            unit = match.group(2).lower() or "ms"
            factor = _MS_PER_UNIT.get(unit)
            if factor is not None:
                return int(match.group(1)) * factor
    raise ValueError(f"expected {_DURATION_HINT}, got {_describe(value)}")


def parse_byte_size(value: object) -> int:
    """Return a size in bytes: ``1048576``, ``"1M"``, ``"1MB"``, ``"1 mib"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected {_BYTE_SIZE_HINT}, got {value} (negative)")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT_RE.fullmatch(value)
        if match:
            unit = match.group(2).lower() or "b"
            factor = _BYTES_PER_UNIT.get(unit)
            if factor is not None:
                return int(match.group(1)) * factor
    raise ValueError(f"expected {_BYTE_SIZE_HINT}, got {_describe(value)}")


def format_duration_ms(ms: int) -> str:
    """The shortest exact spelling of ``ms`` that :func:`parse_duration_ms` reads back."""
    if ms == 0:
        return "0ms"
    for unit in ("d", "h", "m", "s"):
        factor = _MS_PER_UNIT[unit]
        if ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


def format_byte_size(size: int) -> str:
    """The shortest exact spelling of ``size`` that :func:`parse_byte_size` reads back."""
    if size == 0:
        return "0B"
    for unit in ("GB", "MB", "KB"):
        factor = _BYTES_PER_UNIT[unit.lower()]
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
