"""What one bench run measured, and how repeated runs become one row: medians, an
error total, and the ratio to the reference server. Pure functions, no I/O.

A server that echoed a wrong byte in any run (a mismatch, or bytes that were never
sent) is not ranked: its rows say `verified: false` and have no ratios, and if it is
the reference, no row of its scenario has one. Speed bought with wrong answers is
not speed.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .proctree import CLOCK_TICKS_PER_S

# The per-run figures a row reports as the median over its repeats.
MEDIAN_FIELDS = (
    "requests",
    "requests_per_s",
    "mb_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "max_us",
    "connections_alive",
    "server_cpu_s",
    "cpu_resolution_s",
    "server_cpu_pct",
    "cpu_us_per_request",
    "foreign_cpu_pct",
    "peak_rss_bytes",
    "idle_rss_bytes",
    "connections_accepted",
    "client_cpu_s",
    "client_cpu_us_per_request",
    "server_processes",
    "server_threads",
    "rss_per_connection_bytes",
)
# Memory per connection is only figured where (nearly) every connection stayed open: a
# server that kept 32 of 10,000 would divide its whole footprint by 32.
HELD_SHARE = 0.9
# Fewer units of its clock (`cpu_resolution_s`) of server CPU than this in a run's
# window: no CPU per message (one unit either way is then at most 5%).
MIN_CPU_TICKS = 20
# `echoplex load` error kinds that mean the server echoed what it was not sent.
WRONG_ECHO_ERRORS = ("extra bytes",)
MISMATCH_SAMPLES_KEPT = 5
# How far the two load generators' between-server ratios may differ before the bench
# names the server (--cross-check).
CROSS_CHECK_TOLERANCE = 0.15


@dataclass
class RunResult:
    """One server under one load point, once."""

    scenario: str
    point: str
    server: str
    kind: str
    repeat: int
    pattern: str
    connections: int
    size_bytes: int
    generator: str = "echoplex load"
    """What drove the server: `echoplex load`, or the cross-check's C client."""
    requests: float | None = None
    requests_per_s: float | None = None
    mb_per_s: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    max_us: float | None = None
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0
    mismatch_samples: list[str] = field(default_factory=list)
    """The first wrong bytes the load generator saw: connection, offset, expected, received."""
    connections_alive: float | None = None
    client_cpu_s: float | None = None
    client_cpu_us_per_request: float | None = None
    """The load generator's own CPU per request, from the OS, as it reports it: beside the
    server's, it shows which of the two sets the pace."""
    server_cpu_s: float | None = None
    """Server CPU (user + system, whole process tree) over the measured window."""
    cpu_resolution_s: float | None = None
    """The unit `server_cpu_s` was counted in: 1 ns per thread where no thread exited in
    the window, else the clock tick of `/proc/PID/stat` (10 ms)."""
    cpu_window_s: float | None = None
    server_cpu_pct: float | None = None
    cpu_us_per_request: float | None = None
    peak_rss_bytes: float | None = None
    """Sum over the server's process tree of each process's peak resident memory."""
    idle_rss_bytes: float | None = None
    """Resident memory of the tree once it listened, before any load."""
    connections_opened: dict[str, int] | None = None
    """Connections the server accepted, by process (`worker-N` for workers)."""
    server_cpus: list[int] | None = None
    """The CPUs the server was pinned to; None when the bench did not pin."""
    foreign_cpu_pct: float | None = None
    """Share of the pinned CPUs (the server's and the load generator's) that went to
    anything else during the CPU window: other processes, the hypervisor's steal.
    Request/response throughput scales with what is left, so such a run measured the
    machine as much as the server."""
    contended_attempts: list[float] = field(default_factory=list)
    """`foreign_cpu_pct` of the attempts before this one, each measured again because
    other work took too much of its CPUs (`runner.measure_uncontended`); empty when the
    first attempt was kept."""
    server_processes: int | None = None
    """Processes in the server's tree under load (a shell and its server count two)."""
    server_threads: int | None = None
    """Threads of the server's tree under load, each process's main thread included."""
    cannot_hold: str | None = None
    """Why the server was not run at this point of a scenario whose connections must all
    be held at once (`cannot hold 100: serves one connection at a time`)."""
    failure: str | None = None
    """Why the run did not complete normally (timeout, crash, no report), if it did not."""

    @property
    def connections_accepted(self) -> int | None:
        return (
            sum(self.connections_opened.values()) if self.connections_opened is not None else None
        )

    @property
    def error_count(self) -> int:
        return self.errors + self.mismatches + (1 if self.failure else 0)

    @property
    def rss_per_connection_bytes(self) -> float | None:
        return per_connection_bytes(
            self.peak_rss_bytes, self.idle_rss_bytes, self.connections_alive, self.connections
        )

    @property
    def echoed_wrong(self) -> bool:
        """Whether the server sent back a byte it was not sent (it lied)."""
        return bool(self.mismatches) or any(
            self.errors_by_kind.get(kind) for kind in WRONG_ECHO_ERRORS
        )


