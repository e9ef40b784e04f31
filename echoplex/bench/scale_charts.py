"""The `scale` scenario's charts: each figure against the number of connections held.

Unlike the other scenarios' bar charts (`charts.py`), these are lines: N runs over
decades (100 to the descriptor limit) and the question is how each cost grows with it,
so both axes are logarithmic and each server is one line through its points, the
reference server (the uvloop echo) black and dashed. Written beside the others:

- `scale-memory.png`: server memory per connection (RSS growth over the idle server);
- `scale-cpu.png`: server CPU per echoed message;
- `scale-latency.png`: p50, p99, p99.9 and the longest wait for any echo, a panel each;
- `scale-threads.png`: threads the server holds under the load.

A point is drawn only where the figure is there and above zero (a log axis has no
zero); a server that served fewer connections than offered gets no latency or CPU point
there, and one that cannot hold N at all (`simple`) no point anywhere: the notes under
the panels name both, with the reason and the errors.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .chart_view import STYLE, ScenarioView, format_latency, pyplot
from .proctree import CLOCK_TICKS_PER_S
from .results import MIN_CPU_TICKS, Row, cpu_measurable
from .runner import ScenarioResult
from .scenarios import SCALE_METRIC as METRIC

PANEL_WIDTH_IN = 7.0
PANEL_HEIGHT_IN = 4.6
LEGEND_WIDTH_IN = 3.2
MIN_WIDTH_IN = 13.0  # the title and the key beside one panel
NOTE_HEIGHT_IN = 0.3
NOTE_WIDTH = 150  # characters a line of the notes under the panels
REFERENCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 2.5}
OTHER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass(frozen=True)
class Panel:
    field: str
    """A figure of a row (`Row.figure`)."""
    name: str
    """What the figure is, in a few words, for the notes."""
    title: str
    axis: str
    scale: float = 1.0
    """The figure is divided by this before it is drawn (bytes to KiB)."""
    latency: bool = False
    """A latency, in µs."""
    held_only: bool = False
    """Left out where the server served fewer connections than offered (see Row): the
    latency or CPU of the few it served would look best for failing most."""

    def value(self, row: Row) -> float | None:
        if row.cannot_hold or not row.verified or (self.held_only and row.served_fewer):
            return None
        if self.field == "cpu_us_per_request" and not cpu_measurable(row):
            return None
        value = row.figure(self.field)
        return value / self.scale if value is not None and value > 0 else None

    def ticks(self) -> Callable[[float, Any], str]:
        if self.latency:
            return lambda value, _: format_latency(value)
        return lambda value, _: f"{value:,g}"


def _latency(field: str, name: str, title: str) -> Panel:
    return Panel(field, name, title, "latency (log scale)", latency=True, held_only=True)


CHARTS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "scale-memory.png": (
        "server memory per connection",
        (
            Panel(
                METRIC,
                "memory per connection",
                "peak RSS over the idle server's, per connection held",
                "KiB per connection (log scale)",
                1024,
            ),
        ),
    ),
    "scale-cpu.png": (
        "server CPU per echoed message",
        (
            Panel(
                "cpu_us_per_request",
                "CPU per message",
                "server CPU (whole process tree) per echoed message",
                "CPU µs per message (log scale)",
                held_only=True,
            ),
        ),
    ),
    "scale-latency.png": (
        "latency",
        (
            _latency("p50_us", "p50", "p50"),
            _latency("p99_us", "p99", "p99"),
            _latency("p999_us", "p99.9", "p99.9"),
            _latency("max_us", "max latency", "max: the longest any message waited for its echo"),
        ),
    ),
    "scale-threads.png": (
        "threads the server holds",
        (
            Panel(
                "server_threads",
                "threads",
                "threads of the server's process tree, under the load",
                "threads (log scale)",
            ),
        ),
    ),
}


def chart_names() -> list[str]:
    return list(CHARTS)


def figures(result: ScenarioResult, machine: dict[str, Any]) -> dict[str, Any]:
    """The scale scenario's figures by file name; the caller saves and closes them."""
    plt = pyplot()
    view = ScenarioView(result, machine)
    with plt.rc_context(STYLE):
        return {name: _chart(plt, view, what, panels) for name, (what, panels) in CHARTS.items()}


def _line_style(view: ScenarioView, server: str, index: int) -> dict[str, Any]:
    if server == view.result.reference:
        return dict(REFERENCE_STYLE)
    dashed = view.kind(server) != "model"
    return {
        "color": OTHER_COLORS[index % len(OTHER_COLORS)],
        "linestyle": ":" if dashed else "-",
        "linewidth": 1.8,
    }


def _server_label(view: ScenarioView, server: str) -> str:
    label = view.server_label(server)
    rows = [row for row in view.result.rows if row.server == server]
    if rows and all(row.cannot_hold for row in rows):
        return f"{label} (not run: see below)"
    return f"{label} (reference)" if server == view.result.reference else label


