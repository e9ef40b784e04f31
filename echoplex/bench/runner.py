"""The bench's loop: for every load point, for every repeat, every server in turn.

Servers alternate within a repeat (A, B, C, A, B, C, ...) so that slow changes on a
shared machine hit them alike, and every run starts a fresh server on a free port.
With 2+ CPUs and `taskset`, the load generator is pinned to the last CPU and a server
to the first one, so they do not compete for a core; a server of N processes
(`workers-2`) gets the first N CPUs, which may include the load generator's: the
report says so under its table.

Before its load, every server is readied the same way (`servers.warm_up`). Server CPU
is read from `/proc` (whole process tree) over a window inside the load's measured
phase, which starts once the server's side has all the load's connections and the
load's warmup has passed, and is divided by that window's length, giving a CPU rate;
dividing the rate by the load's requests/s gives CPU per request. Only rates are
compared, so the window need not line up exactly with the load generator's own
measurement.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..load.config import MAX_CONNECTIONS
from ..models import MODELS
from ..payload import Mismatch
from . import crosscheck
from .loadgen import LoadRun, LoadSpec
from .proctree import (
    CLOCK_TICKS_PER_S,
    busy_ticks_of,
    established_connections,
    raise_nofile_limit,
    tree_affinity,
    tree_cpu_s,
    tree_peak_rss_bytes,
    tree_pids,
    tree_rss_bytes,
    tree_thread_cpu_ns,
    tree_threads,
)
from .results import (
    CrossCheckRow,
    Row,
    RunResult,
    choose_reference,
    compare_generators,
    summarize,
    wrong_echoes,
)
from .scenarios import ALL, SCENARIOS, LoadPoint, Scenario
from .servers import SERVERS, RunningServer, ServerSpec, ServerStartError, WarmUpError, warm_up

log = logging.getLogger("echoplex.bench")

# A run whose pinned CPUs were this busy with other work is measured again (up to
# MEASURE_ATTEMPTS times in all); the figure is reported either way ("other load %").
CONTENDED_PCT = 10.0
MEASURE_ATTEMPTS = 3

DEFAULT_DURATION_S = 2.0
DEFAULT_WARMUP_S = 0.5
# The load generator's warmup starts once its connections are open: the bench waits
# until the server's side has them all (or this long, plus a little per connection,
# for a server that cannot take them all), polling every so often.
CONNECT_WAIT_S = 10.0
CONNECT_WAIT_PER_CONNECTION_S = 0.003
CONNECT_POLL_S = 0.01
# The CPU window covers this share of the measured duration, so it ends before the
# load does even when the bench itself runs late: on this 2-CPU machine shared with
# other work (load average 10), 0.9 left 14 of 36 runs of 3 s without a CPU figure.
CPU_WINDOW_SHARE = 0.75
# Descriptors the bench, a server or the load generator need beyond one per connection.
NOFILE_MARGIN = 200
# What the bench needs beyond the standard library, by module, with the package that
# provides it; `echoplex[bench]` installs them all. `echoplex load` records every
# latency in an HDR histogram; the charts are drawn with matplotlib.
LOAD_MODULES = {"hdrh": "hdrhistogram"}
CHART_MODULES = {"matplotlib": "matplotlib"}
INSTALL_HINT = "pip install 'echoplex[bench]'"


@dataclass(frozen=True)
class Pinning:
    """The CPUs the bench may use: the load generator on the last, a server on the first
    as many as it has serving processes (all of them if there are fewer)."""

    cpus: tuple[int, ...]

    @property
    def load_cpu(self) -> int:
        return self.cpus[-1]

    def server_cpus(self, spec: ServerSpec) -> tuple[int, ...]:
        return self.cpus[: spec.cpus]


@dataclass(frozen=True)
class BenchSettings:
    scenarios: tuple[str, ...]
    servers: tuple[str, ...] | None = None
    """Servers to run (models and/or `ref-*`); None: each scenario's own choice."""
    baselines: bool = False
    custom_servers: tuple[ServerSpec, ...] = ()
    """`--server` commands, run in every scenario beside the others."""
    duration_s: float | None = None
    warmup_s: float | None = None
    repeat: int = 1
    pin: bool = True
    reference: str | None = None
    warmup_connections: int = 1
    """Connections that each echo 64 bytes and close, one after another, between a
    server's listening and its load (see `servers.warm_up`)."""
    cross_check: bool = False
    """Also drive every server with the C client (crosscheck.py), at ping-pong points."""
    connections: tuple[int, ...] | None = None
    """Connection counts to run each scenario's load points at; None: the scenario's own."""

    def specs(self) -> dict[str, ServerSpec]:
        """Every server this run may start, by name: the built-in ones and `--server`s."""
        return {**SERVERS, **{spec.name: spec for spec in self.custom_servers}}


