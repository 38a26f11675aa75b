def mentions(data: bytes, start: int, end: int, /) -> bool:
    """Whether data[start:end] contains "advisory_" in any mix of case."""
