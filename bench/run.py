"""Benchmark pg_doorman against PgBouncer and PostgreSQL directly, in one invocation.

    python -m bench.run                  # full run, writes docs/benchmarks.md + chart
    python -m bench.run --smoke          # about a minute: checks that the harness works
    python -m bench.run --duration 5 --families aid-simple,S-prepared --clients 10,100

Targets are interleaved per scenario (direct, pg_doorman, PgBouncer, then the next
scenario) so that machine noise hits all three alike; with `--rounds`, every other round
runs them in reverse. A target that cannot start is reported as such; the others still
run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench import report
from bench.idle import Credentials, IdleClients
from bench.pgbench import DEFAULT_FAMILIES, FAMILIES, RunResult, Scenario, run_pgbench
from bench.procstat import machine_times, steal_percent, usage
from bench.targets import (
    BOUNCER_ENV,
    DATABASE,
    HOST,
    PASSWORD,
    POOL_SIZE,
    USER,
    Bouncer,
    Pooler,
    Postgres,
    TargetUnavailable,
    find_bouncer,
    tail,
)
from pg_doorman.implementation import ENV as IMPL_ENV

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MARKDOWN = REPO / "docs" / "benchmarks.md"
DEFAULT_CHART = REPO / "docs" / "img" / "benchmarks.png"
# File descriptors the harness keeps for itself besides the idle clients.
FD_RESERVE = 200


class Target(Protocol):
    name: str

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int | None: ...


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="pgbench against PostgreSQL, pg_doorman and PgBouncer, side by side.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="short run of a few scenarios to check the harness (no files written unless "
        "--markdown/--chart/--json are given)",
    )
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (15; smoke 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each scenario N times; report medians and the per-round ratios' median",
    )
    parser.add_argument(
        "--families",
        type=_names,
        help=f"scenario families, from {', '.join(FAMILIES)} "
        f"(default {','.join(DEFAULT_FAMILIES)}; smoke aid-simple,S-prepared,connect)",
    )
    parser.add_argument(
        "--clients", type=_ints, help="client counts (default 1,10,100,1000; smoke 1,10)"
    )
    parser.add_argument(
        "--connect-clients",
        type=_ints,
        help="client counts for the --connect family (default 10,100; smoke 4)",
    )
    parser.add_argument(
        "--targets",
        type=_names,
        default=list(report.TARGETS),
        help="which of direct,pg_doorman,pgbouncer to run (default all)",
    )
    parser.add_argument(
        "--auth",
        choices=("scram", "trust"),
        default="scram",
        help="client authentication everywhere (default scram: SCRAM-SHA-256)",
    )
    parser.add_argument("--scale", type=int, help="pgbench -i scale (default 10; smoke 1)")
    parser.add_argument(
        "--idle-clients",
        type=int,
        help="idle connections for the memory measurement, 0 to skip (10000; smoke 300)",
    )
    parser.add_argument(
        "--connect-allowance",
        type=float,
        default=12.0,
        help="seconds added to pgbench -T per 1000 clients, because pgbench's timer also "
        "runs while it connects (default 12; not for --connect runs)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded warm-up")
    parser.add_argument(
        "--max-steal",
        type=float,
        default=None,
        metavar="PCT",
        help="measure a pgbench run again (at most twice) when the hypervisor stole more "
        "than PCT %% of the CPU time during it; the report lists each repeat (default: never)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="pg_doorman worker processes (general.workers)"
    )
    parser.add_argument(
        "--bouncer-processes",
        type=int,
        default=1,
        help="PgBouncer processes sharing the port with so_reuseport, pool_size split "
        "between them (default 1)",
    )
    parser.add_argument("--markdown", type=Path, help=f"default {DEFAULT_MARKDOWN} (not smoke)")
    parser.add_argument("--chart", type=Path, help=f"default {DEFAULT_CHART} (not smoke)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--workdir", type=Path, help="where servers and logs live (temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if args.duration is None:
        args.duration = 2 if smoke else 15
    if args.families is None:
        args.families = ["aid-simple", "S-prepared", "connect"] if smoke else DEFAULT_FAMILIES
    if args.clients is None:
        args.clients = [1, 10] if smoke else [1, 10, 100, 1000]
    if args.connect_clients is None:
        args.connect_clients = [4] if smoke else [10, 100]
    if args.scale is None:
        args.scale = 1 if smoke else 10
    if args.idle_clients is None:
        args.idle_clients = 300 if smoke else 10000
    if not smoke:
        args.markdown = args.markdown or DEFAULT_MARKDOWN
        args.chart = args.chart or DEFAULT_CHART
    unknown = [f for f in args.families if f not in FAMILIES]
    unknown += [t for t in args.targets if t not in report.TARGETS]
    if unknown:
        parser.error(f"unknown scenario family or target: {', '.join(unknown)}")
    if args.workers < 1 or args.bouncer_processes < 1:
        parser.error("--workers and --bouncer-processes must be at least 1")
    return args


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for family in args.families:
        counts = args.connect_clients if FAMILIES[family][2] else args.clients
        out += [Scenario(family, clients) for clients in counts]
    return out


T = TypeVar("T")


def round_order(targets: list[T], round_no: int) -> list[T]:
    """The order the targets run in within round `round_no` (from 1): every other round
    reversed, so that no target always goes first or always runs right after another."""
    return list(reversed(targets)) if round_no % 2 == 0 else list(targets)


# --- environment -----------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (pgbench, poolers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _sigterm(signum: int, frame: object) -> None:
    # As KeyboardInterrupt every finally block runs and the servers are stopped.
    raise KeyboardInterrupt(f"signal {signum}")


def machine() -> tuple[str, str]:
    cpus = len(os.sched_getaffinity(0))
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    short = f"{cpus} cores"
    full = f"{cpus} cores{f' ({model})' if model else ''}{mem}, Linux {platform.release()}"
    return full, short


def python_build() -> str:
    """The interpreter's version and how libpython is linked: a shared libpython (as
    pyenv builds it by default) costs the pooler's Python part more than a statically
    linked interpreter such as Debian's (docs/benchmarks.md, "A faster build of the same
    interpreter")."""
    linked = "libpython statically linked"
    with contextlib.suppress(OSError):
        if "/libpython" in Path("/proc/self/maps").read_text():
            linked = "libpython shared"
    return f"{platform.python_version()}, {linked}"


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio event loop"
    return "uvloop"


