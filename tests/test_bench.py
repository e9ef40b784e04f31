"""`echoplex bench`: /proc measurement, medians and ratios, the report files, and the
whole bench end to end on its tiny `smoke` scenario."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from echoplex._cli_util import config_from_args
from echoplex.bench import loadgen, runner
from echoplex.bench.proctree import (
    parse_stat,
    raise_nofile_limit,
    tree_cpu_s,
    tree_peak_rss_bytes,
    tree_pids,
    tree_rss_bytes,
)
from echoplex.bench.report import markdown, write_results
from echoplex.bench.results import (
    RunResult,
    choose_reference,
    median,
    paired_ratio,
    summarize,
)
from echoplex.bench.runner import (
    BenchReport,
    BenchSettings,
    Pinning,
    ScenarioResult,
    run_scenario,
    servers_for,
)
from echoplex.bench.scenarios import SCENARIOS
from echoplex.bench.servers import SERVERS, RunningServer
from echoplex.commands import load as load_command
from echoplex.commands import serve as serve_command
from echoplex.config import ServerConfig
from echoplex.load.config import LoadConfig

from .procs import echoplex
from .waiting import wait_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUSY = "import time\nwhile True: time.perf_counter()"


def _parent_and_child(pids: list[int]) -> list[int] | None:
    """`pids` once there are two of them (a parent and its child), else None."""
    return pids if len(pids) == 2 else None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- /proc measurement ---------------------------------------------------------------


def test_parse_stat_counts_fields_after_a_command_name_with_spaces_and_parens() -> None:
    text = "1234 (a (weird) name) S 99 1234 1234 0 -1 4194560 1 0 0 0 70 30 5 6 20 0 1 0"
    stat = parse_stat(1234, text)
    assert (stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (99, 70, 30, 5, 6)
    assert stat.cpu_ticks == 111


def test_a_busy_child_accumulates_cpu_and_has_memory() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        cpu = wait_for(lambda: tree_cpu_s(proc.pid), 20, "CPU time of the busy child")
        assert cpu > 0
        rss = tree_rss_bytes(proc.pid)
        peak = tree_peak_rss_bytes(proc.pid)
        assert rss is not None and rss > 0
        assert peak is not None and peak >= rss
    finally:
        _stop(proc)
    assert tree_cpu_s(proc.pid) is None  # gone: no figure, no crash


def test_the_tree_includes_grandchildren_and_their_cpu() -> None:
    # A parent that only waits, and a busy child: the tree's CPU is the child's.
    parent_code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BUSY!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        pids = wait_for(lambda: _parent_and_child(tree_pids(proc.pid)), 20, "the busy grandchild")
        assert pids[0] == proc.pid
        child = pids[1]
        cpu = wait_for(
            lambda: (c := tree_cpu_s(child)) and c > 0.05 and c, 20, "the grandchild's CPU time"
        )
        assert (tree_cpu_s(proc.pid) or 0) >= cpu
        assert (tree_peak_rss_bytes(proc.pid) or 0) > (tree_peak_rss_bytes(child) or 0)
    finally:
        for pid in tree_pids(proc.pid)[1:]:
            os.kill(pid, 9)
        _stop(proc)


def test_raising_the_descriptor_limit_never_lowers_it() -> None:
    import resource

    before, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = raise_nofile_limit()
    assert soft >= before
    assert soft == hard or hard == resource.RLIM_INFINITY


# --- medians and ratios --------------------------------------------------------------


def _run(
    server: str, repeat: int, rps: float | None, point: str = "p", **figures: float
) -> RunResult:
    return RunResult(
        scenario="s",
        point=point,
        server=server,
        kind="baseline" if server.startswith("ref-") else "model",
        repeat=repeat,
        pattern="pingpong",
        connections=int(point[1:]) if point[1:].isdigit() else 1,
        size_bytes=64,
        requests_per_s=rps,
        **figures,  # type: ignore[arg-type]
    )


def test_median_ignores_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None]) is None
    assert median([]) is None


def test_paired_ratio_pairs_runs_of_the_same_repeat() -> None:
    runs = [_run("a", 0, 200.0), _run("a", 1, 50.0), _run("a", 2, 300.0)]
    reference = [_run("ref", 0, 100.0), _run("ref", 1, 100.0), _run("ref", 2, 100.0)]
    assert paired_ratio(runs, reference, "requests_per_s") == 2.0
    # A repeat where either side has no figure (or the reference is 0) is left out.
    reference[0].requests_per_s = None
    reference[2].requests_per_s = 0.0
    assert paired_ratio(runs, reference, "requests_per_s") == 0.5
    assert paired_ratio(runs, [], "requests_per_s") is None


def test_summarize_gives_one_row_per_point_and_server_with_medians_and_errors() -> None:
    runs = []
    for repeat in range(3):
        for point in ("c1", "c10"):
            runs.append(
                _run(
                    "ref-uvloop", repeat, 1e3, point, p99_us=100.0 + repeat, cpu_us_per_request=10.0
                )
            )
            slow = _run("simple", repeat, 10.0 * (repeat + 1), point, cpu_us_per_request=40.0)
            slow.errors = 2
            runs.append(slow)
    runs[-1].failure = "load did not finish within 30s"
    rows = summarize(runs, "requests_per_s", "ref-uvloop")
    assert [(row.point, row.server) for row in rows] == [
        ("c1", "ref-uvloop"),
        ("c1", "simple"),
        ("c10", "ref-uvloop"),
        ("c10", "simple"),
    ]
    ref, simple = rows[2], rows[3]
    assert ref.runs == simple.runs == 3
    assert ref.figure("p99_us") == 101.0
    assert ref.vs_baseline == 1.0
    assert simple.figure("requests_per_s") == 20.0
    assert simple.vs_baseline == pytest.approx(0.02)
    assert simple.cpu_vs_baseline == 4.0
    assert simple.errors_total == 3 * 2 + 1
    assert simple.failures == ["load did not finish within 30s"]
    assert summarize(runs, "requests_per_s", None)[0].vs_baseline is None


def test_a_server_that_echoed_a_wrong_byte_anywhere_is_never_ranked() -> None:
    runs = []
    for point in ("c1", "c10"):
        runs += [_run("ref-uvloop", 0, 100.0, point), _run("fast", 0, 500.0, point)]
        runs.append(_run("honest", 0, 50.0, point))
    # The liar was right at c1 and wrong at c10: it is ranked at neither.
    runs[4].mismatches = 1
    runs[4].mismatch_samples = ["connection 3 offset 7: expected byte 0x01, received 0x02"]
    rows = {(row.point, row.server): row for row in summarize(runs, "requests_per_s", "ref-uvloop")}
    for point in ("c1", "c10"):
        fast = rows[(point, "fast")]
        assert not fast.verified and fast.vs_baseline is None and fast.cpu_vs_baseline is None
        assert rows[(point, "honest")].verified and rows[(point, "honest")].vs_baseline == 0.5
    assert rows[("c10", "fast")].mismatch_samples == runs[4].mismatch_samples
    # Echoing bytes that were never sent is lying too; and a lying reference ranks no one.
    runs[4].mismatches, runs[4].errors_by_kind = 0, {"extra bytes": 1}
    rows = {(row.point, row.server): row for row in summarize(runs, "requests_per_s", "fast")}
    assert not rows[("c1", "fast")].verified
    assert all(row.vs_baseline is None for row in rows.values())


def test_the_reference_defaults_to_uvloop_then_the_asyncio_model() -> None:
    assert choose_reference(["simple", "asyncio", "ref-uvloop"], None) == "ref-uvloop"
    assert choose_reference(["simple", "asyncio"], None) == "asyncio"
    assert choose_reference(["simple", "threads"], None) == "simple"
    assert choose_reference(["simple", "asyncio"], "simple") == "simple"


# --- the load generator's interface --------------------------------------------------


def test_load_command_and_its_json_report() -> None:
    spec = loadgen.LoadSpec("stream", 10, 65536, 2.0, 0.5)
    pinned = loadgen.load_argv("127.0.0.1", 4242, spec, cpu=1)
    assert pinned[:3] == ["taskset", "-c", "1"]
    command = len(loadgen.LOAD_COMMAND)
    assert pinned[3 : 3 + command] == loadgen.LOAD_COMMAND
    # `echoplex load` parses the flags back into the run the bench meant.
    parser = argparse.ArgumentParser()
    load_command.add_arguments(parser)
    args = parser.parse_args(pinned[3 + command :])
    assert args.json
    assert load_command.config_from(args) == loadgen.load_config("127.0.0.1", 4242, spec)
    assert load_command.config_from(args) == LoadConfig(
        host="127.0.0.1",
        port=4242,
        pattern="stream",
        connections=10,
        size_bytes=65536,
        duration_s=2.0,
        warmup_s=0.5,
    )
    assert loadgen.parse_report('{"requests": 5}') == {"requests": 5}
    assert loadgen.parse_report('progress\n{"requests": 5}\n') == {"requests": 5}
    with pytest.raises(ValueError):
        loadgen.parse_report("Traceback ...\n")


def test_a_load_run_that_hangs_is_stopped_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        loadgen, "LOAD_COMMAND", [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    monkeypatch.setattr(loadgen, "GRACE_S", 0.2)
    run = loadgen.LoadRun("127.0.0.1", 9, loadgen.LoadSpec("pingpong", 1, 64, 0.1, 0.0))
    report, failure = run.finish()
    assert report is None
    assert failure is not None and "did not finish" in failure
    assert run.proc.returncode is not None


@pytest.mark.parametrize("name", [n for n, spec in SERVERS.items() if spec.kind == "model"])
def test_a_model_is_served_with_the_flags_of_its_server_config(name: str) -> None:
    spec = SERVERS[name]
    assert spec.argv[:4] == (sys.executable, "-m", "echoplex", "serve")
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    args = parser.parse_args(spec.argv[4:])
    config = config_from_args(ServerConfig, args)
    assert args.log_level == "info"  # the line per connection the bench counts
    assert (config.hosts, config.port, config.drain_timeout_s) == (("127.0.0.1",), 0, 1.0)
    assert config.mode == name.split("-")[0]
    assert spec.description.startswith(f"echoplex serve --mode {config.mode}")
    assert config.workers == (spec.cpus if name.startswith("workers-") else 0)
    assert config.zero_copy == (name != "threads-copy")


# --- servers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["workers", "ref-socketserver", "ref-asyncio"])
def test_every_kind_of_server_starts_echoes_and_stops(name: str) -> None:
    import socket

    with RunningServer(SERVERS[name]) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(b"ping")
            assert sock.recv(16) == b"ping"
        assert server.alive()
        if name == "workers":
            assert len(tree_pids(server.pid)) >= 2  # the supervisor and its workers
            opened = wait_for(server.connections_opened, 10, "the open line in the log")
            assert sum(opened.values()) == 1
            assert all(process.startswith("worker-") for process in opened)
        else:
            assert server.connections_opened() is None  # reference servers do not log them
    assert server.proc.returncode is not None
    assert tree_cpu_s(server.pid) is None


def test_the_pool_runs_with_its_default_threads_and_serves_more_connections_than_that() -> None:
    import socket

    spec = SERVERS["pool"]
    assert "--threads" not in spec.argv  # the default 32, whatever the load
    # 40 clients that keep their connections open are all echoed at once.
    with RunningServer(spec) as server:
        clients = [
            socket.create_connection((server.host, server.port), timeout=10) for _ in range(40)
        ]
        try:
            for index, client in enumerate(clients):
                client.sendall(b"client %d" % index)
            for index, client in enumerate(clients):
                assert client.recv(64) == b"client %d" % index
        finally:
            for client in clients:
                client.close()


def test_the_hold_scenario_is_skipped_with_a_reason_when_descriptors_are_short() -> None:
    result = run_scenario(SCENARIOS["hold"], BenchSettings(scenarios=("hold",)), None, 1024)
    assert result.skipped is not None and "open files" in result.skipped
    assert result.runs == []


def test_a_contended_run_is_measured_again_up_to_the_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Other work's share of the pinned CPUs, run after run: two contended, then calm.
    foreign = iter([50.0, 30.0, 5.0, 90.0, 80.0, 70.0, 60.0])
    measured: list[tuple[str, int]] = []

    def measure(scenario: Any, point: Any, spec: Any, repeat: int, *args: Any, **kw: Any) -> Any:
        measured.append((spec.name, repeat))
        return RunResult(
            *(scenario.name, point.label, spec.name, spec.kind, repeat),
            *(point.pattern, point.connections, point.size_bytes),
            foreign_cpu_pct=next(foreign),
        )

    monkeypatch.setattr(runner, "measure", measure)
    settings = BenchSettings(scenarios=("smoke",), servers=("threads",), repeat=2)
    result = run_scenario(SCENARIOS["smoke"], settings, None, 4096)
    # The first repeat takes three runs (the last one calm), the second stops at the
    # attempts' limit, contended, and says so in its figure.
    assert measured == [("threads", 0)] * 3 + [("threads", 1)] * runner.MEASURE_ATTEMPTS
    assert [run.foreign_cpu_pct for run in result.runs] == [5.0, 70.0]
    assert [run.generator for run in result.runs] == ["echoplex load"] * 2
    # What was thrown away is kept for the report to say.
    assert [run.contended_attempts for run in result.runs] == [[50.0, 30.0], [90.0, 80.0]]
    report = BenchReport(
        "echoplex bench", "now", {"cpus": 2, "pinning": {"cpus": [0, 1], "load_cpu": 1}}, settings
    )
    report.scenarios.append(result)
    text = markdown(report)
    assert "Runs measured again: 2 of 2 (a run is measured again, up to 3 times in all, " in text
    assert "more than 10% of its pinned CPUs" in text
    assert "- threads, pingpong c=1 s=64B, repeat 1: other load 50%, 30%, then 5%\n" in text
    assert "- threads, pingpong c=1 s=64B, repeat 2: other load 90%, 80%, then 70%, kept " in text


def test_the_report_says_when_no_run_was_measured_again() -> None:
    runs = [_run("asyncio", 0, 1000.0, "c1", foreign_cpu_pct=3.0)]
    result = ScenarioResult(
        SCENARIOS["concurrency"],
        ["asyncio"],
        "asyncio",
        runs=runs,
        rows=summarize(runs, "requests_per_s", "asyncio"),
    )
    pinned = {"cpus": 2, "pinning": {"cpus": [0, 1], "load_cpu": 1}}
    settings = BenchSettings(("concurrency",))
    text = markdown(BenchReport("echoplex bench", "now", pinned, settings, [result]))
    assert "Runs measured again: none of 1 (a run is measured again" in text
    unpinned = markdown(BenchReport("echoplex bench", "now", {"pinning": None}, settings, [result]))
    assert "Runs measured again: none (not pinned" in unpinned


def test_a_server_that_served_fewer_connections_has_no_latency_in_the_table() -> None:
    runs = [
        _run(server, 0, 1000.0, "c1000", p50_us=p50, p99_us=p50 * 2, connections_alive=alive)
        for server, p50, alive in (("simple", 40.0, 1.0), ("asyncio", 9000.0, 1000.0))
    ]
    result = ScenarioResult(
        SCENARIOS["concurrency"],
        ["simple", "asyncio"],
        "asyncio",
        runs=runs,
        rows=summarize(runs, "requests_per_s", "asyncio"),
    )
    text = markdown(
        BenchReport("echoplex bench", "now", {}, BenchSettings(("concurrency",)), [result])
    )
    assert "| c1000 | simple | 1,000 | - | left out | left out |" in text
    assert "| c1000 | asyncio | 1,000 | - | 9,000 | 18,000 |" in text
    assert "Latency `left out`: the server served fewer connections than it was offered" in text
    assert "- simple, c1000: served 1 of 1,000 connections" in text


# --- report files --------------------------------------------------------------------


def test_report_files_from_known_results(tmp_path: Path) -> None:
    runs = []
    for repeat in range(2):
        for point in ("c1", "c10"):
            for server in ("asyncio", "workers"):
                run = _run(server, repeat, 1000.0 * (repeat + 1), point, p50_us=50.0, p99_us=90.0)
                run.mb_per_s, run.p90_us, run.peak_rss_bytes = 0.1, 70.0, 20e6
                run.cpu_us_per_request = 10.0
                run.connections_opened = (
                    {"worker-0": 3, "worker-1": 7} if server == "workers" else {"main": 10}
                )
                runs.append(run)
    result = ScenarioResult(
        SCENARIOS["concurrency"],
        servers=["asyncio", "workers"],
        reference="asyncio",
        runs=runs,
        rows=summarize(runs, "requests_per_s", "asyncio"),
    )
    report = BenchReport(
        "echoplex bench", "now", {"cpus": 2}, BenchSettings(("concurrency",), repeat=2), [result]
    )
    paths = write_results(report, tmp_path)
    assert {path.name for path in paths} == {
        "results.json",
        "results.md",
        "concurrency-throughput.png",
        "concurrency-cpu.png",
        "concurrency-latency.png",
    }
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["scenarios"][0]["rows"]
    assert len(rows) == 4 and rows[1]["vs_baseline"] == 1.0
    text = (tmp_path / "results.md").read_text()
    assert "| c10 | workers | 1,500 |" in text
    assert "worker-0 3, worker-1 7" in text
    assert "![concurrency](concurrency-latency.png)" in text
    assert markdown(report).count("| c1 |") == 2


# --- the command ---------------------------------------------------------------------


def test_bench_rejects_unknown_servers_in_one_line() -> None:
    result = echoplex("bench", "--models", "simple,nginx")
    assert result.returncode == 2
    assert "unknown server 'nginx'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_rejects_a_reference_that_does_not_run() -> None:
    result = echoplex("bench", "--scenario", "smoke", "--reference", "ref-uvloop")
    assert result.returncode == 2
    assert "--reference ref-uvloop is not among the servers" in result.stderr


def _bench(out: Path, *args: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """Run `echoplex bench ARGS --quiet --out OUT` (one scenario) to success; return
    its stdout, the machine it describes, and its scenario's rows by server."""
    result = echoplex("bench", *args, "--quiet", "--out", str(out), timeout_s=45)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    (scenario,) = data["scenarios"]
    rows = {row["server"]: row for row in scenario["rows"]}
    assert {row["reference"] for row in rows.values()} == {scenario["reference"]}
    return result.stdout, data["machine"], rows


