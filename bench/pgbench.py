"""Scenarios, one pgbench run, and what we read back from it."""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procstat import machine_times, per_transaction_us, steal_percent, usage
from bench.targets import DATABASE, HOST, USER, pg_client_env

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"

# name -> (script: a file in scripts/ or "-S" for pgbench's built-in select-only,
#          protocol, reconnect per transaction)
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "aid-simple": ("select_aid.sql", "simple", False),
    "aid-extended": ("select_aid.sql", "extended", False),
    "aid-prepared": ("select_aid.sql", "prepared", False),
    "S-simple": ("-S", "simple", False),
    "S-extended": ("-S", "extended", False),
    "S-prepared": ("-S", "prepared", False),
    "connect": ("select_aid.sql", "simple", True),
}
DEFAULT_FAMILIES = ("aid-simple", "S-simple", "S-extended", "S-prepared", "connect")


@dataclass(frozen=True)
class Scenario:
    family: str
    clients: int

    @property
    def key(self) -> str:
        return f"{self.family} c={self.clients}"

    @property
    def script(self) -> str:
        return FAMILIES[self.family][0]

    @property
    def protocol(self) -> str:
        return FAMILIES[self.family][1]

    @property
    def connect(self) -> bool:
        return FAMILIES[self.family][2]

    def describe(self) -> str:
        what = "pgbench -S" if self.script == "-S" else f"scripts/{self.script}"
        extra = ", --connect" if self.connect else ""
        return f"{what}, -M {self.protocol}{extra}, {self.clients} clients"


@dataclass
class RunResult:
    target: str
    scenario: str
    round: int
    ok: bool
    error: str = ""
    tps: float | None = None
    transactions: int = 0
    failed_transactions: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_tx: float | None = None
    user_us_per_tx: float | None = None  # the part of cpu_us_per_tx spent outside the kernel
    rss_bytes: int | None = None
    steal_percent: float | None = None  # CPU time the hypervisor took during this run
    initial_connection_ms: float | None = None
    pgbench_seconds: int = 0
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def read_latencies(prefix: Path) -> list[int]:
    """Per-transaction latencies (µs) from pgbench's --log files, then delete them.

    A line is `client_id transaction_no time script_no time_epoch time_us`; time is
    `failed` or `skipped` for transactions that did not complete.
    """
    values: list[int] = []
    for path in prefix.parent.glob(prefix.name + ".*"):
        with open(path, "rb") as f:
            for line in f:
                fields = line.split(None, 3)
                if len(fields) >= 3 and fields[2].isdigit():
                    values.append(int(fields[2]))
        path.unlink()
    values.sort()
    return values


_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_CONNECTION = re.compile(r"initial connection time = ([0-9.]+) ms")


def pgbench_seconds(scenario: Scenario, duration: int, allowance_per_1000: float) -> int:
    """The -T to give pgbench: its timer also runs while it opens the connections.

    Opening 1000 SCRAM connections straight to PostgreSQL takes several seconds on two
    cores, which would eat a short run entirely; every target of a scenario gets the same
    allowance, and tps is computed without the connection time. --connect runs open
    connections inside the measurement, so they get none.
    """
    if scenario.connect:
        return duration
    return duration + int(scenario.clients * allowance_per_1000 / 1000 + 0.5)


def _first_error(stderr: str) -> str:
    """The first and the last distinct error lines of pgbench, shortened."""
    errors = [line.strip() for line in stderr.splitlines() if "error" in line.lower()]
    if not errors:
        errors = [line.strip() for line in stderr.splitlines() if line.strip()][-2:]
    picked = list(dict.fromkeys([errors[0], errors[-1]])) if errors else []
    return " / ".join(e[:240] for e in picked)


def run_pgbench(
    *,
    bin_dir: Path,
    port: int,
    target: str,
    scenario: Scenario,
    duration: int,
    logdir: Path,
    round_no: int,
    connect_allowance: float = 0.0,
    measured_pid: Callable[[], int | None] = lambda: None,
) -> RunResult:
    """One pgbench run; CPU and RSS are read for `measured_pid()` around it."""
    clients = scenario.clients
    prefix = logdir / f"{target}-{scenario.family}-c{clients}-r{round_no}"
    seconds = pgbench_seconds(scenario, duration, connect_allowance)
    argv = [str(bin_dir / "pgbench"), "-n", "-T", str(seconds), "-c", str(clients)]
    argv += ["-j", str(min(clients, 2)), "-M", scenario.protocol]
    argv += ["-h", HOST, "-p", str(port), "-U", USER, "--log", f"--log-prefix={prefix}"]
    if scenario.connect:
        argv.append("--connect")
    if scenario.script == "-S":
        argv.append("-S")
    else:
        argv += ["-f", str(SCRIPTS_DIR / scenario.script)]
    argv.append(DATABASE)

    result = RunResult(
        target=target, scenario=scenario.key, round=round_no, ok=False, pgbench_seconds=seconds
    )
    pid = measured_pid()
    before = usage(pid) if pid is not None else None
    times_before = machine_times()
    started = time.monotonic()
    # Generous: opening 1000 SCRAM connections one by one takes a while before the clock runs.
    timeout = seconds * 2 + 120
    with subprocess.Popen(
        argv,
        env=pg_client_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=logdir,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            result.error = f"pgbench did not finish within {timeout}s and was killed"
        except BaseException:
            proc.kill()
            raise
    result.wall_seconds = round(time.monotonic() - started, 2)
    after = usage(pid) if pid is not None else None
    result.steal_percent = steal_percent(times_before, machine_times())

    if match := _TPS.search(stdout):
        result.tps = float(match.group(1))
    if match := _PROCESSED.search(stdout):
        result.transactions = int(match.group(1))
    if match := _FAILED.search(stdout):
        result.failed_transactions = int(match.group(1))
    if match := _CONNECTION.search(stdout):
        result.initial_connection_ms = float(match.group(1))
    latencies = read_latencies(prefix)
    if latencies:
        result.p50_ms = percentile(latencies, 0.50) / 1000
        result.p99_ms = percentile(latencies, 0.99) / 1000
    if before is not None and after is not None:
        result.rss_bytes = after.rss_bytes
        if result.transactions:
            cpu, user = per_transaction_us(before, after, result.transactions)
            result.cpu_us_per_tx, result.user_us_per_tx = cpu, user
    if proc.returncode == 0 and result.transactions > 0 and not result.error:
        result.ok = True
    elif not result.error and proc.returncode == 0:
        result.error = (
            f"no transaction completed within -T {seconds}: opening {clients} connections "
            "took the whole time (pgbench's timer includes it)"
        )
    elif not result.error:
        detail = _first_error(stderr) or "no transactions"
        result.error = f"pgbench exit code {proc.returncode}: {detail}"
    with contextlib.suppress(OSError):
        for leftover in logdir.glob(prefix.name + ".*"):
            leftover.unlink()
    return result
