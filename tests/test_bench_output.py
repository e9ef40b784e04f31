"""Where the bench writes: by default into `bench/out/`, which git ignores, so following
the docs never changes a tracked file; the committed bench/results are rewritten by one
documented command only (`python -m echoplex.bench.regenerate`), which reruns the
command each results.json records; and a run into a directory leaves none of an
earlier run's charts beside a report that does not link them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from echoplex.bench.regenerate import recorded_runs
from echoplex.bench.report import write_results
from echoplex.bench.results import RunResult, summarize
from echoplex.bench.runner import BenchReport, BenchSettings, ScenarioResult
from echoplex.bench.scenarios import SCENARIOS
from echoplex.cli import build_parser
from echoplex.commands.bench import BenchOptions

from .procs import ROOT, echoplex, require_tool

DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
REGENERATE = "python -m echoplex.bench.regenerate bench/results"
# A command that writes into the committed results: the bench's `--out` there, or the
# charts redrawn beside them.
WRITES_COMMITTED = re.compile(r"(--out[ =]|echoplex\.bench\.charts .*)\.?/?bench/results\b")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool("git")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an sdist has no .git nor .gitignore)")
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_the_default_output_directory_is_ignored_by_git_and_holds_nothing_tracked() -> None:
    out = BenchOptions().out
    # Relative: from the checkout's top, where the docs run the bench, it is this one.
    assert not out.is_absolute()
    ignored = _git("check-ignore", "--verbose", (out / "results.json").as_posix())
    assert ignored.returncode == 0, f"{out} is not ignored: {ignored.stdout}{ignored.stderr}"
    tracked = _git("ls-files", "--", out.as_posix())
    assert tracked.returncode == 0 and tracked.stdout == ""


def _doc_lines() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}:{number}", line)
        for path in DOCS
        for number, line in enumerate(path.read_text().splitlines(), 1)
    ]


def test_no_documented_command_writes_into_the_committed_results_but_the_one_that_says_so() -> None:
    writers = [(where, line) for where, line in _doc_lines() if WRITES_COMMITTED.search(line)]
    assert writers == []
    regenerating = [(where, line) for where, line in _doc_lines() if REGENERATE in line]
    assert len(regenerating) == 1, regenerating
    # It says, right above it, that it rewrites tracked files.
    where, _ = regenerating[0]
    name, number = where.rsplit(":", 1)
    above = (ROOT / name).read_text().splitlines()[int(number) - 4 : int(number) - 1]
    assert re.search(r"rewrites .*tracked", " ".join(above), re.I), above


def test_the_committed_results_record_commands_the_bench_still_takes() -> None:
    top = ROOT / "bench" / "results"
    runs = recorded_runs(top)
    assert [directory for directory, _ in runs] == [
        path.parent for path in sorted(top.rglob("results.json"))
    ]
    for directory, flags in runs:
        # Remade where they are, wherever the first run wrote them.
        assert flags[-2:] == ["--out", str(directory)] and flags.count("--out") == 1
        args = build_parser("bench").parse_args(["bench", *flags])
        assert args.out == directory


def test_regenerate_dry_run_prints_each_command_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "results" / "targets"
    target.mkdir(parents=True)
    command = "echoplex bench --scenario smoke --models simple --out somewhere/else"
    (target / "results.json").write_text(json.dumps({"command": command}))
    result = subprocess.run(
        [sys.executable, "-m", "echoplex.bench.regenerate", "--dry-run", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"echoplex bench --scenario smoke --models simple --out {target}\n")
    assert sorted(path.name for path in target.iterdir()) == ["results.json"]


def _report(scenario: str, server: str = "asyncio") -> BenchReport:
    runs = [RunResult(scenario, "c1", server, "model", 0, "pingpong", 1, 64, requests_per_s=1e3)]
    result = ScenarioResult(
        SCENARIOS[scenario],
        servers=[server],
        reference=server,
        runs=runs,
        rows=summarize(runs, "requests_per_s", server),
    )
    return BenchReport("echoplex bench", "now", {"cpus": 2}, BenchSettings((scenario,)), [result])


def test_a_run_removes_the_charts_an_earlier_run_wrote_that_its_report_does_not_link(
    tmp_path: Path,
) -> None:
    write_results(_report("concurrency"), tmp_path)
    earlier = {path.name for path in tmp_path.glob("concurrency-*.png")}
    assert earlier == {
        "concurrency-throughput.png",
        "concurrency-cpu.png",
        "concurrency-latency.png",
    }
    # Files the bench did not write are never its to remove.
    (tmp_path / "notes.png").write_bytes(b"mine")
    (tmp_path / "concurrency-by-hand.png").write_bytes(b"mine")
    written = write_results(_report("smoke"), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "concurrency-by-hand.png",
        "notes.png",
        "results.json",
        "results.md",
        "smoke-cpu.png",
        "smoke-latency.png",
        "smoke-throughput.png",
    ]
    assert {path.name for path in written} == {
        "results.json",
        "results.md",
        "smoke-cpu.png",
        "smoke-latency.png",
        "smoke-throughput.png",
    }
    assert "concurrency-" not in (tmp_path / "results.md").read_text()


def test_a_directory_whose_results_json_is_not_the_benchs_loses_no_file(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"scenarios": [{"name": "../up"}]}')
    (tmp_path / "concurrency-cpu.png").write_bytes(b"mine")
    write_results(_report("smoke"), tmp_path)
    assert (tmp_path / "concurrency-cpu.png").read_bytes() == b"mine"


def test_a_run_without_out_writes_into_bench_out_of_the_current_directory(
    tmp_path: Path,
) -> None:
    result = echoplex(
        "bench", "--scenario", "smoke", "--models", "simple", "--quiet", cwd=tmp_path, timeout_s=45
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench"]
    out = tmp_path / "bench" / "out"
    assert {path.name for path in out.iterdir()} == {
        "results.json",
        "results.md",
        "smoke-cpu.png",
        "smoke-latency.png",
        "smoke-throughput.png",
    }
    assert "--out" not in json.loads((out / "results.json").read_text())["command"]