def test_bench_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout, _, rows = _bench(out, "--scenario", "smoke", "--models", "simple,workers,ref-asyncio")
    assert set(rows) == {"simple", "workers", "ref-asyncio"}
    assert rows["simple"]["reference"] == "simple"
    for row in rows.values():
        assert row["errors_total"] == 0, row
        for figure in ("requests_per_s", "p50_us", "p99_us", "peak_rss_bytes"):
            assert isinstance(row[figure], int | float) and row[figure] > 0, (figure, row)
        # The bench leaves a run's CPU out when a busy machine made it late for the
        # load's half-second: present or not, never a wrong figure.
        assert row["cpu_us_per_request"] is None or row["cpu_us_per_request"] > 0, row
        # What other work took of the pinned CPUs: measured where the bench pinned.
        assert row["foreign_cpu_pct"] is None or row["foreign_cpu_pct"] >= 0, row
    assert rows["simple"]["vs_baseline"] == 1.0
    assert sum(rows["workers"]["connections_opened"][0].values()) == 1
    text = (out / "results.md").read_text()
    assert "| load | server | req/s |" in text
    assert "| other load % |" in text
    assert text in stdout + "\n" or "| pingpong c=1 s=64B | simple |" in stdout
    for chart in ("smoke-throughput.png", "smoke-cpu.png", "smoke-latency.png"):
        assert (out / chart).read_bytes().startswith(PNG_MAGIC)


