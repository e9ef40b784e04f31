"""The bench's PNG charts: drawn from a small results object, then read back, as files
(size, resolution) and as matplotlib figures (axes from zero, the key outside the
panels, errors and CPU sharing written on the charts), and redrawn from a results.json
by `python -m echoplex.bench.charts`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from matplotlib.figure import Figure
from PIL import Image

from echoplex.bench.charts import OWN_SCALES_NOTE, figures, load_results, write_charts
from echoplex.bench.report import to_json
from echoplex.bench.results import RunResult, summarize
from echoplex.bench.runner import BenchReport, BenchSettings, ScenarioResult
from echoplex.bench.scenarios import LoadPoint, Scenario

matplotlib.use("Agg")

PINNED = {"cpus": 2, "pinning": {"cpus": [0, 1], "load_cpu": 1}}
SERVERS = ("asyncio", "workers-2", "ref-uvloop", "go-echo")
KINDS = {"asyncio": "model", "workers-2": "model", "ref-uvloop": "baseline", "go-echo": "custom"}


def _scenario_result(sizes: tuple[int, ...] = (64, 64), connections: tuple[int, ...] = (1, 100)):
    """Two load points, four servers of three kinds, two repeats. At the second point
    asyncio timed out 7 times, go-echo corrupted 3 echoes, and one run of ref-uvloop
    failed; workers-2 ran on both CPUs, one of them the load generator's."""
    points = [LoadPoint("pingpong", c, s) for c, s in zip(connections, sizes, strict=True)]
    scenario = Scenario("demo", "a demo", tuple(points), metric="requests_per_s")
    runs = []
    for index, point in enumerate(points):
        for repeat in range(2):
            for number, server in enumerate(SERVERS):
                rps = 1000.0 * (number + 1) * (index + 1)
                run = RunResult(
                    scenario="demo",
                    point=point.label,
                    server=server,
                    kind=KINDS[server],
                    repeat=repeat,
                    pattern=point.pattern,
                    connections=point.connections,
                    size_bytes=point.size_bytes,
                    requests_per_s=rps,
                    mb_per_s=rps * point.size_bytes / 1e6,
                    p50_us=100.0 * (index + 1),
                    p90_us=300.0 * (index + 1),
                    p99_us=900.0 * (index + 1),
                    cpu_us_per_request=10.0 + number,
                    peak_rss_bytes=20e6,
                    server_cpus=[0, 1] if server == "workers-2" else [0],
                )
                if index == 1 and server == "asyncio" and repeat == 0:
                    run.errors, run.errors_by_kind = 7, {"timeout": 7}
                if index == 1 and server == "go-echo":
                    run.mismatches = 3 if repeat == 0 else 0
                if index == 1 and server == "ref-uvloop" and repeat == 1:
                    run.failure = "server exited with status 1"
                runs.append(run)
    return ScenarioResult(
        scenario,
        servers=list(SERVERS),
        reference="ref-uvloop",
        runs=runs,
        rows=summarize(runs, "requests_per_s", "ref-uvloop"),
    )


def _report(machine: dict[str, Any] | None = None) -> BenchReport:
    return BenchReport(
        "echoplex bench --scenario demo",
        "now",
        dict(PINNED if machine is None else machine),
        BenchSettings(("demo",), repeat=2),
        [_scenario_result()],
    )


@pytest.fixture(scope="module")
def charts() -> Iterator[dict[str, Figure]]:
    """The demo scenario's figures by file name, on a pinned machine, drawn once for
    the tests that only read them; closed after."""
    drawn = figures(_scenario_result(), PINNED)
    yield drawn
    _close(drawn)


def _close(drawn: dict[str, Figure]) -> None:
    import matplotlib.pyplot as plt

    for fig in drawn.values():
        plt.close(fig)


def _panel_texts(fig: Figure) -> list[Any]:
    """Every text drawn inside the panels (bar labels, latency labels)."""
    return [text for ax in fig.axes for text in ax.texts]


def _legend_texts(fig: Figure) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def test_charts_are_files_of_150_dpi_and_wide_enough_to_read(tmp_path: Path) -> None:
    written = write_charts(_report(), tmp_path)
    assert [path.name for path in written["demo"]] == [
        "demo-throughput.png",
        "demo-cpu.png",
        "demo-latency.png",
    ]
    for path in written["demo"]:
        with Image.open(path) as image:
            assert image.format == "PNG"
            dpi_x, dpi_y = image.info["dpi"]
            assert round(dpi_x) >= 150 and round(dpi_y) >= 150, path
            # Two panels of six inches at 150 dpi.
            assert image.width >= 1800 and image.height >= 500, (path, image.size)


