"""One run's figures from the shares it was spread over (`echoplex.load.processes`).

Every count is a sum, and latencies merge exactly: each share sends its histograms
`encode()`d, and the merged histogram is their `add` (`echoplex.stats`), bucket by
bucket, with the exact count, sum, minimum and maximum beside it. Percentiles of the
merged run are then read from one histogram, never averaged from the shares'
percentiles (which would be wrong).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..stats import EncodedHistogram, LatencyHistogram, LatencySummary
from .config import LoadConfig
from .result import MAX_SAMPLES, LoadResult


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
    # The shares connect at once, each timed on the one clock they share.
    total.connect_start_ns = min(part.connect_start_ns for part in parts)
    total.connect_end_ns = max(part.connect_end_ns for part in parts)
    total.client_cpu_s = sum(part.client_cpu_s for part in parts)
    total.interrupted = any(part.interrupted for part in parts)
    total.unfinished = sum(part.unfinished for part in parts)
    total.echoed_total = sum(part.echoed_total for part in parts)
    total.sending_s = max(part.sending_s for part in parts)
    return total


def _merged_summary(histograms: Iterable[EncodedHistogram]) -> LatencySummary:
    merged = LatencyHistogram()
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
