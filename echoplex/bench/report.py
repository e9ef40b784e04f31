"""The bench's output: `results.json` (every run and every row) and `results.md`
(one table per scenario), plus the charts (`charts.py`) when writing a directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .crosscheck import GENERATOR, SOURCE
from .results import (
    CROSS_CHECK_TOLERANCE,
    HELD_SHARE,
    MIN_CPU_TICKS,
    CrossCheckRow,
    Row,
    RunResult,
    cpu_measurable,
    per_connection_bytes,
)
from .runner import CONTENDED_PCT, MEASURE_ATTEMPTS, BenchReport, ScenarioResult
from .scenarios import SCALE_METRIC
from .servers import SERVERS

MIB = 1024 * 1024

Column = tuple[str, Callable[[Row], str]]


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (the measurements are not more precise), deeply."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def to_json(report: BenchReport) -> dict[str, Any]:
    return {
        "command": report.command,
        "started_at": report.started_at,
        "finished_at": report.finished_at,
        "machine": report.machine,
        "settings": asdict(report.settings),
        "scenarios": [_scenario_json(result) for result in report.scenarios],
    }


def _scenario_json(result: ScenarioResult) -> dict[str, Any]:
    scenario = result.scenario
    return {
        "name": scenario.name,
        "description": scenario.description,
        "metric": scenario.metric,
        "higher_is_better": scenario.higher_is_better,
        "servers": result.servers,
        "reference": result.reference,
        "duration_s": result.duration_s,
        "warmup_s": result.warmup_s,
        "skipped": result.skipped,
        "rows": [row.as_json() for row in result.rows],
        "runs": _runs_json(result.runs),
        "cross_check": {
            "generator": GENERATOR,
            "tolerance": CROSS_CHECK_TOLERANCE,
            "comparison": [row.as_json() for row in result.cross_check],
            "rows": [row.as_json() for row in result.cross_rows],
            "runs": _runs_json(result.cross_runs),
        }
        if result.cross_runs
        else None,
    }


def _runs_json(runs: list[RunResult]) -> list[dict[str, Any]]:
    return [{**asdict(run), "connections_accepted": run.connections_accepted} for run in runs]


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def _per_connection_kib(row: Row) -> str:
    per_connection = per_connection_bytes(
        row.figure("peak_rss_bytes"),
        row.figure("idle_rss_bytes"),
        row.figure("connections_alive"),
        row.connections,
    )
    return _fmt(per_connection, ".1f", 1024)


# What a latency cell says for a server that served fewer connections than offered.
LATENCY_LEFT_OUT = "left out"


def _latency(row: Row, name: str) -> str:
    return LATENCY_LEFT_OUT if row.served_fewer else _fmt(row.figure(name), ",.0f")


def _measured_again_lines(result: ScenarioResult, pinned: bool) -> list[str]:
    """How many runs were measured again, why, and each one's other load, attempt after
    attempt (`runner.measure_uncontended`)."""
    if not pinned:
        return [
            "Runs measured again: none (not pinned, so what other work took of the CPUs was "
            "not measured)."
        ]
    runs = [*result.runs, *result.cross_runs]
    again = [run for run in runs if run.contended_attempts]
    why = (
        f"a run is measured again, up to {MEASURE_ATTEMPTS} times in all, while other work "
        f"took more than {CONTENDED_PCT:g}% of its pinned CPUs; its figures, `other load %` "
        "among them, are its last attempt's"
    )
    if not again:
        return [f"Runs measured again: none of {len(runs)} ({why})."]
    lines = [f"Runs measured again: {len(again)} of {len(runs)} ({why}):", ""]
    for run in again:
        attempts = ", ".join(f"{pct:.0f}%" for pct in run.contended_attempts)
        last = _fmt(run.foreign_cpu_pct, ".0f")
        kept = (
            f", kept after {MEASURE_ATTEMPTS} attempts"
            if (run.foreign_cpu_pct or 0.0) > CONTENDED_PCT
            else ""
        )
        generator = f" ({GENERATOR})" if run.generator == GENERATOR else ""
        lines.append(
            f"- {run.server}, {run.point}, repeat {run.repeat + 1}{generator}: other load "
            f"{attempts}, then {last}%{kept}"
        )
    return lines


def _served_fewer_lines(result: ScenarioResult) -> list[str]:
    """The rows whose latency is left out, and why (`Row.served_fewer`)."""
    short = [row for row in result.rows if row.served_fewer]
    if not short or result.scenario.metric == "peak_rss_bytes":
        return []
    return [
        f"Latency `{LATENCY_LEFT_OUT}`: the server served fewer connections than it was "
        "offered, so its percentiles would be those of the few it served while the others "
        "waited in vain (they are among its errors), and it would look fastest for failing "
        "most:",
        "",
        *(f"- {row.server}, {row.point}: {row.served_fewer} connections" for row in short),
    ]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# What a server that echoed wrong bytes shows instead of its ratios: it is not ranked.
NOT_RANKED = "wrong echo"


def _vs_ref(row: Row) -> str:
    return _ratio(row.vs_baseline) if row.verified else NOT_RANKED


def _cpu_vs_ref(row: Row) -> str:
    return _ratio(row.cpu_vs_baseline) if row.verified else NOT_RANKED


THROUGHPUT_COLUMNS: list[Column] = [
    ("req/s", lambda row: _fmt(row.figure("requests_per_s"), ",.0f")),
    ("MB/s", lambda row: _fmt(row.figure("mb_per_s"), ",.2f")),
    ("p50 µs", lambda row: _latency(row, "p50_us")),
    ("p99 µs", lambda row: _latency(row, "p99_us")),
    ("CPU µs/req", lambda row: _fmt(row.figure("cpu_us_per_request"), ",.1f")),
    ("load CPU µs/req", lambda row: _fmt(row.figure("client_cpu_us_per_request"), ",.1f")),
    ("other load %", lambda row: _fmt(row.figure("foreign_cpu_pct"), ",.0f")),
    ("peak RSS MiB", lambda row: _fmt(row.figure("peak_rss_bytes"), ",.1f", MIB)),
    ("accepted", lambda row: _fmt(row.figure("connections_accepted"), ",.0f")),
    ("errors", lambda row: f"{row.errors_total:,}"),
    ("vs ref", _vs_ref),
    ("CPU/req vs ref", _cpu_vs_ref),
]
HOLD_COLUMNS: list[Column] = [
    ("alive", lambda row: _fmt(row.figure("connections_alive"), ",.0f")),
    ("accepted", lambda row: _fmt(row.figure("connections_accepted"), ",.0f")),
    ("peak RSS MiB", lambda row: _fmt(row.figure("peak_rss_bytes"), ",.1f", MIB)),
    ("KiB/conn", _per_connection_kib),
    ("server CPU %", lambda row: _fmt(row.figure("server_cpu_pct"), ",.1f")),
    ("errors", lambda row: f"{row.errors_total:,}"),
    ("vs ref", _vs_ref),
]


def _scale_cpu(row: Row) -> str:
    return _fmt(row.figure("cpu_us_per_request"), ",.1f") if cpu_measurable(row) else "-"


SCALE_COLUMNS: list[Column] = [
    ("alive", lambda row: _fmt(row.figure("connections_alive"), ",.0f")),
    ("KiB/conn", _per_connection_kib),
    ("CPU µs/msg", _scale_cpu),
    ("p50 µs", lambda row: _latency(row, "p50_us")),
    ("p99 µs", lambda row: _latency(row, "p99_us")),
    ("p99.9 µs", lambda row: _latency(row, "p999_us")),
    ("max µs", lambda row: _latency(row, "max_us")),
    ("threads", lambda row: _fmt(row.figure("server_threads"), ",.0f")),
    ("other load %", lambda row: _fmt(row.figure("foreign_cpu_pct"), ",.0f")),
    ("errors", lambda row: f"{row.errors_total:,}"),
    ("vs ref", _vs_ref),
    ("CPU/req vs ref", _cpu_vs_ref),
]


def _columns(result: ScenarioResult) -> list[Column]:
    metric = result.scenario.metric
    if metric == SCALE_METRIC:
        return SCALE_COLUMNS
    return HOLD_COLUMNS if metric == "peak_rss_bytes" else THROUGHPUT_COLUMNS


def table(result: ScenarioResult) -> str:
    """The scenario's rows as one markdown table, grouped by load point."""
    columns = _columns(result)
    headers = ["load", "server", *(name for name, _ in columns)]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + " |",
    ]
    for row in result.rows:
        if row.cannot_hold:
            # Not run: the reason in the first column, nothing measured in the others.
            figures = [row.cannot_hold, *["-"] * (len(columns) - 1)]
        else:
            figures = [render(row) for _, render in columns]
        lines.append("| " + " | ".join([row.point, row.server, *figures]) + " |")
    return "\n".join(lines)


