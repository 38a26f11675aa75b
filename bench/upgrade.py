"""A binary upgrade under load: do pgbench's clients notice?

    python -m bench.upgrade                     # 50 clients, 20 s, SIGUSR2 after 8 s
    python -m bench.upgrade --workers 2 --protocol prepared
    python -m bench.upgrade --smoke             # 16 s: checks that it works

pgbench runs `-S` through pg_doorman and the pooler is sent SIGUSR2 part-way through.
pgbench aborts a client on any connection error, so a run in which every client
finishes shows that no session was cut; with `--protocol prepared` each client also
keeps using the statements it prepared before the upgrade. Reported: the transactions,
the aborted clients, the throughput of each second (from `pgbench -P 1`) around the
upgrade, and how long the hand-over took (from the pooler's log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from bench.run import raise_fd_limit
from bench.targets import DATABASE, HOST, USER, Pooler, Postgres, pg_client_env

_PROGRESS = re.compile(r"progress: ([\d.]+) s, ([\d.]+) tps")
_SUCCESSOR = re.compile(r"upgrade: new process (\d+) serves")
_MOVED = re.compile(r"upgrade: (\d+) clients moved to the new process")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.upgrade", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="16 s, 10 clients")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=int, default=20, help="seconds of pgbench")
    parser.add_argument("--at", type=float, default=8.0, help="send SIGUSR2 after this long")
    parser.add_argument("--workers", type=int, default=1, help="general.workers")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple")
    args = parser.parse_args(argv)
    if args.smoke:
        # Long enough for a new process with workers to start on a loaded machine.
        args.clients, args.duration, args.at = 10, 16, 2.0
    return args


def _stamp(line: str) -> float | None:
    found = _STAMP.match(line)
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def hand_over_seconds(log: str) -> float | None:
    """From "new process serves" to the last "clients moved" line of the old process."""
    start = end = None
    for line in log.splitlines():
        if _SUCCESSOR.search(line):
            start = _stamp(line)
        elif _MOVED.search(line) and start is not None:
            end = _stamp(line)
    return None if start is None or end is None else end - start


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="pg_doorman-bench-upgrade-"))
    pg = Postgres(workdir, "scram")
    pooler = Pooler(workdir, pg, workers=args.workers)
    successor: int | None = None
    try:
        pg.start(scale=1)
        pooler.start()
        assert pooler.proc is not None
        argv_ = [str(pg.bin_dir / "pgbench"), "-n", "-S", "-M", args.protocol, "-P", "1"]
        argv_ += ["-c", str(args.clients), "-j", "2", "-T", str(args.duration)]
        argv_ += ["-h", HOST, "-p", str(pooler.port), "-U", USER, DATABASE]
        bench = subprocess.Popen(
            argv_, env=pg_client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(args.at)
        pooler.proc.send_signal(signal.SIGUSR2)
        stdout, stderr = bench.communicate(timeout=args.duration + 60)
        # The old process is gone once the new one serves and its clients have left.
        with contextlib.suppress(subprocess.TimeoutExpired):
            pooler.proc.wait(60)
        log = pooler.log_path.read_text(errors="replace")
        found = _SUCCESSOR.search(log)
        successor = int(found.group(1)) if found else None
        moved = sum(int(n) for n in _MOVED.findall(log))
        aborted = stderr.count("aborted in command")
        totals = re.search(r"number of transactions actually processed: (\d+)", stdout)
        per_second = [(float(t), float(tps)) for t, tps in _PROGRESS.findall(stderr)]
        print(f"pgbench -S -M {args.protocol} -c {args.clients} -T {args.duration}")
        print(f"workers {args.workers}; SIGUSR2 after {args.at:.0f} s")
        print(f"pgbench exit code: {bench.returncode}; aborted clients: {aborted}")
        print(f"transactions: {totals.group(1) if totals else 'unknown'}")
        print(f"clients moved to the new process: {moved}")
        seconds = hand_over_seconds(log)
        print("hand-over: " + ("not seen" if seconds is None else f"{seconds * 1000:.0f} ms"))
        if per_second:
            rates = [tps for _, tps in per_second]
            print(
                f"tps per second: median {statistics.median(rates):,.0f}, lowest {min(rates):,.0f}"
            )
            print("  " + " ".join(f"{tps:,.0f}" for tps in rates))
        if successor is None:
            print("no new process was started")
            return 1
        return 0 if bench.returncode == 0 and aborted == 0 else 1
    finally:
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(successor, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        pooler.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
