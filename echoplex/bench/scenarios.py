"""The bench's scenarios: named lists of load points, each run against every server.

A point is one `echoplex load` shape (pattern, connections, message size, and for the
open-loop `rate` pattern how often each connection sends). A scenario also names its
headline figure, the one the `vs_baseline` ratio is taken on, and the point field its
charts put on the x axis; it may choose its servers and reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..models import MODELS

KIB = 1024


@dataclass(frozen=True)
class LoadPoint:
    pattern: str
    connections: int
    size_bytes: int
    interval_s: float | None = None
    """`rate` only: each connection sends one message this often, so the whole run is
    due `connections / interval_s` messages a second (`echoplex load` sends message k
    on connection k mod c: one per connection per `c / rate` seconds)."""

    @property
    def rate_per_s(self) -> float | None:
        return None if self.interval_s is None else self.connections / self.interval_s

    @property
    def label(self) -> str:
        every = "" if self.interval_s is None else f" every {self.interval_s:g}s"
        return f"{self.pattern} c={self.connections} s={format_size(self.size_bytes)}{every}"


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
    up_to_descriptor_limit: bool = False
    """Also a point at as many connections as the descriptor limit lets a server and
    the load generator each hold (points past it are left out)."""
    must_hold: bool = False
    """Every connection of a point is to be held at once: a server that cannot (`simple`
    serves one at a time) is not run there but reported with the reason."""

    @property
    def max_connections(self) -> int:
        return max(point.connections for point in self.points)

    def points_for(self, connections: Sequence[int] | None, capacity: int) -> tuple[LoadPoint, ...]:
        """The points to run: each shape of the scenario at each of `connections` if
        given, else its own points, and with `up_to_descriptor_limit` those within
        `capacity` connections and one at `capacity`."""
        if connections:
            shapes = dict.fromkeys(dataclasses.replace(p, connections=0) for p in self.points)
            return tuple(
                dataclasses.replace(shape, connections=count)
                for shape in shapes
                for count in connections
            )
        if not self.up_to_descriptor_limit:
            return self.points
        within = tuple(point for point in self.points if point.connections < capacity)
        largest = max(within or self.points, key=lambda point: point.connections)
        return (*within, dataclasses.replace(largest, connections=capacity))


def format_size(size_bytes: int) -> str:
    if size_bytes >= KIB and size_bytes % KIB == 0:
        return f"{size_bytes // KIB}KiB"
    return f"{size_bytes}B"


# The scale scenario's headline figure (results.RunResult); it picks its table and charts.
SCALE_METRIC = "rss_per_connection_bytes"
# The scale scenario's trickle: each connection sends one small message every 2 s. Slow
# enough that the cost measured is that of holding the connections, not of moving bytes
# (19,800 connections are due 9,900 messages/s, which every model echoes on one CPU),
# and fast enough that each connection sends 5 in a 10 s measured window, so the 100
# connections of the smallest point still give 500 latencies (a p99.9 of 500 is their
# largest but one) and every connection's longest wait is seen more than once. Issue
# 22's 100,000-connection run uses 10 s; a bench run of that rate would need 50 s per
# point to give as many latencies.
SCALE_INTERVAL_S = 2.0
SCALE_MESSAGE_BYTES = 64

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
            "scale",
            f"N connections held at once, each sending {SCALE_MESSAGE_BYTES} B every "
            f"{SCALE_INTERVAL_S:g} s (open loop: N / {SCALE_INTERVAL_S:g} messages/s in all), "
            "for N = 100, 1,000, 10,000 and as many as the descriptor limit allows: what "
            "each connection costs in memory, CPU, latency and threads as N grows",
            tuple(
                LoadPoint("rate", count, SCALE_MESSAGE_BYTES, SCALE_INTERVAL_S)
                for count in (100, 1000, 10_000)
            ),
            metric=SCALE_METRIC,
            higher_is_better=False,
            models=(*MODELS, "ref-uvloop"),
            # One interval of warmup: every connection has sent before the window opens.
            duration_s=10.0,
            warmup_s=SCALE_INTERVAL_S,
            reference="ref-uvloop",
            up_to_descriptor_limit=True,
            must_hold=True,
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
