"""The limits as plain logic, on a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

import pytest

from echoplex import ServerConfig
from echoplex._throttle import Throttle
from echoplex.limits import (
    OVER_MAX_CONNECTIONS,
    OVER_MAX_PER_IP,
    Admission,
    Deadlines,
    ProgressWatch,
    TimeLimits,
)
from echoplex.outcomes import Outcome


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admission_counts_overall_and_per_address() -> None:
    admission = Admission(max_connections=3, max_per_ip=2)
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") == OVER_MAX_PER_IP
    assert admission.admit("10.0.0.2") is None
    assert admission.admit("10.0.0.3") == OVER_MAX_CONNECTIONS
    admission.release("10.0.0.1")
    assert admission.admit("10.0.0.3") is None
    assert admission.open == 3


def test_zero_means_no_limit() -> None:
    admission = Admission(max_connections=0, max_per_ip=0)
    assert all(admission.admit("10.0.0.1") is None for _ in range(10_000))


def config(**limits: Any) -> ServerConfig:
    none = {"idle_timeout_s": 0, "send_timeout_s": 0, "max_lifetime_s": 0}
    return replace(ServerConfig(), **{**none, **limits})


def test_deadlines_without_limits_block_forever() -> None:
    deadlines = Deadlines(limits(), opened_at=0)
    assert deadlines.for_read().timeout_s is None
    assert deadlines.for_send().timeout_s is None


def test_lifetime_shortens_the_idle_and_send_waits() -> None:
    clock = FakeClock()
    deadlines = Deadlines(
        limits(idle_timeout_s=10, send_timeout_s=5, max_lifetime_s=30),
        opened_at=clock.now,
        clock=clock,
    )
    assert (
        deadlines.for_read().timeout_s == 10
        and deadlines.for_read().outcome == Outcome.IDLE_TIMEOUT
    )
    assert (
        deadlines.for_send().timeout_s == 5 and deadlines.for_send().outcome == Outcome.SEND_TIMEOUT
    )
    clock.now += 27
    assert deadlines.for_read().timeout_s == pytest.approx(3)
    assert deadlines.for_read().outcome == Outcome.LIFETIME
    clock.now += 10
    assert deadlines.for_send().timeout_s == 0


def limits(**config_limits: Any) -> TimeLimits:
    return TimeLimits.from_config(config(**config_limits))


def test_watch_ends_a_silent_connection_after_the_idle_timeout() -> None:
    watch, idle = ProgressWatch(opened_at=0), limits(idle_timeout_s=1.0)
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=0.9) is None
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=1.0) == Outcome.IDLE_TIMEOUT


def test_watch_keeps_a_connection_that_receives_bytes() -> None:
    watch, idle = ProgressWatch(opened_at=0), limits(idle_timeout_s=1.0)
    for step in range(1, 50):  # a byte every 0.9 s: never idle for a whole second
        assert watch.check(idle, bytes_in=step, pending_bytes=0, now=step * 0.9) is None


def test_lifetime_ends_a_trickling_connection() -> None:
    watch, both = ProgressWatch(opened_at=0), limits(idle_timeout_s=1.0, max_lifetime_s=5.0)
    outcomes = [
        watch.check(both, bytes_in=step, pending_bytes=0, now=step * 0.9) for step in range(1, 7)
    ]
    assert outcomes[-1] == Outcome.LIFETIME and set(outcomes[:-1]) == {None}


def test_lifetime_counts_from_when_the_connection_opened() -> None:
    watch, lifetime = ProgressWatch(opened_at=100.0), limits(max_lifetime_s=5.0)
    assert watch.check(lifetime, bytes_in=1, pending_bytes=0, now=104.9) is None
    assert watch.check(lifetime, bytes_in=2, pending_bytes=0, now=105.0) == Outcome.LIFETIME


def test_sweep_limits_without_limits_enforce_nothing() -> None:
    none = limits()
    assert none.sweep_interval_s() is None and limits(send_timeout_s=1.0).sweep_interval_s()
    watch = ProgressWatch(opened_at=0)
    assert watch.check(none, bytes_in=0, pending_bytes=10, now=1e9) is None


def test_send_timeout_counts_only_while_the_client_takes_nothing() -> None:
    watch, both = ProgressWatch(opened_at=0), limits(send_timeout_s=2.0, idle_timeout_s=1.0)
    # The client reads slowly: pending shrinks each sweep, so no timeout (and no idle either).
    assert watch.check(both, bytes_in=100, pending_bytes=90, now=0.5) is None
    assert watch.check(both, bytes_in=100, pending_bytes=60, now=1.5) is None
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=3.0) is None
    # Then it stops reading altogether.
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=4.9) is None
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=5.0) == Outcome.SEND_TIMEOUT


def test_throttle_lets_one_message_a_second_through_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("echoplex._throttle.time.monotonic", clock)
    throttle = Throttle(interval_s=1.0)
    assert throttle.allow("x") == 0
    assert [throttle.allow("x") for _ in range(5)] == [None] * 5
    assert throttle.allow("y") == 0  # keys are independent
    clock.now += 1.0
    assert throttle.allow("x") == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"max_connections": -1},
        {"max_per_ip": -1},
        {"idle_timeout_s": -1},
        {"send_timeout_s": float("nan")},
        {"max_buffer_bytes": 0},
    ],
)
def test_config_rejects_negative_limits(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(ServerConfig(), **bad)


def test_a_sweep_looks_a_quarter_of_the_shortest_limit_apart_within_bounds() -> None:
    assert limits(idle_timeout_s=2.0, send_timeout_s=30.0).sweep_interval_s() == 0.5
    assert limits(idle_timeout_s=300.0).sweep_interval_s() == 1.0  # at least once a second
    assert limits(max_lifetime_s=0.001).sweep_interval_s() == 0.01  # not a busy loop
    # Handshake deadlines count too, with no limit of the connection's own.
    assert limits().sweep_interval_s(5.0, 0.4) == 0.1


def test_the_behaviour_document_lists_every_outcome() -> None:
    from pathlib import Path

    from echoplex.outcomes import Outcome

    document = (Path(__file__).parent.parent / "docs" / "server-behavior.md").read_text()
    for outcome in Outcome:
        assert f"| `{outcome}" in document, f"docs/server-behavior.md does not list {outcome}"


def test_exceptions_map_to_outcomes_in_one_place() -> None:
    import ssl

    from echoplex.outcomes import Outcome, label, outcome_of

    assert outcome_of(None) == (Outcome.CLOSED, None)
    assert outcome_of(ssl.SSLEOFError()) == (Outcome.CLOSED, None)
    assert outcome_of(ssl.SSLError(1, "bad record mac")) == (Outcome.ERROR, "tls")
    assert outcome_of(ConnectionResetError()) == (Outcome.RESET, None)
    assert outcome_of(BrokenPipeError()) == (Outcome.RESET, None)
    assert outcome_of(OSError(errno.ETIMEDOUT, "timed out")) == (Outcome.ERROR, "ETIMEDOUT")
    assert outcome_of(RuntimeError("?")) == (Outcome.ERROR, "RuntimeError")
    assert label(Outcome.ERROR, "EPIPE") == "error:EPIPE" and label(Outcome.DRAINED) == "drained"
    assert Outcome.RESET.is_error and not Outcome.IDLE_TIMEOUT.is_error