@dataclass
class Row:
    """One server at one load point: the medians of its repeated runs."""

    scenario: str
    point: str
    server: str
    kind: str
    pattern: str
    connections: int
    size_bytes: int
    runs: int
    medians: dict[str, float | None]
    errors_total: int
    """Errors + mismatches reported by the load generator, plus failed runs, over all repeats."""
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """The load generator's errors over all repeats, by kind (timeout, reset, ...)."""
    failures: list[str] = field(default_factory=list)
    connections_opened: list[dict[str, int]] = field(default_factory=list)
    server_cpus: list[int] | None = None
    cannot_hold: str | None = None
    """Why the server was not run at this point (`RunResult.cannot_hold`)."""
    verified: bool = True
    """False when the server echoed a wrong byte at any point of the scenario: it is
    not ranked (no ratios)."""
    mismatches_total: int = 0
    mismatch_samples: list[str] = field(default_factory=list)
    reference: str | None = None
    vs_baseline: float | None = None
    """Median over repeats of (this server's headline figure / the reference's, same repeat)."""
    cpu_vs_baseline: float | None = None
    """The same for server CPU per request (lower is better). CPU time is only counted
    while the server runs, so on a busy machine this is steadier than throughput."""

    @property
    def wrong_echo_errors(self) -> int:
        """Errors of the kinds that mean bytes were echoed that were never sent."""
        return sum(self.errors_by_kind.get(kind, 0) for kind in WRONG_ECHO_ERRORS)

    @property
    def wrong_echoes(self) -> int:
        """Bytes echoed that were not sent, or not as sent: mismatches and such errors."""
        return self.mismatches_total + self.wrong_echo_errors

    def figure(self, name: str) -> float | None:
        return self.medians.get(name)

    @property
    def served(self) -> int | None:
        """Connections the load generator still had at the end (median over repeats):
        the ones the server served throughout. None when no run reported it."""
        alive = self.figure("connections_alive")
        return None if alive is None else math.floor(alive)

    @property
    def served_fewer(self) -> str:
        """`served 1 of 1,000` (connections) when the server served fewer connections than
        it was offered, else empty. Its latency is then that of the few it served (the
        others waited in vain, and are errors), so it would look best for failing most:
        charts and tables leave it out and say this instead."""
        served = self.served
        if served is None or served >= self.connections:
            return ""
        return f"served {served:,} of {self.connections:,}"

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "point": self.point,
            "server": self.server,
            "kind": self.kind,
            "pattern": self.pattern,
            "connections": self.connections,
            "size_bytes": self.size_bytes,
            "runs": self.runs,
            **self.medians,
            "errors_total": self.errors_total,
            "errors_by_kind": self.errors_by_kind,
            "failures": self.failures,
            "connections_opened": self.connections_opened,
            "server_cpus": self.server_cpus,
            "cannot_hold": self.cannot_hold,
            "verified": self.verified,
            "mismatches_total": self.mismatches_total,
            "mismatch_samples": self.mismatch_samples,
            "reference": self.reference,
            "vs_baseline": self.vs_baseline,
            "cpu_vs_baseline": self.cpu_vs_baseline,
        }


def per_connection_bytes(
    peak: float | None, idle: float | None, alive: float | None, offered: int
) -> float | None:
    """A server's resident memory growth over its idle baseline per connection held, if
    at least HELD_SHARE of the `offered` connections were alive to the end."""
    if peak is None or idle is None or not alive or alive < HELD_SHARE * offered:
        return None
    return (peak - idle) / alive


def cpu_measurable(row: Row) -> bool:
    """Whether the server's CPU over the window is enough units of the clock it was
    counted in to divide: at a trickle to 100 connections a window may hold 2 clock
    ticks of 10 ms, a figure off by half (none such where it was counted in ns)."""
    cpu_s = row.figure("server_cpu_s")
    resolution_s = row.figure("cpu_resolution_s") or 1 / CLOCK_TICKS_PER_S
    return cpu_s is not None and cpu_s >= MIN_CPU_TICKS * resolution_s


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are present; None if there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def paired_ratio(
    runs: Sequence[RunResult], reference_runs: Sequence[RunResult], metric: str
) -> float | None:
    """Median over repeats of run.metric / reference.metric, pairing runs of the same
    repeat: they ran moments apart, so slow drift on a shared machine cancels out."""
    by_repeat = {run.repeat: getattr(run, metric) for run in reference_runs}
    ratios = []
    for run in runs:
        value, reference = getattr(run, metric), by_repeat.get(run.repeat)
        if value is not None and reference:
            ratios.append(value / reference)
    return median(ratios)


def wrong_echoes(runs: Iterable[RunResult]) -> set[str]:
    """The servers that echoed a wrong byte in any of `runs`."""
    return {run.server for run in runs if run.echoed_wrong}


