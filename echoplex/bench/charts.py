"""PNG charts of a bench report, drawn with matplotlib (imported only here, and only
when charts are drawn: `pip install 'echoplex[bench]'`).

Per scenario, under the names results.md links to:

- `NAME-throughput.png` (`NAME-memory.png` for `hold`): the scenario's headline figure;
- `NAME-cpu.png`: server CPU per request (not for `hold`);
- `NAME-latency.png`: p50, p90 and p99 latency (not for `hold`);
- for `scale`, line charts against the connections held instead (`scale_charts.py`).

Every chart has one panel per load point and one horizontal bar (or row) per server,
in the order the servers ran, its name beside it. Bars, not lines: a scenario has at
most four load points, steps (1, 10, 100, 1000 connections) rather than a continuous
variable, so a line between two of them draws values nobody measured, and with eight
servers the lines cross and hide each other exactly where the servers are closest.
A labelled bar says each value. Value axes start at zero, so bar lengths compare;
panels share their axis unless their largest values are more than `SHARED_SCALE_LIMIT`
apart (`sizes`: MB/s from 64 B to 64 KiB messages), then each panel gets its own.

Latency is a dot per percentile on a log axis, p50 to p99 joined: at 1000 connections
the percentiles of one server span three decades, and a bar on a log axis has no
meaningful length.

The key (above the panels) tells echoplex models (solid) from reference servers
(hatched, dashed on the latency chart) and from any other kind of server. Errors
(timeouts, resets, failed runs, over all repeats) are written in red beside the
server's value on every chart; a server that echoed wrong bytes gets no bar or dots,
only "not ranked" and its count of wrong echoes. A server that served fewer connections
than it was offered (`simple` at 1000: one at a time) is marked "served 1 of 1,000
connections" in red, and gets no latency dots: the latency of the one it served would
look the best of all. A server that ran on the load
generator's CPU has a dagger after its name and a note under the panels.

Redraw the charts from a results.json without rerunning the bench:

    python -m echoplex.bench.charts bench/out bench/out/targets
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from .._cli_util import Parser, fail
from .chart_view import (
    DPI,
    STYLE,
    MissingDependency,
    ScenarioView,
    check_available,
    format_latency,
    pyplot,
)
from .results import MEDIAN_FIELDS, Row, RunResult
from .runner import BenchReport, ScenarioResult
from .scenarios import LoadPoint, Scenario

PROG = "python -m echoplex.bench.charts"
PANEL_WIDTH_IN = 6.0
ROW_HEIGHT_IN = 0.4
PANEL_MARGIN_IN = 1.1  # title, tick labels and axis label of one panel
KEY_HEIGHT_IN = 1.3  # suptitle and the key
MIN_WIDTH_IN = 9.0
LABEL_MARGIN = 0.02  # of a panel's width, between a label and the panel's edge
MIN_LOG_SPAN = 1.0  # decades: a latency axis narrower than that has too few ticks
MIB = 1024 * 1024
SHARED_SCALE_LIMIT = 5.0
OWN_SCALES_NOTE = "each panel has its own scale: their values are too far apart to share one"
ERROR_COLOR = "tab:red"
METRIC_LABELS = {
    "requests_per_s": "requests/s",
    "mb_per_s": "MB/s",
    "peak_rss_bytes": "peak RSS (MiB)",
    "cpu_us_per_request": "server CPU µs per request",
}
PERCENTILES = (
    ("p50_us", "p50", "o", "tab:blue"),
    ("p90_us", "p90", "s", "tab:purple"),
    ("p99_us", "p99", "D", "black"),
)


LineStyle = Literal["-", "--", ":"]
LINE_NAMES: dict[LineStyle, str] = {"-": "solid", "--": "dashed", ":": "dotted"}


@dataclass(frozen=True)
class KindStyle:
    """How one kind of server is drawn: its bars (colour and hatch) and, on the latency
    chart, the line from its p50 to its p99."""

    name: str
    color: str
    hatch: str
    bar_look: str
    """The bars' look in words, for the key."""
    linestyle: LineStyle

    @property
    def bar_label(self) -> str:
        return f"{self.name} ({self.bar_look})"

    @property
    def line_label(self) -> str:
        return f"{self.name} ({LINE_NAMES[self.linestyle]})"


