"""Turn a results document (see bench.run) into markdown tables, a PNG chart and JSON.

`python -m bench.report results.json --markdown docs/benchmarks.md --chart docs/img/x.png`
re-renders a saved run without measuring again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.pgbench import FAMILIES

TARGETS = ("direct", "pg_doorman", "pgbouncer")
LABELS = {"direct": "PostgreSQL direct", "pg_doorman": "pg_doorman", "pgbouncer": "PgBouncer"}
COLORS = {"direct": "#4c72b0", "pg_doorman": "#dd8452", "pgbouncer": "#55a868"}
# En dash for an empty cell, multiplication sign for ratios (escaped: ruff flags look-alikes).
DASH = "\u2013"
TIMES = "\u00d7"
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

METRICS = ("tps", "p50_ms", "p99_ms", "cpu_us_per_tx", "user_us_per_tx", "rss_bytes")


def median(values: Iterable[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(scenario key, target) -> medians over the rounds that succeeded, or the failure."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in doc["runs"]:
        runs.setdefault((run["scenario"], run["target"]), []).append(run)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for scenario in doc["scenarios"]:
        for target in TARGETS:
            key = (scenario["key"], target)
            status = doc["targets"].get(target, {}).get("status", "not run")
            rounds = runs.get(key, [])
            good = [r for r in rounds if r["ok"]]
            entry: dict[str, Any] = {"rounds": len(rounds), "ok_rounds": len(good)}
            if status != "ok" and not rounds:
                entry["status"] = status
            elif not good:
                entry["status"] = "failed"
                entry["error"] = rounds[-1]["error"] if rounds else "not run"
            else:
                entry["status"] = "ok"
                for metric in METRICS:
                    entry[metric] = median(r.get(metric) for r in good)
                # Older result files have no round numbers: one round each.
                entry["tps_by_round"] = {r.get("round", 1): r["tps"] for r in good}
                if len(good) < len(rounds):
                    failed = next(r for r in rounds if not r["ok"])
                    entry["error"] = (
                        f"{len(rounds) - len(good)}/{len(rounds)} rounds failed: {failed['error']}"
                    )
            out[key] = entry
    return out


# --- formatting ------------------------------------------------------------------------


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """a's tps over b's, once per round in which both ran.

    A round runs the targets one after the other, so its own ratio is the least touched
    by the machine getting faster or slower over the whole run.
    """
    a_rounds = a.get("tps_by_round") or {}
    b_rounds = b.get("tps_by_round") or {}
    return [a_rounds[n] / b_rounds[n] for n in sorted(a_rounds) if b_rounds.get(n)]


def ratio(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float] | None:
    """(median, lowest, highest) of the rounds' own ratios of a to b.

    Falls back to the ratio of the medians when no round has both (a round failed for
    one of them).
    """
    if a.get("status") != "ok" or b.get("status") != "ok" or not b.get("tps"):
        return None
    per_round = round_ratios(a, b)
    if not per_round:
        only = a["tps"] / b["tps"]
        return only, only, only
    return statistics.median(per_round), min(per_round), max(per_round)


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    found = ratio(a, b)
    if found is None:
        return DASH
    mid, low, high = found
    text = f"{mid:.2f}{TIMES}"
    if f"{low:.2f}" != f"{high:.2f}":
        text += f" ({low:.2f}{DASH}{high:.2f})"
    return text


def _cell_tps(entry: dict[str, Any], untracked: bool = False) -> str:
    if entry.get("status") == "ok":
        return number(entry["tps"]) + (" (untracked)" if untracked else "")
    return str(entry.get("status", DASH))


def bouncer_untracked(doc: dict[str, Any], scenario: dict[str, Any]) -> bool:
    """Whether PgBouncer passed this scenario's prepared statements through untracked.

    A PgBouncer before 1.21 does not track protocol-level prepared statements: a `-M
    prepared` run that gets through measured plain pass-through, which is not like for
    like, so it is shown but not compared.
    """
    family = FAMILIES.get(scenario["family"])
    if family is None or family[1] != "prepared":
        return False
    meta = doc["meta"]
    tracked = meta.get("pgbouncer_prepared_tracked")
    if tracked is None:  # result files written before the flag existed
        return str(meta.get("pgbouncer_prepared", "")).startswith("not supported")
    return not tracked


def _rounds_note(rounds: int) -> str:
    if rounds < 2:
        return "median shown"
    return (
        "medians shown; a ratio is the median of the rounds' own ratios, their range "
        "in brackets; each round runs the targets in turn, in reverse order every "
        "other round"
    )


def _untracked_note(doc: dict[str, Any]) -> str:
    if not any(bouncer_untracked(doc, scenario) for scenario in doc["scenarios"]):
        return ""
    return (
        "; a `-M prepared` run of PgBouncer that gets through (one client, or by luck) "
        "is shown marked *untracked*, and not compared with pg_doorman"
    )


def _load(meta: dict[str, Any], when: str) -> str:
    values = meta.get("load_average", {}).get(when)
    return " / ".join(f"{v:.2f}" for v in values) if values else "unknown"


def _steal(doc: dict[str, Any]) -> str:
    """What the hypervisor took, over the run and in its worst pgbench run, for result
    files that recorded it: a burst can hide in the whole run's share."""
    value = doc["meta"].get("steal_percent")
    if value is None:
        return ""
    text = f"; CPU time stolen by the hypervisor (steal): {value:.1f} %"
    worst = max(
        (r for r in doc["runs"] if r.get("steal_percent") is not None),
        key=lambda r: r["steal_percent"],
        default=None,
    )
    if worst is not None:
        where = f"{worst['scenario']}, {LABELS[worst['target']]}, round {worst.get('round', 1)}"
        text += f", at most {worst['steal_percent']:.1f} % in one pgbench run ({where})"
    return text


