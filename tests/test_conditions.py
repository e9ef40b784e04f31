"""The conditions on purpose as plain logic, on a fake clock (`now` is a float): what a
connection is told to send when, and when to close, reset, stall or finish; the draws;
the settings as the control API and the CLI give them. No sockets, no sleeping. (What a
client sees of them over a socket is checked per model by `echoplex.testing`.)"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echoplex import ServerConfig
from echoplex.conditions import (
    CLOSE_AFTER,
    CLOSE_DISCARD_S,
    RESET_AFTER,
    Action,
    Close,
    ConditionDraw,
    ConditionError,
    Conditions,
    ConnectionConditions,
    DatagramConditions,
    Finish,
    LiveConditions,
    Reset,
    Send,
    Work,
    reader,
)

BIG_BUFFER = 1 << 20
SUMMED_ROUNDING = 1e-6  # bytes: a paced time is a sum of floats, a little short or over
SETTING_NAMES = [
    "latency",
    "jitter",
    "bandwidth",
    "slice",
    "slice_delay",
    "close_after",
    "reset_after",
    "stall_after",
    "stall_for",
    "slow_close",
    "toxicity",
    "seed",
    "work",
    "drop",
]


def connection(
    conditions: Conditions,
    *,
    seed: int = 1,
    now: float = 0.0,
    max_buffer_bytes: int = BIG_BUFFER,
) -> ConnectionConditions:
    """A connection that gets `conditions` (toxicity aside), opened at `now`."""
    made = conditions.for_connection(ConditionDraw(seed), now, max_buffer_bytes=max_buffer_bytes)
    assert made is not None
    return made


@dataclass
class Run:
    """What a driver did with a connection's conditions: each Send with its time, the
    end (Close, Reset or Finish) with its time, and the most bytes it ever held."""

    sends: list[tuple[float, bytes]] = field(default_factory=list)
    end: tuple[float, Action] | None = None
    most_held: int = 0

    @property
    def echo(self) -> bytes:
        return b"".join(data for _, data in self.sends)


def drive(
    conditions: ConnectionConditions,
    arrivals: Iterable[tuple[float, bytes]],
    *,
    eof_at: float | None = None,
    start: float = 0.0,
    until: float = 1e6,
    late: random.Random | None = None,
    most_late_s: float = 0.0,
    eager: bool = False,
) -> Run:
    """Drive `conditions` as the drivers do, on a fake clock: at each step do what `due`
    says, then read the next chunk (or the EOF) if `may_read` allows and it has come
    (the kernel keeps it meanwhile), else wait for `next_at`. Stops at the end, or when
    nothing more will happen before `until`.

    `late` makes each timer wake up to `most_late_s` late, as a busy loop's timers do;
    `eager` reads whatever `may_read` says, as an event loop may deliver a chunk after
    it paused reading."""
    pending = deque(sorted(arrivals, key=lambda arrival: arrival[0]))
    run, now, eof_read = Run(), start, False
    for _ in range(100_000):
        for action in conditions.due(now):
            if isinstance(action, Send):
                run.sends.append((now, action.data))
            else:
                run.end = (now, action)
                return run
        read_at = math.inf
        if eager or conditions.may_read(now):
            if pending:
                read_at = pending[0][0]
            elif eof_at is not None and not eof_read:
                read_at = eof_at
        wake = conditions.next_at()
        wake_at = math.inf if wake is None else wake
        if late is not None:
            wake_at += late.uniform(0, most_late_s)
        step_at = min(read_at, wake_at)
        if step_at > until:
            return run
        now = max(now, step_at)
        if read_at <= wake_at:
            if pending:
                conditions.received(pending.popleft()[1], now)
            else:
                conditions.eof(now)
                eof_read = True
        run.most_held = max(run.most_held, conditions.held)
    raise AssertionError("the conditions never settled: next_at kept asking for nothing")


def sent_by(run: Run, moment: float) -> int:
    return sum(len(data) for at, data in run.sends if at <= moment)


def first_sent_at(run: Run, arrivals: list[tuple[float, bytes]]) -> list[float]:
    """When the first byte of each chunk of `arrivals` was sent (chunks that leave the
    line together go in one Send)."""
    byte_times = [at for at, data in run.sends for _ in data]
    starts, offset = [], 0
    for _, chunk in arrivals:
        starts.append(byte_times[offset])
        offset += len(chunk)
    return starts


# ---------------------------------------------------------------- latency and jitter


def test_latency_is_a_delay_line_not_a_stall() -> None:
    """10 pipelined chunks come back about `latency` after each arrived, not 10 x."""
    arrivals = [(i / 100, bytes([65 + i]) * 3) for i in range(10)]
    run = drive(connection(Conditions(latency_s=0.5)), arrivals)
    assert [data for _, data in run.sends] == [chunk for _, chunk in arrivals]
    for (arrived, _), (sent, _) in zip(arrivals, run.sends, strict=True):
        assert sent == pytest.approx(arrived + 0.5)
    assert run.sends[-1][0] < 0.6


def test_reading_goes_on_while_the_line_holds_chunks() -> None:
    conditions = connection(Conditions(latency_s=1.0))
    conditions.received(b"one", 0.0)
    assert conditions.due(0.0) == []
    assert conditions.may_read(0.0)
    assert conditions.next_at() == 1.0
    conditions.received(b"two", 0.5)
    assert conditions.due(0.99) == []
    assert conditions.due(1.0) == [Send(b"one")]
    assert conditions.next_at() == 1.5
    assert conditions.due(1.5) == [Send(b"two")]
    assert conditions.next_at() is None


def test_jitter_stays_within_its_range_and_keeps_the_order() -> None:
    arrivals = [(i / 1000, i.to_bytes(2, "big")) for i in range(300)]
    run = drive(connection(Conditions(latency_s=0.1, jitter_s=0.05), seed=3), arrivals)
    assert run.echo == b"".join(chunk for _, chunk in arrivals)
    sent = first_sent_at(run, arrivals)
    assert sent == sorted(sent)  # never before the chunk ahead
    delays = [at - arrived for (arrived, _), at in zip(arrivals, sent, strict=True)]
    assert all(0.05 - 1e-9 <= delay <= 0.15 + 1e-9 for delay in delays)
    assert len({round(delay, 6) for delay in delays}) > 10  # it does vary


def test_jitter_above_the_latency_never_makes_a_negative_delay() -> None:
    arrivals = [(i / 10, bytes([i])) for i in range(200)]
    run = drive(connection(Conditions(latency_s=0.01, jitter_s=0.5), seed=9), arrivals)
    assert run.echo == bytes(range(200))
    sent = first_sent_at(run, arrivals)
    for (arrived, _), at in zip(arrivals, sent, strict=True):
        assert arrived <= at <= arrived + 0.51
    assert sent == sorted(sent)


def test_a_chunk_is_never_due_before_it_arrived() -> None:
    conditions = connection(Conditions(latency_s=0.01, jitter_s=0.5), seed=2)
    for i in range(200):
        conditions.received(b"x", float(i))
        due_at = conditions.next_at()
        assert due_at is not None and i <= due_at <= i + 0.51
        assert conditions.due(due_at) == [Send(b"x")]


def test_jitter_alone_delays_and_zero_latency_sends_at_once() -> None:
    assert connection(Conditions(jitter_s=0.2)).conditions.tcp
    at_once = connection(Conditions(slow_close_s=1.0))
    at_once.received(b"now", 5.0)
    assert at_once.due(5.0) == [Send(b"now")]


# ---------------------------------------------------------------- draws


def drawn(seed: int | None, toxicity: float, count: int) -> list[float | None]:
    """For each of `count` connections, its first jitter draw, or None if left out."""
    draw = ConditionDraw(seed)
    results: list[float | None] = []
    for _ in range(count):
        rng = draw.draw(toxicity)
        results.append(None if rng is None else rng.random())
    return results


def test_the_same_seed_draws_the_same_connections() -> None:
    assert drawn(42, 0.5, 50) == drawn(42, 0.5, 50)
    assert drawn(42, 0.5, 50) != drawn(43, 0.5, 50)
    assert ConditionDraw(42, stream=1).draw(1.0).random() != (  # type: ignore[union-attr]
        ConditionDraw(42, stream=2).draw(1.0).random()  # type: ignore[union-attr]
    )


def test_toxicity_is_the_share_of_connections_drawn() -> None:
    assert drawn(5, 0.0, 200) == [None] * 200
    assert None not in drawn(5, 1.0, 200)
    chosen = sum(result is not None for result in drawn(5, 0.5, 2000))
    assert 900 <= chosen <= 1100


def test_toxicity_through_for_connection() -> None:
    conditions = Conditions(latency_s=0.1, toxicity=0.25)
    draw = ConditionDraw(11)
    got = [conditions.for_connection(draw, 0.0, max_buffer_bytes=10) for _ in range(2000)]
    assert 400 <= sum(made is not None for made in got) <= 600


def test_one_connections_luck_does_not_shift_the_next_ones_draws() -> None:
    lucky, unlucky = ConditionDraw(8), ConditionDraw(8)
    assert unlucky.draw(0.0) is None
    assert lucky.draw(1.0) is not None
    after_lucky, after_unlucky = lucky.draw(1.0), unlucky.draw(1.0)
    assert after_lucky is not None and after_unlucky is not None
    assert after_lucky.random() == after_unlucky.random()


def test_one_connections_jitter_does_not_shift_the_next_ones() -> None:
    """Each connection draws its jitter from its own generator."""
    conditions = Conditions(latency_s=0.1, jitter_s=0.1)
    busy_draw, idle_draw = ConditionDraw(4), ConditionDraw(4)
    busy = conditions.for_connection(busy_draw, 0.0, max_buffer_bytes=BIG_BUFFER)
    conditions.for_connection(idle_draw, 0.0, max_buffer_bytes=BIG_BUFFER)
    assert busy is not None
    drive(busy, [(i / 10, b"x") for i in range(50)])
    runs = []
    for draw in (busy_draw, idle_draw):
        next_one = conditions.for_connection(draw, 0.0, max_buffer_bytes=BIG_BUFFER)
        assert next_one is not None
        runs.append(drive(next_one, [(i / 10, b"y") for i in range(20)]).sends)
    assert runs[0] == runs[1]


def test_a_seed_repeats_a_whole_connections_echo() -> None:
    conditions = Conditions(latency_s=0.05, jitter_s=0.05, slice_bytes=3, seed=77)
    arrivals = [(i / 50, b"abcdefg") for i in range(30)]
    first = drive(connection(conditions, seed=77), arrivals)
    again = drive(connection(conditions, seed=77), arrivals)
    assert first.sends == again.sends


# ---------------------------------------------------------------- bandwidth and slices


def test_bandwidth_never_runs_ahead_of_its_rate_and_the_whole_echo_arrives() -> None:
    rate, quantum = 1000, 100  # a pacing quantum: a tenth of a second's worth
    payload = bytes(range(256)) * 20
    run = drive(connection(Conditions(bandwidth_bytes_per_s=rate)), [(0.0, payload)])
    assert run.echo == payload
    assert all(len(data) <= quantum for _, data in run.sends)
    for at, _ in run.sends:
        assert sent_by(run, at) <= rate * at + quantum + SUMMED_ROUNDING
    assert run.sends[-1][0] >= (len(payload) - quantum) / rate - 1e-9


def test_bandwidth_holds_across_chunks_that_arrive_later() -> None:
    rate = 500
    arrivals = [(i * 0.05, bytes(40)) for i in range(40)]
    run = drive(connection(Conditions(bandwidth_bytes_per_s=rate)), arrivals)
    assert len(run.echo) == 1600
    for at, _ in run.sends:
        assert sent_by(run, at) <= rate * at + rate // 10 + SUMMED_ROUNDING


def test_a_tiny_rate_still_moves_a_byte_at_a_time() -> None:
    run = drive(connection(Conditions(bandwidth_bytes_per_s=2)), [(0.0, b"abcd")])
    assert run.sends == [(0.0, b"a"), (0.5, b"b"), (1.0, b"c"), (1.5, b"d")]


def test_slices_are_at_most_slice_bytes_slice_delay_apart() -> None:
    conditions = Conditions(slice_bytes=3, slice_delay_s=0.01)
    run = drive(connection(conditions), [(0.0, b"abcdefghij")])
    assert [data for _, data in run.sends] == [b"abc", b"def", b"ghi", b"j"]
    assert [at for at, _ in run.sends] == pytest.approx([0.0, 0.01, 0.02, 0.03])


def test_slices_without_a_delay_all_go_at_once() -> None:
    conditions = connection(Conditions(slice_bytes=4))
    conditions.received(b"0123456789", 2.0)
    assert conditions.due(2.0) == [Send(b"0123"), Send(b"4567"), Send(b"89")]


def test_a_delayed_chunk_is_sliced_after_its_delay() -> None:
    conditions = Conditions(latency_s=1.0, slice_bytes=2, slice_delay_s=0.1)
    run = drive(connection(conditions), [(0.0, b"abcd"), (0.05, b"ef")])
    assert [data for _, data in run.sends] == [b"ab", b"cd", b"ef"]
    assert [at for at, _ in run.sends] == pytest.approx([1.0, 1.1, 1.2])


# ---------------------------------------------------------------- close, reset, stall


@pytest.mark.parametrize(
    ("settings_", "ending", "reason"),
    [
        ({"close_after_bytes": 5}, Close, CLOSE_AFTER),
        ({"reset_after_bytes": 5}, Reset, RESET_AFTER),
    ],
)
def test_the_connection_ends_after_exactly_n_bytes(
    settings_: dict[str, int], ending: type, reason: str
) -> None:
    conditions = connection(Conditions(latency_s=0.1, **settings_))  # type: ignore[arg-type]
    conditions.received(b"abc", 0.0)
    conditions.received(b"defg", 0.01)
    conditions.received(b"more", 0.02)
    assert conditions.held == 5  # what lies past the mark is never echoed, nor held
    run = drive(conditions, [])
    assert run.echo == b"abcde"
    assert run.end is not None
    at, action = run.end
    assert isinstance(action, ending)
    assert at == pytest.approx(0.11)
    assert conditions.outcome == reason
    if isinstance(action, Close):
        assert action.reason == CLOSE_AFTER
        assert action.discard_until == pytest.approx(at + CLOSE_DISCARD_S)
    else:
        assert action == Reset(RESET_AFTER)
    conditions.received(b"after", 1.0)
    assert conditions.due(1.0) == []
    assert conditions.next_at() is None
    assert not conditions.may_read(1.0)


def test_a_piece_crossing_the_mark_is_cut_there() -> None:
    conditions = connection(Conditions(close_after_bytes=4, slice_bytes=3))
    conditions.received(b"abcdef", 0.0)
    actions = conditions.due(0.0)
    assert actions[:2] == [Send(b"abc"), Send(b"d")]
    assert isinstance(actions[2], Close) and len(actions) == 3


def test_held_bytes_never_grow_past_close_after() -> None:
    conditions = connection(Conditions(latency_s=10.0, close_after_bytes=100))
    for i in range(50):
        conditions.received(b"x" * 7, i / 100)
        assert conditions.held <= 100
    assert conditions.held == 100


@pytest.mark.parametrize(
    ("conditions", "ending"),
    [(Conditions(close_after_bytes=0), Close), (Conditions(reset_after_bytes=0), Reset)],
)
def test_a_mark_of_zero_ends_the_connection_at_once(conditions: Conditions, ending: type) -> None:
    made = connection(conditions, now=3.0)
    assert made.next_at() == 3.0
    made.received(b"ignored", 3.0)
    assert made.held == 0
    actions = made.due(3.0)
    assert len(actions) == 1 and isinstance(actions[0], ending)
    assert made.next_at() is None


def test_a_stall_stops_the_echo_and_the_reading_then_both_resume() -> None:
    conditions = connection(Conditions(stall_after_bytes=4, stall_for_s=1.0))
    conditions.received(b"0123456789", 0.0)
    assert conditions.due(0.0) == [Send(b"0123")]
    assert conditions.stalled(0.0)
    assert not conditions.may_read(0.0)
    assert not conditions.may_read(0.99)
    assert conditions.next_at() == 1.0
    assert conditions.due(0.5) == []
    assert conditions.due(1.0) == [Send(b"456789")]
    assert not conditions.stalled(1.0)
    assert conditions.may_read(1.0)
    conditions.received(b"later", 2.0)
    assert conditions.due(2.0) == [Send(b"later")]  # once: no second stall


def test_a_stall_without_stall_for_lasts_until_a_limit_ends_it() -> None:
    conditions = connection(Conditions(stall_after_bytes=2))
    conditions.received(b"abc", 0.0)
    assert conditions.due(0.0) == [Send(b"ab")]
    assert conditions.next_at() is None
    assert conditions.stalled(1e9)
    assert not conditions.may_read(1e9)
    assert conditions.due(1e9) == []


def test_a_stall_at_zero_holds_from_the_start() -> None:
    conditions = connection(Conditions(stall_after_bytes=0, stall_for_s=2.0), now=10.0)
    assert not conditions.may_read(10.0)
    assert conditions.next_at() == 12.0
    assert conditions.due(12.0) == []
    assert conditions.may_read(12.0)
    conditions.received(b"hi", 12.5)
    assert conditions.due(12.5) == [Send(b"hi")]


@pytest.mark.parametrize("ending", [Close, Reset])
def test_a_stall_and_an_end_at_the_same_count_stall_first(ending: type) -> None:
    mark = {"close_after_bytes": 4} if ending is Close else {"reset_after_bytes": 4}
    conditions = connection(Conditions(stall_after_bytes=4, stall_for_s=1.0, **mark))  # type: ignore[arg-type]
    conditions.received(b"abcdef", 0.0)
    assert conditions.due(0.0) == [Send(b"abcd")]
    assert conditions.stalled(0.5)
    assert conditions.next_at() == 1.0
    actions = conditions.due(1.0)
    assert len(actions) == 1 and isinstance(actions[0], ending)


def test_a_stall_and_an_end_at_zero_stall_first() -> None:
    conditions = connection(Conditions(stall_after_bytes=0, stall_for_s=1.0, close_after_bytes=0))
    assert conditions.next_at() == 1.0
    assert conditions.due(0.0) == []
    assert [type(action) for action in conditions.due(1.0)] == [Close]


def test_a_stall_before_the_end_mark() -> None:
    conditions = Conditions(stall_after_bytes=2, stall_for_s=0.5, reset_after_bytes=5)
    run = drive(connection(conditions), [(0.0, b"abcdefgh")])
    assert run.sends == [(0.0, b"ab"), (0.5, b"cde")]
    assert run.end is not None and run.end[0] == 0.5 and isinstance(run.end[1], Reset)


# ---------------------------------------------------------------- the end: finish and slow close


def test_slow_close_finishes_only_that_long_after_the_eof_and_the_last_byte() -> None:
    conditions = connection(Conditions(latency_s=1.0, slow_close_s=2.0))
    conditions.received(b"data", 0.0)
    conditions.eof(0.2)
    assert not conditions.may_read(0.2)  # nothing to read after the EOF
    assert conditions.due(0.2) == []
    assert conditions.due(1.0) == [Send(b"data")]
    assert conditions.next_at() == 3.0
    assert conditions.due(2.99) == []
    assert conditions.due(3.0) == [Finish()]
    assert conditions.next_at() is None
    assert conditions.outcome is None  # a finish is the client's close, not on purpose


def test_slow_close_counts_from_the_eof_when_the_echo_is_done_before() -> None:
    run = drive(connection(Conditions(slow_close_s=0.5)), [(0.0, b"x")], eof_at=4.0)
    assert run.sends == [(0.0, b"x")]
    assert run.end == (4.5, Finish())


def test_without_slow_close_the_finish_comes_right_after_the_eof() -> None:
    conditions = connection(Conditions(latency_s=0.1))
    conditions.received(b"abc", 0.0)
    assert conditions.due(0.1) == [Send(b"abc")]
    conditions.eof(0.5)
    assert conditions.next_at() == 0.5
    assert conditions.due(0.5) == [Finish()]


def test_the_finish_waits_for_the_last_byte() -> None:
    run = drive(connection(Conditions(bandwidth_bytes_per_s=10)), [(0.0, b"0123456789")], eof_at=0)
    assert run.echo == b"0123456789"
    assert run.end == (run.sends[-1][0], Finish())
    assert run.end[0] == pytest.approx(0.9)


def test_an_eof_during_a_stall_finishes_after_it() -> None:
    conditions = Conditions(stall_after_bytes=3, stall_for_s=1.0)
    run = drive(connection(conditions), [(0.0, b"abc")], eof_at=0.1)
    assert run.sends == [(0.0, b"abc")]
    assert run.end == (1.0, Finish())


def test_an_eof_delivered_during_a_stall_waits_for_it_then_the_slow_close() -> None:
    conditions = connection(Conditions(stall_after_bytes=3, stall_for_s=1.0, slow_close_s=0.5))
    conditions.received(b"abc", 0.0)
    assert conditions.due(0.0) == [Send(b"abc")]
    conditions.eof(0.1)  # an event loop may deliver it though reading is paused
    assert conditions.next_at() == 1.0
    assert conditions.due(1.0) == []
    assert conditions.next_at() == 1.5
    assert conditions.due(1.5) == [Finish()]


# ---------------------------------------------------------------- the buffer bound


def test_max_buffer_bytes_bounds_what_a_connection_holds() -> None:
    conditions = connection(Conditions(latency_s=1.0), max_buffer_bytes=10)
    conditions.received(b"x" * 6, 0.0)
    assert conditions.may_read(0.0)
    conditions.received(b"y" * 6, 0.1)  # delivered anyway, as an event loop may: taken
    assert conditions.held == 12
    assert not conditions.may_read(0.1)
    assert conditions.due(1.0) == [Send(b"x" * 6)]
    assert conditions.may_read(1.0)


def test_a_paced_echo_reads_only_as_fast_as_it_writes() -> None:
    arrivals = [(0.0, bytes(100)) for _ in range(100)]
    conditions = connection(Conditions(bandwidth_bytes_per_s=1000), max_buffer_bytes=300)
    run = drive(conditions, arrivals)
    assert len(run.echo) == 10_000
    assert run.most_held <= 300 + 100  # the bound plus one read


def test_max_buffer_bytes_must_be_positive() -> None:
    with pytest.raises(ConditionError, match="max_buffer_bytes"):
        connection(Conditions(latency_s=1.0), max_buffer_bytes=0)


# ---------------------------------------------------------------- properties


chunks = st.lists(
    st.tuples(st.floats(0, 2, allow_nan=False), st.binary(min_size=1, max_size=48)),
    max_size=16,
)
stream_conditions = st.builds(
    Conditions,
    latency_s=st.sampled_from([0.0, 0.001, 0.05, 0.3]),
    jitter_s=st.sampled_from([0.0, 0.01, 0.2]),
    bandwidth_bytes_per_s=st.sampled_from([None, 50, 1000, 50_000]),
    slice_bytes=st.sampled_from([None, 1, 5, 64]),
    slow_close_s=st.sampled_from([0.0, 0.25]),
)


def _with_slice_delay(conditions: Conditions, slice_delay_s: float) -> Conditions:
    if conditions.slice_bytes is None or not slice_delay_s:
        return conditions
    values = {**conditions.to_mapping(), "slice_delay": slice_delay_s}
    return Conditions.from_mapping(values)


@settings(max_examples=100, deadline=None)
@given(
    conditions=stream_conditions,
    slice_delay_s=st.sampled_from([0.0, 0.02]),
    stall=st.one_of(st.none(), st.tuples(st.integers(0, 200), st.sampled_from([0.01, 1.0]))),
    arrivals=chunks,
    eof_gap=st.floats(0, 3, allow_nan=False),
    max_buffer_bytes=st.integers(1, 500),
    seed=st.integers(0, 2**32),
    most_late_s=st.sampled_from([0.0, 0.003, 0.2]),
    eager=st.booleans(),
)
def test_every_byte_is_echoed_exactly_once_in_order(
    conditions: Conditions,
    slice_delay_s: float,
    stall: tuple[int, float] | None,
    arrivals: list[tuple[float, bytes]],
    eof_gap: float,
    max_buffer_bytes: int,
    seed: int,
    most_late_s: float,
    eager: bool,
) -> None:
    conditions = _with_slice_delay(conditions, slice_delay_s)
    if stall is not None:
        values = {**conditions.to_mapping(), "stall_after": stall[0], "stall_for": stall[1]}
        conditions = Conditions.from_mapping(values)
    if not conditions.tcp:
        conditions = Conditions.from_mapping({**conditions.to_mapping(), "latency": 0.01})
    eof_at = max((at for at, _ in arrivals), default=0.0) + eof_gap
    made = connection(conditions, seed=seed, max_buffer_bytes=max_buffer_bytes)
    late = random.Random(seed)
    run = drive(made, arrivals, eof_at=eof_at, late=late, most_late_s=most_late_s, eager=eager)
    arrived = sorted(arrivals, key=lambda arrival: arrival[0])
    assert run.echo == b"".join(chunk for _, chunk in arrived)
    assert run.end is not None and isinstance(run.end[1], Finish)
    times = [at for at, _ in run.sends]
    assert times == sorted(times)
    finished_at = run.end[0]
    assert finished_at >= eof_at
    if run.sends:
        assert finished_at >= run.sends[-1][0] + conditions.slow_close_s - 1e-9
    if not eager:
        assert run.most_held <= max_buffer_bytes + 48  # the bound plus one read
    if conditions.bandwidth_bytes_per_s is not None and run.sends:
        rate, first = conditions.bandwidth_bytes_per_s, run.sends[0][0]
        quantum = max(1, rate // 10)
        for at, _ in run.sends:
            assert sent_by(run, at) <= rate * (at - first) + quantum + SUMMED_ROUNDING


@settings(max_examples=100, deadline=None)
@given(
    conditions=stream_conditions,
    mark=st.integers(0, 300),
    reset=st.booleans(),
    stall_after=st.one_of(st.none(), st.integers(0, 300)),
    arrivals=chunks,
    seed=st.integers(0, 2**32),
)
def test_the_echo_never_passes_close_after_or_reset_after(
    conditions: Conditions,
    mark: int,
    reset: bool,
    stall_after: int | None,
    arrivals: list[tuple[float, bytes]],
    seed: int,
) -> None:
    values: dict[str, object] = {
        **conditions.to_mapping(),
        "reset_after" if reset else "close_after": mark,
    }
    if stall_after is not None:
        values.update(stall_after=stall_after, stall_for=0.5)
    made = connection(Conditions.from_mapping(values), seed=seed)
    eof_at = max((at for at, _ in arrivals), default=0.0) + 1.0
    run = drive(made, arrivals, eof_at=eof_at)
    arrived = b"".join(chunk for _, chunk in sorted(arrivals, key=lambda arrival: arrival[0]))
    assert run.echo == arrived[:mark]
    assert run.most_held <= mark
    assert run.end is not None
    if len(arrived) >= mark:
        assert isinstance(run.end[1], Reset if reset else Close)
        assert made.outcome == (RESET_AFTER if reset else CLOSE_AFTER)
    else:
        assert run.end[1] == Finish()
        assert made.outcome is None


durations = st.floats(0, 365 * 24 * 3600.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(
    latency=durations,
    slow_close=durations,
    stall_for=st.floats(1e-9, 365 * 24 * 3600.0, allow_nan=False),
    size=st.integers(1, 1 << 40),
    toxicity=st.floats(0, 1),
    seed=st.integers(0, 2**64 - 1),
)
def test_to_mapping_reads_back_as_the_same_conditions(
    latency: float, slow_close: float, stall_for: float, size: int, toxicity: float, seed: int
) -> None:
    conditions = Conditions(
        latency_s=latency,
        slow_close_s=slow_close,
        stall_after_bytes=size,
        stall_for_s=stall_for,
        bandwidth_bytes_per_s=size,
        toxicity=toxicity,
        seed=seed,
        work=Work("io", stall_for),
    )
    mapping = json.loads(json.dumps(conditions.to_mapping()))
    assert Conditions.from_mapping(mapping) == conditions


# ---------------------------------------------------------------- UDP


def test_datagrams_are_answered_after_the_latency() -> None:
    datagrams = Conditions(latency_s=0.2).for_datagrams(ConditionDraw(1))
    assert datagrams is not None
    assert [datagrams.datagram(t) for t in (0.0, 1.0, 1.5)] == pytest.approx([0.2, 1.2, 1.7])


def datagram_delays(conditions: Conditions, count: int = 1000) -> list[float]:
    datagrams = conditions.for_datagrams(ConditionDraw(2))
    assert datagrams is not None
    answers = [datagrams.datagram(10.0) for _ in range(count)]
    assert None not in answers
    return [answer - 10.0 for answer in answers if answer is not None]


def test_datagram_jitter_spreads_both_ways_within_its_range() -> None:
    delays = datagram_delays(Conditions(latency_s=0.5, jitter_s=0.3))
    assert all(0.2 <= delay <= 0.8 for delay in delays)
    assert min(delays) < 0.25 and max(delays) > 0.75


def test_datagram_jitter_above_the_latency_never_answers_early() -> None:
    delays = datagram_delays(Conditions(latency_s=0.1, jitter_s=0.3))
    assert all(0.0 <= delay <= 0.4 for delay in delays)
    assert delays.count(0.0) > 100  # a third or so would have been early: now instead


def test_a_share_of_datagrams_is_dropped() -> None:
    datagrams = Conditions(drop=0.3).for_datagrams(ConditionDraw(3))
    assert datagrams is not None
    answers = [datagrams.datagram(float(t)) for t in range(5000)]
    dropped = answers.count(None)
    assert 1300 <= dropped <= 1700
    assert all(answer == t for t, answer in enumerate(answers) if answer is not None)


def test_datagram_toxicity_and_seed() -> None:
    untouched = DatagramConditions(Conditions(drop=1.0, toxicity=0.0), ConditionDraw(4).stream())
    assert all(untouched.datagram(1.0) == 1.0 for _ in range(100))

    def answers(seed: int) -> list[float | None]:
        datagrams = Conditions(drop=0.5, latency_s=0.1, jitter_s=0.1).for_datagrams(
            ConditionDraw(seed)
        )
        assert datagrams is not None
        return [datagrams.datagram(0.0) for _ in range(100)]

    assert answers(6) == answers(6)
    assert answers(6) != answers(7)


def test_what_changes_tcp_and_what_changes_udp() -> None:
    assert Conditions(drop=0.5).for_connection(ConditionDraw(1), 0.0, max_buffer_bytes=1) is None
    assert Conditions(slice_bytes=3).for_datagrams(ConditionDraw(1)) is None
    assert Conditions().for_datagrams(ConditionDraw(1)) is None
    both = Conditions(latency_s=0.1)
    assert both.tcp and both.udp
    assert (Conditions(drop=0.1).tcp, Conditions(drop=0.1).udp) == (False, True)
    assert (Conditions(close_after_bytes=1).tcp, Conditions(close_after_bytes=1).udp) == (
        True,
        False,
    )


# ---------------------------------------------------------------- live changes


def test_a_live_change_reaches_new_connections_only() -> None:
    live = LiveConditions(Conditions(latency_s=1.0))
    opened_before = live.for_connection(0.0, max_buffer_bytes=BIG_BUFFER)
    assert opened_before is not None
    live.set(Conditions(close_after_bytes=2))
    assert live.version == 1
    assert live.current == Conditions(close_after_bytes=2)
    opened_after = live.for_connection(0.0, max_buffer_bytes=BIG_BUFFER)
    assert opened_after is not None
    assert opened_before.conditions == Conditions(latency_s=1.0)
    opened_before.received(b"abc", 0.0)
    assert opened_before.due(1.0) == [Send(b"abc")]
    opened_after.received(b"abc", 0.0)
    assert [type(action) for action in opened_after.due(0.0)] == [Send, Close]


def test_a_live_clear_leaves_new_connections_without_conditions() -> None:
    live = LiveConditions(Conditions(latency_s=1.0, drop=0.5))
    assert live.for_datagrams() is not None
    live.set(Conditions())
    assert live.for_connection(0.0, max_buffer_bytes=10) is None
    assert live.for_datagrams() is None
    assert not live.current.active


def test_a_live_change_draws_afresh_from_its_seed() -> None:
    live = LiveConditions(Conditions(latency_s=0.1, toxicity=0.5, seed=3))
    first = [live.for_connection(0.0, max_buffer_bytes=10) is not None for _ in range(40)]
    live.set(Conditions(latency_s=0.1, toxicity=0.5, seed=3))
    assert [live.for_connection(0.0, max_buffer_bytes=10) is not None for _ in range(40)] == first


# ---------------------------------------------------------------- settings by name


def test_from_mapping_takes_text_as_the_cli_does_and_dashed_names() -> None:
    conditions = Conditions.from_mapping(
        {
            "latency": "200ms",
            "jitter": 0.05,
            "bandwidth": "64KiB",
            "slice": "1K",
            "slice-delay": "10ms",
            "close-after": "100",
            "stall_after": 0,
            "stall-for": "1m",
            "slow_close": "1.5s",
            "toxicity": "0.5",
            "seed": "12",
            "work": "io:100ms",
            "drop": 0.25,
        }
    )
    assert conditions == Conditions(
        latency_s=0.2,
        jitter_s=0.05,
        bandwidth_bytes_per_s=65536,
        slice_bytes=1024,
        slice_delay_s=0.01,
        close_after_bytes=100,
        stall_after_bytes=0,
        stall_for_s=60.0,
        slow_close_s=1.5,
        toxicity=0.5,
        seed=12,
        work=Work("io", 0.1),
        drop=0.25,
    )
    assert Conditions.from_mapping(json.loads(json.dumps(conditions.to_mapping()))) == conditions


def test_to_mapping_shows_what_is_set() -> None:
    assert Conditions().to_mapping() == {}
    assert Conditions(
        latency_s=0.2, close_after_bytes=100, work=Work("cpu", 0.02)
    ).to_mapping() == {
        "latency": "0.2s",
        "close_after": 100,
        "work": "cpu:0.02s",
    }
    assert Conditions.from_mapping({"latency": None, "toxicity": None}) == Conditions()


def test_names_and_label_name_the_stream_conditions() -> None:
    conditions = Conditions(latency_s=0.2, close_after_bytes=100, toxicity=0.5, drop=0.1)
    assert conditions.names == ("latency", "close-after")
    assert conditions.label == "latency=0.2s close-after=100"
    made = ConnectionConditions(conditions, random.Random(1), 0.0, max_buffer_bytes=10)
    assert (made.names, made.label) == (conditions.names, conditions.label)
    assert Conditions().label == ""


def test_active_means_anything_that_changes_the_answer() -> None:
    assert not Conditions().active
    assert not Conditions(toxicity=0.5, seed=1).active
    assert Conditions(work=Work("io", 0.1)).active
    assert Conditions(drop=0.1).active
    assert Conditions(slow_close_s=1.0).active
    assert (
        Conditions(work=Work("io", 0.1)).for_connection(ConditionDraw(1), 0.0, max_buffer_bytes=1)
        is None
    )  # work is the handler's, not a stream condition


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConditionError) as caught:
        Conditions.from_mapping({"latency": "1s", "lag": "1s", "dealy": 2})
    message = str(caught.value)
    assert message == f"unknown conditions: dealy, lag (known: {', '.join(SETTING_NAMES)})"
    assert "close_after" in message and "\n" not in message


def test_many_unknown_names_are_told_in_short() -> None:
    with pytest.raises(ConditionError) as caught:
        Conditions.from_mapping({f"x{i}": 1 for i in range(20)} | {"y" * 500: 1})
    message = str(caught.value)
    assert message.startswith("unknown conditions: x0, x1, x10, x11, x12 and 16 more (known:")
    assert len(message) < 400


def test_an_unknown_name_with_a_line_break_stays_one_line() -> None:
    with pytest.raises(ConditionError) as caught:
        Conditions.from_mapping({"bad\nname": 1})
    assert "\n" not in str(caught.value)
    assert "bad\\nname" in str(caught.value)


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(ConditionError, match="`close_after` is given twice"):
        Conditions.from_mapping({"close_after": 1, "close-after": 2})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("latency", -1),
        ("latency", "-1"),
        ("latency", -0.5),
        ("latency", math.nan),
        ("latency", "nan"),
        ("latency", math.inf),
        ("latency", "inf"),
        ("latency", "1e999"),
        ("latency", 1e300),
        ("latency", 10**400),
        ("latency", True),
        ("latency", "soon"),
        ("latency", "5 parsecs"),
        ("latency", ""),
        ("latency", [1]),
        ("jitter", "-3ms"),
        ("bandwidth", 0),
        ("bandwidth", "0"),
        ("bandwidth", 1.5),
        ("bandwidth", "fast"),
        ("bandwidth", 10**30),
        ("bandwidth", "99999999999999999999999"),
        ("slice", 0),
        ("slice", -4),
        ("close_after", -1),
        ("close_after", 2.0),
        ("close_after", False),
        pytest.param("close_after", 10**5000, id="close_after-5000-digits"),
        ("reset_after", "many"),
        ("stall_after", math.nan),
        ("stall_for", 0),
        ("stall_for", "0s"),
        ("slow_close", "a while"),
        ("toxicity", 2),
        ("toxicity", "2"),
        ("toxicity", -0.1),
        ("toxicity", "half"),
        ("toxicity", math.nan),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", "1.5"),
        ("seed", 1.0),
        ("work", "gpu:1s"),
        ("work", "io"),
        ("work", "io:0"),
        ("work", 5),
        ("drop", 1.5),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(name: str, value: object) -> None:
    others = {"stall_after": 1} if name == "stall_for" else {}
    with pytest.raises(ConditionError) as caught:
        Conditions.from_mapping({name: value, **others})
    message = str(caught.value)
    assert f"`{name}`" in message
    assert "\n" not in message
    assert len(message) < 300


@settings(max_examples=120, deadline=None)
@given(
    name=st.sampled_from(SETTING_NAMES),
    value=st.one_of(
        st.text(max_size=30),
        st.text(alphabet="0123456789.e-+ smhKMGiB:iocpu\n\t", max_size=12),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_any_value_is_taken_or_refused_in_one_line_naming_it(name: str, value: object) -> None:
    needed = {"slice": 1, "stall_after": 1}
    try:
        Conditions.from_mapping({**needed, name: value})
    except ConditionError as exc:
        message = str(exc)
        assert f"`{name}`" in message
        assert message.isprintable() and len(message) <= 400


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"latency": "1e999\n"}, "latency"),
        ({"toxicity": "2\n"}, "toxicity"),
        ({"close_after": " 99999999999999999999 \n"}, "close_after"),
        ({"work": "io:1e999\n"}, "work"),
        ({"latency": "x" * 5000}, "latency"),
    ],
)
def test_text_that_reads_but_is_out_of_range_stays_one_line(
    values: dict[str, str], name: str
) -> None:
    with pytest.raises(ConditionError) as caught:
        Conditions.from_mapping(values)
    assert str(caught.value).startswith(f"`{name}`")
    assert str(caught.value).isprintable() and len(str(caught.value)) <= 400


def test_a_bad_whole_number_shows_the_value_as_given() -> None:
    with pytest.raises(ConditionError, match=r"not 2\.0$"):
        Conditions.from_mapping({"close_after": 2.0})


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"close_after": 1, "reset_after": 2}, "exclude each other"),
        ({"slice_delay": "10ms"}, "`slice_delay` needs `slice`"),
        ({"stall_for": "1s"}, "`stall_for` needs `stall_after`"),
    ],
)
def test_settings_that_need_or_exclude_each_other(values: dict[str, object], words: str) -> None:
    with pytest.raises(ConditionError, match=words):
        Conditions.from_mapping(values)


def test_the_dataclass_checks_values_whoever_builds_it() -> None:
    with pytest.raises(ConditionError, match="`latency` must be 0 or more seconds"):
        Conditions(latency_s=-1)
    with pytest.raises(ConditionError, match="`slice`"):
        Conditions(slice_bytes=0)
    with pytest.raises(ConditionError, match="`toxicity`"):
        Conditions(toxicity=math.inf)
    assert Conditions(latency_s=2).latency_s == 2.0
    assert isinstance(Conditions(latency_s=2).latency_s, float)


def test_reader_reads_as_the_cli_does() -> None:
    assert reader("latency")("200ms") == 0.2
    assert reader("bandwidth")("1MB") == 1_000_000
    assert reader("close_after")("0") == 0
    assert reader("close-after")("7") == 7
    assert reader("work")("cpu:20ms") == Work("cpu", 0.02)
    with pytest.raises(ConditionError, match="unknown condition: nope"):
        reader("nope")


# ---------------------------------------------------------------- handler work


@pytest.mark.parametrize(
    ("text", "work"),
    [
        ("io:100ms", Work("io", 0.1)),
        ("cpu:20ms", Work("cpu", 0.02)),
        ("IO:2s", Work("io", 2.0)),
        (" cpu : 1.5 ", Work("cpu", 1.5)),
        ("io:1m", Work("io", 60.0)),
    ],
)
def test_work_parses_a_kind_and_a_duration(text: str, work: Work) -> None:
    assert Work.parse(text) == work
    assert Work.parse(str(work)) == work


@pytest.mark.parametrize(
    "text",
    ["gpu:1s", "io", "io:", "io:0", "io:-1s", "io:soon", "cpu:1e999", "cpu:nan", ":1s", ""],
)
def test_work_refuses_bad_text_in_one_line(text: str) -> None:
    with pytest.raises(ConditionError) as caught:
        Work.parse(text)
    assert str(caught.value).startswith("`work`")
    assert "\n" not in str(caught.value)


def test_work_checks_values_whoever_builds_it() -> None:
    with pytest.raises(ConditionError, match="io:DURATION"):
        Work("disk", 1.0)  # type: ignore[arg-type]
    for seconds in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ConditionError, match="`work` must last"):
            Work("io", seconds)
    assert str(Work("io", 0.1)) == "io:0.1s"


# ---------------------------------------------------------------- how long was it held


def held_times(
    conditions: Conditions, arrivals: list[tuple[float, bytes]]
) -> tuple[Run, list[tuple[int, float]]]:
    """A run, and what `on_held` heard for each piece: (bytes sent before it, seconds)."""
    made = connection(conditions)
    heard: list[float] = []
    made.on_held = heard.append
    run = drive(made, arrivals)
    offsets = [sum(len(data) for _, data in run.sends[:index]) for index in range(len(run.sends))]
    return run, list(zip(offsets, heard, strict=True))


def test_each_piece_is_heard_with_how_long_its_first_byte_waited() -> None:
    run, heard = held_times(
        Conditions(latency_s=2.0, slice_bytes=3, slice_delay_s=0.5),
        [(0.0, b"abcdef"), (1.0, b"gh")],
    )
    assert run.echo == b"abcdefgh"
    # abc at 2 (held 2), def at 2.5 (its first byte came at 0), gh at 3 (came at 1).
    assert heard == [(0, 2.0), (3, 2.5), (6, 2.0)]


def test_a_stall_counts_in_what_was_held() -> None:
    # cd was read with ab, and went when the stall ended; what the stall left unread
    # waited in the kernel, which no server figure sees.
    _, heard = held_times(
        Conditions(stall_after_bytes=2, stall_for_s=10.0), [(0.0, b"abcd"), (1.0, b"ef")]
    )
    assert heard == [(0, 0.0), (2, 10.0), (4, 0.0)]


def test_with_no_listener_nothing_is_heard_and_the_echo_is_the_same() -> None:
    made = connection(Conditions(latency_s=1.0))
    run = drive(made, [(0.0, b"x" * 10)])
    assert run.echo == b"x" * 10 and made.on_held is None


# ---------------------------------------------------------------- what the server serves

# Each setting that changes only a stream's echo, with a value (and what it needs).
TCP_ONLY: dict[str, dict[str, object]] = {
    "bandwidth": {"bandwidth": "1KiB"},
    "slice": {"slice": 10},
    "slice_delay": {"slice": 10, "slice_delay": "10ms"},
    "close_after": {"close_after": 3},
    "reset_after": {"reset_after": 3},
    "stall_after": {"stall_after": 3},
    "stall_for": {"stall_after": 3, "stall_for": "1s"},
    "slow_close": {"slow_close": "1s"},
    "work": {"work": "io:1s"},
}


@pytest.mark.parametrize("name", list(TCP_ONLY))
def test_a_tcp_only_condition_is_refused_by_a_server_of_udp_alone(name: str) -> None:
    conditions = Conditions.from_mapping(TCP_ONLY[name])
    with pytest.raises(ConditionError, match="changes TCP echo only") as caught:
        conditions.check_served(tcp=False, udp=True)
    assert str(caught.value).startswith("`") and "\n" not in str(caught.value)
    conditions.check_served(tcp=True, udp=True)  # beside TCP it is served
    conditions.check_served(tcp=True, udp=False)


# And each that a server of UDP alone serves.
SERVED_OVER_UDP: dict[str, dict[str, object]] = {
    "latency": {"latency": "1s"},
    "jitter": {"jitter": "1s"},
    "toxicity": {"toxicity": 0.5},
    "seed": {"seed": 7},
    "drop": {"drop": 0.5},
}


def test_every_setting_is_either_tcp_only_or_served_over_udp() -> None:
    assert sorted([*TCP_ONLY, *SERVED_OVER_UDP]) == sorted(SETTING_NAMES)


@pytest.mark.parametrize("name", list(SERVED_OVER_UDP))
def test_the_other_conditions_are_served_by_a_server_of_udp_alone(name: str) -> None:
    Conditions.from_mapping(SERVED_OVER_UDP[name]).check_served(tcp=False, udp=True)


def test_drop_is_refused_by_a_server_without_udp_and_the_rest_of_udp_is_served() -> None:
    with pytest.raises(ConditionError, match="`drop` is a share of UDP datagrams"):
        Conditions(drop=0.5).check_served(tcp=True, udp=False)
    Conditions(latency_s=1.0, toxicity=0.5, seed=7).check_served(tcp=True, udp=False)
    Conditions().check_served(tcp=False, udp=True)


def test_the_config_refuses_what_its_transports_would_not_serve() -> None:
    with pytest.raises(ValueError, match="`close_after` changes TCP echo only"):
        ServerConfig(udp=True, close_after_bytes=3)
    with pytest.raises(ValueError, match="`drop` is a share of UDP datagrams"):
        ServerConfig(drop=0.5)
    assert ServerConfig(udp=True, tcp=True, close_after_bytes=3, drop=0.5).conditions.tcp
