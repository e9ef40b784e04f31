"""`echoplex bench --cross-check`: the independent C client, built with the system's cc,
checks every echoed byte, and the bench compares the two load generators' ratios."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from echoplex.bench import crosscheck, runner
from echoplex.bench.report import markdown
from echoplex.bench.results import RunResult, compare_generators, summarize
from echoplex.bench.runner import BenchReport, BenchSettings, ScenarioResult
from echoplex.bench.scenarios import SCENARIOS
from echoplex.bench.servers import RunningServer, custom_server
from echoplex.commands import bench

from .procs import ROOT, require_tool
from .test_bench_servers import ECHO_SERVER


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("cc")
    return crosscheck.build(tmp_path_factory.mktemp("cache"))


def _echo_server(tmp_path: Path, *args: str) -> RunningServer:
    script = tmp_path / "echo_server.py"
    script.write_text(ECHO_SERVER)
    command = shlex.join([sys.executable, str(script), "{port}", *args]).replace(
        "'{port}'", "{port}"
    )
    return RunningServer(custom_server(f"server={command}"))


def _drive(client: Path, port: int, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [client, "127.0.0.1", str(port), *args], capture_output=True, text=True, timeout=30
    )
    return result.returncode, json.loads(result.stdout)


def test_the_client_counts_verified_round_trips(client: Path, tmp_path: Path) -> None:
    with _echo_server(tmp_path) as server:
        status, report = _drive(client, server.port, "4", "1000", "0.3", "0.1")
    assert status == 0, report
    assert report["errors"] == report["mismatches"] == 0
    assert isinstance(report["requests"], int) and report["requests"] > 0
    assert report["bytes"] == report["requests"] * 1000
    assert report["connections_alive"] == 4


@pytest.mark.parametrize(
    ("lie", "size", "caught"),
    [
        ("corrupt", "64", "mismatch"),  # byte 100 flipped: in the middle of a message
        ("drop", "64", "mismatch"),  # byte 100 left out: the next one takes its place
        ("drop", "101", "timeout"),  # the last byte of the first message never comes
    ],
)
def test_the_client_catches_a_lying_server(
    client: Path, tmp_path: Path, lie: str, size: str, caught: str
) -> None:
    with _echo_server(tmp_path, lie) as server:
        status, report = _drive(client, server.port, "2", size, "0.3", "0.1")
    assert status == 1
    if caught == "mismatch":
        assert report["mismatches"] == 2
        assert {sample["offset"] for sample in report["mismatch_samples"]} == {100}
    else:
        assert report["errors_by_kind"] == {"timeout": 2}
    assert report["connections_alive"] == 0


def test_the_client_refuses_bad_arguments(client: Path) -> None:
    for args in (
        [],
        ["127.0.0.1", "1", "0", "64", "1", "0"],
        ["localhost", "1", "1", "64", "1", "0"],
    ):
        result = subprocess.run([client, *args], capture_output=True, text=True, timeout=10)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_build_is_cached_by_the_source_it_was_built_from(
    client: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = client.parent
    assert crosscheck.build(cache) == client  # built once: the cache is used
    changed = tmp_path / "crosscheck.c"
    changed.write_text(crosscheck.SOURCE.read_text() + "/* changed */\n")
    monkeypatch.setattr(crosscheck, "SOURCE", changed)
    rebuilt = crosscheck.build(cache)
    assert rebuilt != client and os.access(rebuilt, os.X_OK)


def test_without_a_compiler_the_bench_says_so_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "echoplex", "bench", "--scenario", "smoke", "--cross-check"],
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},  # no cc, nor anything else
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("echoplex bench: error: --cross-check needs a C compiler")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_bench_builds_the_client_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command builds it before anything starts, and hands it to every scenario.
    client = tmp_path / "echoplex-crosscheck"
    builds: list[Path] = []
    given: list[Path | None] = []

    def build() -> Path:
        builds.append(client)
        return client

    def run_scenario(scenario: Any, *args: Any) -> ScenarioResult:
        given.append(args[-1])
        return ScenarioResult(scenario, skipped="not run by this test")

    monkeypatch.setattr(bench, "build_cross_check", build)
    monkeypatch.setattr(crosscheck, "build", build)
    monkeypatch.setattr(runner, "run_scenario", run_scenario)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--scenario", "smoke", "--scenario", "sizes", "--cross-check"])
    assert bench.run(args) == 0
    assert (builds, given) == ([client], [client, client])
    assert "not run by this test" in capsys.readouterr().out


def test_bench_cross_check_end_to_end(client: Path, tmp_path: Path) -> None:
    require_tool("cc")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "echoplex", "bench", "--scenario", "smoke"),
            *("--models", "ref-socketserver,ref-asyncio", "--cross-check"),
            *("--duration", "0.3", "--warmup", "0.1", "--quiet", "--out", str(out)),
        ],
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    (scenario,) = json.loads((out / "results.json").read_text())["scenarios"]
    check = scenario["cross_check"]
    assert check["generator"] == "C client" and check["tolerance"] == 0.15
    assert [row["server"] for row in check["comparison"]] == ["ref-socketserver", "ref-asyncio"]
    for run in check["runs"]:
        assert run["generator"] == "C client"
        assert run["errors"] == run["mismatches"] == 0 and run["requests"] > 0, run
    assert all(run["generator"] == "echoplex load" for run in scenario["runs"])
    reference = check["comparison"][0]
    assert reference["vs_ref_echoplex"] == reference["vs_ref_crosscheck"] == 1.0
    assert reference["within_tolerance"] is True
    text = (out / "results.md").read_text()
    assert "### Cross-check: the C client" in text
    assert "| pingpong c=1 s=64B | ref-asyncio |" in text.split("### Cross-check")[1]


def _runs(
    server: str, rps: tuple[float, float], cpu_us: tuple[float, float]
) -> tuple[RunResult, RunResult]:
    """One run of `server` under echoplex load and one under the C client: requests/s
    and server CPU µs per request under each."""
    common = dict(scenario="s", point="p", server=server, kind="baseline", repeat=0)
    shape = dict(pattern="pingpong", connections=1, size_bytes=64)
    return (
        RunResult(**common, **shape, requests_per_s=rps[0], cpu_us_per_request=cpu_us[0]),  # type: ignore[arg-type]
        RunResult(
            **common,  # type: ignore[arg-type]
            **shape,  # type: ignore[arg-type]
            generator="C client",
            requests_per_s=rps[1],
            cpu_us_per_request=cpu_us[1],
        ),
    )


def test_the_report_names_servers_the_two_generators_rank_apart() -> None:
    pairs = [
        _runs("ref", (100.0, 200.0), (10.0, 10.0)),
        _runs("close", (50.0, 110.0), (15.0, 16.0)),
        _runs("apart", (50.0, 150.0), (10.0, 13.0)),
        _runs("cpu-apart", (50.0, 100.0), (10.0, 20.0)),
    ]
    runs, cross_runs = [p[0] for p in pairs], [p[1] for p in pairs]
    rows, cross_rows = (
        summarize(runs, "requests_per_s", "ref"),
        summarize(cross_runs, "requests_per_s", "ref"),
    )
    compared = compare_generators(runs, cross_runs, rows, cross_rows, "requests_per_s")
    by_server = {row.server: row for row in compared}
    assert by_server["ref"].generators == 2.0 and by_server["ref"].agreement == 1.0
    assert by_server["close"].agreement == pytest.approx(1.1)
    assert by_server["close"].cpu_agreement == pytest.approx(16 / 15)
    assert by_server["close"].within_tolerance is True
    assert by_server["apart"].agreement == pytest.approx(1.5)
    assert by_server["apart"].within_tolerance is False
    assert by_server["cpu-apart"].agreement == 1.0 and by_server["cpu-apart"].cpu_agreement == 2.0
    assert by_server["cpu-apart"].within_tolerance is False
    result = ScenarioResult(
        SCENARIOS["smoke"],
        servers=["ref", "close", "apart", "cpu-apart"],
        reference="ref",
        runs=runs,
        rows=rows,
        cross_runs=cross_runs,
        cross_rows=cross_rows,
        cross_check=compared,
    )
    text = markdown(BenchReport("echoplex bench", "now", {}, BenchSettings(("smoke",)), [result]))
    assert (
        "| p | apart | 50 | 150 | 3.00x | 0.50x | 0.75x | 1.50x | 1.00x | 1.30x | 1.30x |" in text
    )
    assert (
        "**The generators disagree by more than 15%** on apart at p (req/s 0.50x under "
        "echoplex load, 0.75x under the C client; CPU/req 1.00x under echoplex load, 1.30x "
        "under the C client); cpu-apart at p (CPU/req 1.00x under echoplex load, 2.00x "
        "under the C client)." in text
    )