STEAL_RETRIES = 2  # with --max-steal: the last attempt stands, however much was stolen


def steal_exceeds(result: RunResult, limit: float | None) -> bool:
    """Whether `result` lost more CPU time to the hypervisor than `--max-steal` allows."""
    return limit is not None and result.steal_percent is not None and result.steal_percent > limit


def log(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- the run ---------------------------------------------------------------------------


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.started = time.monotonic()
        self.pg = Postgres(workdir, args.auth)
        self.pooler: Pooler | None = None
        self.bouncer: Bouncer | None = None
        self.status: dict[str, dict[str, str]] = {}
        self.runs: list[RunResult] = []
        self.idle: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.logdir = workdir / "pgbench-logs"
        # Other work on the machine shows up here; the report prints it next to the numbers.
        self.load_before = os.getloadavg()
        # On a virtual machine, CPU time the hypervisor gives to other guests slows every
        # target; a run with much of it is worth repeating.
        self.times_before = machine_times()

    def say(self, text: str) -> None:
        log(self.started, text)

    def start(self) -> None:
        wanted = set(self.args.targets)
        self.say(f"workdir {self.workdir}")
        self.say(f"PostgreSQL: initdb, start, pgbench -i -s {self.args.scale}")
        self.pg.start(self.args.scale)
        self.status["direct"] = {"status": "ok" if "direct" in wanted else "not run"}
        self.logdir.mkdir()

        if "pg_doorman" in wanted:
            self.pooler = Pooler(self.workdir / "pg_doorman", self.pg, workers=self.args.workers)
            self.status["pg_doorman"] = self._start_one(self.pooler)
        else:
            self.status["pg_doorman"] = {"status": "not run"}

        if "pgbouncer" in wanted:
            exe = find_bouncer()
            if exe is None:
                self.status["pgbouncer"] = {
                    "status": "not available",
                    "detail": (
                        f"{BOUNCER_ENV}={os.environ[BOUNCER_ENV]} is not an executable"
                        if os.environ.get(BOUNCER_ENV)
                        else "no pgbouncer executable (apt-get install pgbouncer, or set "
                        "BOUNCER_EXE)"
                    ),
                }
            else:
                self.bouncer = Bouncer(
                    self.workdir / "pgbouncer", self.pg, exe, processes=self.args.bouncer_processes
                )
                self.status["pgbouncer"] = self._start_one(self.bouncer)
        else:
            self.status["pgbouncer"] = {"status": "not run"}

    def _start_one(self, target: Pooler | Bouncer) -> dict[str, str]:
        self.say(f"starting {target.name}")
        try:
            target.start()
        except (TargetUnavailable, OSError) as exc:
            self.say(f"{target.name} failed to start:\n{exc}")
            return {"status": "failed to start", "detail": str(exc)}
        return {"status": "ok"}

    def targets(self) -> list[Target]:
        candidates: list[Target | None] = [self.pg, self.pooler, self.bouncer]
        return [
            t
            for t in candidates
            if t is not None and self.status.get(t.name, {}).get("status") == "ok"
        ]

    def _check_alive(self, target: Target, during: str) -> bool:
        if target.pid is not None:
            return True
        log_path = getattr(target, "log_path", None)
        detail = tail(log_path) if isinstance(log_path, Path) else ""
        self.status[target.name] = {"status": f"exited during {during}", "detail": detail}
        self.say(f"{target.name} is gone (during {during}); log tail:\n{detail}")
        return False

    def warm_up(self) -> None:
        """Fill the pools and the caches; nothing is recorded."""
        if self.args.warmup <= 0:
            return
        for target in self.targets():
            scenario = Scenario("aid-simple", POOL_SIZE)
            result = self._bench(target, scenario, self.args.warmup, round_no=0)
            self.say(f"warm-up {target.name}: {'ok' if result.ok else result.error}")
            self._check_alive(target, "warm-up")

    def _bench(self, target: Target, scenario: Scenario, duration: int, round_no: int) -> RunResult:
        measured = None if target.name == "direct" else (lambda: target.pid)
        return run_pgbench(
            bin_dir=self.pg.bin_dir,
            port=target.port,
            target=target.name,
            scenario=scenario,
            duration=duration,
            logdir=self.logdir,
            round_no=round_no,
            connect_allowance=self.args.connect_allowance,
            measured_pid=measured or (lambda: None),
        )

    def measure(self) -> None:
        scenarios = scenarios_for(self.args)
        for scenario in scenarios:
            for round_no in range(1, self.args.rounds + 1):
                for target in round_order(self.targets(), round_no):
                    result = self._bench(target, scenario, self.args.duration, round_no)
                    for _ in range(STEAL_RETRIES):
                        if not steal_exceeds(result, self.args.max_steal):
                            break
                        repeat = (
                            f"{scenario.key} {target.name} round {round_no}: measured again "
                            f"after {result.steal_percent:.1f} % steal"
                        )
                        self.say(repeat)
                        self.notes.append(repeat)
                        result = self._bench(target, scenario, self.args.duration, round_no)
                    self.runs.append(result)
                    self.say(_progress(result))
                    self._check_alive(target, scenario.key)

    def measure_idle(self) -> None:
        count = self.args.idle_clients
        if count <= 0:
            return
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if count + FD_RESERVE > limit:
            self.notes.append(
                f"idle clients capped at {limit - FD_RESERVE} by RLIMIT_NOFILE {limit} "
                f"(asked for {count})"
            )
            count = limit - FD_RESERVE
        for target in self.targets():
            if target.name == "direct":
                continue
            self.say(f"idle clients: {count} to {target.name}")
            row = asyncio.run(self._idle_one(target, count))
            self.idle.append(row)
            self.say(
                f"idle {target.name}: {row.get('connected')} connected, "
                f"{row.get('bytes_per_client') or 0:,.0f} bytes per client"
            )
            self._check_alive(target, "idle clients")

    async def _idle_one(self, target: Target, count: int) -> dict[str, Any]:
        row: dict[str, Any] = {"target": target.name, "requested": count}
        pid = target.pid
        if pid is None:
            return {**row, "status": "not running"}
        await asyncio.sleep(1)
        row["rss_before"] = usage(pid).rss_bytes
        clients = IdleClients(HOST, target.port, Credentials(USER, PASSWORD, DATABASE))
        try:
            await clients.open(count)
            # Let the pooler finish whatever it does after a login before we look.
            await asyncio.sleep(2)
            row["connected"] = len(clients.writers)
            row["rss_after"] = usage(pid).rss_bytes
        finally:
            await clients.close()
        row["errors"] = clients.errors
        if row["connected"]:
            row["status"] = "ok"
            row["bytes_per_client"] = (row["rss_after"] - row["rss_before"]) / row["connected"]
        else:
            row["status"] = "no client connected"
        return row

    def stop(self) -> None:
        for target in (self.pooler, self.bouncer):
            if target is not None:
                with contextlib.suppress(Exception):
                    target.stop()
        self.pg.stop()

    def document(self, command: str) -> dict[str, Any]:
        full, short = machine()
        tracked: bool | None = None
        if self.bouncer is None:
            bouncer_version = "not available"
            prepared = "n/a"
        else:
            bouncer_version = self.bouncer.version()
            tracked = self.bouncer.prepared_support
            if tracked:
                prepared = "`max_prepared_statements = 200` (tracked by PgBouncer)"
            else:
                prepared = (
                    f"not supported by PgBouncer {bouncer_version} (needs 1.21+): Parse/Bind "
                    "pass through untracked, so -M prepared fails once a client's "
                    "transaction lands on a server connection that lacks its statement"
                )
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": full,
                "machine_short": short,
                "python": python_build(),
                "event_loop": event_loop_name(),
                "hot_path": self.pooler.hot_path() if self.pooler else "not run",
                "postgres_version": self.pg.version(),
                "pooler_version": self.pooler.version() if self.pooler else "not run",
                "pgbouncer_version": bouncer_version,
                "pgbouncer_prepared": prepared,
                "pgbouncer_prepared_tracked": tracked,
                "workers": self.args.workers,
                "pgbouncer_processes": self.args.bouncer_processes,
                "duration": self.args.duration,
                "connect_allowance": self.args.connect_allowance,
                "rounds": self.args.rounds,
                "auth": "scram-sha-256" if self.args.auth == "scram" else "trust",
                "pool_size": POOL_SIZE,
                "scale": self.args.scale,
                "smoke": self.args.smoke,
                "command": command,
                "wall_seconds": round(time.monotonic() - self.started, 1),
                "load_average": {
                    "before": [round(v, 2) for v in self.load_before],
                    "after": [round(v, 2) for v in os.getloadavg()],
                },
                "steal_percent": steal_percent(self.times_before, machine_times()),
                "notes": self.notes,
            },
            "targets": self.status,
            "scenarios": [
                {
                    "key": s.key,
                    "family": s.family,
                    "clients": s.clients,
                    "description": s.describe(),
                }
                for s in scenarios_for(self.args)
            ],
            "runs": [r.to_json() for r in self.runs],
            "idle": self.idle,
        }