def _scale_lines(result: ScenarioResult) -> list[str]:
    """What the scale table's figures are, under it."""
    if result.scenario.metric != SCALE_METRIC:
        return []
    return [
        "A request is a message here. `KiB/conn`: the server's peak resident memory (its "
        "whole process tree) over its own once it listened, idle, divided by the "
        "connections alive at the end (only "
        f"where at least {HELD_SHARE:.0%} were). `CPU µs/msg`: server CPU over the measured "
        "window per message echoed in it, counted per thread in ns (or, where a server "
        "thread ended in the window, in 10 ms clock ticks, and left out (`-`) below "
        f"{MIN_CPU_TICKS} of them, too few to divide). Latency is measured from "
        "each message's due time (open loop: a stall shows, it cannot hide). `max`: the "
        "longest any message waited for its echo; `echoplex load` reports no gap per "
        "connection, so this is the largest gap's bound: no connection went longer than "
        "its interval plus `max` without an echo. `threads`: the server tree's threads "
        "with every connection open, as the CPU window opened. A server that cannot hold "
        "N at once is not run there; its row says why.",
    ]


def markdown(report: BenchReport, charts: dict[str, list[str]] | None = None) -> str:
    machine = report.machine
    pinning = machine.get("pinning")
    pinned = (
        f"server on CPU {pinning['cpus'][0]} (unless said under its table), load generator on "
        f"CPU {pinning['load_cpu']}"
        if pinning
        else "not pinned"
    )
    parts = [
        "# echoplex bench results",
        "",
        f"Command: `{report.command}`",
        "",
        f"echoplex {machine.get('echoplex_revision') or '(not a git checkout)'} on "
        f"{machine.get('cpu_model') or 'unknown CPU'}, {machine.get('cpus')} CPUs, "
        f"{machine.get('platform')}, Python {machine.get('python')}, "
        f"uvloop {machine.get('uvloop') or 'not installed'}; {pinned}. "
        f"Started {report.started_at}, finished {report.finished_at}; "
        f"load average {_loadavg(machine.get('load_average_start'))} at the start, "
        f"{_loadavg(machine.get('load_average_end'))} at the end.",
        "",
        readiness(report.settings.warmup_connections),
    ]
    for result in report.scenarios:
        scenario = result.scenario
        parts += ["", f"## {scenario.name}", "", scenario.description + "."]
        if result.skipped:
            parts += ["", f"**Skipped:** {result.skipped}."]
            continue
        better = "higher" if scenario.higher_is_better else "lower"
        cpu_ratio = (
            ""
            if scenario.metric == "peak_rss_bytes"
            else " `CPU/req vs ref` is the same ratio for server CPU per request (lower is "
            "better; CPU is only charged while the server runs, so it is the steadier figure "
            "on a busy machine)."
        )
        parts += [
            "",
            f"Each figure is the median of {report.settings.repeat} run(s) of "
            f"{result.duration_s:g} s after {result.warmup_s:g} s of warmup, servers taking "
            f"turns. The reference is `{result.reference}`: `vs ref` is `{scenario.metric}` "
            f"over the reference's in the same repeat ({better} is better), median over "
            f"repeats.{cpu_ratio}",
            "",
            table(result),
        ]
        if scale := _scale_lines(result):
            parts += ["", *scale]
        if served_fewer := _served_fewer_lines(result):
            parts += ["", *served_fewer]
        parts += ["", *_measured_again_lines(result, pinned=bool(pinning))]
        if custom := _custom_lines(report, result):
            parts += ["", "Servers given with `--server` (run through `/bin/sh -c`):", "", *custom]
        if wrong := _wrong_echo_lines(result):
            parts += ["", *wrong]
        if pinned_apart := _pinning_lines(result, pinning):
            parts += ["", "Servers pinned to other CPUs than the first:", "", *pinned_apart]
        if per_worker := _per_worker_lines(result):
            parts += [
                "",
                "Connections accepted per worker process (workers model):",
                "",
                *per_worker,
            ]
        if errors := _error_lines(result):
            parts += ["", "Errors over all repeats, by kind, and runs that failed:", "", *errors]
        if result.cross_check:
            parts += ["", *_cross_check_lines(result)]
        for chart in (charts or {}).get(scenario.name, []):
            parts += ["", f"![{scenario.name}]({chart})"]
    return "\n".join(parts) + "\n"