def test_throughput_axes_start_at_zero_and_every_bar_is_labelled_and_whole(
    charts: dict[str, Figure],
) -> None:
    for name in ("demo-throughput.png", "demo-cpu.png"):
        fig = charts[name]
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            assert low == 0 and ax.get_xscale() == "linear"
            (bars,) = ax.containers
            assert len(bars) == len(SERVERS)
            labels = [text.get_text() for text in ax.texts]
            for bar, label in zip(bars, labels, strict=True):
                # Not clipped by the axis, and its value written beside it.
                assert bar.get_width() <= high
                if label.startswith("not ranked"):
                    assert bar.get_width() == 0
                    continue
                value = float(label.split("  ")[0].replace(",", ""))
                assert value == pytest.approx(bar.get_width(), rel=0.01)
            # The labels fit inside the panel.
            box = ax.get_window_extent()
            for text in ax.texts:
                assert text.get_window_extent().x1 <= box.x1 + 1


def test_the_key_is_outside_the_panels_and_tells_the_kinds_of_server_apart(
    charts: dict[str, Figure],
) -> None:
    for fig in charts.values():
        fig.canvas.draw()
        assert fig.legends
        for legend in fig.legends:
            key = legend.get_window_extent()
            for ax in fig.axes:
                assert not key.overlaps(ax.get_window_extent()), _legend_texts(fig)
    bar_key = _legend_texts(charts["demo-throughput.png"])
    for label in ("echoplex model (solid)", "reference server (hatched)", "custom server (dotted)"):
        assert label in bar_key
    line_key = _legend_texts(charts["demo-latency.png"])
    for label in ("p50", "p99", "echoplex model (solid)", "reference server (dashed)"):
        assert label in line_key
    (bars,) = charts["demo-throughput.png"].axes[0].containers
    hatches = dict(zip(SERVERS, (bar.get_hatch() or "" for bar in bars), strict=True))
    assert hatches["asyncio"] == hatches["workers-2"] == ""
    assert hatches["ref-uvloop"] == "//" and hatches["go-echo"] == ".."


def _red(texts: Iterable[Any]) -> list[str]:
    red = matplotlib.colors.to_hex("tab:red")
    return sorted(t.get_text() for t in texts if matplotlib.colors.to_hex(t.get_color()) == red)


def test_errors_are_written_in_red_on_the_throughput_cpu_and_latency_charts(
    charts: dict[str, Figure],
) -> None:
    for fig in charts.values():
        first, second = fig.axes
        # go-echo echoed wrong bytes at the second point only: not ranked at either.
        assert _red(first.texts) == ["not ranked: wrong echoes at another load point"]
        assert sorted(text.split("  ")[-1] for text in _red(second.texts)) == [
            "(1 failed run)",
            "(7 timeout errors)",
            "not ranked: 3 wrong echoes",
        ]
        assert any(text.startswith("red: errors") for text in _legend_texts(fig))


def test_a_server_that_echoed_wrong_bytes_gets_no_bar_and_no_dots_anywhere(
    charts: dict[str, Figure],
) -> None:
    go_echo = SERVERS.index("go-echo")
    for name in ("demo-throughput.png", "demo-cpu.png"):
        for ax in charts[name].axes:
            widths = [bar.get_width() for bar in ax.containers[0]]
            assert widths[go_echo] == 0 and all(widths[:go_echo])
    for ax in charts["demo-latency.png"].axes:
        # A line from p50 to p99 and three dots per server that is drawn.
        assert len(ax.lines) == 4 * (len(SERVERS) - 1)


def test_a_server_on_the_load_generators_cpu_is_marked_and_noted(
    charts: dict[str, Figure],
) -> None:
    for fig in charts.values():
        names = [label.get_text() for label in fig.axes[0].get_yticklabels()]
        assert names == ["asyncio", "workers-2 †", "ref-uvloop", "go-echo"]
        assert (
            "† workers-2 ran on CPUs 0, 1: it shared CPU 1 with the load generator"
            in _legend_texts(fig)
        )


@pytest.mark.parametrize(
    ("machine", "note"),
    [
        ({"cpus": 2, "pinning": None}, "not pinned: every server shared the CPUs"),
        ({"cpus": 2}, None),  # results that do not say how they were pinned
    ],
)
def test_unpinned_runs_are_noted_once_and_unknown_pinning_not_at_all(
    machine: dict[str, Any], note: str | None
) -> None:
    drawn = figures(_scenario_result(), machine)
    try:
        fig = drawn["demo-throughput.png"]
        notes = [text for text in _legend_texts(fig) if "CPU" in text]
        assert notes == ([f"{note} with the load generator"] if note else [])
        assert not any("†" in label.get_text() for label in fig.axes[0].get_yticklabels())
    finally:
        _close(drawn)


def test_panels_whose_values_are_far_apart_get_their_own_axis_from_zero() -> None:
    result = _scenario_result(sizes=(64, 65536), connections=(10, 10))
    result.scenario = Scenario("sizes", "", result.scenario.points, metric="mb_per_s")
    drawn = figures(result, PINNED)
    try:
        small, large = drawn["sizes-throughput.png"].axes
        assert small.get_xlim()[0] == large.get_xlim()[0] == 0
        # 64 B messages carry 1/1024 of the MB/s: on a shared axis their bars would vanish.
        assert large.get_xlim()[1] > 100 * small.get_xlim()[1]
        for ax in (small, large):
            (bars,) = ax.containers
            assert max(bar.get_width() for bar in bars) > 0.2 * ax.get_xlim()[1]
        assert OWN_SCALES_NOTE in _legend_texts(drawn["sizes-throughput.png"])
        # CPU per request is alike at both points: one shared axis.
        cpu_small, cpu_large = drawn["sizes-cpu.png"].axes
        assert cpu_small.get_xlim() == cpu_large.get_xlim()
        assert OWN_SCALES_NOTE not in _legend_texts(drawn["sizes-cpu.png"])
    finally:
        _close(drawn)


