"""The report's arithmetic (medians over rounds, ratios paired by round, their range, the
targets read-out) and the harness's account of CPU time stolen by the hypervisor.

Built from results documents in the shape `bench.run` writes, and from scripted runs,
without measuring.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bench.pgbench import RunResult

from bench import procstat, report, run

SCENARIO = {"key": "S-simple-c10", "family": "S-simple", "clients": 10}


def _run(target: str, round_no: int | None, tps: float | None) -> dict[str, Any]:
    run: dict[str, Any] = {"scenario": SCENARIO["key"], "target": target, "ok": tps is not None}
    if round_no is not None:
        run["round"] = round_no
    if tps is None:
        run["error"] = "pgbench exit code 2"
    else:
        run.update(tps=tps, p50_ms=0.3, p99_ms=0.6, cpu_us_per_tx=15.0, user_us_per_tx=3.5)
        run["rss_bytes"] = 30 * 2**20
    return run


def _doc(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    ok = {"status": "ok"}
    meta = {
        "date": "2026-12-01 06:00 UTC",
        "smoke": False,
        "machine": "2 cores",
        "machine_short": "2 cores",
        "postgres_version": "18",
        "pooler_version": "0.1.0",
        "python": "3.11",
        "event_loop": "uvloop",
        "pgbouncer_version": "1.18.0",
        "duration": 8,
        "rounds": rounds,
        "auth": "scram-sha-256",
        "pool_size": 20,
        "scale": 10,
        "pgbouncer_prepared": "not supported",
        "wall_seconds": 60.0,
        "command": "python -m bench.run",
    }
    targets = {t: ok for t in report.TARGETS}
    return {"meta": meta, "scenarios": [SCENARIO], "targets": targets, "runs": runs}


def _entries(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = report.summarize(doc)
    return summary[(SCENARIO["key"], "pg_doorman")], summary[(SCENARIO["key"], "pgbouncer")]


def _paired(
    doorman: dict[int, float], bouncer: dict[int, float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """pg_doorman's and PgBouncer's summaries from their tps by round."""
    runs = [_run("pg_doorman", n, tps) for n, tps in doorman.items()]
    runs += [_run("pgbouncer", n, tps) for n, tps in bouncer.items()]
    return _entries(_doc(runs, len(doorman)))


def test_a_ratio_is_the_median_of_the_rounds_own_ratios_with_their_range() -> None:
    # The machine slows down in round 2: both targets lose, their ratio holds.
    doorman = {1: 30_000.0, 2: 20_000.0, 3: 31_000.0}
    bouncer = {1: 32_000.0, 2: 21_000.0, 3: 36_000.0}
    pooler, bouncer_entry = _paired(doorman, bouncer)

    assert pooler["tps"] == 30_000.0 and bouncer_entry["tps"] == 32_000.0
    assert report.round_ratios(pooler, bouncer_entry) == [30 / 32, 20 / 21, 31 / 36]
    assert report.ratio(pooler, bouncer_entry) == (30 / 32, 31 / 36, 20 / 21)
    assert report._ratio(pooler, bouncer_entry) == "0.94\u00d7 (0.86\u20130.95)"


def test_paired_ratios_differ_from_the_ratio_of_medians_when_rounds_disagree() -> None:
    doorman = {1: 10.0, 2: 30.0, 3: 20.0}
    bouncer = {1: 20.0, 2: 15.0, 3: 40.0}
    pooler, bouncer_entry = _paired(doorman, bouncer)

    # Medians 20 and 20 would say 1.00x; the rounds say 0.5, 2.0 and 0.5.
    assert pooler["tps"] / bouncer_entry["tps"] == 1.0
    assert report._ratio(pooler, bouncer_entry) == "0.50\u00d7 (0.50\u20132.00)"


def test_a_round_that_failed_for_one_target_has_no_ratio() -> None:
    runs = [
        _run("pg_doorman", 1, 30_000.0),
        _run("pg_doorman", 2, 28_000.0),
        _run("pgbouncer", 1, 31_000.0),
        _run("pgbouncer", 2, None),
    ]
    pooler, bouncer_entry = _entries(_doc(runs, 2))

    assert report.round_ratios(pooler, bouncer_entry) == [30 / 31]
    assert report._ratio(pooler, bouncer_entry) == "0.97\u00d7"
    assert "1/2 rounds failed" in bouncer_entry["error"]


def test_without_a_shared_round_the_ratio_of_the_medians_is_shown() -> None:
    runs = [
        _run("pg_doorman", 1, None),
        _run("pg_doorman", 2, 28_000.0),
        _run("pgbouncer", 1, 35_000.0),
        _run("pgbouncer", 2, None),
    ]
    pooler, bouncer_entry = _entries(_doc(runs, 2))

    assert report.round_ratios(pooler, bouncer_entry) == []
    assert report._ratio(pooler, bouncer_entry) == "0.80\u00d7"


def test_results_without_round_numbers_count_as_one_round() -> None:
    # Result files written before runs carried their round.
    runs = [_run("pg_doorman", None, 27_000.0), _run("pgbouncer", None, 30_000.0)]
    pooler, bouncer_entry = _entries(_doc(runs, 1))

    assert report.round_ratios(pooler, bouncer_entry) == [0.9]
    assert report._ratio(pooler, bouncer_entry) == "0.90\u00d7"


def test_a_failed_target_has_no_ratio() -> None:
    runs = [_run("pg_doorman", 1, 27_000.0), _run("pgbouncer", 1, None)]
    pooler, bouncer_entry = _entries(_doc(runs, 1))

    assert bouncer_entry["status"] == "failed"
    assert report.ratio(pooler, bouncer_entry) is None
    assert report._ratio(pooler, bouncer_entry) == report.DASH


def test_the_report_says_how_ratios_are_formed() -> None:
    runs = [_run(t, n, 1000.0 * n) for t in report.TARGETS for n in (1, 2)]
    several = report.results_markdown(_doc(runs, 2), None)
    assert "a ratio is the median of the rounds' own ratios" in several
    assert "| S-simple | 10 | 1,500 | 1,500 | 1,500 | 1.00\u00d7 | 1.00\u00d7 |" in several

    one = report.results_markdown(_doc(runs[::2], 1), None)
    assert "1 round(s) (median shown)" in one


def test_every_other_round_runs_the_targets_in_reverse() -> None:
    targets = ["direct", "pg_doorman", "pgbouncer"]
    assert run.round_order(targets, 1) == targets
    assert run.round_order(targets, 2) == ["pgbouncer", "pg_doorman", "direct"]
    assert run.round_order(targets, 3) == targets
    assert targets == ["direct", "pg_doorman", "pgbouncer"]  # not reordered in place


PREPARED = {"key": "S-prepared-c1000", "family": "S-prepared", "clients": 1000}


def _prepared_doc(tracked: bool | None, described: str) -> dict[str, Any]:
    runs = [
        {**_run(target, 1, tps), "scenario": PREPARED["key"]}
        for target, tps in (("direct", 18_000.0), ("pg_doorman", 18_400.0), ("pgbouncer", 26_400.0))
    ]
    doc = _doc(runs, 1)
    doc["scenarios"] = [PREPARED]
    doc["meta"]["pgbouncer_prepared"] = described
    if tracked is not None:
        doc["meta"]["pgbouncer_prepared_tracked"] = tracked
    return doc


def _summary_row(text: str) -> str:
    return next(
        line for line in text.splitlines() if line.startswith("| S-prepared | 1000 | 18,000")
    )


def test_prepared_runs_of_a_pgbouncer_that_does_not_track_them_are_not_compared() -> None:
    # PgBouncer before 1.21 passes Parse and Bind through: a run that gets through
    # measured pass-through, not statement tracking.
    untracked = report.results_markdown(_prepared_doc(False, "not supported by 1.18"), None)
    row = _summary_row(untracked)
    assert row.startswith("| S-prepared | 1000 | 18,000 | 18,400 | 26,400 (untracked) | \u2013 |")
    assert "shown marked *untracked*" in untracked
    assert "| S-prepared | 1000 | PgBouncer | 26,400 (untracked) |" in untracked

    tracked = report.results_markdown(_prepared_doc(True, "`max_prepared_statements`"), None)
    assert _summary_row(tracked).startswith(
        "| S-prepared | 1000 | 18,000 | 18,400 | 26,400 | 0.70\u00d7 |"
    )
    assert "(untracked)" not in tracked and "shown marked" not in tracked


def test_results_without_the_tracking_flag_read_it_from_the_description() -> None:
    old = report.results_markdown(_prepared_doc(None, "not supported by PgBouncer 1.18.0"), None)
    assert "26,400 (untracked) | \u2013 |" in _summary_row(old)
    new = report.results_markdown(_prepared_doc(None, "`max_prepared_statements = 200`"), None)
    assert "26,400 | 0.70\u00d7 |" in _summary_row(new)


def _scenario(family: str, clients: int) -> dict[str, Any]:
    return {"key": f"{family} c={clients}", "family": family, "clients": clients}


def _measured(scenario: dict[str, Any], target: str, **values: float) -> dict[str, Any]:
    run = {**_run(target, 1, values.pop("tps")), "scenario": scenario["key"]}
    run.update(values)
    return run


def _targets_doc() -> dict[str, Any]:
    one, simple, extended, prepared = (
        _scenario("S-simple", 1),
        _scenario("S-simple", 10),
        _scenario("S-extended", 10),
        _scenario("S-prepared", 10),
    )
    runs = [
        # One client is below the targets' range, however it compares.
        _measured(one, "pg_doorman", tps=100.0, cpu_us_per_tx=90.0, p99_ms=9.0),
        _measured(one, "pgbouncer", tps=200.0, cpu_us_per_tx=10.0, p99_ms=1.0),
        _measured(simple, "pg_doorman", tps=27_000.0, cpu_us_per_tx=15.0, p99_ms=0.6),
        _measured(simple, "pgbouncer", tps=30_000.0, cpu_us_per_tx=12.0, p99_ms=0.5),
        _measured(extended, "pg_doorman", tps=33_000.0, cpu_us_per_tx=17.0, p99_ms=0.5),
        _measured(extended, "pgbouncer", tps=30_000.0, cpu_us_per_tx=17.0, p99_ms=0.7),
        _measured(prepared, "pg_doorman", tps=40_000.0, cpu_us_per_tx=16.0, p99_ms=0.5),
        # PgBouncer 1.18 got through: pass-through, neither compared nor the best.
        _measured(prepared, "pgbouncer", tps=50_000.0, cpu_us_per_tx=9.0, p99_ms=0.3),
    ]
    doc = _doc(runs, 1)
    doc["scenarios"] = [one, simple, extended, prepared]
    doc["meta"]["pgbouncer_prepared_tracked"] = False
    doc["idle"] = [
        {
            "target": "pg_doorman",
            "status": "ok",
            "requested": 10_000,
            "connected": 10_000,
            "rss_before": 35_422_208,
            "rss_after": 63_864_832,
            "bytes_per_client": 2844.3,
        }
    ]
    return doc


def test_the_targets_table_says_which_scenarios_meet_each_target_and_by_how_much() -> None:
    doc = _targets_doc()
    table = report.targets_table(doc, report.summarize(doc)).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}

    assert rows["throughput ≥ 1.0\u00d7 PgBouncer's"].endswith(
        "| 1 of 2 | missed: S-simple c=10 0.90\u00d7 |"
    )
    # 40,000 over the faster of PgBouncer's S-simple and S-extended (30,000 each).
    assert rows["`-M prepared` ≥ 1.3\u00d7 PgBouncer's fastest protocol"].endswith(
        "| 1 of 1 | all met |"
    )
    assert rows["CPU per transaction ≤ PgBouncer's"].endswith(
        "| 1 of 2 | missed: S-simple c=10 1.25\u00d7 |"
    )
    assert rows["p99 latency ≤ PgBouncer's"].endswith(
        "| 1 of 2 | missed: S-simple c=10 1.20\u00d7 |"
    )
    assert rows["RSS ≤ 10,240 bytes per idle client"].endswith(
        "| met | 2,844 bytes per idle client |"
    )


def test_prepared_falls_short_of_the_target_below_1_3_times_the_fastest_protocol() -> None:
    doc = _targets_doc()
    for measured in doc["runs"]:
        if measured["scenario"] == "S-prepared c=10" and measured["target"] == "pg_doorman":
            measured["tps"] = 36_000.0
    table = report.targets_table(doc, report.summarize(doc))
    assert "| 0 of 1 | missed: S-prepared c=10 1.20\u00d7 |" in table


def test_full_runs_carry_the_targets_section_and_smoke_runs_do_not() -> None:
    doc = _targets_doc()
    assert "#### Against the targets" in report.results_markdown(doc, None)
    doc["meta"]["smoke"] = True
    assert "#### Against the targets" not in report.results_markdown(doc, None)


def test_the_hypervisors_share_of_cpu_time_is_read_from_proc_stat() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = procstat.parse_machine_times("cpu  100 0 50 800 10 0 5 35 20 0\ncpu0 1 2 3\n")
    after = procstat.parse_machine_times("cpu  300 0 150 1400 10 0 5 135 60 0\n")
    assert (before.total_ticks, before.steal_ticks) == (1000, 35)
    assert procstat.steal_percent(before, after) == 10.0  # 100 of 1000 ticks
    assert procstat.steal_percent(after, after) is None
    assert procstat.steal_percent(None, after) is None
    # Kernels without the steal field (before 2.6.11) read as none stolen.
    assert procstat.parse_machine_times("cpu 1 2 3 4\n").steal_ticks == 0


def test_the_report_prints_steal_time_when_the_run_recorded_it() -> None:
    doc = _targets_doc()
    assert "steal" not in report.results_markdown(doc, None)  # older result files
    doc["meta"]["steal_percent"] = 12.34
    assert "stolen by the hypervisor (steal): 12.3 %" in report.results_markdown(doc, None)
    # The worst pgbench run is named: a burst can hide in the whole run's share.
    doc["runs"][0]["steal_percent"] = 4.0
    doc["runs"][1]["steal_percent"] = 31.0
    worst = doc["runs"][1]
    scenario = next(s for s in doc["scenarios"] if s["key"] == worst["scenario"])
    expected = (
        f"at most 31.0 % in one pgbench run ({report._label(scenario)}, "
        f"{report.LABELS[worst['target']]}, round {worst['round']})"
    )
    assert expected in report.results_markdown(doc, None)


def _steal_run(steal: float | None) -> RunResult:
    return RunResult(
        target="pg_doorman", scenario="S-simple-c10", round=1, ok=True, steal_percent=steal
    )


def test_max_steal_repeats_only_runs_that_lost_more_than_it_allows() -> None:
    assert run.steal_exceeds(_steal_run(12.0), 10.0)
    assert not run.steal_exceeds(_steal_run(10.0), 10.0)
    assert not run.steal_exceeds(_steal_run(50.0), None)  # not asked for
    assert not run.steal_exceeds(_steal_run(None), 10.0)  # not measured


class _StealHarness(run.Harness):
    """The harness's measuring loop over a scripted series of runs, without servers."""

    def __init__(self, args: Any, workdir: Path, steals: list[float]) -> None:
        super().__init__(args, workdir)
        self.steals = steals

    def targets(self) -> list[Any]:
        return [SimpleNamespace(name="pg_doorman", pid=None)]

    def _check_alive(self, target: Any, during: str) -> bool:
        return True

    def _bench(self, target: Any, scenario: Any, duration: int, round_no: int) -> RunResult:
        return _steal_run(self.steals.pop(0))