@dataclass
class ScenarioResult:
    scenario: Scenario
    servers: list[str] = field(default_factory=list)
    reference: str | None = None
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    runs: list[RunResult] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    cross_runs: list[RunResult] = field(default_factory=list)
    """The same servers under the cross-check's C client, when asked for."""
    cross_rows: list[Row] = field(default_factory=list)
    cross_check: list[CrossCheckRow] = field(default_factory=list)
    skipped: str | None = None
    """Why the scenario did not run, if it did not."""


@dataclass
class BenchReport:
    command: str
    started_at: str
    machine: dict[str, Any]
    settings: BenchSettings
    scenarios: list[ScenarioResult] = field(default_factory=list)
    finished_at: str | None = None


def missing_packages() -> list[str]:
    """The packages a run needs, to load the servers and draw its charts (every run
    writes them), that are not installed."""
    needed = {**LOAD_MODULES, **CHART_MODULES}
    return [
        package for module, package in needed.items() if importlib.util.find_spec(module) is None
    ]


def plan_pinning(wanted: bool) -> Pinning | None:
    """Separate CPUs for the server and the load, if there are two and taskset."""
    if not wanted or shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2:
        return None
    return Pinning(cpus)


def servers_for(scenario: Scenario, settings: BenchSettings) -> list[str]:
    names = list(settings.servers or scenario.models or MODELS)
    names += [spec.name for spec in settings.custom_servers if spec.name not in names]
    if settings.baselines:
        names += [
            name for name, spec in SERVERS.items() if spec.kind == "baseline" and name not in names
        ]
    return names


def machine_info(pinning: Pinning | None, nofile: tuple[int, int]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        # Each run's server CPUs are in its `server_cpus`.
        "pinning": {"cpus": list(pinning.cpus), "load_cpu": pinning.load_cpu} if pinning else None,
        "echoplex_revision": _revision(),
        "load_average_start": _load_average(),
        "nofile_soft": nofile[0],
        "nofile_hard": nofile[1],
    }
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except ImportError:
        info["uvloop"] = None
    return info