def readiness(warmup_connections: int) -> str:
    """How every server was readied for its load, as results.md says it."""
    steps = (
        f"then {warmup_connections} warm-up connection(s), one after another, each echoing "
        "64 bytes (checked) and closed by both ends"
        if warmup_connections
        else "then nothing more: the load's connections were the first it accepted"
    )
    return (
        "Every run starts a fresh server, readied the same way: the bench waits for its "
        "listening socket (its `listening on` log line, or for a `--server`, the socket in "
        f"/proc held by its process tree), {steps}; then the load starts. See "
        'bench/README.md, "Readying a server".'
    )


def _loadavg(values: Any) -> str:
    if not values:
        return "unknown"
    return "/".join(f"{value:.1f}" for value in values)


def _cpu_set(cpus: list[int]) -> str:
    if len(cpus) == 1:
        return f"CPU {cpus[0]}"
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"CPUs {cpus[0]}-{cpus[-1]}"
    return "CPUs " + ",".join(map(str, cpus))


def _pinning_lines(result: ScenarioResult, pinning: dict[str, Any] | None) -> list[str]:
    """Servers of several processes, pinned to several CPUs: the load generator's CPU
    among them, or fewer CPUs than processes, is said, as it weighs on their figures."""
    if not pinning:
        return []
    load_cpu = pinning["load_cpu"]
    apart: dict[str, list[int]] = {}
    for row in result.rows:
        if row.server_cpus and row.server_cpus != pinning["cpus"][:1]:
            apart.setdefault(row.server, row.server_cpus)
    lines = []
    for server, cpus in apart.items():
        processes = SERVERS[server].cpus if server in SERVERS else len(cpus)
        fewer = f" (all of them, for its {processes} processes)" if processes > len(cpus) else ""
        shared = f": they share CPU {load_cpu}" if load_cpu in cpus else ""
        lines.append(
            f"- {server}: server on {_cpu_set(cpus)}{fewer}, load generator on CPU {load_cpu}"
            f"{shared}"
        )
    return lines


