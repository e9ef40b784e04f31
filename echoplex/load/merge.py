"""One run's figures from the shares it was spread over (`echoplex.load.processes`).

Every count is a sum, and latencies merge exactly: each share sends its HDR histogram
in hdrhistogram's own encoding (compressed counts, base64), and the merged histogram
is their `add`, bucket by bucket; the exact count, sum, minimum and maximum kept beside
it add up too. Percentiles of the merged run are then read from one histogram, never
averaged from the shares' percentiles (which would be wrong).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..stats import LatencyHistogram, LatencySummary, require_hdrh
from .config import LoadConfig
from .result import MAX_SAMPLES, LoadResult


@dataclass(frozen=True)
class EncodedHistogram:
    """A latency histogram as one process hands it to another."""

    hdr: bytes
    """hdrhistogram's `encode()`."""
    count: int
    total_us: int
    min_us: int | None
    max_us: int


class MergeableHistogram(LatencyHistogram):
    """A LatencyHistogram that can be encoded, and can add an encoded one to itself."""

    def encode(self) -> EncodedHistogram:
        return EncodedHistogram(
            self._histogram.encode(), self.count, self.total_us, self.min_us, self.max_us
        )

    def add(self, other: EncodedHistogram) -> None:
        if not other.count:
            return
        self._histogram.add(require_hdrh().HdrHistogram.decode(other.hdr))
        self.count += other.count
        self.total_us += other.total_us
        if other.min_us is not None:
            self.min_us = other.min_us if self.min_us is None else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)


@dataclass(frozen=True)
class ShareResult:
    """What one process of a spread run found: its result, and its histograms whole."""

    result: LoadResult
    latency: EncodedHistogram
    send_lag: EncodedHistogram | None


def merged(config: LoadConfig, shares: Sequence[ShareResult]) -> LoadResult:
    """The result of the run `config` describes, from the results of its shares."""
    parts = [share.result for share in shares]
    total = LoadResult(config, loop=parts[0].loop, shares=parts)
    total.requests = sum(part.requests for part in parts)
    total.latency = _merged_summary(share.latency for share in shares)
    lags = [share.send_lag for share in shares if share.send_lag is not None]
    if lags:
        total.send_lag = _merged_summary(lags)
    # The shares start together (at one start time) and run for the same duration: the
    # longest of their windows is the run's, which errs on the side of fewer requests/s.
    total.measured_s = max(part.measured_s for part in parts)
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors_by_kind)
    total.errors_by_kind = dict(errors)
    total.error_samples = _first_samples(part.error_samples for part in parts)
    total.mismatches = sum(part.mismatches for part in parts)
    total.mismatch_samples = _first_samples(part.mismatch_samples for part in parts)
    if config.udp:
        total.late_datagrams = sum(part.late_datagrams or 0 for part in parts)
    total.connections_opened = sum(part.connections_opened for part in parts)
    total.connections_alive = sum(part.connections_alive for part in parts)
    total.client_cpu_s = sum(part.client_cpu_s for part in parts)
    total.interrupted = any(part.interrupted for part in parts)
    total.unfinished = sum(part.unfinished for part in parts)
    total.echoed_total = sum(part.echoed_total for part in parts)
    total.sending_s = max(part.sending_s for part in parts)
    return total


def _merged_summary(histograms: Iterable[EncodedHistogram]) -> LatencySummary:
    merged = MergeableHistogram()
    for histogram in histograms:
        merged.add(histogram)
    return merged.summary()


class _Sample(Protocol):
    @property
    def connection(self) -> int: ...


Sample = TypeVar("Sample", bound=_Sample)


def _first_samples(groups: Iterable[list[Sample]]) -> list[Sample]:
    """Up to MAX_SAMPLES of the shares' samples, by connection number."""
    every = itertools.chain.from_iterable(groups)
    return sorted(every, key=lambda sample: sample.connection)[:MAX_SAMPLES]
