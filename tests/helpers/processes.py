"""Processes the tests start or watch, by PID."""

from __future__ import annotations


def process_alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for a parent that does not reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    # The state follows the command name, which may itself hold spaces or ")".
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")
