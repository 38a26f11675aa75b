def send_now(fd: int, data: bytes | bytearray | memoryview, /) -> int:
    """Bytes the kernel took, 0 when the socket is full; raises OSError otherwise."""
