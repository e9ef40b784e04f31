"""Every deadline and the stop sequence as plain logic, on a fake clock: no sockets, no
sleeping. (What a socket shows of them is checked per model by `echoplex.testing`.)"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from echoplex import ServerConfig
from echoplex._net import Listeners
from echoplex.deadlines import Step, Timeouts, Watch
from echoplex.events import QuietEvents
from echoplex.lifecycle import Connections, drain
from echoplex.limits import Admission, TimeLimits
from echoplex.outcomes import Outcome
from echoplex.plan import ServerPlan
from echoplex.shutdown import Shutdown


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timeouts(
    proxy_header_s: float | None = None,
    tls_handshake_s: float | None = None,
    **limits: Any,
) -> Timeouts:
    none = {"idle_timeout_s": 0, "send_timeout_s": 0, "max_lifetime_s": 0}
    config = replace(ServerConfig(), **{**none, **limits})
    return Timeouts(proxy_header_s, tls_handshake_s, TimeLimits.from_config(config))


def test_a_silent_connection_runs_out_at_the_idle_timeout() -> None:
    watch, idle = Watch(None, opened_at=0), timeouts(idle_timeout_s=1.0)
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=0.9) is None
    assert watch.next_deadline(idle) == 1.0
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=1.0) == Outcome.IDLE_TIMEOUT


def test_bytes_received_keep_a_connection_from_idling() -> None:
    watch, idle = Watch(None, opened_at=0), timeouts(idle_timeout_s=1.0)
    for step in range(1, 50):  # a byte every 0.9 s: never idle for a whole second
        assert watch.check(idle, bytes_in=step, pending_bytes=0, now=step * 0.9) is None
    assert watch.next_deadline(idle) == pytest.approx(49 * 0.9 + 1.0)


def test_lifetime_ends_a_trickling_connection_counted_from_its_opening() -> None:
    watch, both = Watch(None, opened_at=100.0), timeouts(idle_timeout_s=1.0, max_lifetime_s=5.0)
    outcomes = [
        watch.check(both, bytes_in=step, pending_bytes=0, now=100 + step * 0.9)
        for step in range(1, 7)
    ]
    assert outcomes[-1] == Outcome.LIFETIME and set(outcomes[:-1]) == {None}


def test_send_timeout_counts_only_while_the_client_takes_nothing() -> None:
    watch, both = Watch(None, opened_at=0), timeouts(send_timeout_s=2.0, idle_timeout_s=1.0)
    # The client reads slowly: pending shrinks each look, so no timeout (and no idle either).
    assert watch.check(both, bytes_in=100, pending_bytes=90, now=0.5) is None
    assert watch.check(both, bytes_in=100, pending_bytes=60, now=1.5) is None
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=3.0) is None
    assert watch.next_deadline(both) == 5.0
    # Then it stops reading altogether.
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=4.9) is None
    assert watch.check(both, bytes_in=100, pending_bytes=30, now=5.0) == Outcome.SEND_TIMEOUT


@pytest.mark.parametrize(
    ("step", "outcome"),
    [
        (Step.PROXY_HEADER, Outcome.PROXY_HEADER_TIMEOUT),
        (Step.TLS_HANDSHAKE, Outcome.TLS_HANDSHAKE_TIMEOUT),
    ],
)
def test_a_step_deadline_counts_from_the_start_of_its_step(step: Step, outcome: Outcome) -> None:
    steps = timeouts(proxy_header_s=2.0, tls_handshake_s=2.0, idle_timeout_s=0.5)
    watch = Watch(None, opened_at=0)
    watch.enter(step, now=1.0)
    # The idle limit does not apply before the echo: only the step's own deadline does.
    assert watch.check(steps, bytes_in=0, pending_bytes=0, now=2.9) is None
    assert watch.next_deadline(steps) == 3.0
    assert watch.check(steps, bytes_in=0, pending_bytes=0, now=3.0) == outcome


def test_the_idle_clock_starts_when_the_echo_does() -> None:
    idle = timeouts(tls_handshake_s=10.0, idle_timeout_s=1.0)
    watch = Watch(None, opened_at=0)
    watch.enter(Step.TLS_HANDSHAKE, now=0)
    watch.enter(Step.ECHO, now=5.0)  # a slow handshake is not silence
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=5.9) is None
    assert watch.check(idle, bytes_in=0, pending_bytes=0, now=6.0) == Outcome.IDLE_TIMEOUT


def test_no_deadlines_means_no_sweep() -> None:
    none = timeouts()
    assert none.look_every_s is None
    assert Watch(None, 0).check(none, bytes_in=0, pending_bytes=10, now=1e9) is None


def test_looks_come_a_quarter_of_the_shortest_deadline_apart_within_bounds() -> None:
    assert timeouts(idle_timeout_s=2.0, send_timeout_s=30.0).look_every_s == 0.5
    assert timeouts(idle_timeout_s=300.0).look_every_s == 1.0  # at least once a second
    assert timeouts(max_lifetime_s=0.001).look_every_s == 0.01  # not a busy loop
    assert timeouts(proxy_header_s=5.0, tls_handshake_s=0.4).look_every_s == 0.1


def plan(**settings: Any) -> ServerPlan:
    config = replace(ServerConfig(), **settings)
    return ServerPlan(
        config=config,
        loop=None,
        tls=None,
        tls_handshake_s=None,
        trusted_proxies=[],
        proxy_header_s=None,
        limits=TimeLimits.from_config(config),
        admission=Admission.from_config(config),
        drain_timeout_s=config.drain_timeout_s,
        chunk_bytes=config.recv_bytes,
        per_process_hosts=(),
        port=0,
        listeners=Listeners([]),
    )


class Handles:
    """The driver side, faked: handles are names, and a cut-off is written down."""

    def __init__(self, clock: FakeClock, **settings: Any) -> None:
        self.cut: list[str] = []
        self.clock = clock
        self.connections: Connections[str] = Connections(
            plan(**settings), QuietEvents(), self.cut.append, Admission(0, 0), clock=clock
        )

    def open(self, name: str) -> Any:
        record = self.connections.admitted(("127.0.0.1", 1), name)
        assert list(self.connections.steps(record)) == [Step.ECHO]
        return record

    def close(self, record: Any) -> None:
        self.connections.closed(record, lambda: None)


def test_the_sweep_cuts_off_what_ran_out_and_says_when_to_look_again() -> None:
    clock = FakeClock()
    driver = Handles(clock, idle_timeout_s=2.0, send_timeout_s=0, max_lifetime_s=0)
    quiet, busy = driver.open("quiet"), driver.open("busy")
    assert driver.connections.sweep() == 0.5  # a quarter of the idle timeout
    clock.now += 1.5
    busy.bytes_in = busy.bytes_out = 10  # it echoed: its idle clock starts again
    assert driver.connections.sweep() == 0.5
    clock.now += 0.5
    assert driver.connections.sweep() == 0.5
    assert driver.cut == ["quiet"] and quiet.outcome == Outcome.IDLE_TIMEOUT
    assert busy.outcome is None
    clock.now += 0.5
    driver.connections.sweep()  # ending already: not cut off twice
    assert driver.cut == ["quiet"]


def test_the_sweep_wakes_for_a_deadline_sooner_than_the_next_look() -> None:
    clock = FakeClock()
    driver = Handles(clock, idle_timeout_s=300.0, send_timeout_s=0, max_lifetime_s=2.25)
    driver.open("short-lived")
    clock.now += 2.0
    assert driver.connections.sweep() == 0.25  # the lifetime's end, not a second on
    clock.now += 0.25
    driver.connections.sweep()
    assert driver.cut == ["short-lived"]


def test_drain_waits_until_closed_and_cuts_off_nothing() -> None:
    clock, open_now = FakeClock(), [2]
    cut_off: list[int] = []
    waits = drain(lambda: open_now[0], lambda: cut_off.append(1), lambda: 110.0, clock)
    assert next(waits) == 10.0
    clock.now += 4
    open_now[0] = 0
    assert list(waits) == [] and cut_off == []


def test_drain_cuts_off_at_the_deadline_then_waits_a_bounded_grace() -> None:
    clock = FakeClock()
    cut_off: list[int] = []
    waits = drain(lambda: 1, lambda: cut_off.append(1), lambda: 101.0, clock, grace_s=0.5)
    assert next(waits) == 1.0
    clock.now = 101.0
    assert next(waits) == 0.5 and cut_off == [1]  # cut off, then the grace
    clock.now += 0.5
    assert list(waits) == []  # the grace is over: give up on them


def test_a_second_stop_request_ends_the_drain_at_once() -> None:
    clock = FakeClock()
    driver = Handles(clock, drain_timeout_s=30.0)
    record = driver.open("slow")
    shutdown = Shutdown(clock=clock)
    stopped_listening: list[bool] = []
    try:
        shutdown.request()
        waits = driver.connections.stopping(shutdown, lambda: stopped_listening.append(True))
        assert next(waits) == 30.0 and stopped_listening == [True]
        clock.now += 1
        shutdown.request()  # "stop now"
        assert next(waits) == 1.0  # the grace, after the cut-off
        assert driver.cut == ["slow"] and record.outcome == Outcome.DRAINED
        driver.close(record)
        assert list(waits) == []
    finally:
        shutdown.close()