KIND_STYLES = {
    "model": KindStyle("echoplex model", "tab:blue", "", "solid", "-"),
    "baseline": KindStyle("reference server", "#d0d0d0", "//", "hatched", "--"),
}


def kind_style(kind: str) -> KindStyle:
    """Models and reference servers as above; any other kind (a server given to the
    bench on its command line) orange and dotted, named by its kind."""
    return KIND_STYLES.get(kind) or KindStyle(f"{kind} server", "tab:orange", "..", "dotted", ":")


def write_charts(report: BenchReport, out_dir: Path) -> dict[str, list[Path]]:
    """Draw every scenario that ran; returns the PNG paths by scenario name."""
    return draw_scenarios(report.scenarios, report.machine, out_dir)


def draw_scenarios(
    results: Iterable[ScenarioResult], machine: dict[str, Any], out_dir: Path
) -> dict[str, list[Path]]:
    """The charts of each scenario that ran, into `out_dir`; `machine` is the report's
    (its `pinning` says which CPU the load generator had)."""
    plt = pyplot()
    written: dict[str, list[Path]] = {}
    for result in results:
        if result.skipped or not result.rows:
            continue
        paths = written[result.scenario.name] = []
        for file_name, fig in figures(result, machine).items():
            with plt.rc_context(STYLE):
                fig.savefig(out_dir / file_name, dpi=DPI)
            plt.close(fig)
            paths.append(out_dir / file_name)
    return written


def figures(result: ScenarioResult, machine: dict[str, Any]) -> dict[str, Any]:
    """A scenario's matplotlib figures by file name (`concurrency-throughput.png`, ...);
    the caller saves and closes them."""
    from . import scale_charts

    metric = result.scenario.metric
    if metric == scale_charts.METRIC:
        return scale_charts.figures(result, machine)
    plt = pyplot()
    view = ScenarioView(result, machine)
    names = chart_names(result.scenario.name, metric)
    with plt.rc_context(STYLE):
        if metric == "peak_rss_bytes":
            return dict(zip(names, [_bar_chart(plt, view, metric)], strict=True))
        drawn = [
            _bar_chart(plt, view, metric),
            _bar_chart(plt, view, "cpu_us_per_request"),
            _latency_chart(plt, view),
        ]
        return dict(zip(names, drawn, strict=True))


def chart_names(scenario: str, metric: str) -> list[str]:
    """The files a scenario's charts are written to (see the module's docstring)."""
    from . import scale_charts

    if metric == scale_charts.METRIC:
        return scale_charts.chart_names()
    if metric == "peak_rss_bytes":
        return [f"{scenario}-memory.png"]
    return [f"{scenario}-{what}.png" for what in ("throughput", "cpu", "latency")]


