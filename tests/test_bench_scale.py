"""The bench's `scale` scenario: its points (up to the descriptor limit), the trickle
each connection sends, servers that cannot hold N, the figures it adds (threads held,
memory per connection), its line charts on log axes, and a run end to end at small N."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from matplotlib.figure import Figure
from PIL import Image

from echoplex.bench import loadgen
from echoplex.bench.charts import chart_names, figures
from echoplex.bench.proctree import CLOCK_TICKS_PER_S, tree_thread_cpu_ns, tree_threads
from echoplex.bench.report import table
from echoplex.bench.results import (
    MIN_CPU_TICKS,
    RunResult,
    cpu_measurable,
    per_connection_bytes,
    summarize,
)
from echoplex.bench.runner import (
    NOFILE_MARGIN,
    CpuWindow,
    ScenarioResult,
    descriptor_capacity,
)
from echoplex.bench.scenarios import SCALE_METRIC, SCENARIOS
from echoplex.bench.servers import SERVERS
from echoplex.load.config import MAX_CONNECTIONS

from .procs import echoplex
from .waiting import wait_for

matplotlib.use("Agg")

SCALE = SCENARIOS["scale"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("scale-memory.png", "scale-cpu.png", "scale-latency.png", "scale-threads.png")


def _counts(points: Any) -> list[int]:
    return [point.connections for point in points]


def test_scale_holds_100_1000_10000_and_as_many_as_the_descriptors_allow() -> None:
    # This machine: a hard limit of 20,000 descriptors a process.
    capacity = descriptor_capacity(20_000)
    assert capacity == 20_000 - NOFILE_MARGIN
    assert _counts(SCALE.points_for(None, capacity)) == [100, 1000, 10_000, capacity]
    # A smaller limit: the points past it give way to one at the limit.
    assert _counts(SCALE.points_for(None, 5000)) == [100, 1000, 5000]
    # `echoplex load` takes at most MAX_CONNECTIONS, whatever the limit.
    assert descriptor_capacity(10**7) == MAX_CONNECTIONS
    # --connection-counts replaces them all, in every scenario; the others keep their own.
    assert _counts(SCALE.points_for((10, 50), capacity)) == [10, 50]
    assert SCENARIOS["hold"].points_for(None, capacity) == SCENARIOS["hold"].points


def test_each_connection_sends_one_message_per_interval() -> None:
    point = SCALE.points_for((10,), 100)[0]
    assert (point.pattern, point.interval_s, point.rate_per_s) == ("rate", 2.0, 5.0)
    assert point.label == "rate c=10 s=64B every 2s"
    spec = loadgen.LoadSpec(point.pattern, 10, point.size_bytes, 3.0, 2.0, point.rate_per_s)
    argv = loadgen.load_argv("127.0.0.1", 9, spec)
    # `echoplex load` sends message k on connection k mod c: 5/s over 10 connections is
    # one per connection every 2 s.
    assert argv[argv.index("--pattern") + 1] == "rate"
    assert float(argv[argv.index("--rate") + 1]) == 5.0
    # A pattern without a rate is given none (its flag would be refused).
    assert "--rate" not in loadgen.load_argv("127.0.0.1", 9, loadgen.LoadSpec("hold", 1, 64, 1, 0))


def test_a_server_that_cannot_hold_n_says_why() -> None:
    assert SERVERS["simple"].cannot_hold(100) == (
        "cannot hold 100: serves one connection at a time"
    )
    assert SERVERS["simple"].cannot_hold(1) is None
    assert SERVERS["threads"].cannot_hold(10_000) is None
    assert SERVERS["threads"].cannot_hold(20_001) == (
        "cannot hold 20,001: --max-connections is 20,000"
    )
    # A reference server states no limit: it is run, and its figures tell.
    assert SERVERS["ref-uvloop"].cannot_hold(10**6) is None


def test_memory_per_connection_only_where_nearly_all_were_held() -> None:
    assert per_connection_bytes(3e6, 1e6, 1000, 1000) == 2000
    assert per_connection_bytes(3e6, 1e6, 900, 1000) == pytest.approx(2e6 / 900)
    assert per_connection_bytes(3e6, 1e6, 899, 1000) is None
    assert per_connection_bytes(None, 1e6, 1000, 1000) is None


def test_cpu_per_message_needs_enough_units_of_its_clock() -> None:
    enough = MIN_CPU_TICKS / CLOCK_TICKS_PER_S
    runs = [
        _run("asyncio", 100, server_cpu_s=enough),
        _run("pool", 100, server_cpu_s=enough / 2),
        # Counted per thread in ns: a few ms is plenty.
        _run("threads", 100, server_cpu_s=enough / 2, cpu_resolution_s=1e-9),
        _run("ref-uvloop", 100),
    ]
    rows = summarize(runs, SCALE_METRIC, None)
    assert [cpu_measurable(row) for row in rows] == [True, False, True, False]


def _window(before: dict[int, int], after: dict[int, int]) -> CpuWindow:
    return CpuWindow(1.0, 1.5, 2.0, None, None, None, before, after)


def test_cpu_is_counted_per_thread_in_ns_unless_a_thread_ended() -> None:
    # A thread born in the window counts all it ran.
    assert _window({1: 10**9}, {1: 3 * 10**9, 2: 5 * 10**8}).exact_server_cpu_s() == 2.5
    # One that ended took its count along; one that starts from less is a reused id.
    assert _window({1: 10**9, 2: 1}, {1: 3 * 10**9}).exact_server_cpu_s() is None
    assert _window({1: 10**9}, {1: 10}).exact_server_cpu_s() is None
    # No schedstat: the clock ticks then.
    assert _window({}, {}).exact_server_cpu_s() is None


def test_a_busy_thread_runs_up_its_nanoseconds() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = wait_for(lambda: tree_thread_cpu_ns(proc.pid), 10, "a schedstat")
        assert list(first) == [proc.pid]
        wait_for(
            lambda: tree_thread_cpu_ns(proc.pid)[proc.pid] > first[proc.pid] + 10**7,
            10,
            "10 ms more of CPU",
        )
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_threads_are_counted_over_the_tree() -> None:
    code = (
        "import threading, sys\n"
        "for _ in range(3): threading.Thread(target=sys.stdin.read, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        # The main thread and the three it started.
        wait_for(lambda: tree_threads(proc.pid) == 4, 10, "4 threads in /proc")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]


# --- rows, table and charts from a small result ---------------------------------------

SERVERS_DRAWN = ("simple", "threads", "asyncio", "ref-uvloop")


def _run(server: str, connections: int, **figures: Any) -> RunResult:
    point = SCALE.points_for((connections,), connections)[0]
    return RunResult(
        *("scale", point.label, server, SERVERS[server].kind, 0),
        *(point.pattern, connections, point.size_bytes),
        **figures,
    )


def _result() -> ScenarioResult:
    """simple cannot hold either point; threads hold a thread per connection and lose
    half their connections at 1,000; asyncio and the reference hold everything."""
    runs = []
    for n in (100, 1000):
        runs.append(_run("simple", n, cannot_hold=SERVERS["simple"].cannot_hold(n)))
        for number, server in enumerate(SERVERS_DRAWN[1:]):
            alive = n // 2 if server == "threads" and n == 1000 else n
            runs.append(
                _run(
                    server,
                    n,
                    connections_alive=alive,
                    requests=n * 2.5,
                    requests_per_s=n / 2,
                    idle_rss_bytes=20e6,
                    peak_rss_bytes=20e6 + n * 1024 * (number + 1),
                    server_cpu_s=1.0,
                    cpu_us_per_request=40.0 + number,
                    p50_us=200.0,
                    p99_us=900.0,
                    p999_us=2000.0,
                    max_us=5000.0 * (number + 1),
                    server_threads=n + 2 if server == "threads" else 1,
                )
            )
    return ScenarioResult(
        SCALE,
        servers=list(SERVERS_DRAWN),
        reference="ref-uvloop",
        runs=runs,
        rows=summarize(runs, SCALE_METRIC, "ref-uvloop"),
    )


@pytest.fixture(scope="module")
def charts() -> Iterator[dict[str, Figure]]:
    import matplotlib.pyplot as plt

    drawn = figures(_result(), {"pinning": None})
    yield drawn
    for fig in drawn.values():
        plt.close(fig)


def test_the_table_says_why_a_server_was_not_run_and_its_figures_per_connection() -> None:
    lines = table(_result()).splitlines()
    assert lines[0].startswith(
        "| load | server | alive | KiB/conn | CPU µs/msg | p50 µs | p99 µs | p99.9 µs | "
        "max µs | threads |"
    )
    simple = next(line for line in lines if "| simple |" in line)
    assert "| cannot hold 100: serves one connection at a time | - |" in simple
    asyncio = next(line for line in lines if "c=1000 " in line and "| asyncio |" in line)
    # 2 KiB per connection over the idle server, the reference 3 KiB: 0.67x.
    assert "| 1,000 | 2.0 | 41.0 | 200 | 900 | 2,000 | 10,000 | 1 |" in asyncio
    assert asyncio.endswith("| 0.67x | 0.98x |")
    # threads kept 500 of 1,000: no memory per connection, latency left out.
    threads = next(line for line in lines if "c=1000 " in line and "| threads |" in line)
    assert "| 500 | - | 40.0 | left out |" in threads


def test_the_charts_are_the_scale_ones_on_log_axes(charts: dict[str, Figure]) -> None:
    assert list(charts) == chart_names("scale", SCALE_METRIC) == list(CHARTS)
    for name, fig in charts.items():
        for ax in fig.axes:
            assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log"), name
            assert ax.get_xlabel() == "connections held (log scale)"
            assert ax.get_ylabel()
            assert [tick.get_text() for tick in ax.get_xticklabels()] == ["100", "1,000"]
    assert [ax.get_title() for ax in charts["scale-latency.png"].axes] == [
        "p50",
        "p99",
        "p99.9",
        "max: the longest any message waited for its echo",
    ]


def _lines(fig: Figure) -> dict[str, Any]:
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles, strict=True))


def test_one_line_per_server_the_reference_marked(charts: dict[str, Figure]) -> None:
    lines = _lines(charts["scale-threads.png"])
    assert list(lines) == [
        "simple (not run: see below)",
        "threads",
        "asyncio",
        "ref-uvloop (reference)",
    ]
    assert list(lines["threads"].get_xdata()) == [100, 1000]
    assert list(lines["threads"].get_ydata()) == [102, 1002]
    assert list(lines["simple (not run: see below)"].get_xdata()) == []
    reference = lines["ref-uvloop (reference)"]
    assert (reference.get_color(), reference.get_linestyle()) == ("black", "--")
    # threads held too few at 1,000 for a memory figure there; its latency is left out.
    memory = _lines(charts["scale-memory.png"])
    assert list(memory["threads"].get_xdata()) == [100]
    latency = _lines(charts["scale-latency.png"])
    assert list(latency["threads"].get_xdata()) == [100]


def test_the_notes_say_who_was_not_run_and_why(charts: dict[str, Figure]) -> None:
    legends = charts["scale-memory.png"].legends[1:]
    notes = [text.get_text() for legend in legends for text in legend.get_texts()]
    assert "simple: not run at 100, 1,000 connections: serves one connection at a time" in notes
    assert "threads at 1,000: served 500 of 1,000" in notes


# --- end to end ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_scale_scenario_runs_end_to_end_at_small_n(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = echoplex(
        *("bench", "--scenario", "scale", "--connection-counts", "10,50"),
        *("--models", "simple,threads,ref-uvloop", "--duration", "1s", "--warmup", "500ms"),
        *("--quiet", "--out", str(out)),
        timeout_s=110,
    )
    assert result.returncode == 0, result.stderr
    (scenario,) = json.loads((out / "results.json").read_text())["scenarios"]
    assert scenario["reference"] == "ref-uvloop"
    rows = {(row["connections"], row["server"]): row for row in scenario["rows"]}
    assert set(rows) == {(n, s) for n in (10, 50) for s in ("simple", "threads", "ref-uvloop")}
    for n in (10, 50):
        simple = rows[n, "simple"]
        assert simple["cannot_hold"] == f"cannot hold {n}: serves one connection at a time"
        assert simple["requests"] is None and simple["errors_total"] == 0
        for server in ("threads", "ref-uvloop"):
            row = rows[n, server]
            assert row["errors_total"] == 0 and row["connections_alive"] == n, row
            assert row["requests"] > 0, row
            latency = [row[name] for name in ("p50_us", "p99_us", "p999_us", "max_us")]
            assert latency[0] > 0 and latency == sorted(latency), row
            assert row["rss_per_connection_bytes"] is not None, row
        # A thread per connection, beside the main one; an event loop has a few.
        assert rows[n, "threads"]["server_threads"] > n
        assert 1 <= rows[n, "ref-uvloop"]["server_threads"] < 10
    text = (out / "results.md").read_text()
    assert "| rate c=10 s=64B every 2s | simple | cannot hold 10:" in text
    for name in CHARTS:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        with Image.open(out / name) as image:
            assert [round(dpi) for dpi in image.info["dpi"]] == [150, 150]
        assert f"![scale]({name})" in text
