"""The bench's scenarios: named lists of load points, each run against every server.

A point is one `echoplex load` shape (pattern, connections, message size). A scenario
also names its headline figure, the one the `vs_baseline` ratio is taken on, and the
point field its charts put on the x axis; it may choose its servers and reference.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class LoadPoint:
    pattern: str
    connections: int
    size_bytes: int

    @property
    def label(self) -> str:
        return f"{self.pattern} c={self.connections} s={format_size(self.size_bytes)}"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    points: tuple[LoadPoint, ...]
    metric: str
    """The headline figure of a row, a key of the per-run results."""
    higher_is_better: bool = True
    x_axis: str = "connections"
    """The LoadPoint field that varies across the points (for charts)."""
    models: tuple[str, ...] | None = None
    """The servers run when `--models` is not given; None: every model."""
    duration_s: float | None = None
    """Measured seconds per run when `--duration` is not given; None: the bench default."""
    warmup_s: float | None = None
    reference: str | None = None
    """The server ratios are taken against when it runs and `--reference` is not given;
    None: the bench's default choice."""

    @property
    def max_connections(self) -> int:
        return max(point.connections for point in self.points)


def format_size(size_bytes: int) -> str:
    if size_bytes >= KIB and size_bytes % KIB == 0:
        return f"{size_bytes // KIB}KiB"
    return f"{size_bytes}B"


# The load point of the performance targets: 1 KiB request/response over 50 connections.
TARGETS_POINT = LoadPoint("pingpong", 50, KIB)

SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "concurrency",
            "request/response (pingpong) of 64 B messages over 1, 10, 100 and 1000 "
            "connections at once",
            tuple(LoadPoint("pingpong", c, 64) for c in (1, 10, 100, 1000)),
            metric="requests_per_s",
        ),
        Scenario(
            "targets",
            "the load point of the performance targets: 1 KiB request/response over 50 connections",
            (TARGETS_POINT,),
            metric="requests_per_s",
        ),
        Scenario(
            "multicore",
            "what a second core adds to the workers model: 1 and 2 processes on as many "
            "CPUs, asyncio beside them, 1 KiB request/response over 50 connections",
            (TARGETS_POINT,),
            metric="requests_per_s",
            models=("workers-1", "workers-2", "asyncio"),
            reference="workers-1",
        ),
        Scenario(
            "sizes",
            "pingpong over 10 connections with messages of 64 B, 1 KiB, 16 KiB and 64 KiB",
            tuple(LoadPoint("pingpong", 10, size) for size in (64, KIB, 16 * KIB, 64 * KIB)),
            metric="mb_per_s",
            x_axis="size_bytes",
        ),
        Scenario(
            "stream",
            "bulk stream: 1 and 10 connections each sending 64 KiB writes as fast as the "
            "echo comes back",
            tuple(LoadPoint("stream", c, 64 * KIB) for c in (1, 10)),
            metric="mb_per_s",
        ),
        Scenario(
            "hold",
            "10,000 connections opened and held: what each idle connection costs",
            (LoadPoint("hold", 10_000, 64),),
            metric="peak_rss_bytes",
            higher_is_better=False,
        ),
        Scenario(
            "smoke",
            "a tiny check that the bench works: 1 connection, half a second",
            (LoadPoint("pingpong", 1, 64),),
            metric="requests_per_s",
            models=("simple", "asyncio"),
            duration_s=0.5,
            warmup_s=0.2,
        ),
    )
}
# `all` is every real scenario; `smoke` is only a check.
ALL = ("concurrency", "sizes", "stream", "hold")
