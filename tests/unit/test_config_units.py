"""Durations and byte sizes in PgDoorman's spellings."""

from __future__ import annotations

import pytest

from pg_doorman.config import (
    format_byte_size,
    format_duration_ms,
    parse_byte_size,
    parse_duration_ms,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (5000, 5000),
        ("5000", 5000),
        ("5ms", 5),
        ("5s", 5_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("5S", 5_000),
        ("5MS", 5),
        ("2H", 7_200_000),
        (" 5 s ", 5_000),
        ("10 ms", 10),
    ],
)
def test_durations(value: object, expected: int) -> None:
    assert parse_duration_ms(value) == expected


@pytest.mark.parametrize(
    "value", [-1, "-5s", "5x", "1.5s", "5us", "", "s", "5 s s", True, 1.5, None, [5], "\u0665s"]
)
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration_ms(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("1024B", 1024),
        ("1K", 1024),
        ("1KB", 1024),
        ("1kb", 1024),
        ("1M", 1 << 20),
        ("1MB", 1 << 20),
        ("256mb", 256 << 20),
        ("1G", 1 << 30),
        ("1GB", 1 << 30),
        ("1 MiB", 1 << 20),
        (" 2 k ", 2048),
    ],
)
def test_byte_sizes(value: object, expected: int) -> None:
    assert parse_byte_size(value) == expected


@pytest.mark.parametrize("value", [-1, "1TB", "1.5M", "M", "", "1 K B", False, 2.0, None])
def test_bad_byte_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="expected a byte size"):
        parse_byte_size(value)


@pytest.mark.parametrize("ms", [0, 1, 999, 1_000, 1_500, 60_000, 90_000, 3_600_000, 86_400_000])
def test_duration_format_round_trips(ms: int) -> None:
    assert parse_duration_ms(format_duration_ms(ms)) == ms


def test_duration_format_is_short() -> None:
    assert format_duration_ms(600_000) == "10m"
    assert format_duration_ms(1_500) == "1500ms"


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1536, 1 << 20, 256 << 20, 1 << 30, 3 << 30])
def test_byte_size_format_round_trips(size: int) -> None:
    assert parse_byte_size(format_byte_size(size)) == size


def test_byte_size_format_is_short() -> None:
    assert format_byte_size(256 << 20) == "256MB"
    assert format_byte_size(1536) == "1536B"
    assert format_byte_size(2048) == "2KB"
