"""The benchmark harness works end to end: `python -m bench.run --smoke`.

Checks that a report comes out with rows for PostgreSQL, pg_doorman and PgBouncer and
that each measured something. No speed is asserted: the numbers are for people.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.implementation import expect_compiled

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "pg_doorman", "pgbouncer")

pytestmark = pytest.mark.timeout(240)


def _bouncer_installed() -> bool:
    """The harness's own rule: BOUNCER_EXE, else pgbouncer on PATH or in an sbin."""
    override = os.environ.get("BOUNCER_EXE")
    if override:
        return os.access(override, os.X_OK)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("pgbouncer", path=path) is not None


def test_smoke_run_reports_all_targets(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    markdown = tmp_path / "benchmarks.md"
    chart = tmp_path / "img" / "benchmarks.png"
    argv = [sys.executable, "-m", "bench.run", "--smoke", "--json", str(results)]
    argv += ["--markdown", str(markdown), "--chart", str(chart), "--workdir", str(tmp_path)]
    # `-m bench.run` from the repository root: the harness is not an installed package.
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    doc = json.loads(results.read_text())
    by_target: dict[str, list[dict[str, object]]] = {t: [] for t in TARGETS}
    for run in doc["runs"]:
        by_target[run["target"]].append(run)

    expected = list(TARGETS) if _bouncer_installed() else ["direct", "pg_doorman"]
    for target in expected:
        status = doc["targets"][target]
        assert status["status"] == "ok", f"{target}: {status}\n{proc.stderr}"
        good = [r for r in by_target[target] if r["ok"]]
        assert good, f"no successful run for {target}: {by_target[target]}"
        assert all(isinstance(r["tps"], float) and r["tps"] > 0 for r in good)
        assert all(r["p99_ms"] is not None for r in good)
    if "pgbouncer" not in expected:
        assert doc["targets"]["pgbouncer"]["status"] == "not available"

    # The pooler's own process was measured.
    measured = [r for r in by_target["pg_doorman"] if r["ok"]]
    assert all(r["cpu_us_per_tx"] and r["rss_bytes"] for r in measured)
    assert all(0 <= r["user_us_per_tx"] <= r["cpu_us_per_tx"] for r in measured)
    assert any(row["target"] == "pg_doorman" and row["status"] == "ok" for row in doc["idle"])

    # The report names what ran and how to run it again, not where its files went.
    meta = doc["meta"]
    assert "--smoke" in meta["command"] and str(tmp_path) not in meta["command"]
    # Linux's /proc/stat has the steal field; a bare-metal machine reads 0.
    assert isinstance(meta["steal_percent"], float) and 0 <= meta["steal_percent"] <= 100
    assert all(0 <= r["steal_percent"] <= 100 for r in doc["runs"])
    compiled = expect_compiled()
    assert meta["hot_path"] == ("compiled hot path" if compiled else "pure-Python hot path")

    text = markdown.read_text()
    for label in ("PostgreSQL direct", "pg_doorman", "PgBouncer"):
        assert f"| {label} |" in text
    # One process of each says nothing; more are named, here re-rendered from the JSON.
    assert "workers)" not in text and "so_reuseport" not in text
    meta.update(workers=2, pgbouncer_processes=3)
    results.write_text(json.dumps(doc))
    argv = [sys.executable, "-m", "bench.report", str(results)]
    rendered = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "hot path, 2 workers), PgBouncer " in rendered
    assert "(3 processes with `so_reuseport`)" in rendered
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "queued", ["", "queued", "pressure"], ids=["idle-server", "queued", "pressure"]
)
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_relay_micro_runs(mode: str, queued: str) -> None:
    """The in-memory relay benchmark drives real transactions (it checks the pool's
    transaction count itself, with --queued that requests really wait for the server,
    and with --pressure that the pool-pressure check ran and opened nothing) and names
    the implementation it measured."""
    argv = [sys.executable, "-m", "bench.relay_micro", "--transactions", "3000", "--mode", mode]
    if queued:
        argv.append("--queued")
    if queued == "pressure":
        argv.append("--pressure")
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    label = f"{mode}, queued" if queued else mode
    if queued == "pressure":
        label += " under pool pressure"
    assert proc.stdout.startswith(f"{label}: ") and "µs of Python per transaction" in proc.stdout
    compiled = expect_compiled()
    assert ("compiled hot path" in proc.stdout) is compiled


