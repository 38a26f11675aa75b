"""Counting a process's sockets from /proc (SHOW SOCKETS, pg_doorman_sockets): the
table parsers on sample text, a scan of a made-up /proc, one of this very process, the
cache, and what the SHOW table and the metric make of the counts."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pg_doorman.admin.show import TableUnavailable
from pg_doorman.admin.show import sockets as show_sockets
from pg_doorman.admin.snapshot import merge
from pg_doorman.stats import sockets
from pg_doorman.stats.sockets import COLUMNS, count_tcp, count_unix, empty_counts, scan
from pg_doorman.web.metrics import render

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1920 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1920 0100007F:C350 01 00000000:00000000 02:000AFC7A 00000000  1000        0 5002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:C351 0100007F:1538 01 00000000:00000000 02:000AFC7A 00000000  1000        0 5003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1920 0100007F:C352 08 00000000:00000000 00:00000000 00000000  1000        0 5004 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:1920 0100007F:C353 06 00000000:00000000 03:00000F22 00000000     0        0 0 3 0000000000000000
   5: 0100007F:1920 0100007F:C354 01 00000000:00000000 02:000AFC7A 00000000  1000        0 9999 1 0000000000000000 20 4 30 10 -1
"""  # noqa: E501

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F8F 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 6001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1920 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000  1000        0 6002 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000001000000:1920 00000000000000000000000001000000:D432 0D 00000000:00000000 00:00000000 00000000  1000        0 6003 1 0000000000000000 20 4 30 10 -1
"""  # noqa: E501

UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 7001 /tmp/sock dir/.s.PGSQL.6432
0000000000000000: 00000003 00000000 00000000 0001 03 7002 /tmp/sock dir/.s.PGSQL.6432
0000000000000000: 00000003 00000000 00000000 0001 03 7003
0000000000000000: 00000002 00000000 00000000 0002 01 7004 @abstract
0000000000000000: 00000003 00000000 00000000 0005 03 7005
0000000000000000: 00000003 00000000 00000000 0001 03 8888 /run/other
"""


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {key: count for key, count in counts.items() if count}


def test_tcp_rows_of_our_inodes_are_counted_by_state() -> None:
    inodes = {"5001", "5002", "5003", "5004", "4242"}
    counts = empty_counts()
    count_tcp(TCP, inodes, "tcp", counts)
    # 0A listen, 01 established twice (a client's and a server's), 08 close_wait; the
    # TIME_WAIT row (inode 0) and another process's (9999) are not ours.
    assert nonzero(counts) == {"tcp_listen": 1, "tcp_established": 2, "tcp_close_wait": 1}
    assert inodes == {"4242"}  # the rest were found


def test_tcp6_rows_and_the_kernels_newest_state() -> None:
    inodes = {"6001", "6002", "6003"}
    counts = empty_counts()
    count_tcp(TCP6, inodes, "tcp6", counts)
    # 0D is TCP_BOUND_INACTIVE (Linux 6.7+: bound, neither listening nor connected).
    assert nonzero(counts) == {"tcp6_listen": 1, "tcp6_established": 1, "tcp6_bound_inactive": 1}
    assert not inodes


def test_unix_rows_by_type_and_stream_state() -> None:
    inodes = {"7001", "7002", "7003", "7004", "7005"}
    counts = empty_counts()
    count_unix(UNIX, inodes, counts)
    # A listening stream socket is "unconnected" (St 01), paths with spaces are fine.
    assert nonzero(counts) == {
        "unix_unconnected": 1, "unix_connected": 2, "unix_dgram": 1, "unix_seq_packet": 1,
    }  # fmt: skip
    assert not inodes


def test_columns_follow_pgdoorman() -> None:
    assert len(COLUMNS) == 34
    assert COLUMNS[:3] == ("tcp_established", "tcp_syn_sent", "tcp_syn_recv")
    assert COLUMNS[9:13] == ("tcp_listen", "tcp_closing", "tcp_new_syn_recv", "tcp_bound_inactive")
    assert COLUMNS[13] == "tcp6_established"
    assert COLUMNS[26:] == (
        "unix_free", "unix_unconnected", "unix_connecting", "unix_connected",
        "unix_disconnecting", "unix_dgram", "unix_seq_packet", "unknown",
    )  # fmt: skip


def fake_proc(root: Path, links: dict[str, str], tables: dict[str, str]) -> Path:
    """/proc/<pid> with fd links (targets need not exist) and net tables."""
    (root / "4321" / "fd").mkdir(parents=True)
    (root / "4321" / "net").mkdir()
    for fd, target in links.items():
        os.symlink(target, root / "4321" / "fd" / fd)
    for name, text in tables.items():
        (root / "4321" / "net" / name).write_text(text)
    return root