def _revision() -> str | None:
    """The git commit of the echoplex source being measured (`+dirty` if the tracked
    files differ from it), when it runs from a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the (shared) machine was."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_bench(
    settings: BenchSettings, command: str, cross_check_binary: Path | None = None
) -> BenchReport:
    """Every scenario of `settings`; with `cross_check`, under the C client too (the one
    `cross_check_binary` names, or one built now)."""
    nofile = raise_nofile_limit()
    pinning = plan_pinning(settings.pin)
    if settings.pin and pinning is None:
        log.warning("not pinning: needs taskset and 2+ CPUs; server and load share the CPUs")
    report = BenchReport(
        command=command,
        started_at=_now(),
        machine=machine_info(pinning, nofile),
        settings=settings,
    )
    if settings.cross_check and cross_check_binary is None:
        cross_check_binary = crosscheck.build()
    binary = cross_check_binary if settings.cross_check else None
    for name in settings.scenarios:
        report.scenarios.append(run_scenario(SCENARIOS[name], settings, pinning, nofile[0], binary))
    report.finished_at = _now()
    report.machine["load_average_end"] = _load_average()
    return report


@dataclass(frozen=True)
class Generator:
    """A load generator of the bench, and the runs of a scenario it made."""

    name: str
    start: Callable[..., LoadRun]
    runs: list[RunResult]


def run_scenario(
    scenario: Scenario,
    settings: BenchSettings,
    pinning: Pinning | None,
    nofile_soft: int,
    cross_check_binary: Path | None = None,
) -> ScenarioResult:
    result = ScenarioResult(
        scenario,
        duration_s=_first(settings.duration_s, scenario.duration_s, DEFAULT_DURATION_S),
        warmup_s=_first(settings.warmup_s, scenario.warmup_s, DEFAULT_WARMUP_S),
    )
    points = scenario.points_for(settings.connections, descriptor_capacity(nofile_soft))
    result.skipped = _short_of_descriptors(points, nofile_soft)
    if result.skipped is not None:
        log.warning("scenario %s skipped: %s", scenario.name, result.skipped)
        return result
    specs = _runnable(servers_for(scenario, settings), settings, pinning)
    result.servers = [spec.name for spec in specs]
    result.reference = choose_reference(result.servers, settings.reference, scenario.reference)
    for point in points:
        load = LoadSpec(
            *(point.pattern, point.connections, point.size_bytes),
            *(result.duration_s, result.warmup_s, point.rate_per_s),
        )
        specs_here = _held(scenario, point, specs, result.runs) if scenario.must_hold else specs
        generators = [Generator("echoplex load", LoadRun, result.runs)]
        if cross_check_binary is not None and point.pattern in crosscheck.PATTERNS:
            start = functools.partial(crosscheck.CrossCheckRun, cross_check_binary)
            generators.append(Generator(crosscheck.GENERATOR, start, result.cross_runs))
        # Each server under each generator, a fresh server every time, the two
        # generators' runs of a server next to each other.
        for repeat, spec, generator in itertools.product(
            range(settings.repeat), specs_here, generators
        ):
            run_once = functools.partial(
                measure,
                *(scenario, point, spec, repeat, load, pinning),
                warmup_connections=settings.warmup_connections,
                start_load=generator.start,
            )
            run = measure_uncontended(run_once, f"{scenario.name} {point.label} {spec.name}")
            run.generator = generator.name
            log.info(
                "%s %s %s, %s [%d/%d]: %s",
                *(scenario.name, point.label, spec.name, generator.name),
                *(repeat + 1, settings.repeat, _progress(run)),
            )
            generator.runs.append(run)
    _rank(result)
    return result


def descriptor_capacity(nofile_soft: int) -> int:
    """The most connections a server and the load generator can each hold with
    `nofile_soft` open files a process (`echoplex load` takes at most MAX_CONNECTIONS)."""
    return max(1, min(nofile_soft - NOFILE_MARGIN, MAX_CONNECTIONS))


def _held(
    scenario: Scenario, point: LoadPoint, specs: Sequence[ServerSpec], runs: list[RunResult]
) -> list[ServerSpec]:
    """The servers of `specs` that may hold every connection of `point` at once; for
    each of the others, a run that says why it was not run (into `runs`)."""
    able = []
    for spec in specs:
        if (reason := spec.cannot_hold(point.connections)) is None:
            able.append(spec)
            continue
        log.info("%s %s %s: not run, %s", scenario.name, point.label, spec.name, reason)
        runs.append(
            RunResult(
                *(scenario.name, point.label, spec.name, spec.kind, 0),
                *(point.pattern, point.connections, point.size_bytes),
                cannot_hold=reason,
            )
        )
    return able


def _short_of_descriptors(points: Sequence[LoadPoint], nofile_soft: int) -> str | None:
    """Why `points` cannot run with `nofile_soft` open files a process; None if they can."""
    needed = max(point.connections for point in points) + NOFILE_MARGIN
    if nofile_soft >= needed:
        return None
    return (
        f"needs {needed} open files per process but the limit is {nofile_soft} even after "
        f"raising it to the hard limit (raise it with `ulimit -n {needed}` as root, or "
        f"in /etc/security/limits.conf)"
    )


def _runnable(
    names: Sequence[str], settings: BenchSettings, pinning: Pinning | None
) -> list[ServerSpec]:
    """The servers of `names` that can run here; a warning for each left out, and for
    each with more processes than CPUs to pin them to."""
    specs: list[ServerSpec] = []
    known = settings.specs()
    for spec in (known[name] for name in names):
        if (reason := spec.unavailable_reason()) is not None:
            log.warning("skipping %s", reason)
            continue
        if pinning and spec.cpus > len(pinning.cpus):
            log.warning(
                "%s has %d processes but only %d CPUs to run on: pinned to all of them",
                *(spec.name, spec.cpus, len(pinning.cpus)),
            )
        specs.append(spec)
    return specs


def _rank(result: ScenarioResult) -> None:
    """The rows of `result`'s runs, and the two generators compared where both ran."""
    # Wrong bytes under either generator: not ranked under either.
    liars = wrong_echoes([*result.runs, *result.cross_runs])
    metric = result.scenario.metric
    result.rows = summarize(result.runs, metric, result.reference, liars)
    if result.cross_runs:
        result.cross_rows = summarize(result.cross_runs, metric, result.reference, liars)
        result.cross_check = compare_generators(
            result.runs, result.cross_runs, result.rows, result.cross_rows, metric
        )