def _progress(result: RunResult) -> str:
    head = f"{result.scenario:<22} {result.target:<10}"
    if not result.ok:
        return f"{head} FAILED {result.error}"
    cpu = ""
    if result.cpu_us_per_tx is not None:
        cpu = f" cpu {result.cpu_us_per_tx:.1f} µs/tx (user {result.user_us_per_tx or 0:.1f})"
    return (
        f"{head} tps {result.tps or 0:>10,.0f}  p50 {result.p50_ms or 0:.2f} ms  "
        f"p99 {result.p99_ms or 0:.2f} ms{cpu}"
    )


# Where the output goes says nothing about the run, and would leak local paths.
_OUTPUT_OPTIONS = ("--markdown", "--chart", "--json", "--workdir")


def recorded_command(raw: list[str]) -> str:
    """The command line as the report shows it: the implementation choice, the options
    that shape the run, not the output paths."""
    kept: list[str] = []
    skip = False
    for arg in raw:
        if skip:
            skip = False
            continue
        if arg in _OUTPUT_OPTIONS:
            skip = True
            continue
        if arg.split("=", 1)[0] in _OUTPUT_OPTIONS or arg == "--keep":
            continue
        kept.append(arg)
    impl = os.environ.get(IMPL_ENV)
    prefix = f"{IMPL_ENV}={shlex.quote(impl)} " if impl else ""
    if os.environ.get(BOUNCER_ENV):
        # Its path says nothing on another machine; the report gives its version.
        prefix = f"{BOUNCER_ENV}=<another PgBouncer build> " + prefix
    return prefix + "python -m bench.run" + ("" if not kept else " " + shlex.join(kept))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = recorded_command(list(sys.argv[1:] if argv is None else argv))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)
    raise_fd_limit()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pg_doorman-bench-"))
    # The unprivileged user that runs PostgreSQL and PgBouncer must reach its files.
    workdir.chmod(0o755)
    harness = Harness(args, workdir)
    try:
        harness.start()
        harness.warm_up()
        harness.measure()
        harness.measure_idle()
        doc = harness.document(command)
    finally:
        harness.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    text = report.render(doc, args.markdown, args.chart)
    print(text)
    harness.say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
