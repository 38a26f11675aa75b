def candidates(data: bytes, start: int, end: int, /) -> int:
    """Which words data[start:end] contains, in any mix of case, as ORed bits: 1
    "advisory_", 2 "set_config", 4 "temp"."""