def _format_value(value: float) -> str:
    """Three significant figures or more: 104,875 / 56.7 / 1.43 / 0.0641."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _grid(count: int) -> tuple[int, int]:
    """Rows and columns of panels: two columns once there are two points or more."""
    columns = min(count, 2)
    return math.ceil(count / columns), columns


def _figure(plt: Any, view: ScenarioView, **share: Any) -> tuple[Any, list[Any]]:
    """A figure with one panel per load point (surplus grid cells removed)."""
    rows, columns = _grid(len(view.points))
    height = rows * (len(view.servers) * ROW_HEIGHT_IN + PANEL_MARGIN_IN) + KEY_HEIGHT_IN
    fig, grid = plt.subplots(
        rows,
        columns,
        # One panel gets more than a panel's width: the title and key must fit above it.
        figsize=(max(columns * PANEL_WIDTH_IN, MIN_WIDTH_IN), height),
        squeeze=False,
        layout="constrained",
        **share,
    )
    axes = [ax for line in grid for ax in line]
    for ax in axes[len(view.points) :]:
        fig.delaxes(ax)
    return fig, axes[: len(view.points)]


def _server_axis(ax: Any, view: ScenarioView) -> None:
    """Servers down the vertical axis, the first at the top, named on every panel."""
    ax.set_yticks(range(len(view.servers)))
    ax.set_yticklabels([view.server_label(server) for server in view.servers])
    ax.tick_params(axis="y", labelleft=True, length=0)
    ax.set_ylim(len(view.servers) - 0.5, -0.5)


def _bar_chart(plt: Any, view: ScenarioView, metric: str) -> Any:
    """One horizontal bar per server in each load point's panel, labelled with its value
    (and in red with its errors), on a value axis from zero."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    scale = MIB if metric == "peak_rss_bytes" else 1
    maxima = [
        max(row.figure(metric) or 0.0 for row in view.result.rows if row.point == point)
        for point in view.points
    ]
    shared = min(maxima) > 0 and max(maxima) / min(maxima) <= SHARED_SCALE_LIMIT
    fig, axes = _figure(plt, view, sharey=True, sharex=shared)
    panels = []
    for ax, point in zip(axes, view.points, strict=True):
        rows = [view.row(point, server) for server in view.servers]
        values = [
            (row.figure(metric) or 0.0) / scale if row and row.verified else 0.0 for row in rows
        ]
        bars = ax.barh(range(len(rows)), values, height=0.7, edgecolor="dimgray", linewidth=0.8)
        for bar, server in zip(bars, view.servers, strict=True):
            style = kind_style(view.kind(server))
            bar.set_facecolor(style.color)
            bar.set_hatch(style.hatch)
        labels = [_bar_label(view, row, metric, scale) for row in rows]
        texts = ax.bar_label(bars, labels=[text for text, _ in labels], padding=4)
        for text, (_, troubled) in zip(texts, labels, strict=True):
            if troubled:
                text.set_color(ERROR_COLOR)
                text.set_fontweight("bold")
        _server_axis(ax, view)
        ax.set_title(view.point_title(point))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        if max(values, default=0.0) >= 1000:
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.grid(True, axis="x", alpha=0.35)
        ax.set_axisbelow(True)
        panels.append((ax, texts))
    for ax, most in zip(axes, maxima, strict=True):
        ax.set_xlim(0, (max(maxima) if shared else most) / scale or 1.0)
    better = "higher is better" if _higher_is_better(view, metric) else "lower is better"
    label = f"{METRIC_LABELS.get(metric, metric)} ({better})"
    for ax in _bottom_panels(axes, shared):
        ax.set_xlabel(label)
    handles = [_kind_patch(view.kind(server)) for server in view.servers]
    apart = [] if shared or len(axes) == 1 else [OWN_SCALES_NOTE]
    _finish(fig, view, METRIC_LABELS.get(metric, metric), _unique(handles), apart)
    _fit_texts(fig, panels, shared)
    return fig


def _higher_is_better(view: ScenarioView, metric: str) -> bool:
    if metric == view.result.scenario.metric:
        return view.result.scenario.higher_is_better
    return metric not in ("cpu_us_per_request", "peak_rss_bytes")


def _bar_label(view: ScenarioView, row: Row | None, metric: str, scale: float) -> tuple[str, bool]:
    """The text beside a bar, and whether it reports trouble."""
    if row is None:
        return "did not run", False
    value, trouble = row.figure(metric), view.trouble(row)
    if not_ranked := view.not_ranked(row):
        return not_ranked, True
    text = "no result" if value is None else _format_value(value / scale)
    return (f"{text}  ({trouble})", True) if trouble else (text, False)


def _bottom_panels(axes: list[Any], shared: bool) -> list[Any]:
    """The panels that carry the value axis label: the lowest of each column if the axis
    is shared, else every one."""
    if not shared:
        return axes
    columns = axes[0].get_gridspec().ncols
    return axes[-columns:]


def _kind_patch(kind: str) -> Any:
    from matplotlib.patches import Patch

    style = kind_style(kind)
    return Patch(
        facecolor=style.color, hatch=style.hatch, edgecolor="dimgray", label=style.bar_label
    )


def _unique(handles: Iterable[Any]) -> list[Any]:
    return list({handle.get_label(): handle for handle in handles}.values())


def _finish(
    fig: Any, view: ScenarioView, what: str, handles: list[Any], notes: Sequence[str] = ()
) -> None:
    """Title, the key above the panels and the notes below them, both outside the data."""
    from matplotlib.patches import Patch

    runs = "1 run each" if view.runs == 1 else f"median of {view.runs} runs each"
    # The title heads the key: constrained layout stacks a suptitle and an outside
    # legend on top of each other.
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=len(handles),
        frameon=False,
        title=f"{view.result.scenario.name}: {what} per server ({runs})",
        title_fontsize=STYLE["figure.titlesize"],
    )
    notes = [*view.cpu_notes, *notes]
    if view.has_trouble():
        notes.insert(
            0,
            "red: errors over all runs (timeouts, resets, wrong echoes, failed runs) and "
            "connections offered but not served",
        )
    if notes:
        blank = [Patch(visible=False, label=note) for note in notes]
        legend = fig.legend(
            handles=blank,
            loc="outside lower center",
            frameon=False,
            handlelength=0,
            handletextpad=0,
        )
        if view.has_trouble():
            legend.get_texts()[0].set_color(ERROR_COLOR)


