"""Ports for test servers: drawn once per process, and ones that stay refused."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from pg_doorman.app import embedded_pg
from pg_doorman.app.embedded_pg import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    """A port drawn for one server and not bound by it yet must not be drawn again
    for another (the pooler under test once got the port a test had taken for a
    server that was down, and connected to itself)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # and it was free


def test_a_refused_port_refuses_and_cannot_be_taken(refused_port: Callable[[], int]) -> None:
    port = refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as sock, pytest.raises(OSError) as taken:
        sock.bind(("127.0.0.1", port))
    assert taken.value.errno == errno.EADDRINUSE


def test_free_port_stays_out_of_the_range_for_outgoing_connections() -> None:
    """A drawn port that became some connection's local port before its server bound
    it made PostgreSQL fail to start with EADDRINUSE."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        low, high = (int(part) for part in f.read().split())
    for _ in range(50):
        assert not low <= free_port() <= high


_HOLD_A_CLAIM = """
import sys, time
from pg_doorman.app import embedded_pg
assert embedded_pg._claim(int(sys.argv[1]))
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_port_claimed_by_another_live_process_is_not_drawn_here() -> None:
    """Test runs side by side each draw ports; one run's port must not be handed to
    the other before its server binds it (nor while that server restarts)."""
    port = free_port()  # this process' claim file
    assert embedded_pg._claim(port) is False  # already ours
    other = free_port()
    (embedded_pg._CLAIMS_DIR / str(other)).unlink()  # as if drawn by nobody
    embedded_pg._handed_out.discard(other)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_CLAIM, str(other)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"
        assert embedded_pg._claim(other) is False
    finally:
        holder.kill()  # dies without releasing: its claim file stays behind
        holder.wait()
    assert (embedded_pg._CLAIMS_DIR / str(other)).exists()
    assert embedded_pg._claim(other) is True  # a dead process's claim is taken over
    assert (embedded_pg._CLAIMS_DIR / str(other)).read_text() == str(os.getpid())
