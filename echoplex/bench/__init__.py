"""`echoplex bench`: every concurrency model (and reference servers) under the same load.

scenarios.py   the named load points (concurrency sweep, targets, multicore, sizes, ...)
servers.py     the servers compared, and starting/stopping one on a free port
loadgen.py     driving a server with `echoplex load` as a subprocess
proctree.py    server CPU and memory, summed over its process tree, from /proc
runner.py      the loop: points x repeats x servers in turn, pinned to CPUs
results.py     medians over repeats and ratios to the reference server
report.py      results.json and results.md
charts.py      PNG charts (matplotlib, imported only to draw them)
"""

from .runner import BenchReport, BenchSettings, run_bench
from .scenarios import SCENARIOS
from .servers import SERVERS

__all__ = ["SCENARIOS", "SERVERS", "BenchReport", "BenchSettings", "run_bench"]