def _fit_texts(fig: Any, panels: Sequence[tuple[Any, Sequence[Any]]], shared: bool) -> None:
    """Set each panel's value axis so that the labels beside its bars and dots fit in
    it. A label sits a fixed number of points from its value, so the room it needs in
    data units depends on the axis' own scale: solved from one measurement."""
    for _, texts in panels:
        for text in texts:
            # Laid out with the labels sticking out, constrained layout would narrow
            # the panels to make room for them, and the measure would be wrong.
            text.set_in_layout(False)
    fig.canvas.draw()  # lays the figure out: panel widths and text sizes in pixels
    for group in [panels] if shared else [[panel] for panel in panels]:
        ax = group[0][0]
        log = ax.get_xscale() == "log"
        width = ax.get_window_extent().width
        needs = [_room(each, text, width, log) for each, texts in group for text in texts]
        if needs:
            low, high = _limits(needs, log)
            ax.set_xlim(10**low, 10**high) if log else ax.set_xlim(0, high)


def _room(ax: Any, text: Any, width: float, log: bool) -> tuple[float, float, float]:
    """A label's anchor on the axis (log10 of it on a log axis) and the shares of the
    panel's width it needs left and right of its anchor, margin included."""
    anchor = text.xy[0]
    anchor_px = ax.transData.transform((anchor, 0))[0]
    extent = text.get_window_extent()
    left = (anchor_px - extent.x0) / width + LABEL_MARGIN
    right = (extent.x1 - anchor_px) / width + LABEL_MARGIN
    return (math.log10(anchor) if log else anchor), left, right


def _limits(needs: Sequence[tuple[float, float, float]], log: bool) -> tuple[float, float]:
    """The narrowest axis (low, high) on which every label fits: with span S, a label
    at u needing shares a and b of the width on its left and right fits if
    low <= u - a*S and low >= u - (1 - b)*S. A linear axis keeps zero as its low end."""
    if not log:
        return 0.0, max((u / (1 - right) for u, _, right in needs if right < 1), default=0) or 1.0
    span = max(
        [MIN_LOG_SPAN]
        + [
            (u_right - u_left) / (1 - b - a)
            for u_left, a, _ in needs
            for u_right, _, b in needs
            if a + b < 1
        ]
    )
    highest_low = min(u - a * span for u, a, _ in needs)
    lowest_low = max(u - (1 - b) * span for u, _, b in needs)
    low = (highest_low + lowest_low) / 2
    return low, low + span


