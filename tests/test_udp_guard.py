"""The UDP reflection guard as pure logic: every reason, token buckets on a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echoplex.udp_guard import (
    BAD_ADDRESS,
    BROADCAST,
    MAX_PAYLOAD_IPV4_BYTES,
    MAX_PAYLOAD_IPV6_BYTES,
    MULTICAST,
    OVERSIZE,
    RATE_SOURCE,
    RATE_TOTAL,
    RESERVED_PORT,
    SOURCES_FULL,
    UNSPECIFIED,
    ReflectionGuard,
    burst_for,
    classify_host,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unlimited() -> ReflectionGuard:
    return ReflectionGuard(rate_per_source=0, rate_total=0)


@pytest.mark.parametrize(
    ("host", "port", "reason"),
    [
        ("192.0.2.1", 40000, None),
        ("2001:db8::1", 40000, None),
        ("fe80::1%lo", 40000, None),
        ("192.0.2.1", 7, RESERVED_PORT),  # echo
        ("192.0.2.1", 9, RESERVED_PORT),  # discard
        ("192.0.2.1", 13, RESERVED_PORT),  # daytime
        ("192.0.2.1", 17, RESERVED_PORT),  # qotd
        ("192.0.2.1", 19, RESERVED_PORT),  # chargen
        ("192.0.2.1", 37, RESERVED_PORT),  # time
        ("192.0.2.1", 0, RESERVED_PORT),  # no reply port
        ("2001:db8::1", 19, RESERVED_PORT),
        ("192.0.2.1", 8, None),
        ("192.0.2.1", 53, None),
        ("255.255.255.255", 40000, BROADCAST),
        ("224.0.0.1", 40000, MULTICAST),
        ("239.255.255.250", 1900, MULTICAST),
        ("ff02::1", 40000, MULTICAST),
        ("0.0.0.0", 40000, UNSPECIFIED),
        ("::", 40000, UNSPECIFIED),
        ("not-an-address", 40000, BAD_ADDRESS),
    ],
)
def test_address_verdict(host: str, port: int, reason: str | None) -> None:
    assert unlimited().verdict((host, port), now=0.0) == reason


@pytest.mark.parametrize(
    ("mapped", "reason"),
    [
        ("::ffff:192.0.2.1", None),
        ("::ffff:255.255.255.255", BROADCAST),
        ("::ffff:224.0.0.251", MULTICAST),
        ("::ffff:0.0.0.0", UNSPECIFIED),
    ],
)
def test_ipv4_mapped_sources_are_checked_as_ipv4(mapped: str, reason: str | None) -> None:
    # A dual-stack socket reports IPv4 clients in this form, with a 4-tuple address.
    assert unlimited().verdict((mapped, 40000, 0, 0), now=0.0) == reason
    assert classify_host(mapped).key == classify_host(mapped.removeprefix("::ffff:")).key
    assert classify_host(mapped).max_payload_bytes == MAX_PAYLOAD_IPV4_BYTES


def test_reserved_ports_of_mapped_sources() -> None:
    assert unlimited().verdict(("::ffff:192.0.2.1", 19, 0, 0), now=0.0) == RESERVED_PORT


def test_oversize_is_per_family() -> None:
    guard = unlimited()
    assert guard.verdict(("192.0.2.1", 5000), 0.0, size=MAX_PAYLOAD_IPV4_BYTES) is None
    assert guard.verdict(("192.0.2.1", 5000), 0.0, size=MAX_PAYLOAD_IPV4_BYTES + 1) == OVERSIZE
    assert guard.verdict(("::ffff:192.0.2.1", 5000, 0, 0), 0.0, size=65_508) == OVERSIZE
    assert guard.verdict(("2001:db8::1", 5000, 0, 0), 0.0, size=MAX_PAYLOAD_IPV6_BYTES) is None
    assert guard.verdict(("2001:db8::1", 5000, 0, 0), 0.0, size=65_528) == OVERSIZE
    assert guard.verdict(("192.0.2.1", 5000), 0.0, size=0) is None


def test_source_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=10, rate_total=0, clock=clock)
    source = ("192.0.2.1", 5000)
    answered = [guard.verdict(source) for _ in range(25)]
    assert answered.count(None) == burst_for(10) == 20
    assert answered[20:] == [RATE_SOURCE] * 5
    clock.now += 0.25  # 2.5 tokens back
    assert [guard.verdict(source) for _ in range(3)] == [None, None, RATE_SOURCE]
    clock.now += 3600  # refills to the burst, no further
    assert [guard.verdict(source) for _ in range(21)].count(None) == 20


def test_sources_have_buckets_of_their_own() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=1, rate_total=0, clock=clock)
    # Burst 2 each; the port does not make another source.
    assert [guard.verdict(("192.0.2.1", p)) for p in (1000, 1001, 1002)] == [
        None,
        None,
        RATE_SOURCE,
    ]
    assert guard.verdict(("192.0.2.2", 1000)) is None


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    guard = ReflectionGuard(rate_per_source=1, rate_total=0, clock=FakeClock())
    same_64 = ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::3"]
    assert [guard.verdict((host, 5000, 0, 0)) for host in same_64] == [None, None, RATE_SOURCE]
    assert guard.verdict(("2001:db8:0:2::1", 5000, 0, 0)) is None


def test_total_bucket_caps_all_sources_together() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=0, rate_total=5, clock=clock)
    verdicts = [guard.verdict((f"192.0.2.{i}", 5000)) for i in range(1, 21)]
    assert verdicts.count(None) == 10
    assert verdicts[10:] == [RATE_TOTAL] * 10
    clock.now += 1.0
    assert [guard.verdict(("198.51.100.1", 5000)) for _ in range(6)].count(None) == 5


def test_a_source_over_its_rate_does_not_use_up_the_total() -> None:
    guard = ReflectionGuard(rate_per_source=1, rate_total=2, clock=FakeClock())  # bursts 2, 4
    flooder, other = ("192.0.2.1", 5000), ("192.0.2.2", 5000)
    assert [guard.verdict(flooder) for _ in range(50)].count(None) == 2
    assert [guard.verdict(other) for _ in range(2)] == [None, None]
    assert guard.verdict(("192.0.2.3", 5000)) == RATE_TOTAL


def test_a_clock_stepping_back_gives_no_tokens() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=1, rate_total=0, clock=clock)
    source = ("192.0.2.1", 5000)
    assert [guard.verdict(source) for _ in range(3)] == [None, None, RATE_SOURCE]
    clock.now -= 100
    assert guard.verdict(source) == RATE_SOURCE
    clock.now += 100.5  # back to where it was, and half a token
    assert guard.verdict(source) == RATE_SOURCE
    clock.now += 0.5
    assert guard.verdict(source) is None


def test_source_table_is_bounded_and_forgets_refilled_buckets() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=1, rate_total=0, max_sources=3, clock=clock)
    for i in range(3):
        assert guard.verdict((f"192.0.2.{i}", 5000)) is None
    assert guard.tracked_sources == 3
    # Full of buckets still refilling: a new source cannot push one out (that would
    # hand the pushed-out source a fresh burst).
    assert guard.verdict(("192.0.2.9", 5000)) == SOURCES_FULL
    assert guard.tracked_sources == 3
    clock.now += 1.0  # all three refilled (one token was spent, one second at 1/s)
    assert guard.verdict(("192.0.2.9", 5000)) is None
    assert guard.tracked_sources <= 3
    clock.now += 10
    guard.verdict(("192.0.2.9", 5000))
    assert guard.tracked_sources == 1  # idle buckets are forgotten as traffic goes on


def test_new_sources_get_no_bucket_while_the_total_is_spent() -> None:
    guard = ReflectionGuard(rate_per_source=1, rate_total=1, max_sources=100, clock=FakeClock())
    verdicts = [guard.verdict((f"192.0.2.{i}", 5000)) for i in range(50)]
    assert verdicts.count(None) == 2
    assert guard.tracked_sources == 2


def test_an_evicted_bucket_comes_back_as_it_left() -> None:
    clock = FakeClock()
    guard = ReflectionGuard(rate_per_source=1, rate_total=0, max_sources=1, clock=clock)
    victim = ("192.0.2.1", 5000)
    assert [guard.verdict(victim) for _ in range(3)] == [None, None, RATE_SOURCE]
    for i in range(10):  # a flood of other sources cannot reset the victim's bucket
        assert guard.verdict((f"198.51.100.{i}", 5000)) == SOURCES_FULL
    assert guard.verdict(victim) == RATE_SOURCE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_per_source": -1},
        {"rate_total": math.nan},
        {"rate_per_source": math.inf},
        {"max_sources": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReflectionGuard(**kwargs)  # type: ignore[arg-type]


def test_small_rates_still_allow_one_datagram() -> None:
    assert burst_for(0.1) == 1.0
    guard = ReflectionGuard(rate_per_source=0.1, rate_total=0, clock=FakeClock())
    assert [guard.verdict(("192.0.2.1", 5000)) for _ in range(2)] == [None, RATE_SOURCE]


# A schedule: (seconds since the previous datagram, which of a few sources sent it).
schedules = st.lists(
    st.tuples(st.floats(min_value=0, max_value=0.5), st.integers(min_value=0, max_value=5)),
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(
    schedule=schedules,
    rate=st.floats(min_value=0.5, max_value=50),
    rate_total=st.sampled_from([0.0, 5.0, 40.0]),
    max_sources=st.integers(min_value=1, max_value=8),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    schedule: list[tuple[float, int]], rate: float, rate_total: float, max_sources: int
) -> None:
    clock = FakeClock()
    start = clock.now
    guard = ReflectionGuard(rate, rate_total, max_sources, clock=clock)
    first_seen: dict[int, float] = {}
    answered: dict[int, int] = {}
    total_answered = 0
    for gap_s, source in schedule:
        clock.now += gap_s
        first_seen.setdefault(source, clock.now)
        if guard.verdict((f"192.0.2.{source}", 40000)) is None:
            answered[source] = answered.get(source, 0) + 1
            total_answered += 1
        assert guard.tracked_sources <= max_sources
    slack = 1e-6
    for source, count in answered.items():
        elapsed = clock.now - first_seen[source]
        assert count <= burst_for(rate) + rate * elapsed + slack
    if rate_total:
        assert total_answered <= burst_for(rate_total) + rate_total * (clock.now - start) + slack