# --- the workers model with 1 and 2 processes (multicore) ----------------------------


def test_a_server_gets_a_cpu_per_process_and_the_load_generator_the_last() -> None:
    workers_1, workers_2 = SERVERS["workers-1"], SERVERS["workers-2"]
    four = Pinning((0, 1, 2, 3))
    assert four.load_cpu == 3
    assert four.server_cpus(workers_1) == four.server_cpus(SERVERS["asyncio"]) == (0,)
    assert four.server_cpus(workers_2) == (0, 1)
    # Two CPUs: workers-2 shares the load generator's; fewer CPUs than processes: all.
    assert Pinning((0, 1)).server_cpus(workers_2) == (0, 1)
    assert Pinning((2, 5)).server_cpus(replace(workers_2, cpus=4)) == (2, 5)


def test_multicore_runs_workers_1_and_2_against_workers_1() -> None:
    scenario = SCENARIOS["multicore"]
    servers = servers_for(scenario, BenchSettings(("multicore",), baselines=True))
    assert servers[:3] == ["workers-1", "workers-2", "asyncio"]
    assert choose_reference(servers, None, scenario.reference) == "workers-1"
    assert choose_reference(servers, "asyncio", scenario.reference) == "asyncio"
    assert SERVERS["workers-2"].cpus == 2