def summarize(
    runs: Sequence[RunResult],
    metric: str,
    reference: str | None,
    liars: set[str] | None = None,
) -> list[Row]:
    """One row per (point, server), in the order first run; `vs_baseline` against
    `reference` at the same point when it ran there, for servers whose every echo was
    right, and only if the reference's was too. `liars`: the servers that echoed wrong
    bytes (default: in `runs`)."""
    liars = wrong_echoes(runs) if liars is None else liars
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.point, run.server), []).append(run)
    rows = []
    for (point, server), group in groups.items():
        first = group[0]
        row = Row(
            scenario=first.scenario,
            point=point,
            server=server,
            kind=first.kind,
            pattern=first.pattern,
            connections=first.connections,
            size_bytes=first.size_bytes,
            runs=len(group),
            medians={name: median(getattr(run, name) for run in group) for name in MEDIAN_FIELDS},
            errors_total=sum(run.error_count for run in group),
            errors_by_kind=_add_up(run.errors_by_kind for run in group),
            failures=[run.failure for run in group if run.failure],
            connections_opened=[run.connections_opened for run in group if run.connections_opened],
            server_cpus=first.server_cpus,
            cannot_hold=first.cannot_hold,
            verified=server not in liars,
            mismatches_total=sum(run.mismatches for run in group),
            mismatch_samples=[sample for run in group for sample in run.mismatch_samples][
                :MISMATCH_SAMPLES_KEPT
            ],
        )
        reference_runs = groups.get((point, reference)) if reference else None
        if reference_runs and row.verified and reference not in liars:
            row.reference = reference
            row.vs_baseline = paired_ratio(group, reference_runs, metric)
            row.cpu_vs_baseline = paired_ratio(group, reference_runs, "cpu_us_per_request")
        rows.append(row)
    return rows


@dataclass
class CrossCheckRow:
    """One server at one load point under both load generators (--cross-check): its
    ratios to the reference under each, for the headline figure and for server CPU
    per request, and each pair's quotient (1.0 when both generators rank it alike)."""

    point: str
    server: str
    echoplex: float | None
    """The headline figure's median under `echoplex load`..."""
    crosscheck: float | None
    """... and under the C client."""
    generators: float | None
    """Median over repeats of C client / echoplex load for this server."""
    vs_ref_echoplex: float | None
    vs_ref_crosscheck: float | None
    agreement: float | None
    cpu_vs_ref_echoplex: float | None
    cpu_vs_ref_crosscheck: float | None
    cpu_agreement: float | None

    @property
    def within_tolerance(self) -> bool | None:
        """False if either pair of ratios is more than the tolerance apart; None if
        there is no pair to compare."""
        present = [a for a in (self.agreement, self.cpu_agreement) if a is not None]
        if not present:
            return None
        return all(abs(a - 1) <= CROSS_CHECK_TOLERANCE for a in present)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "within_tolerance": self.within_tolerance}


def _quotient(value: float | None, by: float | None) -> float | None:
    return value / by if value is not None and by else None


def compare_generators(
    runs: Sequence[RunResult],
    cross_runs: Sequence[RunResult],
    rows: Sequence[Row],
    cross_rows: Sequence[Row],
    metric: str,
) -> list[CrossCheckRow]:
    """For every server and point both generators measured: each one's figure and
    ratios to the reference, and how far apart the two generators' ratios are."""
    by_key = {(row.point, row.server): row for row in rows}

    def runs_of(which: Sequence[RunResult], point: str, server: str) -> list[RunResult]:
        return [run for run in which if run.point == point and run.server == server]

    compared = []
    for cross in cross_rows:
        row = by_key.get((cross.point, cross.server))
        if row is None:
            continue
        compared.append(
            CrossCheckRow(
                point=cross.point,
                server=cross.server,
                echoplex=row.figure(metric),
                crosscheck=cross.figure(metric),
                generators=paired_ratio(
                    runs_of(cross_runs, cross.point, cross.server),
                    runs_of(runs, cross.point, cross.server),
                    metric,
                ),
                vs_ref_echoplex=row.vs_baseline,
                vs_ref_crosscheck=cross.vs_baseline,
                agreement=_quotient(cross.vs_baseline, row.vs_baseline),
                cpu_vs_ref_echoplex=row.cpu_vs_baseline,
                cpu_vs_ref_crosscheck=cross.cpu_vs_baseline,
                cpu_agreement=_quotient(cross.cpu_vs_baseline, row.cpu_vs_baseline),
            )
        )
    return compared


def _add_up(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for each in counts:
        total.update(each)
    return dict(sorted(total.items()))


def choose_reference(
    servers: Sequence[str], requested: str | None, preferred: str | None = None
) -> str | None:
    """The server ratios are taken against: the one asked for, else the scenario's
    `preferred` one if it runs, else the uvloop reference server if it runs, else the
    asyncio model, else the first server."""
    if requested:
        return requested
    for candidate in (preferred, "ref-uvloop", "asyncio"):
        if candidate in servers:
            return candidate
    return servers[0] if servers else None
