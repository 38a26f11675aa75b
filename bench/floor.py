"""The CPU floor of a Python pooler: bare relays beside pg_doorman and PgBouncer.

    python -m bench.floor                       # 8 s runs, 2 rounds, 10 clients
    python -m bench.floor --smoke               # a few seconds: checks that it works

bench/relay.py copies bytes between each client and its own PostgreSQL connection and
does nothing else: no framing, no pool, no statistics. What it spends per transaction
is what the event loop and the kernel cost any pooler built from uvloop protocol
callbacks, however little that pooler's own code does; its epoll variant shows what
is left without asyncio at all. The three targets run the same
pgbench scenarios, alternated, as in bench/run.py; the relay holds one backend per
client, so the comparison is made at client counts up to the pool size (20).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.pgbench import FAMILIES, RunResult, Scenario, run_pgbench
from bench.report import median, number
from bench.run import raise_fd_limit
from bench.targets import (
    POOL_SIZE,
    Bouncer,
    Pooler,
    Postgres,
    Relay,
    TargetUnavailable,
    find_bouncer,
)

LABELS = {
    "relay": "bare relay, uvloop",
    "relay-epoll": "bare relay, epoll",
    "pg_doorman": "pg_doorman",
    "pgbouncer": "PgBouncer",
}
DEFAULT_FAMILIES = ("aid-simple", "S-simple", "S-extended", "S-prepared")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="2 s, one round, one scenario")
    parser.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=2, help="repeat, report medians")
    parser.add_argument("--clients", type=int, default=10, help=f"at most {POOL_SIZE}")
    parser.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        help=f"comma-separated, from {', '.join(f for f in FAMILIES if f != 'connect')}",
    )
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if args.smoke:
        args.duration, args.rounds, args.clients, args.families = 2, 1, 4, ["aid-simple"]
    bad = [f for f in args.families if f not in FAMILIES or f == "connect"]
    if bad:
        parser.error(f"unknown or unsupported families: {', '.join(bad)}")
    if not 1 <= args.clients <= POOL_SIZE:
        parser.error(f"--clients must be 1..{POOL_SIZE}: the relay has no pool")
    return args


def table(runs: list[RunResult], families: list[str], clients: int, ran: list[str]) -> str:
    """The results of the targets in `ran` (a target that was not available has no rows,
    as the message at its start says)."""
    lines = [
        "| scenario | target | tps | CPU µs/tx | of which user | kernel µs/tx |",
        "|---|---|---|---|---|---|",
    ]
    for family in families:
        key = Scenario(family, clients).key
        for target, label in LABELS.items():
            if target not in ran:
                continue
            good = [r for r in runs if r.scenario == key and r.target == target and r.ok]
            if not good:
                failed = [r for r in runs if r.scenario == key and r.target == target]
                why = failed[-1].error.splitlines()[0] if failed else "not run"
                lines.append(f"| {key} | {label} | failed: {why} | | | |")
                continue
            cpu = median([r.cpu_us_per_tx for r in good])
            user = median([r.user_us_per_tx for r in good])
            kernel = None if cpu is None or user is None else cpu - user
            lines.append(
                f"| {key} | {label} | {number(median([r.tps for r in good]), 0)} "
                f"| {number(cpu, 1)} | {number(user, 1)} | {number(kernel, 1)} |"
            )
    return "\n".join(lines)


def _pid_of(target: Relay | Pooler | Bouncer) -> Callable[[], int | None]:
    return lambda: target.pid


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="pg_doorman-floor-"))
    workdir.chmod(0o755)  # the unprivileged user running PostgreSQL must reach it
    pg = Postgres(workdir, "scram")
    targets: list[Relay | Pooler | Bouncer] = []
    runs: list[RunResult] = []
    try:
        pg.start(1 if args.smoke else 10)
        targets.append(Relay(workdir / "relay", pg))
        targets.append(Relay(workdir / "relay-epoll", pg, loop="epoll"))
        targets.append(Pooler(workdir / "pg_doorman", pg))
        exe = find_bouncer()
        if exe is not None:
            targets.append(Bouncer(workdir / "pgbouncer", pg, exe))
        else:
            print("PgBouncer not available: its rows are left out", file=sys.stderr)
        for target in targets:
            target.start()
        logdir = workdir / "pgbench-logs"
        logdir.mkdir()
        if not args.smoke:  # fill PostgreSQL's caches and the pool first; not recorded
            for target in targets:
                run_pgbench(
                    bin_dir=pg.bin_dir,
                    port=target.port,
                    target=target.name,
                    scenario=Scenario("aid-simple", args.clients),
                    duration=2,
                    logdir=logdir,
                    round_no=0,
                )
        for round_no in range(1, args.rounds + 1):
            for family in args.families:
                scenario = Scenario(family, args.clients)
                for target in targets:
                    result = run_pgbench(
                        bin_dir=pg.bin_dir,
                        port=target.port,
                        target=target.name,
                        scenario=scenario,
                        duration=args.duration,
                        logdir=logdir,
                        round_no=round_no,
                        measured_pid=_pid_of(target),
                    )
                    runs.append(result)
                    print(
                        f"round {round_no} {scenario.key} {target.name}: "
                        + (f"{result.tps:,.0f} tps" if result.ok and result.tps else result.error),
                        file=sys.stderr,
                        flush=True,
                    )
    except TargetUnavailable as exc:
        print(f"a target did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        for target in targets:
            target.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.clients} clients, {args.duration} s per run, median of {args.rounds} "
        f"round(s), SCRAM client auth\n"
    )
    print(table(runs, args.families, args.clients, [target.name for target in targets]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
