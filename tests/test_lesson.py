"""`echoplex lesson`, run as a learner runs it, in a pipe and with small sizes: the
relations each step is about (from its own run's figures), its pictures read back as
files and as figures, a step that cannot run, `head`, and Ctrl-C leaving no server."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from PIL import Image

from echoplex.lesson.pictures import figure_of
from echoplex.lesson.results import StepResult

from .procs import ROOT
from .waiting import wait_for

matplotlib.use("Agg")
pytestmark = pytest.mark.timeout(120)

HOLD_S = 0.5
LESSON = [sys.executable, "-m", "echoplex", "lesson", "--no-pause"]


def _marked_env() -> tuple[dict[str, str], str]:
    """The environment with a mark of this test's own: the lesson's servers inherit it,
    so they can be found in /proc however they were started."""
    mark = uuid.uuid4().hex
    return {**os.environ, "PYTHONPATH": str(ROOT), "ECHOPLEX_LESSON_TEST": mark}, mark


def _processes_marked(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours
        if f"ECHOPLEX_LESSON_TEST={mark}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _lesson_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the lesson with --json in a pipe; its document, as stdout carried it."""
    env, mark = _marked_env()
    done = subprocess.run(
        [*LESSON, "--json", "--out", str(tmp_path), *args],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert _processes_marked(mark) == []
    document: dict[str, Any] = json.loads(done.stdout)
    assert json.loads((tmp_path / "lesson.json").read_text()) == document
    return document


def _runs(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (step,) = document["steps"]
    runs = {run["model"]: run for run in step["runs"]}
    for run in runs.values():
        assert run["error"] is None, run
    return runs


def _client(run: dict[str, Any], name_start: str) -> dict[str, Any]:
    return next(c for c in run["clients"] if c["name"].startswith(name_start))


@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("step1")
    return _lesson_json(out, "--step", "1", "--hold", f"{HOLD_S}s"), out


def test_step1_simple_makes_hello_wait_for_nc_and_threads_does_not(
    step1: tuple[dict[str, Any], Path],
) -> None:
    runs = _runs(step1[0])
    for model, waits in (("simple", True), ("threads", False)):
        nc, hello = _client(runs[model], "nc"), _client(runs[model], "ClientPython")
        assert nc["done_s"] - nc["first_echo_s"] >= HOLD_S  # nc held its connection
        # simple answers Hello, world only once nc has gone; threads while nc holds on.
        assert (hello["first_echo_s"] >= nc["done_s"]) is waits, (model, nc, hello)
        if waits:  # and it waited from nc's echo on, the holder's whole time
            assert hello["first_echo_s"] - nc["first_echo_s"] >= HOLD_S
    findings = step1[0]["steps"][0]["findings"]
    assert [f["agrees"] for f in findings] == [True, True]


def test_step2_asyncio_serves_work_that_waits_in_well_under_simples_time(
    tmp_path: Path,
) -> None:
    document = _lesson_json(
        tmp_path, "--step", "2", "--clients", "4", "--messages", "2", "--work", "io:100ms"
    )
    runs = _runs(document)
    assert list(runs) == ["simple", "pool", "threads", "asyncio", "workers"]
    for run in runs.values():
        assert len(run["clients"]) == 4
        for client in run["clients"]:
            for moment in ("connected_s", "accepted_s", "first_echo_s", "done_s"):
                assert client[moment] is not None, (run["model"], client)
    # simple serves 4 x 2 waits of 100 ms one after another; asyncio all clients at once.
    assert runs["asyncio"]["whole_s"] < runs["simple"]["whole_s"] / 2


def test_step3_workers_beat_threads_at_work_that_computes(tmp_path: Path) -> None:
    # 20 clients: the kernel spreads them over the workers by a hash of their ports,
    # and with fewer, one worker's share is too often most of them (with 10, 9 or more
    # land on one of two workers in 2% of runs).
    document = _lesson_json(
        tmp_path, "--step", "3", "--clients", "20", "--messages", "2", "--work", "cpu:20ms"
    )
    runs = _runs(document)
    for model in ("simple", "pool", "threads", "asyncio"):  # the GIL: one core at most
        assert runs[model]["cores_used"] is not None
        assert runs[model]["server_cpu_s"] >= 40 * 0.02 * 0.9
    if len(os.sched_getaffinity(0)) < 2:
        return  # one CPU: nothing for workers to win, and the lesson says so
    assert runs["workers"]["whole_s"] < runs["threads"]["whole_s"], runs["workers"]


def test_step_pictures_are_150_dpi_one_panel_per_model_none_empty(
    step1: tuple[dict[str, Any], Path],
) -> None:
    document, out = step1
    (entry,) = document["steps"]
    assert entry["pictures"] == [str(out / "step1-waiting.png")]
    with Image.open(entry["pictures"][0]) as image:
        assert image.format == "PNG"
        assert [round(d) for d in image.info["dpi"]] == [150, 150]
        assert image.width >= 1600 and image.height >= 500, image.size
    fig = figure_of(StepResult.from_json(entry))
    fig.canvas.draw()
    assert [ax.get_title(loc="left").split(":")[0] for ax in fig.axes] == ["simple", "threads"]
    limits = {ax.get_xlim() for ax in fig.axes}
    assert len(limits) == 1 and next(iter(limits))[0] == 0  # one time axis, from zero
    for ax in fig.axes:
        assert len(ax.collections) >= 2  # a bar for each client
        assert ax.get_yticklabels()[0].get_text() == "nc"
    assert fig.axes[-1].get_xlabel()
    (legend,) = fig.legends
    for ax in fig.axes:
        assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    matplotlib.pyplot.close(fig)


def test_step4_counts_threads_per_idle_connection_and_draws_its_bars(tmp_path: Path) -> None:
    document = _lesson_json(tmp_path, "--step", "4", "--idle", "50")
    runs = _runs(document)
    assert runs["threads"]["threads_per_connection"] >= 0.9
    assert runs["asyncio"]["threads_per_connection"] < 0.1
    (entry,) = document["steps"]
    with Image.open(tmp_path / "step4-idle.png") as image:
        assert [round(d) for d in image.info["dpi"]] == [150, 150]
    fig = figure_of(StepResult.from_json(entry))
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0 and ax.get_ylabel()
        (bars,) = ax.containers
        assert len(bars) == 3
    matplotlib.pyplot.close(fig)


def test_a_step_that_cannot_run_is_one_line_and_the_lesson_ends_well(tmp_path: Path) -> None:
    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    env, mark = _marked_env()
    done = subprocess.run(
        [*LESSON, "--step", "4", "--idle", "1000", "--out", str(tmp_path)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=few_descriptors,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    lines = [line for line in done.stdout.decode().splitlines() if "cannot run" in line]
    assert len(lines) == 1 and "too few descriptors" in lines[0], done.stdout.decode()
    (step,) = json.loads((tmp_path / "lesson.json").read_text())["steps"]
    assert step["skipped"] and step["runs"] == []
    assert _processes_marked(mark) == []


def test_read_through_head_it_stops_quietly_and_leaves_no_server(tmp_path: Path) -> None:
    env, mark = _marked_env()
    lesson = subprocess.Popen(
        [*LESSON, "--step", "1", "--hold", "1s", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    assert lesson.stdout is not None and lesson.stderr is not None
    head = subprocess.run(["head", "-n", "2"], stdin=lesson.stdout, capture_output=True)
    lesson.stdout.close()
    errors = lesson.stderr.read()
    lesson.stderr.close()
    assert lesson.wait(60) == 0, errors.decode()
    assert errors == b""
    assert len(head.stdout.splitlines()) == 2
    assert _processes_marked(mark) == []


def test_ctrl_c_ends_the_lesson_at_once_with_no_server_or_client_left(tmp_path: Path) -> None:
    env, mark = _marked_env()
    lesson = subprocess.Popen(
        [*LESSON, "--step", "2", "--clients", "3", "--messages", "50", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        # Its first server is up and its clients are being served.
        wait_for(lambda: len(_processes_marked(mark)) >= 2, 30, "the lesson's first server")
        lesson.send_signal(signal.SIGINT)
        status = lesson.wait(15)
    finally:
        lesson.kill()
        lesson.wait()
    assert lesson.stderr is not None
    errors = lesson.stderr.read().decode()
    lesson.stderr.close()
    assert status == 130 and errors == "echoplex lesson: stopped\n", errors
    assert _processes_marked(mark) == []
