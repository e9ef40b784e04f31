"""A picture per step (matplotlib, imported only here): for steps 1 to 3 a timeline,
one row per client coloured by its state, one panel per model on one time axis; for
step 4 bars of memory and threads per connection. As readable as the bench's charts
(`echoplex.bench.charts`: 150 dpi, 12 pt, labelled axes from zero)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

from ..bench.charts import DPI, STYLE
from .clients import ClientTimes
from .results import ModelRun, StepResult

STATES = (
    ("waiting to be accepted", "#d62728"),
    ("connected, not answered yet", "#ff9f1c"),
    ("being answered", "#2ca02c"),
    ("done", "#d9d9d9"),
)
PANEL_WIDTH_IN = 11.0
ROW_HEIGHT_IN = 0.28
PANEL_EXTRA_IN = 0.9
FILE_NAMES = {1: "step1-waiting.png", 2: "step2-io-work.png", 3: "step3-cpu-work.png"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def draw_step(step: StepResult, out: Path) -> list[Path]:
    """The step's picture in `out`, if it has figures to draw; its path."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig = figure_of(step)
        if fig is None:
            return []
        path = out / FILE_NAMES.get(step.number, "step4-idle.png")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return [path]


def figure_of(step: StepResult) -> Any:
    """The step's figure (the caller closes it), or None if no run has figures."""
    runs = [run for run in step.runs if run.error is None]
    if not runs:
        return None
    plt = _pyplot()
    with plt.rc_context(STYLE):
        return timeline(plt, step, runs) if step.number != 4 else idle_bars(plt, step, runs)


def _segments(client: ClientTimes, end_s: float) -> list[tuple[float, float, str]]:
    """(from, to, colour) of each state the client was in, up to `end_s`."""
    moments = [
        client.connected_s,
        client.accepted_s if client.accepted_s is not None else client.connected_s,
        client.first_echo_s,
        client.done_s,
        end_s,
    ]
    segments = []
    for (_, colour), (start, stop) in zip(STATES, pairwise(moments), strict=True):
        if start is not None and stop is not None and stop > start:
            segments.append((start, stop, colour))
    return segments


def timeline(plt: Any, step: StepResult, runs: list[ModelRun]) -> Any:
    end_s = max((run.whole_s or 0.0) for run in runs) * 1.05 or 1.0
    heights = [max(len(run.clients), 2) * ROW_HEIGHT_IN + PANEL_EXTRA_IN for run in runs]
    fig, axes = plt.subplots(
        len(runs),
        1,
        figsize=(PANEL_WIDTH_IN, sum(heights) + 1.4),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for row, client in enumerate(run.clients):
            for start, stop, colour in _segments(client, end_s):
                ax.broken_barh([(start, stop - start)], (row - 0.4, 0.8), color=colour)
        ax.set_yticks(range(len(run.clients)))
        ax.set_yticklabels([_short(client.name) for client in run.clients], fontsize=10)
        ax.set_ylim(len(run.clients) - 0.5, -0.5)
        whole = "" if run.whole_s is None else f": every client done in {run.whole_s:.2f} s"
        ax.set_title(f"{run.model}{whole}", loc="left")
        ax.set_xlim(0, end_s)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds from the start of the run")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for _, colour in STATES]
    fig.legend(
        handles,
        [name for name, _ in STATES],
        loc="outside lower center",
        ncol=len(STATES),
        frameon=False,
    )
    fig.suptitle(f"Step {step.number}. {step.title}: one row per client, one panel per model")
    return fig


def _short(name: str) -> str:
    return name.split(" (")[0]


def idle_bars(plt: Any, step: StepResult, runs: list[ModelRun]) -> Any:
    fig, (memory, threads) = plt.subplots(1, 2, figsize=(PANEL_WIDTH_IN, 4.2), layout="constrained")
    names = [run.model for run in runs]
    kib = [float(run.figures.get("bytes_per_connection") or 0) / 1024 for run in runs]
    per_thread = [float(run.figures.get("threads_per_connection") or 0) for run in runs]
    for ax, values, label, fmt in (
        (memory, kib, "server memory per connection (KiB)", "{:.1f}"),
        (threads, per_thread, "server threads per connection", "{:.2f}"),
    ):
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, [fmt.format(value) for value in values], padding=3)
        ax.set_ylabel(label)
        ax.set_xlabel("server model")
        ax.set_ylim(min(0.0, min(values) * 1.2), max(max(values) * 1.2, 1.2))
        ax.grid(axis="y", alpha=0.3)
    count = runs[0].figures.get("connections")
    fig.suptitle(f"Step 4. {count} idle connections: what each costs the server")
    return fig