def test_a_run_with_too_much_steal_is_measured_again_and_the_report_says_so(
    tmp_path: Path,
) -> None:
    argv = ["--families", "S-simple", "--clients", "10", "--rounds", "2", "--max-steal", "10"]
    args = run.parse_args(argv)
    # Round 1: 30 % stolen, then 5 %: kept on the second try. Round 2: three tries over
    # the limit, and the last one stands.
    harness = _StealHarness(args, tmp_path, [30.0, 5.0, 40.0, 35.0, 25.0])
    harness.measure()
    assert [r.steal_percent for r in harness.runs] == [5.0, 25.0]
    assert harness.steals == []
    assert harness.notes == [
        "S-simple c=10 pg_doorman round 1: measured again after 30.0 % steal",
        "S-simple c=10 pg_doorman round 2: measured again after 40.0 % steal",
        "S-simple c=10 pg_doorman round 2: measured again after 35.0 % steal",
    ]
    doc = _targets_doc()
    doc["meta"]["notes"] = harness.notes
    text = report.results_markdown(doc, None)
    assert "- Note: S-simple c=10 pg_doorman round 2: measured again after 35.0 % steal" in text


def test_cpu_per_transaction_keeps_the_user_part_within_the_whole() -> None:
    tick_us = 1e6 / procstat.CLK_TCK
    before = procstat.Usage(cpu_ticks=1003, user_ticks=701, rss_bytes=0)
    # No system time spent between the readings: the user part is the whole, exactly.
    after = procstat.Usage(cpu_ticks=1010, user_ticks=708, rss_bytes=0)
    cpu, user = procstat.per_transaction_us(before, after, 3)
    assert cpu == user == pytest.approx(7 * tick_us / 3)
    # A worker gone between the readings: its ticks leave both sums.
    gone = procstat.Usage(cpu_ticks=900, user_ticks=600, rss_bytes=0)
    assert procstat.per_transaction_us(before, gone, 3) == (0.0, 0.0)
    shrunk = procstat.Usage(cpu_ticks=1020, user_ticks=650, rss_bytes=0)
    assert procstat.per_transaction_us(before, shrunk, 10) == (pytest.approx(1.7 * tick_us), 0.0)