def _chart(plt: Any, view: ScenarioView, what: str, panels: Sequence[Panel]) -> Any:
    """One panel per figure of `panels`, a line per server against N, log-log."""
    from matplotlib.patches import Patch

    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    notes = _notes(view, panels)
    fig, grid = plt.subplots(
        rows,
        columns,
        figsize=(
            max(columns * PANEL_WIDTH_IN + LEGEND_WIDTH_IN, MIN_WIDTH_IN),
            rows * PANEL_HEIGHT_IN + 1.0 + NOTE_HEIGHT_IN * len(notes),
        ),
        squeeze=False,
        layout="constrained",
    )
    axes = [ax for line in grid for ax in line]
    counts = sorted({row.connections for row in view.result.rows})
    for ax, panel in zip(axes, panels, strict=True):
        _draw_panel(ax, view, panel, counts)
    for ax in axes[len(panels) :]:
        fig.delaxes(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    every = _interval(view)
    fig.suptitle(f"scale: {what} against connections held{every} (log axes)")
    if notes:
        # Handle-less legend entries: constrained layout keeps them clear of the panels.
        blank = [Patch(visible=False, label=textwrap.fill(note, NOTE_WIDTH)) for note in notes]
        fig.legend(
            handles=blank,
            loc="outside lower left",
            frameon=False,
            handlelength=0,
            handletextpad=0,
            fontsize=10,
        )
    return fig


def _draw_panel(ax: Any, view: ScenarioView, panel: Panel, counts: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    drawn = False
    for index, server in enumerate(view.servers):
        points = [
            (row.connections, value)
            for row in view.result.rows
            if row.server == server and (value := panel.value(row)) is not None
        ]
        points.sort()
        drawn = drawn or bool(points)
        # Every server has a line in the key, even one with nothing to draw here.
        ax.plot(
            [n for n, _ in points],
            [value for _, value in points],
            marker="o",
            markersize=6,
            label=_server_label(view, server),
            **_line_style(view, server, index),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    if not drawn:
        # A log axis needs a range: an empty panel gets one decade, and says why.
        ax.set_ylim(1, 10)
        ax.text(0.5, 0.5, "no figure to draw: see below", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(FixedLocator(counts))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    # Minor ticks labelled too (as plain numbers, not 2x10^3): an axis within one decade
    # may have no major tick but its ends.
    ax.yaxis.set_major_formatter(FuncFormatter(panel.ticks()))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor(panel, *ax.get_ylim())))
    if counts:
        ax.set_xlim(counts[0] / 1.5, counts[-1] * 1.5)
    ax.set_title(panel.title)
    ax.set_xlabel("connections held (log scale)")
    ax.set_ylabel(panel.axis)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)


def _minor(panel: Panel, low: float, high: float) -> Callable[[float, Any], str]:
    """Minor ticks labelled: every one on an axis within a decade (it may have one major
    tick, or none), those at 2x and 5x each decade within two, none beyond (they would
    crowd the major ones)."""
    major = panel.ticks()
    labelled = "123456789" if high < 10 * low else "25" if high < 100 * low else ""

    def label(value: float, position: Any) -> str:
        return major(value, position) if f"{value:.0e}"[0] in labelled else ""

    return label


def _interval(view: ScenarioView) -> str:
    """`, each sending every 2s`, from the points' labels (`rate c=100 s=64B every 2s`)."""
    label = view.points[0] if view.points else ""
    _, every, interval = label.rpartition(" every ")
    return f", each sending every {interval}" if every else ""


def _notes(view: ScenarioView, panels: Sequence[Panel]) -> list[str]:
    """Why a server has fewer points than there are N values: who was not run, who held
    fewer connections than offered (with its errors), and which figures are missing
    where, one line per reason."""
    rows = view.result.rows
    notes: list[str] = []
    not_run: dict[str, list[Row]] = {}
    for row in rows:
        if row.cannot_hold:
            not_run.setdefault(row.server, []).append(row)
    for server, held in not_run.items():
        counts = ", ".join(f"{row.connections:,}" for row in held)
        why = (held[0].cannot_hold or "").partition(": ")[2]
        notes.append(f"{server}: not run at {counts} connections: {why}")
    missing: dict[str, list[str]] = {}
    for row in rows:
        if row.cannot_hold:
            continue
        if trouble := view.trouble(row):
            kinds = ", ".join(f"{kind} {count:,}" for kind, count in row.errors_by_kind.items())
            notes.append(
                f"{row.server} at {row.connections:,}: {trouble}" + (f" ({kinds})" if kinds else "")
            )
        if row.served_fewer:
            continue
        for panel in panels:
            if panel.value(row) is None:
                missing.setdefault(_why_missing(panel, row), []).append(
                    f"{row.server} at {row.connections:,}"
                )
    notes += [f"no {what}: {', '.join(where)}" for what, where in missing.items()]
    return notes


def _why_missing(panel: Panel, row: Row) -> str:
    if panel.field == "cpu_us_per_request":
        if row.figure("server_cpu_s") is None:
            return "CPU figure (the load ended inside the bench's CPU window: a late bench)"
        if not cpu_measurable(row):
            return (
                f"CPU figure (fewer than {MIN_CPU_TICKS} clock ticks of "
                f"{1000 / CLOCK_TICKS_PER_S:g} ms in the window, too few to divide; a "
                "thread ended in it, so it was not counted per thread in ns)"
            )
    return f"{panel.name} figure (none measured, or 0)"


__all__ = ["CHARTS", "METRIC", "chart_names", "figures"]
