"""The byte a new process writes once it serves tells the old one whether it takes the
old process's clients: a version that does not read the channel answers "R", and the
old process then disconnects its clients rather than sending them into the void."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from pg_doorman.app import upgrade


@pytest.fixture
def ready_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    read_end, write_end = os.pipe()
    monkeypatch.setattr(upgrade, "_ready_fd", write_end)
    monkeypatch.setattr(upgrade, "_takes_clients", False)
    monkeypatch.setattr(upgrade, "_migration", None)
    yield read_end
    os.close(read_end)


def test_a_process_that_takes_the_channel_says_so(
    ready_pipe: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(upgrade, "_migration", theirs)
    try:
        assert upgrade.take_migration_channel() is theirs
        assert upgrade.take_migration_channel() is None  # taken once
        upgrade.announce_ready()
        assert os.read(ready_pipe, 8) == upgrade.READY_TAKING_CLIENTS
    finally:
        ours.close()
        theirs.close()


def test_a_process_without_the_channel_answers_plain_ready(ready_pipe: int) -> None:
    upgrade.announce_ready()
    assert os.read(ready_pipe, 8) == upgrade.READY