def test_latency_is_a_log_axis_with_p50_and_p99_written_out(charts: dict[str, Figure]) -> None:
    first, second = charts["demo-latency.png"].axes
    assert first.get_xscale() == "log"
    labels = [text.get_text() for text in first.texts]
    assert labels == [
        *(["100 µs", "900 µs"] * 3),
        "not ranked: wrong echoes at another load point",
    ]
    assert [text.get_text().split("  ")[0] for text in second.texts] == [
        *(["200 µs", "1.8 ms"] * 3),
        "not ranked: 3 wrong echoes",
    ]


def test_results_without_a_kind_get_one_from_the_server_name(tmp_path: Path) -> None:
    data = to_json(_report())
    for row in data["scenarios"][0]["rows"]:
        del row["kind"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    (result,), machine = load_results(path)
    drawn = figures(result, machine)
    try:
        key = _legend_texts(drawn["demo-throughput.png"])
        assert key[:3] == [
            "echoplex model (solid)",
            "reference server (hatched)",
            "custom server (dotted)",
        ]
    finally:
        _close(drawn)


def _redraw(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echoplex.bench.charts", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_charts_are_redrawn_from_results_json_without_rerunning(tmp_path: Path) -> None:
    report = _report()
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(to_json(report)))
    result = _redraw("out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = ["demo-throughput.png", "demo-cpu.png", "demo-latency.png"]
    assert result.stdout.split() == [f"out/{name}" for name in names]
    # The same charts as drawn from the report itself.
    direct = write_charts(report, tmp_path)["demo"]
    for name, path in zip(names, direct, strict=True):
        with Image.open(out / name) as redrawn, Image.open(path) as drawn:
            assert redrawn.size == drawn.size
            assert redrawn.tobytes() == drawn.tobytes(), name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("not json", "Expecting value"),
        ('{"scenarios": [{"name": "x"}]}', "is not a bench results.json"),
    ],
)
def test_redrawing_what_is_not_bench_results_is_one_line_and_status_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    result = _redraw(str(tmp_path / "results.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("python -m echoplex.bench.charts: error: ")
    assert message in line


def test_the_committed_results_still_load() -> None:
    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    for path in sorted(root.rglob("results.json")):
        results, machine = load_results(path)
        assert results and "pinning" in machine, path


def _served_one_of_many() -> ScenarioResult:
    """The demo at 1 and 1000 connections, where workers-2 served one of the 1000 (the
    others timed out): the latency of that one is the best of all."""
    result = _scenario_result(connections=(1, 1000))
    for run in result.runs:
        run.connections_alive = float(run.connections)
        if run.connections == 1000 and run.server == "workers-2":
            run.connections_alive = 1.0
            run.p50_us, run.p90_us, run.p99_us = 10.0, 20.0, 30.0
            run.errors, run.errors_by_kind = 999, {"timeout": 999}
    result.rows = summarize(result.runs, "requests_per_s", "ref-uvloop")
    return result


def test_a_server_that_served_fewer_connections_than_offered_never_looks_fastest(
    tmp_path: Path,
) -> None:
    result = _served_one_of_many()
    report = BenchReport("echoplex bench", "now", dict(PINNED), BenchSettings(("demo",)), [result])
    # Drawn as a file too, to be looked at.
    write_charts(report, tmp_path)
    drawn = figures(result, PINNED)
    try:
        marked = "served 1 of 1,000"
        first, second = drawn["demo-latency.png"].axes
        # Its dots and line are left out at 1000, not at 1, where it served its one.
        assert len(first.lines) == 4 * (len(SERVERS) - 1)
        assert len(second.lines) == 4 * (len(SERVERS) - 2)
        assert "latency left out: served 1 of 1,000" in _red(second.texts)
        assert not any("served" in text for text in _red(first.texts))
        drawn_at = [line.get_xdata()[0] for line in second.lines]
        assert 10.0 not in drawn_at and min(drawn_at) == 200.0
        # On the throughput and CPU charts its bar stays, marked in red.
        for name in ("demo-throughput.png", "demo-cpu.png"):
            labels = [text.get_text() for text in drawn[name].axes[1].texts]
            assert labels[SERVERS.index("workers-2")].endswith(f"  ({marked})")
            assert f"({marked})" in " ".join(_red(drawn[name].axes[1].texts))
            # And it fits in its panel.
            drawn[name].canvas.draw()
            ax = drawn[name].axes[1]
            assert all(
                text.get_window_extent().x1 <= ax.get_window_extent().x1 + 1 for text in ax.texts
            )
    finally:
        _close(drawn)
