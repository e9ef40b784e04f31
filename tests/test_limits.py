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
)


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
