"""CPU time and resident memory of a process and its descendants, read from /proc.

A process tree rather than one pid, so a pooler that forks workers is measured whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    # Whole clock ticks, so that differences of two readings are exact: in seconds the
    # user part of a difference could come out a rounding error above the whole.
    cpu_ticks: int  # utime + stime
    user_ticks: int  # utime alone: the process's own code, no syscalls
    rss_bytes: int


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fixed fields start after the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, found through the ppid field of /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or len(fields) < 2:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def usage(pid: int) -> Usage:
    """Summed utime, stime and RSS over the tree rooted at `pid` (zero if it is gone)."""
    ticks = 0
    user_ticks = 0
    pages = 0
    for member in descendants(pid):
        fields = _stat_fields(member)
        if fields is None:
            continue
        # After the ')' field 0 is state (field 3 in proc(5)): utime is 14, stime 15, rss 24.
        user_ticks += int(fields[11])
        ticks += int(fields[11]) + int(fields[12])
        pages += int(fields[21])
    return Usage(cpu_ticks=ticks, user_ticks=user_ticks, rss_bytes=pages * PAGE_SIZE)


def per_transaction_us(before: Usage, after: Usage, transactions: int) -> tuple[float, float]:
    """CPU time and its user part per transaction, in µs, between two readings.

    A worker that exits between the readings takes its ticks out of both sums, so each
    difference is kept at zero or above and the user part within the whole."""
    spent = max(0, after.cpu_ticks - before.cpu_ticks)
    user = min(max(0, after.user_ticks - before.user_ticks), spent)
    scale = 1e6 / CLK_TCK / transactions
    return spent * scale, user * scale


@dataclass(frozen=True)
class MachineTimes:
    total_ticks: int  # every CPU's time of every kind, summed over CPUs
    steal_ticks: int  # time a virtual CPU was ready but the hypervisor ran something else


def parse_machine_times(stat_text: str) -> MachineTimes:
    """The aggregate `cpu` line of /proc/stat (proc(5)): user nice system idle iowait irq
    softirq steal [guest guest_nice]; guest time is already counted in user, so it is left
    out of the total. Kernels before 2.6.11 have no steal field: it reads as zero."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]
            steal = values[7] if len(values) > 7 else 0
            return MachineTimes(total_ticks=sum(values), steal_ticks=steal)
    raise ValueError("no aggregate cpu line in /proc/stat")


def machine_times() -> MachineTimes | None:
    """The machine's CPU time so far, or None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            return parse_machine_times(f.read())
    except (OSError, ValueError):
        return None


def steal_percent(before: MachineTimes | None, after: MachineTimes | None) -> float | None:
    """The share of CPU time between two readings that the hypervisor gave to others, in
    percent to one decimal (the ticks are hundredths of a second: finer means nothing)."""
    if before is None or after is None or after.total_ticks <= before.total_ticks:
        return None
    stolen = after.steal_ticks - before.steal_ticks
    return round(100.0 * stolen / (after.total_ticks - before.total_ticks), 1)