def measure_uncontended(run_once: Callable[[], RunResult], what: str) -> RunResult:
    """`run_once()` (a `measure`), again while other work took more than CONTENDED_PCT of
    the pinned CPUs, up to MEASURE_ATTEMPTS runs in all: the last run, with the other
    load of the attempts before it (`contended_attempts`), for the report to say."""
    contended: list[float] = []
    for _ in range(MEASURE_ATTEMPTS - 1):
        run = run_once()
        foreign = run.foreign_cpu_pct or 0.0
        if foreign <= CONTENDED_PCT:
            break
        log.warning("%s: %.0f%% of its CPUs went to other work; measuring again", what, foreign)
        contended.append(foreign)
    else:
        run = run_once()
    run.contended_attempts = contended
    return run


@dataclass(frozen=True)
class CpuWindow:
    """What a CPU window inside the load's measured phase read: the server's CPU seconds
    at each end (None: no figure), its length, at each end the pinned CPUs' busy
    seconds and the seconds the server and the load ran (`_own_cpu_s`), and the
    server's threads as it opened."""

    server_before_s: float | None
    server_after_s: float | None
    seconds: float
    ours_before: tuple[float, float] | None
    ours_after: tuple[float, float] | None
    server_threads: int | None = None
    """The server tree's threads as the window opened."""
    exact_before: dict[int, int] | None = None
    exact_after: dict[int, int] | None = None
    """CPU ns of every server thread at each end (`proctree.tree_thread_cpu_ns`)."""

    def exact_server_cpu_s(self) -> float | None:
        """The server's CPU over the window in nanoseconds, summed per thread, if every
        thread there at its start was there at its end (one that exited took its count
        along, and a reused thread id starts again from zero); else None."""
        before, after = self.exact_before, self.exact_after
        if not before or not after or self.server_before_s is None:
            return None
        if any(after.get(tid, -1) < ns for tid, ns in before.items()):
            return None
        return (sum(after.values()) - sum(before.values())) / 1e9


def measure(
    scenario: Scenario,
    point: LoadPoint,
    spec: ServerSpec,
    repeat: int,
    load: LoadSpec,
    pinning: Pinning | None,
    *,
    warmup_connections: int = 1,
    start_load: Callable[..., LoadRun] = LoadRun,
) -> RunResult:
    """Start `spec` on a free port, ready it with `warmup_connections`, drive it with
    `load` (from `start_load(host, port, load, cpu=...)`), measure it, stop it."""
    server_cpus = pinning.server_cpus(spec) if pinning else None
    pinned_cpus = (*server_cpus, pinning.load_cpu) if pinning and server_cpus else ()
    result = RunResult(
        scenario=scenario.name,
        point=point.label,
        server=spec.name,
        kind=spec.kind,
        repeat=repeat,
        pattern=point.pattern,
        connections=point.connections,
        size_bytes=point.size_bytes,
        server_cpus=list(server_cpus) if server_cpus else None,
    )
    try:
        server = RunningServer(spec, cpus=server_cpus)
    except ServerStartError as exc:
        result.failure = str(exc)
        return result
    exited = None
    try:
        result.idle_rss_bytes = tree_rss_bytes(server.pid)
        unpinned = unpinned_threads(server.pid, server_cpus)
        warm_up_failed, wrong_warm_up = _warm_up(server, warmup_connections)
        run = start_load(server.host, server.port, load, cpu=pinning.load_cpu if pinning else None)
        try:
            window = _cpu_window(server, run, load, pinned_cpus)
            # Again under load: a server may start processes or threads lazily.
            unpinned = unpinned or unpinned_threads(server.pid, server_cpus)
            result.server_processes = len(tree_pids(server.pid))
            result.server_threads = window.server_threads
            report, failure = run.finish()
        finally:
            run.stop()
        result.peak_rss_bytes = tree_peak_rss_bytes(server.pid)
        result.connections_opened = server.connections_opened()
        if (status := server.exit_status()) is not None:
            exited = (
                f"server exited with status {status}; its log ends: {server.stderr_tail()[-300:]}"
            )
    finally:
        server.stop()
    result.failure = "; ".join(filter(None, (failure, warm_up_failed, unpinned, exited))) or None
    if report is not None:
        apply_load_report(result, report)
    if wrong_warm_up:
        result.mismatches += 1
        result.mismatch_samples.insert(0, wrong_warm_up)
    _record_cpu(result, window, len(set(pinned_cpus)))
    return result


