"""Latency statistics for the load generator: an HDR histogram and its summary.

Latencies arrive in whole microseconds. The hot path only counts them in a dict
(`{latency_us: count}`, about 0.08 µs a message) and `LatencyHistogram.record_counts`
folds those counts into the HDR histogram now and then: `HdrHistogram.record_value`
is pure Python, about 0.9 µs a call (CPython 3.11, hdrhistogram 0.10), which would
be a large share of the load generator's own cost per request. Recording a value
with its count is what the histogram would do with each one anyway.

A run spread over processes (`echoplex.load.merge`) merges exactly: each process
hands its histogram over `encode()`d (hdrhistogram's own encoding, compressed counts,
base64, with the exact count, sum, minimum and maximum beside it), and the merged one
`add`s them, bucket by bucket.

`hdrh` (package `hdrhistogram`, extra `echoplex[load]`) is imported only when a
histogram is made, so `echoplex serve` never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import StartupError

HIGHEST_TRACKABLE_US = 3_600_000_000  # one hour; longer latencies are clamped to it
SIGNIFICANT_FIGURES = 3  # values are exact below 2048 µs, within 0.1% above
INSTALL_HINT = "pip install 'echoplex[load]'"
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def require_hdrh() -> Any:
    """The `hdrh.histogram` module, or a StartupError saying how to install it."""
    try:
        from hdrh import histogram
    except ImportError:
        raise StartupError(f"hdrhistogram is not installed: {INSTALL_HINT}") from None
    return histogram


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one run, in microseconds (all 0 when nothing was recorded)."""

    count: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    p999: int = 0
    max: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedHistogram:
    """A latency histogram as one process hands it to another (`LatencyHistogram.encode`)."""

    hdr: bytes
    """hdrhistogram's `encode()`."""
    count: int
    total_us: int
    min_us: int | None
    max_us: int


class LatencyHistogram:
    """Microsecond latencies in an HDR histogram, with the exact minimum and maximum."""

    def __init__(self, highest_us: int = HIGHEST_TRACKABLE_US) -> None:
        self._histogram = require_hdrh().HdrHistogram(1, highest_us, SIGNIFICANT_FIGURES)
        self._highest_us = highest_us
        self.count = 0
        self.total_us = 0  # for an exact mean (the histogram's walks every bucket)
        self.min_us: int | None = None
        self.max_us = 0

    def record(self, value_us: int, count: int = 1) -> None:
        value_us = min(max(value_us, 0), self._highest_us)
        self._histogram.record_value(value_us, count)
        self.count += count
        self.total_us += value_us * count
        self.min_us = value_us if self.min_us is None else min(self.min_us, value_us)
        self.max_us = max(self.max_us, value_us)

    def record_counts(self, counts: Mapping[int, int]) -> None:
        """Record each `{latency_us: how_many}` pair."""
        for value_us, count in counts.items():
            if count > 0:
                self.record(value_us, count)

    def encode(self) -> EncodedHistogram:
        return EncodedHistogram(
            self._histogram.encode(), self.count, self.total_us, self.min_us, self.max_us
        )

    def add(self, other: EncodedHistogram) -> None:
        """Count every value `other` counted, as if recorded here."""
        if not other.count:
            return
        self._histogram.add(require_hdrh().HdrHistogram.decode(other.hdr))
        self.count += other.count
        self.total_us += other.total_us
        if other.min_us is not None:
            self.min_us = other.min_us if self.min_us is None else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, percent: float) -> int:
        value: int = self._histogram.get_value_at_percentile(percent)
        return min(value, self.max_us)

    def summary(self) -> LatencySummary:
        if not self.count:
            return LatencySummary()
        # One pass over the buckets for every percentile, not one pass each.
        by_percent = self._histogram.get_percentile_to_value_dict(list(PERCENTILES.values()))
        # The histogram reports a bucket's highest equivalent value; never above the
        # largest value really seen.
        at = {name: min(int(by_percent[p]), self.max_us) for name, p in PERCENTILES.items()}
        return LatencySummary(
            count=self.count,
            min=self.min_us or 0,
            mean=round(self.total_us / self.count, 1),
            max=self.max_us,
            **at,
        )
