"""Identifiers handed to clients: connection ids (the BackendKeyData pid) and cancel secrets.

One allocator per process, injected where needed, so that worker processes can later
draw from disjoint ranges and a cancel key tells which worker owns the client.
"""

from __future__ import annotations

import os
from typing import Final

# Bound once: compiled, `os.urandom` is a lookup in the module at every call, and
# `int.from_bytes` binds the classmethod anew each time.
_urandom: Final = os.urandom
_from_bytes: Final = int.from_bytes


class IdAllocator:
    __slots__ = ("_next_client", "_next_server", "worker_id")

    # Low bits of a client id count connections; the worker id sits above them.
    WORKER_SHIFT = 24

    def __init__(self, worker_id: int = 0) -> None:
        self.worker_id = worker_id
        self._next_client = 0
        self._next_server = 0

    def next_client_id(self) -> int:
        self._next_client = (self._next_client % ((1 << self.WORKER_SHIFT) - 1)) + 1
        return (self.worker_id << self.WORKER_SHIFT) | self._next_client

    def skip_client_ids(self, count: int) -> None:
        """Count client ids on from `count` (a process an upgrade started: the clients
        its predecessor hands over keep theirs, which then rarely meet new ones)."""
        self._next_client = count % ((1 << self.WORKER_SHIFT) - 1)

    def next_server_id(self) -> int:
        self._next_server += 1
        return self._next_server

    @staticmethod
    def cancel_secret() -> int:
        # BackendKeyData carries a signed int32: four bytes of the OS's CSPRNG.
        return _from_bytes(_urandom(4), "big", signed=True)

    def owner_of(self, client_id: int) -> int:
        return client_id >> self.WORKER_SHIFT