def test_scan_of_a_process_matches_its_descriptors_with_the_tables(tmp_path: Path) -> None:
    links = {
        "0": "/dev/null",
        "3": "socket:[5001]",
        "4": "socket:[5002]",
        "5": "socket:[6002]",
        "6": "socket:[7002]",
        "7": "socket:[31337]",  # a UDP or netlink socket: in none of the tables
        "8": "pipe:[5003]",
    }
    # No tcp6 table (a kernel without IPv6): the others still count.
    proc = fake_proc(tmp_path, links, {"tcp": TCP, "unix": UNIX})
    counts = scan(4321, proc=str(proc))
    assert counts is not None
    assert nonzero(counts) == {
        "tcp_listen": 1, "tcp_established": 1, "unix_connected": 1, "unknown": 2,
    }  # fmt: skip
    assert list(counts) == list(COLUMNS)


def test_scan_without_proc_says_so(tmp_path: Path) -> None:
    assert scan(4321, proc=str(tmp_path / "no-proc")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_scan_of_this_process_sees_the_sockets_it_opens() -> None:
    before = scan()
    assert before is not None
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        after = scan()
    finally:
        for sock in (listener, client, accepted, *pair, udp):
            sock.close()
    assert after is not None
    grown = {key: after[key] - before[key] for key in COLUMNS if after[key] != before[key]}
    assert grown == {
        "tcp_listen": 1, "tcp_established": 2, "unix_seq_packet": 2, "unknown": 1,
    }  # fmt: skip


def test_counted_scans_once_per_period_and_shares_a_running_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int | None] = []

    def fake_scan(pid: int | None = None, proc: str = "/proc") -> dict[str, int]:
        calls.append(pid)
        return {**empty_counts(), "tcp_listen": len(calls)}

    monkeypatch.setattr(sockets, "scan", fake_scan)
    monkeypatch.setattr(sockets, "_counted", {})

    async def ask() -> list[dict[str, int] | None]:
        together = await asyncio.gather(*(sockets.counted(77) for _ in range(5)))
        again = await sockets.counted(77)
        other = await sockets.counted(78)
        return [*together, again, other]

    answers = asyncio.run(ask())
    assert calls == [77, 78]
    assert all(a is not None and a["tcp_listen"] == 1 for a in answers[:6])
    assert answers[6] is not None and answers[6]["tcp_listen"] == 2


def counts_with(**nonzero_counts: int) -> dict[str, int]:
    return {**empty_counts(), **nonzero_counts}


def test_show_sockets_is_one_row_in_column_order() -> None:
    columns, rows = show_sockets({"sockets": counts_with(tcp_established=7, unknown=1)})
    assert [name for name, _ in columns] == list(COLUMNS)
    assert rows == [[7, *[0] * 32, 1]]


def test_show_sockets_without_proc_is_an_error() -> None:
    with pytest.raises(TableUnavailable, match="/proc"):
        show_sockets({"sockets": None})


def test_workers_sockets_add_up() -> None:
    def snap(sockets_counts: dict[str, int] | None) -> dict[str, object]:
        return {
            "workers": 1, "clients": [], "servers": [], "memory": 0, "accepted": 0,
            "cancel_requests": 0, "tls": 0, "plain": 0, "login_failures": 0,
            "connections": 0, "login_clients": 0, "log_level": 20, "worker_connections": {},
            "pools": [], "auth_query": [], "coordinator": [], "fallback": [],
            "startup_parameters": [], "startup_parameter_errors": [],
            "startup_parameters_dropped": [], "sockets": sockets_counts,
        }  # fmt: skip

    merged = merge([snap(counts_with(tcp_established=2)), snap(counts_with(tcp_established=3))])
    assert nonzero(merged["sockets"]) == {"tcp_established": 5}
    assert merge([snap(None), snap(None)])["sockets"] is None


def metric_samples(sockets_counts: dict[str, int] | None) -> dict[str, float]:
    snapshot = {
        "memory": 0, "log_level": 20, "pools": [], "workers": 1, "accepted": 0, "plain": 0,
        "tls": 0, "cancel_requests": 0, "worker_connections": {}, "auth_query": [],
        "coordinator": [], "fallback": [], "startup_parameter_errors": [],
        "startup_parameters_dropped": [], "sockets": sockets_counts,
    }  # fmt: skip
    text = render(snapshot).decode()
    return {
        sample.labels["type"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "pg_doorman_sockets"
        for sample in family.samples
    }


def test_metric_has_pgdoorman_types_and_is_absent_without_proc() -> None:
    counts = counts_with(
        tcp_established=4, tcp_listen=2, tcp6_established=1, unix_connected=3,
        unix_unconnected=1, unix_seq_packet=2, unknown=5,
    )  # fmt: skip
    assert metric_samples(counts) == {"tcp": 6, "tcp6": 1, "unix": 6, "unknown": 5}
    assert metric_samples(None) == {}