def _latency_chart(plt: Any, view: ScenarioView) -> Any:
    """p50, p90 and p99 of every server as dots on a log axis, p50 and p99 written out."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    fig, axes = _figure(plt, view, sharey=True, sharex=True)
    panels = []
    for ax, point in zip(axes, view.points, strict=True):
        texts = []
        # x in the panel's share of its width, y in data: the left edge of a server's row.
        edge = blended_transform_factory(ax.transAxes, ax.transData)
        for index, server in enumerate(view.servers):
            row = view.row(point, server)
            values = [row.figure(field) if row else None for field, *_ in PERCENTILES]
            present = [value for value in values if value]
            if row and not row.verified:
                _row_note(ax, index, view.not_ranked(row), edge)
                continue
            if row and row.served_fewer:
                # The latency of the few it served: it would look best for failing most.
                _row_note(ax, index, f"latency left out: {row.served_fewer}", edge)
                continue
            if not present:
                _row_note(ax, index, "no result", edge, trouble=False)
                continue
            style = kind_style(view.kind(server))
            ax.plot([min(present), max(present)], [index, index], style.linestyle, color="gray")
            for value, (_, _, marker, color) in zip(values, PERCENTILES, strict=True):
                if value:
                    ax.plot(value, index, marker, color=color, markersize=7)
            texts.append(_point_label(ax, min(present), index, format_latency(min(present)), -8))
            trouble = view.trouble(row) if row else ""
            right = format_latency(max(present)) + (f"  ({trouble})" if trouble else "")
            label = _point_label(ax, max(present), index, right, 8)
            if trouble:
                label.set_color(ERROR_COLOR)
                label.set_fontweight("bold")
            texts.append(label)
        _server_axis(ax, view)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_latency(value)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(view.point_title(point))
        ax.grid(True, axis="x", which="major", alpha=0.35)
        panels.append((ax, texts))
    for ax in _bottom_panels(axes, shared=True):
        ax.set_xlabel("latency (log scale; lower is better)")
    handles = [
        Line2D([], [], linestyle="none", marker=marker, color=color, markersize=7, label=label)
        for _, label, marker, color in PERCENTILES
    ]
    for kind in view.kinds():
        style = kind_style(kind)
        handles.append(
            Line2D([], [], linestyle=style.linestyle, color="gray", label=style.line_label)
        )
    _finish(fig, view, "latency percentiles", handles)
    _fit_texts(fig, panels, shared=True)
    low, high = axes[0].get_xlim()
    if high / low < 100:
        # Less than two decades would show one or two ticks: add 2x and 5x ones.
        axes[0].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    return fig


def _row_note(ax: Any, index: int, text: str, edge: Any, trouble: bool = True) -> None:
    """`text` in a server's row from the panel's left edge (`edge`: x in the panel's
    width, y in data), instead of its dots: in red if it reports trouble."""
    ax.text(
        0.01,
        index,
        text,
        va="center",
        color=ERROR_COLOR if trouble else "dimgray",
        fontweight="bold" if trouble else "normal",
        transform=edge,
    )


def _point_label(ax: Any, value: float, index: int, text: str, offset_pt: float) -> Any:
    return ax.annotate(
        text,
        (value, index),
        xytext=(offset_pt, 0),
        textcoords="offset points",
        va="center",
        ha="left" if offset_pt > 0 else "right",
        fontsize=11,
    )


# --- redrawing from results.json -------------------------------------------------------


def load_results(path: Path) -> tuple[list[ScenarioResult], dict[str, Any]]:
    """The scenarios and machine of a bench results.json (as `report.to_json` wrote it)."""
    data = json.loads(path.read_text())
    try:
        return [_scenario_from_json(item) for item in data["scenarios"]], dict(data["machine"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a bench results.json: {type(exc).__name__} {exc}") from exc


def _scenario_from_json(data: dict[str, Any]) -> ScenarioResult:
    rows = [_row_from_json(row) for row in data["rows"]]
    points = dict.fromkeys(LoadPoint(r.pattern, r.connections, r.size_bytes) for r in rows)
    scenario = Scenario(
        data["name"],
        data["description"],
        tuple(points),
        metric=data["metric"],
        higher_is_better=data["higher_is_better"],
    )
    return ScenarioResult(
        scenario,
        servers=list(data["servers"]),
        reference=data.get("reference"),
        duration_s=data["duration_s"],
        warmup_s=data["warmup_s"],
        runs=[RunResult(**_known(RunResult, run)) for run in data.get("runs", [])],
        rows=rows,
        skipped=data.get("skipped"),
    )


def _row_from_json(data: dict[str, Any]) -> Row:
    medians = {name: data.get(name) for name in MEDIAN_FIELDS}
    # No kind recorded: the charts infer it from the server's name.
    return Row(**{"kind": "", **_known(Row, data)}, medians=medians)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The items of `data` that are fields of the dataclass `cls` (results.json also
    holds derived figures, and may hold fields a newer bench added)."""
    names = {field.name for field in fields(cls)} - {"medians"}
    return {key: value for key, value in data.items() if key in names}


def redraw(path: Path) -> dict[str, list[Path]]:
    """Redraw the charts of a results.json (or of the one in directory `path`) beside it."""
    json_path = path / "results.json" if path.is_dir() else path
    results, machine = load_results(json_path)
    return draw_scenarios(results, machine, json_path.parent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog=PROG,
        description="Redraw the PNG charts of bench results from their results.json, "
        "beside it, without rerunning the bench.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a results.json, or a directory holding one",
    )
    args = parser.parse_args(argv)
    try:
        check_available()
    except MissingDependency as exc:
        return fail(PROG, str(exc))
    for path in args.paths:
        try:
            written = redraw(path)
        except (OSError, ValueError) as exc:
            return fail(PROG, f"{path}: {exc}")
        for paths in written.values():
            print(*paths, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
