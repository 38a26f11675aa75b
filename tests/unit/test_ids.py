"""Client ids and cancel secrets."""

from __future__ import annotations

import os

import pytest

from pg_doorman.net.ids import IdAllocator


def test_cancel_secrets_are_signed_int32_and_do_not_repeat() -> None:
    secrets = [IdAllocator.cancel_secret() for _ in range(5000)]
    assert all(-(1 << 31) <= s < (1 << 31) for s in secrets)
    assert len(set(secrets)) > 4990  # 32 random bits: a collision or two at most
    assert min(secrets) < 0 < max(secrets)


# Python 3.12+ warns about forking a process with threads (earlier tests leave some in
# the test process); the child only draws secrets and writes to a pipe, no lock involved.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_repeat_its_parents_secrets() -> None:
    IdAllocator.cancel_secret()  # any state of the generator exists before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        values = [IdAllocator.cancel_secret() for _ in range(8)]
        os.write(write_end, b"".join(v.to_bytes(4, "little", signed=True) for v in values))
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 64):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    child = [int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, 32, 4)]
    parent = [IdAllocator.cancel_secret() for _ in range(8)]
    assert len(child) == 8
    assert child != parent


def test_client_ids_carry_the_worker_index() -> None:
    ids = IdAllocator(worker_id=3)
    first, second = ids.next_client_id(), ids.next_client_id()
    assert second == first + 1
    assert ids.owner_of(first) == 3
