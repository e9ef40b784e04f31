"""PNG charts of a bench report, drawn with matplotlib (imported only here, and only
when charts are written: `pip install 'echoplex[bench]'`).

Per scenario: its headline figure against the load point's varying field, one line
per server (throughput vs connections for `concurrency`), and for the others than
`hold` server CPU per request the same way and the latency percentiles of every
server at every point.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .results import Row
from .runner import BenchReport, ScenarioResult
from .scenarios import format_size

INSTALL_HINT = "matplotlib is needed for the charts: pip install 'echoplex[bench]'"
# Small files: the committed results are read on GitHub, not printed.
DPI = 72
METRIC_LABELS = {
    "requests_per_s": "requests/s",
    "mb_per_s": "MB/s",
    "peak_rss_bytes": "peak RSS (MiB)",
    "cpu_us_per_request": "server CPU µs per request",
}
PERCENTILES = (("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"))


class MissingDependency(Exception):
    pass


def check_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency(INSTALL_HINT)


def _pyplot() -> Any:
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def write_charts(report: BenchReport, out_dir: Path) -> dict[str, list[Path]]:
    """Draw every scenario that ran; returns the PNG paths by scenario name."""
    plt = _pyplot()
    written: dict[str, list[Path]] = {}
    for result in report.scenarios:
        if result.skipped or not result.rows:
            continue
        metric = result.scenario.metric
        name = "memory" if metric == "peak_rss_bytes" else "throughput"
        paths = [_figure_chart(plt, result, metric, out_dir / f"{result.scenario.name}-{name}.png")]
        if metric != "peak_rss_bytes":
            cpu_path = out_dir / f"{result.scenario.name}-cpu.png"
            paths.append(_figure_chart(plt, result, "cpu_us_per_request", cpu_path))
            paths.append(_latency_chart(plt, result, out_dir))
        written[result.scenario.name] = paths
    return written


def _x_value(row: Row, x_axis: str) -> int:
    value: int = getattr(row, x_axis)
    return value


def _figure_chart(plt: Any, result: ScenarioResult, metric: str, path: Path) -> Path:
    """One figure of every server: a line per server over the load points, or a bar
    per server if the scenario has one point."""
    scenario = result.scenario
    scale = 1024 * 1024 if metric == "peak_rss_bytes" else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted({_x_value(row, scenario.x_axis) for row in result.rows})
    if len(xs) == 1:
        # One load point: a bar per server says more than a column of dots.
        rows = [row for row in result.rows if row.figure(metric) is not None]
        ax.bar(
            [row.server for row in rows],
            [(row.figure(metric) or 0.0) / scale for row in rows],
            color=["tab:gray" if row.kind == "baseline" else "tab:blue" for row in rows],
        )
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel(rows[0].point if rows else "")
    else:
        for server in result.servers:
            points = [
                (_x_value(row, scenario.x_axis), row.figure(metric))
                for row in result.rows
                if row.server == server
            ]
            points = [(x, y / scale) for x, y in points if y is not None]
            if points:
                style = "--" if server.startswith("ref-") else "-"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=server)
        ax.set_xscale("log")
        values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if values and max(values) / min(values) > 50:
            ax.set_yscale("log")  # e.g. MB/s from 64 B to 64 KiB messages
        ax.set_xticks(xs)
        labels = [format_size(x) if scenario.x_axis == "size_bytes" else str(x) for x in xs]
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("message size" if scenario.x_axis == "size_bytes" else "connections")
        if ax.get_lines():
            ax.legend(fontsize="small")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{scenario.name}: {METRIC_LABELS.get(metric, metric)} per server")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _latency_chart(plt: Any, result: ScenarioResult, out_dir: Path) -> Path:
    points = list(dict.fromkeys(row.point for row in result.rows))
    fig, axes = plt.subplots(
        1, len(points), figsize=(3.2 * len(points) + 1, 4), squeeze=False, sharey=True
    )
    width = 0.8 / len(PERCENTILES)
    for ax, point in zip(axes[0], points, strict=True):
        rows = [row for row in result.rows if row.point == point]
        for index, (field, label) in enumerate(PERCENTILES):
            values = [row.figure(field) or 0.0 for row in rows]
            ax.bar(
                [i + (index - 1) * width for i in range(len(rows))],
                values,
                width=width,
                label=label,
            )
        ax.set_xticks(range(len(rows)))
        # A server that timed out most connections shows the latency of the few it served:
        # say so under its name.
        labels = [
            f"{row.server} ({row.errors_total:,} err)" if row.errors_total else row.server
            for row in rows
        ]
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(point, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("latency (µs, log scale)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{result.scenario.name}: latency percentiles per server")
    fig.tight_layout()
    path = out_dir / f"{result.scenario.name}-latency.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