def _warm_up(server: RunningServer, connections: int) -> tuple[str | None, str | None]:
    """Ready `server` (`servers.warm_up`): why the warm-up failed, and the wrong echo it
    got (each None if not); the warm-up's connections are then not the load's."""
    failed = wrong = None
    try:
        warm_up(server.host, server.port, connections)
    except WarmUpError as exc:
        if exc.wrong_echo:
            wrong = str(exc)
        else:
            failed = str(exc)
    server.forget_connections(connections)
    return failed, wrong


def _cpu_window(
    server: RunningServer, run: LoadRun, load: LoadSpec, pinned_cpus: Sequence[int]
) -> CpuWindow:
    """Once the load is connected and past its warmup, the server's CPU over
    CPU_WINDOW_SHARE of the measured duration."""
    _wait_connected(server.port, load, run)
    run.wait(load.warmup_s)
    # Now, with every connection open and the load under way: by the window's end a late
    # bench may find the load over, its connections (and their threads) gone.
    threads = tree_threads(server.pid)
    exact_before = tree_thread_cpu_ns(server.pid)
    cpu_before, started = tree_cpu_s(server.pid), time.monotonic()
    ours_before = _own_cpu_s(cpu_before, run.proc.pid, pinned_cpus)
    overran = run.wait(load.duration_s * CPU_WINDOW_SHARE)
    cpu_after, window_s = tree_cpu_s(server.pid), time.monotonic() - started
    exact_after = tree_thread_cpu_ns(server.pid)
    ours_after = _own_cpu_s(cpu_after, run.proc.pid, pinned_cpus)
    if overran:
        # The load ended inside the window (the bench was late on a busy machine): the
        # window's CPU rate would mix load and idle. No figure.
        log.warning("%s: the CPU window outlasted the load: no CPU figure", server.spec.name)
        cpu_before = None
    return CpuWindow(
        *(cpu_before, cpu_after, window_s, ours_before, ours_after),
        *(threads, exact_before, exact_after),
    )


def _record_cpu(result: RunResult, window: CpuWindow, pinned_cpu_count: int) -> None:
    """The server's CPU rate and CPU per request from `window`, and the share of the
    pinned CPUs other work took, into `result` (nothing if the window has no figure)."""
    before, after, window_s = window.server_before_s, window.server_after_s, window.seconds
    if before is None or after is None or window_s <= 0:
        return
    exact = window.exact_server_cpu_s()
    result.server_cpu_s = after - before if exact is None else exact
    result.cpu_resolution_s = 1 / CLOCK_TICKS_PER_S if exact is None else 1e-9
    result.cpu_window_s = window_s
    cpu_rate = result.server_cpu_s / window_s
    result.server_cpu_pct = 100 * cpu_rate
    if result.requests_per_s:
        result.cpu_us_per_request = 1e6 * cpu_rate / result.requests_per_s
    if window.ours_before is not None and window.ours_after is not None:
        (busy_before, own_before), (busy_after, own_after) = window.ours_before, window.ours_after
        foreign_s = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        result.foreign_cpu_pct = 100 * foreign_s / (window_s * pinned_cpu_count)