def _custom_lines(report: BenchReport, result: ScenarioResult) -> list[str]:
    commands = {spec.name: spec.command for spec in report.settings.custom_servers}
    return [f"- {name}: `{commands[name]}`" for name in result.servers if name in commands]


def _wrong_echo_lines(result: ScenarioResult) -> list[str]:
    """The servers that echoed wrong bytes, with the first of them: not ranked."""
    liars = {row.server: row for row in result.rows if not row.verified}
    if not liars:
        return []
    lines = [
        "**Wrong echoes**: these servers sent back bytes they were not sent, so they "
        "are not ranked (no ratios):",
        "",
    ]
    for server in liars:
        rows = [row for row in result.rows if row.server == server]
        mismatches = sum(row.mismatches_total for row in rows)
        samples = [sample for row in rows for sample in row.mismatch_samples][:3]
        extra = sum(row.wrong_echo_errors for row in rows)
        what = [f"{mismatches:,} mismatched connection(s)"] if mismatches else []
        what += [f"{extra:,} connection(s) echoed extra bytes"] if extra else []
        lines.append(
            f"- {server}: {', '.join(what)}" + (f"; {'; '.join(samples)}" if samples else "")
        )
    if result.reference in liars:
        lines += [
            "",
            f"The reference `{result.reference}` is among them: no server is ranked in this table.",
        ]
    return lines


