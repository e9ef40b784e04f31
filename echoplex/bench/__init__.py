"""`echoplex bench`: every concurrency model (and reference servers) under the same load.

scenarios.py   the named load points (concurrency sweep, targets, multicore, sizes, ...)
servers.py     the servers compared (models, reference servers, --server commands),
               starting one on a free port, readying it, stopping it
baselines/     the reference servers' scripts
loadgen.py     driving a server with `echoplex load` as a subprocess
crosscheck.py  the second, independent load generator (crosscheck.c), built with cc
proctree.py    server CPU, memory and sockets, over its process tree, from /proc
runner.py      the loop: points x repeats x servers in turn, pinned to CPUs
results.py     medians over repeats, ratios to the reference, wrong echoes, and the
               two load generators compared
report.py      results.json and results.md
charts.py      PNG charts (matplotlib, imported only to draw them)
"""

from .runner import BenchReport, BenchSettings, run_bench
from .scenarios import SCENARIOS
from .servers import SERVERS

__all__ = ["SCENARIOS", "SERVERS", "BenchReport", "BenchSettings", "run_bench"]
