"""What every bench chart shares: its style (150 dpi, 12 pt), matplotlib loaded for
files only, and a scenario's rows arranged for drawing (`ScenarioView`). The bar charts
(`charts.py`) and the scale scenario's line charts (`scale_charts.py`) both build on it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from .results import WRONG_ECHO_ERRORS, Row
from .runner import ScenarioResult
from .scenarios import format_size
from .servers import SERVERS

INSTALL_HINT = "matplotlib is needed for the charts: pip install 'echoplex[bench]'"
# 150 dpi and 12 pt text: a 1,800 px wide chart that GitHub shows at half size keeps
# its text about 12 px high.
DPI = 150
STYLE = {
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 12,
    "legend.fontsize": 11,
    "figure.titlesize": 15,
    "hatch.linewidth": 1.5,
}


class MissingDependency(Exception):
    pass


def check_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency(INSTALL_HINT)


def pyplot() -> Any:
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


class ScenarioView:
    """One scenario's rows arranged for charts: load points, servers, their kinds,
    what went wrong, and which servers shared the load generator's CPU."""

    def __init__(self, result: ScenarioResult, machine: dict[str, Any]) -> None:
        self.result = result
        self.points = list(dict.fromkeys(row.point for row in result.rows))
        self.servers = list(dict.fromkeys([*result.servers, *(r.server for r in result.rows)]))
        self._rows = {(row.point, row.server): row for row in result.rows}
        self.runs = max(row.runs for row in result.rows)
        self.shared_cpu, self.cpu_notes = cpu_sharing(result.rows, machine)

    def row(self, point: str, server: str) -> Row | None:
        return self._rows.get((point, server))

    def kind(self, server: str) -> str:
        """The kind the results record; else the bench's own servers' kind; else a
        reference server by its `ref-` name, or a server from the command line."""
        for row in self.result.rows:
            if row.server == server and row.kind:
                return row.kind
        if server in SERVERS:
            return SERVERS[server].kind
        return "baseline" if server.startswith("ref-") else "custom"

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(self.kind(server) for server in self.servers))

    def server_label(self, server: str) -> str:
        return f"{server} †" if server in self.shared_cpu else server

    def trouble(self, row: Row) -> str:
        """What went wrong for a server at a point, over all repeats; empty if nothing."""
        wrong = row.wrong_echoes
        failed = len(row.failures)
        errors = max(row.errors_total - row.mismatches_total - failed, 0)
        errors -= row.wrong_echo_errors
        # One kind of error is named (`2,997 timeout errors`); several are just counted.
        kinds = [kind for kind in row.errors_by_kind if kind not in WRONG_ECHO_ERRORS]
        noun = f"{kinds[0]} error" if len(kinds) == 1 else "error"
        parts = [
            # The connections it did not serve are (nearly all) its errors: one mark for
            # both keeps the label short enough to fit beside its bar.
            row.served_fewer or count(errors, noun),
            count(wrong, "wrong echo", "wrong echoes"),
            count(failed, "failed run"),
        ]
        return ", ".join(part for part in parts if part)

    def not_ranked(self, row: Row) -> str:
        """Why the server's figures are not drawn, if it echoed wrong bytes (here or at
        another load point): speed bought with wrong answers is no competitor."""
        if row.verified:
            return ""
        wrong = count(row.wrong_echoes, "wrong echo", "wrong echoes")
        return f"not ranked: {wrong or 'wrong echoes at another load point'}"

    def has_trouble(self) -> bool:
        return any(self.trouble(row) for row in self.result.rows)

    def point_title(self, point: str) -> str:
        row = next(row for row in self.result.rows if row.point == point)
        connections = count(row.connections, "connection") or "0 connections"
        noun = "writes" if row.pattern == "stream" else "messages"
        return f"{row.pattern}: {connections}, {format_size(row.size_bytes)} {noun}"


def count(number: int, singular: str, plural: str | None = None) -> str:
    if not number:
        return ""
    return f"{number:,} {singular if number == 1 else plural or singular + 's'}"


def cpu_sharing(rows: Sequence[Row], machine: dict[str, Any]) -> tuple[set[str], list[str]]:
    """The servers that ran on the load generator's CPU, and the notes that say so.
    Results without a `pinning` entry say nothing of it: no note."""
    if "pinning" not in machine:
        return set(), []
    pinning = machine["pinning"]
    if not pinning:
        return set(), ["not pinned: every server shared the CPUs with the load generator"]
    load_cpu = pinning["load_cpu"]
    shared: dict[str, list[int]] = {}
    for row in rows:
        if row.server_cpus and load_cpu in row.server_cpus:
            shared.setdefault(row.server, row.server_cpus)
    notes = [
        f"† {server} ran on CPUs {', '.join(map(str, cpus))}: it shared CPU {load_cpu} "
        "with the load generator"
        for server, cpus in shared.items()
    ]
    return set(shared), notes


def format_latency(value_us: float) -> str:
    """Microseconds in the unit a reader thinks in: 42 µs, 1.46 ms, 268 ms, 1.2 s."""
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if value_us >= scale:
            return f"{value_us / scale:.3g} {unit}"
    return f"{value_us:.3g} µs"