def _own_cpu_s(
    server_s: float | None, load_pid: int, cpus: Sequence[int]
) -> tuple[float, float] | None:
    """Seconds `cpus` were busy, and seconds the server (`server_s`, just read) and the
    load generator ran: the difference is what other processes (and the hypervisor's
    steal) took from them."""
    if not cpus:
        return None
    busy = busy_ticks_of(cpus)
    load_s = tree_cpu_s(load_pid)
    if busy is None or server_s is None or load_s is None:
        return None
    return busy / CLOCK_TICKS_PER_S, server_s + load_s


def _wait_connected(port: int, load: LoadSpec, run: LoadRun) -> None:
    """Until the load's connections to `port` are established, so that its warmup, then
    its measured time, are under way (or until it gives up, or exits)."""
    deadline = time.monotonic() + CONNECT_WAIT_S + load.connections * CONNECT_WAIT_PER_CONNECTION_S
    # Polling a table of tens of thousands of sockets costs: less often when it is large.
    poll_s = CONNECT_POLL_S * max(1, load.connections // 1000)
    while established_connections(port) < load.connections and time.monotonic() < deadline:
        if run.wait(poll_s):
            return


def unpinned_threads(root_pid: int, cpus: Sequence[int] | None) -> str | None:
    """Which of the server's threads may run outside `cpus` (one that pinned itself
    elsewhere), said in one line; None when all stay on them, or nothing was pinned."""
    if not cpus:
        return None
    allowed = set(cpus)
    escaped = {tid: on for tid, on in tree_affinity(root_pid).items() if not on <= allowed}
    if not escaped:
        return None
    tid, on = next(iter(escaped.items()))
    return (
        f"{len(escaped)} server thread(s) not pinned to CPUs {sorted(allowed)}, e.g. "
        f"thread {tid} on CPUs {sorted(on)}"
    )


def apply_load_report(result: RunResult, report: dict[str, Any]) -> None:
    """Copy the figures of an `echoplex load --json` report into `result`."""
    latency = report.get("latency_us")
    latency = latency if isinstance(latency, dict) else {}
    result.requests = _number(report.get("requests"))
    result.requests_per_s = _number(report.get("requests_per_s"))
    result.mb_per_s = _number(report.get("mb_per_s"))
    for name in ("p50", "p90", "p99", "p999", "max"):
        setattr(result, f"{name}_us", _number(latency.get(name)))
    result.errors = int(_number(report.get("errors")) or 0)
    by_kind = report.get("errors_by_kind")
    if isinstance(by_kind, dict):
        result.errors_by_kind = {
            str(kind): int(count) for kind, count in by_kind.items() if _number(count) is not None
        }
    result.mismatches = int(_number(report.get("mismatches")) or 0)
    samples = report.get("mismatch_samples")
    if isinstance(samples, list):
        result.mismatch_samples = [_mismatch_text(sample) for sample in samples]
    result.connections_alive = _number(report.get("connections_alive"))
    result.client_cpu_s = _number(report.get("client_cpu_s"))
    result.client_cpu_us_per_request = _number(report.get("client_cpu_us_per_request"))


def _mismatch_text(sample: object) -> str:
    """One of `echoplex load`'s mismatch samples as it prints them."""
    try:
        return str(Mismatch(**sample))  # type: ignore[arg-type]
    except TypeError:
        return str(sample)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _first(*values: float | None) -> float:
    return next(value for value in values if value is not None)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _progress(run: RunResult) -> str:
    parts = []
    if run.requests_per_s is not None:
        parts.append(f"{run.requests_per_s:,.0f} req/s")
    if run.mb_per_s is not None:
        parts.append(f"{run.mb_per_s:.1f} MB/s")
    if run.p99_us is not None:
        parts.append(f"p99 {run.p99_us:,.0f} µs")
    if run.cpu_us_per_request is not None:
        parts.append(f"{run.cpu_us_per_request:.1f} CPU µs/req")
    if run.connections_alive is not None:
        parts.append(f"{run.connections_alive:.0f} alive")
    if run.error_count:
        parts.append(f"{run.error_count} errors")
    if run.failure:
        parts.append(f"FAILED: {run.failure}")
    return ", ".join(parts) or "no figures"


def selected(names: Sequence[str]) -> tuple[str, ...]:
    """Scenario names with `all` expanded, in order, without duplicates."""
    expanded: list[str] = []
    for name in names:
        for each in ALL if name == "all" else (name,):
            if each not in expanded:
                expanded.append(each)
    return tuple(expanded)
