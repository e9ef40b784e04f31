"""The latency summary: known values in, known percentiles out."""

from __future__ import annotations

import sys

import pytest

from echoplex.errors import StartupError
from echoplex.stats import LatencyHistogram, LatencySummary, require_hdrh


def test_one_to_a_thousand() -> None:
    histogram = LatencyHistogram()
    for value in range(1, 1001):
        histogram.record(value)
    assert histogram.summary() == LatencySummary(
        count=1000, min=1, mean=500.5, p50=500, p90=900, p99=990, p999=999, max=1000
    )


def test_counts_are_the_same_as_recording_each_value() -> None:
    one_by_one, counted = LatencyHistogram(), LatencyHistogram()
    counts = {40: 900, 80: 90, 400: 9, 25_000: 1}
    for value, count in counts.items():
        for _ in range(count):
            one_by_one.record(value)
    counted.record_counts(counts)
    assert counted.summary() == one_by_one.summary()
    summary = counted.summary()
    assert (summary.p50, summary.p90, summary.p99, summary.max) == (40, 40, 80, 25_000)
    assert summary.p999 == 400


def test_histograms_added_from_their_encoding_are_one_histogram_of_every_value() -> None:
    # What a run spread over processes does: each encodes its own, one adds them all.
    shares = [{40: 900, 80: 90}, {400: 9, 25_000: 1}, {}, {7: 3}]
    whole, merged = LatencyHistogram(), LatencyHistogram()
    for counts in shares:
        whole.record_counts(counts)
        share = LatencyHistogram()
        share.record_counts(counts)
        merged.add(share.encode())
    assert merged.summary() == whole.summary()
    assert (merged.count, merged.total_us, merged.min_us, merged.max_us) == (
        whole.count,
        whole.total_us,
        7,
        25_000,
    )


def test_large_values_stay_within_the_histogram_precision() -> None:
    histogram = LatencyHistogram()
    histogram.record(1_234_567)
    histogram.record(7)
    summary = histogram.summary()
    assert summary.max == 1_234_567  # exact, not the bucket's upper edge
    assert summary.p50 == 7
    assert histogram.percentile(100) == 1_234_567
    assert abs(histogram.percentile(99.9) - 1_234_567) <= 1_234_567 * 0.001


def test_out_of_range_values_are_clamped_not_lost() -> None:
    histogram = LatencyHistogram(highest_us=10_000)
    histogram.record(-5)
    histogram.record(10**9)
    summary = histogram.summary()
    assert (summary.count, summary.min, summary.max) == (2, 0, 10_000)


def test_nothing_recorded_is_all_zero() -> None:
    summary = LatencyHistogram().summary()
    assert summary == LatencySummary()
    assert summary.to_dict() == {
        "count": 0,
        "min": 0,
        "mean": 0.0,
        "p50": 0,
        "p90": 0,
        "p99": 0,
        "p999": 0,
        "max": 0,
    }


def test_without_hdrhistogram_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "hdrh", None)
    with pytest.raises(StartupError, match=r"pip install 'echoplex\[load\]'"):
        require_hdrh()
