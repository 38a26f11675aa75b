"""The sockets a process holds, counted by kind and state (SHOW SOCKETS, the
`pg_doorman_sockets` metric). Linux only: read from /proc.

A process's sockets are the `socket:[inode]` links in /proc/<pid>/fd; each is looked up
in /proc/<pid>/net/tcp, tcp6 and unix (the tables of its network namespace) for its
state. Those tables list every socket of the namespace, not only the pooler's, so a
scan costs in proportion to the whole host's connections: it runs in a thread, at most
once per CACHE_SECONDS, and only for the admin console and /metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Final

# The kernel's TCP states 1..13 (include/net/tcp_states.h), as PgDoorman names them.
TCP_STATES: Final = (
    "established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait", "close",
    "close_wait", "last_ack", "listen", "closing", "new_syn_recv", "bound_inactive",
)  # fmt: skip
# The socket states 0..4 of /proc/net/unix's `St` column (SS_FREE .. SS_DISCONNECTING).
UNIX_STREAM_STATES: Final = ("free", "unconnected", "connecting", "connected", "disconnecting")
_SOCK_STREAM, _SOCK_DGRAM, _SOCK_SEQPACKET = 1, 2, 5

# SHOW SOCKETS' columns in PgDoorman's order.
COLUMNS: Final = (
    *(f"tcp_{state}" for state in TCP_STATES),
    *(f"tcp6_{state}" for state in TCP_STATES),
    *(f"unix_{state}" for state in UNIX_STREAM_STATES),
    "unix_dgram",
    "unix_seq_packet",
    "unknown",
)

CACHE_SECONDS: Final = 1.0
_SOCKET_LINK: Final = "socket:["

SocketCounts = dict[str, int]


def empty_counts() -> SocketCounts:
    return dict.fromkeys(COLUMNS, 0)


def count_tcp(table: str, inodes: set[str], prefix: str, counts: SocketCounts) -> None:
    """Count the rows of a /proc/net/tcp or tcp6 table whose inode is in `inodes`,
    by state, under `<prefix>_<state>`; the inodes found are taken out of `inodes`."""
    for line in table.splitlines()[1:]:
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        fields = line.split(None, 10)
        if len(fields) < 10 or fields[9] not in inodes:
            continue
        try:
            state = int(fields[3], 16)
        except ValueError:
            continue
        inodes.discard(fields[9])
        if 1 <= state <= len(TCP_STATES):
            counts[f"{prefix}_{TCP_STATES[state - 1]}"] += 1
        else:
            counts["unknown"] += 1


def count_unix(table: str, inodes: set[str], counts: SocketCounts) -> None:
    """Count the rows of /proc/net/unix whose inode is in `inodes`: stream sockets by
    state, datagram and seqpacket ones by type; the inodes found are taken out."""
    for line in table.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode [Path, which may hold spaces]
        fields = line.split(None, 7)
        if len(fields) < 7 or fields[6] not in inodes:
            continue
        try:
            kind, state = int(fields[4], 16), int(fields[5], 16)
        except ValueError:
            continue
        inodes.discard(fields[6])
        if kind == _SOCK_STREAM:
            name = UNIX_STREAM_STATES[state] if state < len(UNIX_STREAM_STATES) else "free"
            counts[f"unix_{name}"] += 1
        elif kind == _SOCK_DGRAM:
            counts["unix_dgram"] += 1
        elif kind == _SOCK_SEQPACKET:
            counts["unix_seq_packet"] += 1
        else:
            counts["unknown"] += 1


def socket_inodes(fd_dir: str) -> set[str]:
    """The inodes of the sockets among the descriptors listed in `fd_dir`."""
    inodes = set()
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:  # closed since the listing
            continue
        if target.startswith(_SOCKET_LINK):
            inodes.add(target[len(_SOCKET_LINK) : -1])
    return inodes


def scan(pid: int | None = None, proc: str = "/proc") -> SocketCounts | None:
    """The sockets of process `pid` (this one by default) by kind and state, or None
    where /proc does not tell (not Linux, or another user's process)."""
    base = os.path.join(proc, "self" if pid is None else str(pid))
    try:
        inodes = socket_inodes(os.path.join(base, "fd"))
    except OSError:
        return None
    counts = empty_counts()
    for table in ("tcp", "tcp6", "unix"):
        if not inodes:
            break
        try:
            with open(os.path.join(base, "net", table), encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:  # no IPv6, or no such table in this kernel
            continue
        if table == "unix":
            count_unix(text, inodes, counts)
        else:
            count_tcp(text, inodes, table, counts)
    # UDP, netlink and other kinds, and sockets opened between the listing and the read.
    counts["unknown"] += len(inodes)
    return counts


_counted: dict[int | None, tuple[float, SocketCounts | None]] = {}
_counting: dict[int | None, asyncio.Future[SocketCounts | None]] = {}


async def counted(pid: int | None = None) -> SocketCounts | None:
    """`scan(pid)`, at most once per CACHE_SECONDS for each process, in a thread: the
    /proc reads and the parsing stay off the event loop. Callers asking while a scan
    runs share it."""
    known = _counted.get(pid)
    if known is not None and time.monotonic() - known[0] < CACHE_SECONDS:
        return known[1]
    running = _counting.get(pid)
    if running is None:
        running = asyncio.ensure_future(asyncio.to_thread(scan, pid))
        _counting[pid] = running
        running.add_done_callback(lambda done: _keep(pid, done))
    return await asyncio.shield(running)


def _keep(pid: int | None, done: asyncio.Future[SocketCounts | None]) -> None:
    _counting.pop(pid, None)
    if not done.cancelled() and done.exception() is None:
        _counted[pid] = (time.monotonic(), done.result())


def add_up(parts: Iterable[SocketCounts | None]) -> SocketCounts | None:
    """The counts of several processes together; None if none of them had any."""
    total: SocketCounts | None = None
    for part in parts:
        if part is None:
            continue
        if total is None:
            total = empty_counts()
        for key, count in part.items():
            total[key] = total.get(key, 0) + count
    return total


def totals_by_kind(counts: SocketCounts) -> dict[str, int]:
    """PgDoorman's metric labels: TCP over IPv4, over IPv6, Unix, and the rest."""
    out = dict.fromkeys(("tcp", "tcp6", "unix"), 0)
    for key, count in counts.items():
        kind = key.split("_", 1)[0]
        if kind in out:
            out[kind] += count
    out["unknown"] = counts.get("unknown", 0)
    return out
