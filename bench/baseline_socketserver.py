"""Moved into the package: echoplex/bench/baselines/socketserver_echo.py.

This path still runs it (python bench/baseline_socketserver.py PORT), for commands written
before the move.
"""

import runpy
import sys
from pathlib import Path

sys.argv = [sys.argv[0], *sys.argv[1:2]]
runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "echoplex/bench/baselines/socketserver_echo.py"),
    run_name="__main__",
)