def _mib(value: float | None) -> str:
    return DASH if value is None else f"{value / 2**20:.1f}"


def summary_table(doc: dict[str, Any], summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    head = (
        "| scenario | clients | direct tps | pg_doorman tps | PgBouncer tps "
        "| pg_doorman / PgBouncer | pg_doorman / direct "
        "| pg_doorman CPU µs/tx | PgBouncer CPU µs/tx |"
    )
    lines = [head, "|" + "---|" * 9]
    for scenario in doc["scenarios"]:
        d, p, b = (summary[(scenario["key"], t)] for t in TARGETS)
        untracked = bouncer_untracked(doc, scenario)
        vs_bouncer = DASH if untracked else _ratio(p, b)
        lines.append(
            f"| {scenario['family']} | {scenario['clients']} | {_cell_tps(d)} | {_cell_tps(p)} "
            f"| {_cell_tps(b, untracked)} | {vs_bouncer} | {_ratio(p, d)} "
            f"| {number(p.get('cpu_us_per_tx'), 1)} | {number(b.get('cpu_us_per_tx'), 1)} |"
        )
    return "\n".join(lines)


def detail_table(doc: dict[str, Any], summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    head = (
        "| scenario | clients | target | tps | p50 ms | p99 ms | vs PgBouncer | vs direct "
        "| CPU µs/tx | of which user | RSS MiB |"
    )
    lines = [head, "|" + "---|" * 11]
    for scenario in doc["scenarios"]:
        direct = summary[(scenario["key"], "direct")]
        bouncer = summary[(scenario["key"], "pgbouncer")]
        untracked = bouncer_untracked(doc, scenario)
        for target in TARGETS:
            e = summary[(scenario["key"], target)]
            compared = target == "pg_doorman" and not untracked
            vs_bouncer = _ratio(e, bouncer) if compared else DASH
            vs_direct = _ratio(e, direct) if target != "direct" else DASH
            tps = _cell_tps(e, untracked and target == "pgbouncer")
            lines.append(
                f"| {scenario['family']} | {scenario['clients']} | {LABELS[target]} "
                f"| {tps} | {number(e.get('p50_ms'), 2)} | {number(e.get('p99_ms'), 2)} "
                f"| {vs_bouncer} | {vs_direct} | {number(e.get('cpu_us_per_tx'), 1)} "
                f"| {number(e.get('user_us_per_tx'), 1)} | {_mib(e.get('rss_bytes'))} |"
            )
    return "\n".join(lines)


# What the pooler is meant to reach against PgBouncer, on the scenarios from 10 clients up.
TARGET_MIN_CLIENTS = 10
PREPARED_OVER_BEST = 1.3
IDLE_CLIENT_BYTES = 10 * 1024


def _label(scenario: dict[str, Any]) -> str:
    return f"{scenario['family']} c={scenario['clients']}"


def _compared(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Scenarios from TARGET_MIN_CLIENTS up in which pg_doorman can be set beside PgBouncer."""
    return [
        s
        for s in doc["scenarios"]
        if s["clients"] >= TARGET_MIN_CLIENTS and not bouncer_untracked(doc, s)
    ]


def _met_row(title: str, checks: list[tuple[str, float, bool]]) -> str:
    """One line of the targets table from (scenario label, value, met) per scenario."""
    if not checks:
        return f"| {title} | not measured | {DASH} |"
    met = sum(1 for _, _, ok in checks if ok)
    missed = [(label, value) for label, value, ok in checks if not ok]
    if missed:
        shown = ", ".join(f"{label} {value:.2f}{TIMES}" for label, value in missed)
        where = f"missed: {shown}"
    else:
        where = "all met"
    return f"| {title} | {met} of {len(checks)} | {where} |"


def _fastest_bouncer(
    doc: dict[str, Any],
    summary: dict[tuple[str, str], dict[str, Any]],
    script: str,
    clients: int,
) -> float | None:
    """PgBouncer's best tps over the protocols run with `script` and `clients` (pooled
    connections, prepared statements only where PgBouncer tracks them)."""
    best: float | None = None
    for other in doc["scenarios"]:
        family = FAMILIES.get(other["family"])
        if family is None or family[0] != script or family[2] or other["clients"] != clients:
            continue
        entry = summary[(other["key"], "pgbouncer")]
        if entry.get("status") == "ok" and not bouncer_untracked(doc, other):
            best = entry["tps"] if best is None else max(best, entry["tps"])
    return best


def targets_table(doc: dict[str, Any], summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The run read against the targets: which scenarios meet each, which miss and by how much.

    Throughput compares the per-round ratios' median; prepared statements compare
    pg_doorman's `-M prepared` median with the fastest PgBouncer protocol on the same
    script and client count (tracked statements only); CPU and p99 compare medians.
    """
    throughput: list[tuple[str, float, bool]] = []
    cpu: list[tuple[str, float, bool]] = []
    p99: list[tuple[str, float, bool]] = []
    prepared: list[tuple[str, float, bool]] = []
    for scenario in _compared(doc):
        mine = summary[(scenario["key"], "pg_doorman")]
        theirs = summary[(scenario["key"], "pgbouncer")]
        label = _label(scenario)
        found = ratio(mine, theirs)
        if found is not None:
            throughput.append((label, found[0], found[0] >= 1.0))
            for metric, out in (("cpu_us_per_tx", cpu), ("p99_ms", p99)):
                a, b = mine.get(metric), theirs.get(metric)
                if a is not None and b:
                    out.append((label, a / b, a <= b))
    for scenario in doc["scenarios"]:
        family = FAMILIES.get(scenario["family"])
        if family is None or family[1] != "prepared" or scenario["clients"] < TARGET_MIN_CLIENTS:
            continue
        mine = summary[(scenario["key"], "pg_doorman")]
        best = _fastest_bouncer(doc, summary, family[0], scenario["clients"])
        if mine.get("status") == "ok" and best:
            over = mine["tps"] / best
            prepared.append((_label(scenario), over, over >= PREPARED_OVER_BEST))
    lines = [
        "| target | scenarios that meet it | where not (pg_doorman / PgBouncer) |",
        "|---|---|---|",
        _met_row(f"throughput ≥ 1.0{TIMES} PgBouncer's", throughput),
        _met_row(
            f"`-M prepared` ≥ {PREPARED_OVER_BEST}{TIMES} PgBouncer's fastest protocol",
            prepared,
        ),
        _met_row("CPU per transaction ≤ PgBouncer's", cpu),
        _met_row("p99 latency ≤ PgBouncer's", p99),
    ]
    idle = next((r for r in doc.get("idle") or [] if r.get("target") == "pg_doorman"), None)
    if idle is not None and idle.get("bytes_per_client") is not None:
        per = idle["bytes_per_client"]
        verdict = "met" if per <= IDLE_CLIENT_BYTES else "not met"
        lines.append(
            f"| RSS ≤ {IDLE_CLIENT_BYTES:,} bytes per idle client | {verdict} "
            f"| {per:,.0f} bytes per idle client |"
        )
    return "\n".join(lines)


def failures(doc: dict[str, Any], summary: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    out = []
    for target in TARGETS:
        info = doc["targets"].get(target, {})
        if info.get("status") not in (None, "ok", "not run"):
            detail = info.get("detail", "").strip()
            out.append(f"- **{LABELS[target]}: {info['status']}**" + (":" if detail else ""))
            if detail:
                out.append("\n  ```\n" + _indent(detail, "  ") + "\n  ```")
    for scenario in doc["scenarios"]:
        for target in TARGETS:
            e = summary[(scenario["key"], target)]
            if e.get("error"):
                out.append(f"- {scenario['key']}, {LABELS[target]}: {e['error']}")
    return out


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def idle_table(doc: dict[str, Any]) -> str:
    rows = doc.get("idle") or []
    if not rows:
        return "_Idle-client memory was not measured in this run._"
    lines = [
        "| target | idle clients connected | RSS before MiB | RSS after MiB "
        "| bytes per idle client |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("status") != "ok":
            empty = f" {DASH} |" * 3
            lines.append(f"| {LABELS[row['target']]} | {row.get('status')} |{empty}")
            continue
        per = row.get("bytes_per_client")
        lines.append(
            f"| {LABELS[row['target']]} | {row['connected']:,} of {row['requested']:,} "
            f"| {_mib(row['rss_before'])} | {_mib(row['rss_after'])} "
            f"| {number(per)} |"
        )
    for row in rows:
        if row.get("errors"):
            shown = "; ".join(f"{n}{TIMES} {text}" for text, n in row["errors"].items())
            lines.append(f"\n{LABELS[row['target']]} connection errors: {shown}")
    return "\n".join(lines)


def results_markdown(doc: dict[str, Any], chart_link: str | None) -> str:
    meta = doc["meta"]
    summary = summarize(doc)
    mode = "smoke run: a harness check, too short to compare" if meta["smoke"] else "full run"
    # Older result files lack the process counts: they ran one of each.
    worker_count = meta.get("workers", 1)
    workers = f", {worker_count} workers" if worker_count > 1 else ""
    bouncer_count = meta.get("pgbouncer_processes", 1)
    bouncers = f" ({bouncer_count} processes with `so_reuseport`)" if bouncer_count > 1 else ""
    parts = [
        f"### Run of {meta['date']} ({mode})",
        "",
        f"- Machine: {meta['machine']}",
        f"- PostgreSQL {meta['postgres_version']}, pg_doorman {meta['pooler_version']} "
        f"(Python {meta['python']}, {meta['event_loop']}, "
        f"{meta.get('hot_path', 'hot path unknown')}{workers}), "
        f"PgBouncer {meta['pgbouncer_version']}{bouncers}",
        f"- {meta['duration']} s per run (pgbench -T adds "
        f"{meta.get('connect_allowance', 0):g} s per 1000 clients for connecting), "
        f"{meta['rounds']} round(s) ({_rounds_note(meta['rounds'])}), "
        f"client auth `{meta['auth']}`, pool_size {meta['pool_size']}, "
        f"pgbench scale {meta['scale']}, `-j min(clients, 2)`",
        f"- PgBouncer prepared statements: {meta['pgbouncer_prepared']}{_untracked_note(doc)}",
        f"- Load average (1/5/15 min) before: {_load(meta, 'before')}, after: "
        f"{_load(meta, 'after')}; the run took {meta['wall_seconds']:.0f} s{_steal(doc)}",
        f"- Command: `{meta['command']}`",
        *[f"- Note: {note}" for note in meta.get("notes", [])],
        "",
        summary_table(doc, summary),
        "",
    ]
    if chart_link:
        parts += [f"![tps and CPU per transaction]({chart_link})", ""]
    if not meta["smoke"]:
        parts += [
            "#### Against the targets",
            "",
            f"From {TARGET_MIN_CLIENTS} clients up. The throughput, CPU and p99 rows leave "
            "out scenarios where PgBouncer failed or ran prepared statements untracked; "
            "`-M prepared` is set against PgBouncer's fastest protocol instead.",
            "",
            targets_table(doc, summary),
            "",
        ]
    parts += ["#### Per target", "", detail_table(doc, summary), ""]
    parts += ["#### Idle clients", "", idle_table(doc), ""]
    problems = failures(doc, summary)
    if problems:
        parts += ["#### Failures", "", *problems, ""]
    return "\n".join(parts).rstrip() + "\n"


TEMPLATE = """# Benchmarks

{start}
{end}
"""


def write_markdown(path: Path, results: str) -> None:
    """Replace the text between the result markers, keeping everything else in the file."""
    text = path.read_text() if path.exists() else TEMPLATE.format(start=START, end=END)
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{START}\n{results}{END}{tail}")


def write_chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    summary = summarize(doc)
    families: list[str] = list(dict.fromkeys(s["family"] for s in doc["scenarios"]))
    fig, axes = plt.subplots(
        2, len(families), figsize=(3.6 * len(families), 6.4), squeeze=False, sharex="col"
    )
    for col, family in enumerate(families):
        scenarios = [s for s in doc["scenarios"] if s["family"] == family]
        xs = list(range(len(scenarios)))
        labels = [str(s["clients"]) for s in scenarios]
        tps_ax, cpu_ax = axes[0][col], axes[1][col]
        for target in TARGETS:
            entries = [summary[(s["key"], target)] for s in scenarios]
            if target == "pgbouncer":
                # Untracked pass-through is not plotted beside tracked statements.
                entries = [
                    {"status": "untracked"}
                    if bouncer_untracked(doc, s) and e["status"] == "ok"
                    else e
                    for s, e in zip(scenarios, entries, strict=True)
                ]
            tps = [e.get("tps") if e.get("status") == "ok" else None for e in entries]
            _plot(tps_ax, xs, tps, target)
            # A failed run shows as a cross on the axis rather than silently missing.
            failed = [x for x, e in zip(xs, entries, strict=True) if e.get("status") == "failed"]
            if failed:
                shift = (TARGETS.index(target) - 1) * 0.12  # side by side, not on top
                tps_ax.scatter(
                    [x + shift for x in failed],
                    [0] * len(failed),
                    marker="x",
                    color=COLORS[target],
                    clip_on=False,
                    zorder=3,
                )
            if target != "direct":
                cpu = [e.get("cpu_us_per_tx") if e.get("status") == "ok" else None for e in entries]
                _plot(cpu_ax, xs, cpu, target)
        tps_ax.set_title(family)
        cpu_ax.set_xticks(xs, labels)
        cpu_ax.set_xlabel("clients")
        tps_ax.set_ylim(bottom=0)
        cpu_ax.set_ylim(bottom=0)
        tps_ax.grid(alpha=0.3)
        cpu_ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("transactions / s")
    axes[1][0].set_ylabel("pooler CPU µs / transaction")
    handles = [Line2D([], [], color=COLORS[t], marker="o", label=LABELS[t]) for t in TARGETS]
    handles.append(Line2D([], [], color="black", marker="x", ls="", label="run failed"))
    fig.legend(handles=handles, loc="upper center", ncol=4, frameon=False)
    meta = doc["meta"]
    fig.suptitle(
        f"{meta['date']}, {meta['duration']} s per run, {meta['machine_short']}",
        y=0.005,
        va="bottom",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(ax: Any, xs: Sequence[int], ys: Sequence[float | None], target: str) -> None:
    if all(y is None for y in ys):
        return
    # NaN breaks the line: no segment drawn across a run that failed.
    values = [float("nan") if y is None else y for y in ys]
    ax.plot(xs, values, marker="o", color=COLORS[target], label=LABELS[target])


def render(doc: dict[str, Any], markdown: Path | None, chart: Path | None) -> str:
    """Write the chart and the markdown (either may be None); return the results text."""
    link = None
    if chart is not None:
        try:
            write_chart(doc, chart)
        except ImportError as exc:
            # The tables matter more than the picture: keep going without it.
            print(f"no chart ({exc}): pip install matplotlib", file=sys.stderr)
        else:
            if markdown is not None:
                link = _relative(chart, markdown.parent)
    text = results_markdown(doc, link)
    if markdown is not None:
        write_markdown(markdown, text)
    return text


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results JSON written by bench.run")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    print(render(doc, args.markdown, args.chart))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
