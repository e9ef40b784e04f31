"""Moved into the package: echoplex/bench/baselines/protocol_echo.py PORT uvloop.

This path still runs it (python bench/baseline_uvloop.py PORT), for commands written
before the move.
"""

import runpy
import sys
from pathlib import Path

sys.argv = [sys.argv[0], *sys.argv[1:2], "uvloop"]
runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "echoplex/bench/baselines/protocol_echo.py"),
    run_name="__main__",
)
