"""`echoplex load`: a load generator that verifies every echoed byte and never lies.

    from echoplex.load import LoadConfig, run
    result = run(LoadConfig(port=12345, pattern="pingpong", connections=50, duration_s=5))

Modules: `config` (the one LoadConfig), `connections` (a verifying asyncio Protocol
per pattern), `engine` (connect, drive, watch, tally), `result` (the figures),
`report` (progress line, summary, JSON). Payloads come from `echoplex.payload`,
latency percentiles from `echoplex.stats`.
"""

from .config import PATTERNS, LoadConfig
from .engine import LoadError, Progress, run
from .result import ConnectionFailure, LoadResult

__all__ = [
    "PATTERNS",
    "ConnectionFailure",
    "LoadConfig",
    "LoadError",
    "LoadResult",
    "Progress",
    "run",
]