def _cross_check_lines(result: ScenarioResult) -> list[str]:
    """The cross-check's table and its verdict: do the two generators rank alike?"""
    metric = result.scenario.metric
    unit = "req/s" if metric == "requests_per_s" else "MB/s"
    tolerance = f"{CROSS_CHECK_TOLERANCE:.0%}"
    lines = [
        f"### Cross-check: the {GENERATOR}",
        "",
        f"Every server again, a fresh one each time, driven by an independent load generator "
        f"that shares no code with `echoplex load`: a one-thread C epoll ping-pong client "
        f"that checks every echoed byte ({SOURCE.name}). `C / echoplex` is the {GENERATOR}'s "
        f"{unit} over `echoplex load`'s for the same server (median over repeats). Then, "
        f"under each generator (`e`: echoplex load, `C`: the {GENERATOR}), the server's "
        f"ratio to `{result.reference}` in {unit} and in server CPU per request, and "
        f"`agree`, the C ratio over the echoplex one: 1.00 when both generators rank the "
        f"server alike.",
        "",
        f"| load | server | echoplex load {unit} | {GENERATOR} {unit} | C / echoplex | "
        f"vs ref e | vs ref C | agree | CPU/req vs ref e | CPU/req vs ref C | agree |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verified = {row.server: row.verified for row in result.rows}
    figure = ",.0f" if unit == "req/s" else ",.2f"
    for row in result.cross_check:
        ranked = (
            [
                _ratio(row.vs_ref_echoplex),
                _ratio(row.vs_ref_crosscheck),
                _ratio(row.agreement),
                _ratio(row.cpu_vs_ref_echoplex),
                _ratio(row.cpu_vs_ref_crosscheck),
                _ratio(row.cpu_agreement),
            ]
            if verified.get(row.server, True)
            else [NOT_RANKED] * 6
        )
        cells = [
            row.point,
            row.server,
            _fmt(row.echoplex, figure),
            _fmt(row.crosscheck, figure),
            _ratio(row.generators),
            *ranked,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    apart = [row for row in result.cross_check if row.within_tolerance is False]
    lines.append("")
    if apart:
        lines.append(
            f"**The generators disagree by more than {tolerance}** on "
            + "; ".join(_disagreement(row, unit) for row in apart)
            + "."
        )
    elif any(row.within_tolerance for row in result.cross_check):
        lines.append(
            f"The two generators' ratios to the reference agree within {tolerance}, in {unit} "
            "and in server CPU per request, for every server compared."
        )
    else:
        lines.append("No ratio to compare (no reference figure under both generators).")
    return lines


def _disagreement(row: CrossCheckRow, unit: str) -> str:
    parts = []
    for what, echoplex, cross, agreement in (
        (unit, row.vs_ref_echoplex, row.vs_ref_crosscheck, row.agreement),
        ("CPU/req", row.cpu_vs_ref_echoplex, row.cpu_vs_ref_crosscheck, row.cpu_agreement),
    ):
        if agreement is not None and abs(agreement - 1) > CROSS_CHECK_TOLERANCE:
            parts.append(
                f"{what} {_ratio(echoplex)} under echoplex load, {_ratio(cross)} under the "
                f"{GENERATOR}"
            )
    return f"{row.server} at {row.point} ({'; '.join(parts)})"


def _per_worker_lines(result: ScenarioResult) -> list[str]:
    lines = []
    for row in result.rows:
        counts = [
            opened
            for opened in row.connections_opened
            if any(name.startswith("worker-") for name in opened)
        ]
        if counts:
            runs = "; ".join(", ".join(f"{name} {n}" for name, n in c.items()) for c in counts)
            lines.append(f"- {row.server}, {row.point}: {runs}")
    return lines


def _error_lines(result: ScenarioResult) -> list[str]:
    lines = []
    for row in result.rows:
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in row.errors_by_kind.items())
        failures = "; ".join(dict.fromkeys(row.failures))
        if kinds or failures:
            text = "; ".join(part for part in (kinds, failures) if part)
            lines.append(f"- {row.server}, {row.point}: {text}")
    return lines


def write_results(report: BenchReport, out_dir: Path) -> list[Path]:
    """Write results.json, the charts and results.md into `out_dir`; return the paths."""
    from .charts import write_charts

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    earlier = charts_of(json_path)
    json_path.write_text(json.dumps(_rounded(to_json(report)), indent=2) + "\n")
    charts = write_charts(report, out_dir)
    # An earlier run's charts that this report does not link would be read as its own.
    written = {path.name for paths in charts.values() for path in paths}
    for name in earlier - written:
        (out_dir / name).unlink(missing_ok=True)
    md_path = out_dir / "results.md"
    md_path.write_text(
        markdown(report, {name: [path.name for path in paths] for name, paths in charts.items()})
    )
    return [json_path, md_path, *(path for paths in charts.values() for path in paths)]


def charts_of(json_path: Path) -> set[str]:
    """The chart files the bench wrote beside `json_path` for the scenarios it records
    (none if there is no such file, or it is not a bench results.json): only these are
    ever removed, so a directory's other files are left alone."""
    from .charts import chart_names

    try:
        scenarios = json.loads(json_path.read_text())["scenarios"]
        return {
            name
            for scenario in scenarios
            for name in chart_names(str(scenario["name"]), str(scenario["metric"]))
            # A file beside it, never elsewhere, whatever the file says.
            if Path(name).name == name
        }
    except (OSError, ValueError, KeyError, TypeError):
        return set()