def test_the_report_says_where_a_server_shares_or_lacks_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(SERVERS, "workers-4", replace(SERVERS["workers-2"], cpus=4))
    runs = []
    for server, cpus in (("workers-1", [0]), ("workers-2", [0, 1]), ("workers-4", [0, 1])):
        run = _run(server, 0, 1000.0, "c50")
        run.server_cpus = cpus
        runs.append(run)
    result = ScenarioResult(
        SCENARIOS["multicore"],
        servers=[run.server for run in runs],
        reference="workers-1",
        runs=runs,
        rows=summarize(runs, "requests_per_s", "workers-1"),
    )
    pinning = {"cpus": [0, 1], "load_cpu": 1}
    report = BenchReport(
        "echoplex bench", "now", {"pinning": pinning}, BenchSettings(("multicore",)), [result]
    )
    text = markdown(report)
    assert "server on CPU 0 (unless said under its table), load generator on CPU 1" in text
    assert "- workers-1:" not in text
    assert "- workers-2: server on CPUs 0-1, load generator on CPU 1: they share CPU 1" in text
    assert "- workers-4: server on CPUs 0-1 (all of them, for its 4 processes)," in text
    assert [row.server_cpus for row in result.rows] == [[0], [0, 1], [0, 1]]


def test_bench_multicore_spreads_workers_2_over_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, machine, rows = _bench(
        out,
        *("--scenario", "multicore", "--models", "workers-1,workers-2"),
        *("--duration", "0.5", "--warmup", "0.2"),
    )
    assert set(rows) == {"workers-1", "workers-2"}
    connections = SCENARIOS["multicore"].points[0].connections
    for name, processes in (("workers-1", 1), ("workers-2", 2)):
        row = rows[name]
        assert row["reference"] == "workers-1"
        assert row["errors_total"] == 0, row
        (opened,) = row["connections_opened"]
        assert len(opened) == processes, opened
        assert all(process.startswith("worker-") for process in opened)
        assert sum(opened.values()) == connections
    assert rows["workers-1"]["vs_baseline"] == 1.0
    assert isinstance(rows["workers-2"]["vs_baseline"], float)  # the 2-over-1 ratio
    text = (out / "results.md").read_text()
    assert "- workers-2, pingpong c=50 s=1KiB: worker-0 " in text
    if pinning := machine["pinning"]:
        assert rows["workers-1"]["server_cpus"] == pinning["cpus"][:1]
        assert rows["workers-2"]["server_cpus"] == pinning["cpus"][:2]
        assert "- workers-2: server on CPU" in text
    else:
        assert rows["workers-2"]["server_cpus"] is None


def test_busy_ticks_count_the_cpus_asked_for_only() -> None:
    from echoplex.bench.proctree import busy_ticks_of

    cpus = sorted(os.sched_getaffinity(0))
    everything = busy_ticks_of(cpus)
    assert everything is not None and everything > 0  # this machine has run something
    assert busy_ticks_of([]) == 0
    assert busy_ticks_of([10_000]) == 0  # no such CPU: nothing counted
    first = busy_ticks_of(cpus[:1])
    assert first is not None and first <= everything