def test_relay_micro_with_the_slow_request_log() -> None:
    """--log-min-duration turns log_min_duration_statement on (above every request's
    time here, so what is measured is keeping each request's start; the benchmark
    checks that its server took the setting)."""
    argv = [sys.executable, "-m", "bench.relay_micro", "--transactions", "3000"]
    argv += ["--log-min-duration", "60000"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("simple, log_min_duration_statement 60000 ms: ")


def test_login_micro_runs() -> None:
    """The in-memory login benchmark completes real SCRAM logins: it checks the
    pooler's answer at each step (SASL, SASLContinue, then ReadyForQuery)."""
    argv = [sys.executable, "-m", "bench.login_micro", "--logins", "400"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("login: ") and "µs of Python per SCRAM login" in proc.stdout
    assert ("compiled hot path" in proc.stdout) is expect_compiled()


def test_floor_smoke_measures_the_relay_beside_the_poolers() -> None:
    """`python -m bench.floor --smoke`: the bare relay really carries pgbench's traffic
    and each target's CPU per transaction is read."""
    argv = [sys.executable, "-m", "bench.floor", "--smoke"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = {
        cells[1]: cells[2:]
        for line in proc.stdout.splitlines()
        if line.startswith("| aid-simple")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    expected = ["bare relay, uvloop", "bare relay, epoll", "pg_doorman"]
    expected += ["PgBouncer"] if _bouncer_installed() else []
    assert sorted(rows) == sorted(expected), proc.stdout
    for label in expected:
        tps, cpu, user, kernel = (float(v.replace(",", "")) for v in rows[label])
        assert tps > 0, (label, proc.stdout)
        assert cpu > 0 and 0 <= user <= cpu and kernel == pytest.approx(cpu - user, abs=0.11)


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_under_load_cuts_no_pgbench_client(workers: int) -> None:
    """`python -m bench.upgrade --smoke`: SIGUSR2 while pgbench runs `-M prepared`; every
    client finishes (pgbench aborts a client on any connection error) and all of them
    moved to the new process."""
    argv = [sys.executable, "-m", "bench.upgrade", "--smoke", "--protocol", "prepared"]
    argv += ["--workers", str(workers)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "pgbench exit code: 0; aborted clients: 0" in proc.stdout
    assert "clients moved to the new process: 10" in proc.stdout


@pytest.mark.skipif(not _bouncer_installed(), reason="needs pgbouncer")
def test_several_pgbouncer_processes_share_the_port_and_split_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--bouncer-processes 2`: two PgBouncers listen on one port with so_reuseport, each
    with half the pool; the kernel spreads connections over both, and stopping the
    target stops both."""
    import psycopg

    monkeypatch.syspath_prepend(str(REPO))  # the harness is not an installed package
    from bench.procstat import descendants
    from bench.targets import PASSWORD, POOL_SIZE, USER, Bouncer, Postgres, find_bouncer

    exe = find_bouncer()
    assert exe is not None
    pg = Postgres(tmp_path, "scram")
    pg.start(1)
    bouncer = Bouncer(tmp_path / "pgbouncer", pg, exe, processes=2)
    try:
        bouncer.start()
        assert bouncer.pid is not None
        processes = [p for p in descendants(bouncer.pid) if _comm(p) == "pgbouncer"]
        assert len(processes) == 2
        for ini in ("pgbouncer.ini", "pgbouncer1.ini"):
            text = (bouncer.workdir / ini).read_text()
            assert f"default_pool_size = {POOL_SIZE // 2}\n" in text
            assert "so_reuseport = 1\n" in text
        before = {p: _open_files(p) for p in processes}
        conninfo = f"host=127.0.0.1 port={bouncer.port} dbname=bench user={USER}"
        connections = [
            psycopg.connect(conninfo, password=PASSWORD, autocommit=True) for _ in range(24)
        ]
        try:
            for conn in connections:
                assert conn.execute("select 1").fetchone() == (1,)
            # Both hold client sockets: all 24 on one process has odds of 2 in 2**24.
            for process in processes:
                assert _open_files(process) > before[process], processes
        finally:
            for conn in connections:
                conn.close()
    finally:
        bouncer.stop()
        pg.stop()
    assert not [p for p in processes if _comm(p) == "pgbouncer"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
