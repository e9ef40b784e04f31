"""`echoplex load`: a load generator that verifies every echoed byte and never lies.

    from echoplex.load import LoadConfig, run
    result = run(LoadConfig(port=12345, pattern="pingpong", connections=50, duration_s=5))

Modules: `config` (the one LoadConfig), `patterns` (the registry of traffic patterns,
a class each), `transport` (how a connection reaches the server: TCP, Unix socket, TLS,
PROXY header, UDP), `connections` (a verifying asyncio Protocol per pattern),
`datagrams` (the same over UDP, a datagram at a time), `engine` (connect, drive, watch,
tally, in one process), `processes` (`run`: one process, or the connections spread over
several), `merge` (their figures and histograms as one), `timer` (sub-millisecond
schedule for `rate`), `result` (the figures), `report` (progress line, summary, JSON).
Payloads come from `echoplex.payload`, latency percentiles from `echoplex.stats`.

The engine is imported on first use of its names: every `echoplex` command builds
the `load` parser (which needs only `config`), and most never run a load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import LoadConfig
from .patterns import PATTERNS, Pattern

if TYPE_CHECKING:
    from .engine import LoadError, Progress
    from .processes import run
    from .result import ConnectionFailure, LoadResult

_LAZY = {
    "LoadError": "engine",
    "Progress": "engine",
    "run": "processes",
    "ConnectionFailure": "result",
    "LoadResult": "result",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PATTERNS",
    "ConnectionFailure",
    "LoadConfig",
    "LoadError",
    "LoadResult",
    "Pattern",
    "Progress",
    "run",
]
