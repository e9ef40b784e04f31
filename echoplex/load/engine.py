"""The load run: open the connections, drive one pattern, watch it, and tally the result.

The transport (TCP, Unix socket, TLS, PROXY header, UDP) is the run's `Connector`
(`transport`): it resolves the server once and opens each connection; the patterns
never ask which transport they are on. Over UDP a connection is a connected datagram
socket (`datagrams`), with `pingpong` and `rate` only.

Timeline of `pingpong`, `rate` and `stream`:

    connect (at --connect-rate) | warmup | measured (--duration) | drain | close

Traffic starts on every connection at once when the connect phase ends. Only
messages sent (for `rate`: due) in the measured window count, and the client's own
CPU time is taken over that window too. At the end nothing new is sent, and the
run waits up to `timeout_s` for every echo still in flight, so every byte sent is
verified; one that never comes back is a "timeout" error.

`hold`: connect, each connection checking one round trip as soon as it is open;
idle for --duration; one more round trip on each; close. Figures cover the whole
run, and a server that closes a connection at any point is an error.

A watchdog (every TICK_S; over UDP up to four times per `timeout_s`) fails a
connection whose echo makes no progress for `timeout_s` while bytes are outstanding
(over UDP: counts a datagram not echoed within `timeout_s` as lost, and the connection
carries on), folds latency counts into the histogram, and feeds the progress display.
SIGINT/SIGTERM only set a flag: the run stops early and still returns its result; a
second one also cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Protocol, TypeVar, cast

from ..errors import StartupError
from ..loops import loop_factory
from ..payload import PayloadPattern
from ..stats import LatencyHistogram
from . import connections as stream_connections
from . import datagrams
from .config import LoadConfig
from .connections import NEVER_NS, LoadConnection, Tally
from .datagrams import DatagramConnection
from .patterns import Pattern
from .result import ConnectionFailure, LoadResult
from .timer import PeriodicTimer
from .transport import OpenFailed, connector_for

Connection = LoadConnection | DatagramConnection


class Scheduled(Protocol):
    """A connection of a `scheduled` pattern: it sends when the run's schedule says."""

    @property
    def alive(self) -> bool: ...
    def schedule(self, first_ns: float, interval_ns: float) -> None: ...
    def send_due(self) -> None: ...


TICK_S = 0.25
# A stream connection's watchdog looks at each connection at least this often (and four
# times per --timeout, if that is more often), a share of them each tick: a look costs a
# few calls per connection, which at 12,500 connections a process took most of the
# client's CPU under a trickle when every tick looked at all of them.
WATCH_ROUND_S = 2.0
# Over UDP the watchdog is what notices a lost datagram (and lets `pingpong` send the
# next one), so it looks four times per --timeout, if that is shorter than TICK_S.
MIN_UDP_TICK_S = 0.02
SETTLE_POLL_S = 0.01
# Connects in progress at once when no --connect-rate is given: enough to open
# thousands quickly, few enough not to overflow a default listen backlog.
MAX_CONNECTS_IN_FLIGHT = 128
INTERRUPTED_DRAIN_S = 1.0
MIN_TICK_NS = 100_000  # the rate schedule wakes at most 10,000 times a second
CLOSE_WAIT_S = 2.0
FD_HEADROOM = 64


class LoadError(StartupError):
    """The run cannot start: bad target, unreachable server, too few file descriptors."""


@dataclass(frozen=True)
class Progress:
    """A snapshot for the live display."""

    phase: str
    elapsed_s: float
    completed: int
    recent_per_s: float
    recent_mb_per_s: float
    p99_us: int  # over the last tick only: what the server does now
    errors: int
    mismatches: int
    alive: int
    connections: int


ProgressCallback = Callable[[Progress], None]
StartTime = Callable[[], Awaitable[int]]
Result = TypeVar("Result")


def run(config: LoadConfig, progress: ProgressCallback | None = None) -> LoadResult:
    """Run one load against a server, in this process, and return what it found (blocking)."""
    return run_on_loop(config, LoadRun(config, progress).run)


def run_on_loop(config: LoadConfig, main: Callable[[], Coroutine[Any, Any, Result]]) -> Result:
    """`main()` on the config's event loop, with a descriptor for each connection (what
    the run needs besides is checked once, by `processes.check_dependencies`)."""
    factory = loop_factory(config.loop)
    _ensure_descriptors(config.connections)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def connection_class(pattern: type[Pattern], udp: bool) -> type[Connection]:
    """The connection class `pattern` names, over UDP or a stream (see `patterns`)."""
    name = pattern.datagram_connection if udp else pattern.connection
    if name is None:
        raise ValueError(f"{pattern.name} does not go with udp")  # LoadConfig refuses it
    return cast(type[Connection], getattr(datagrams if udp else stream_connections, name))


def _ensure_descriptors(connections: int) -> None:
    try:
        import resource
    except ImportError:  # not Unix: nothing to adjust
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise LoadError(
                f"{connections} connections need {needed} open files, "
                f"but the limit is {hard} (raise it with ulimit -n, or spread them over "
                "more --processes)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _cpu_seconds() -> float:
    try:
        import resource
    except ImportError:
        times = time.process_time()
        return times
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadRun:
    """One run of one config: `await run()` for its LoadResult.

    A share of a run spread over processes (`echoplex.load.processes`) numbers its
    connections from `config.first_connection`, starts its traffic at the time
    `start_time()` gives once its connections are open (by default at once), and
    leaves signals to the process that spread the run (`handle_signals=False`).
    """

    def __init__(
        self,
        config: LoadConfig,
        progress: ProgressCallback | None = None,
        *,
        start_time: StartTime | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self.start_time = start_time or _now_ns
        self.handle_signals = handle_signals
        self.pattern = config.pattern_class
        self.connection_class = connection_class(self.pattern, config.udp)
        self.connection_arguments = self.pattern.connection_arguments(config)
        self.progress = progress
        self.payload = PayloadPattern(config.seed)
        self.tally = Tally(config)
        self.histogram = LatencyHistogram()
        self.send_lag: LatencyHistogram | None = None  # `scheduled` patterns only
        self.connector = connector_for(config)
        self.tick_s = (
            max(min(TICK_S, config.timeout_s / 4), MIN_UDP_TICK_S) if config.udp else TICK_S
        )
        self.watch_every_ticks = (
            1 if config.udp else max(1, int(min(WATCH_ROUND_S, config.timeout_s / 4) / TICK_S))
        )
        """Ticks between two looks of the watchdog at one connection (over UDP, where
        it is what notices a lost datagram: every tick)."""
        self._ticks = 0
        self.connections: list[Connection | None] = [None] * config.connections
        self.phase = "connecting"
        self.interrupted = False
        self.forced = False
        self._stop: asyncio.Event | None = None
        self._started = time.monotonic()
        self._last_tick = (time.monotonic(), 0)

    # the whole run

    async def run(self) -> LoadResult:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.interrupted:  # asked to stop before it ran
            self._stop.set()
        handle_signals = (
            self.handle_signals and threading.current_thread() is threading.main_thread()
        )
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        result = LoadResult(
            self.config, loop="uvloop" if "uvloop" in type(loop).__module__ else "asyncio"
        )
        ticker = asyncio.ensure_future(self._tick_forever())
        try:
            try:
                await self.connector.prepare()
            except OpenFailed as exc:
                raise LoadError(exc.summary) from None
            hold = self._start_hold() if self.pattern.holds else None
            result.connect_start_ns = perf_counter_ns()
            await self._open_all()
            result.connect_end_ns = perf_counter_ns()
            result.connections_opened = sum(conn is not None for conn in self.connections)
            start_ns = await self.start_time()
            if hold is not None:
                await self._hold(result, *hold)
            else:
                await self._load(result, start_ns)
            result.connections_alive = len(self._live())
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self._close_all()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        self.histogram.record_counts(self.tally.take_latency_counts())
        size = self.config.size_bytes
        result.echoed_total = sum(conn.verified() // size for conn in self.connections if conn)
        result.requests = self.histogram.count
        result.latency = self.histogram.summary()
        result.errors_by_kind = dict(self.tally.errors_by_kind)
        result.error_samples = list(self.tally.error_samples)
        result.mismatches = self.tally.mismatches
        result.mismatch_samples = list(self.tally.mismatch_samples)
        if self.config.udp:
            result.late_datagrams = self.tally.late_datagrams
        result.interrupted = self.interrupted
        return result

    def request_stop(self) -> None:
        """Signal handler: the first stops the run early, a second one skips waiting."""
        if self.interrupted:
            self.forced = True
        self.interrupted = True
        if self._stop is not None:
            self._stop.set()

    # connecting

    async def _open_all(self) -> None:
        # The run's first connection alone: if the server is not there, say so once and
        # stop. (The other shares of a run spread over processes count their failures.)
        rest = range(self.config.connections)
        if self.config.first_connection == 0:
            try:
                await self._connect(0)
            except OpenFailed as exc:
                raise LoadError(exc.summary) from None
            rest = rest[1:]
        limiter = asyncio.Semaphore(MAX_CONNECTS_IN_FLIGHT)
        tasks = []
        started = time.monotonic()
        rate = self.config.connect_rate_per_s
        for index in rest:
            if rate is not None and await self._sleep(started + index / rate - time.monotonic()):
                break
            await limiter.acquire()
            if self.interrupted:
                limiter.release()
                break
            tasks.append(asyncio.ensure_future(self._connect_counted(index, limiter)))
        if tasks:
            await asyncio.gather(*tasks)

    async def _connect_counted(self, index: int, limiter: asyncio.Semaphore) -> None:
        try:
            await self._connect(index)
        except OpenFailed as exc:
            number = self.config.first_connection + index
            self.tally.failed(ConnectionFailure(number, exc.kind, 0, exc.detail))
        finally:
            limiter.release()

    async def _connect(self, index: int) -> None:
        """Open connection `index` of this process (its number in the run may be higher)."""
        number = self.config.first_connection + index
        connection = self.connection_class(
            self.tally, self.payload, number, **self.connection_arguments
        )
        await self.connector.open(connection, number)
        self.connections[index] = connection
        if self.pattern.holds:
            connection.begin()  # its first round trip, at once

    # the patterns

    async def _load(self, result: LoadResult, start_ns: int) -> None:
        config, tally = self.config, self.tally
        if await self._sleep_until(start_ns):
            start_ns = perf_counter_ns()  # stopped before the start: nothing is measured
        window_start_ns = start_ns + int(config.warmup_s * 1e9)
        tally.window_start_ns = window_start_ns
        tally.window_end_ns = window_start_ns + int(config.duration_s * 1e9)
        tally.sending = True
        schedule = _RateSchedule(self, start_ns) if self.pattern.scheduled else None
        try:
            for connection in self._live():
                connection.begin()
            self.phase = "warmup"
            if config.warmup_s > 0:
                await self._sleep(config.warmup_s)
            cpu_start = _cpu_seconds()
            self.phase = "measuring"
            # To the end exactly (a loop timer may fire early), and then every message
            # due in the window goes, even if the timer fell behind: each connection
            # sends what its schedule says, no fewer.
            if not await self._sleep_until(tally.window_end_ns) and schedule is not None:
                schedule.tick()
        finally:
            tally.sending = False
            if schedule is not None:
                schedule.close()
        end_ns = min(perf_counter_ns(), tally.window_end_ns)
        tally.window_end_ns = end_ns
        result.client_cpu_s = _cpu_seconds() - cpu_start if end_ns > window_start_ns else 0.0
        result.measured_s = max(0, end_ns - window_start_ns) / 1e9
        result.sending_s = max(0, end_ns - start_ns) / 1e9
        if schedule is not None:
            self.send_lag = LatencyHistogram()
            self.send_lag.record_counts(schedule.lag_counts)
            result.send_lag = self.send_lag.summary()
        self.phase = "draining"
        await self._wait_settled()
        self._settle_stragglers(result)

    def _start_hold(self) -> tuple[int, float]:
        """Before connecting: with `hold` each connection checks one round trip as soon
        as it is open, and every figure covers the whole run."""
        self.tally.window_start_ns = 0
        self.tally.sending = True  # from here on, a server that closes is an error
        return perf_counter_ns(), _cpu_seconds()

    async def _hold(self, result: LoadResult, start_ns: int, cpu_start: float) -> None:
        self.phase = "checking"
        await self._wait_settled()  # the first round trips, begun as each connection opened
        self._settle_stragglers(result)
        if not self.interrupted:
            self.phase = "holding"
            await self._sleep(self.config.duration_s)
        if not self.forced:
            self.phase = "checking"
            for connection in self._live():
                connection.begin()
            await self._wait_settled()
            self._settle_stragglers(result)
        self.tally.sending = False
        result.client_cpu_s = _cpu_seconds() - cpu_start
        result.measured_s = (perf_counter_ns() - start_ns) / 1e9

    # waiting and watching

    def _live(self) -> list[Connection]:
        return [conn for conn in self.connections if conn is not None and conn.alive]

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or less if a stop is requested; whether a stop was requested."""
        assert self._stop is not None
        if seconds > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stop.wait()
        return self._stop.is_set()

    async def _sleep_until(self, when_ns: int) -> bool:
        """Sleep until perf_counter_ns() reaches `when_ns` (or a stop); whether a stop was
        requested. A timer may fire early: uvloop's count whole milliseconds of a clock
        read once per loop iteration, and wake up to 1.1 ms before their time (measured,
        156 of 200 sleeps). A share of a spread run that began its traffic that early
        would send its first messages before its window opens, and leave them out."""
        assert self._stop is not None
        while (remaining_ns := when_ns - perf_counter_ns()) > 0:
            if await self._sleep(remaining_ns / 1e9):
                return True
        return self._stop.is_set()

    async def _wait_settled(self) -> None:
        """Wait until every live connection has all its echoes back (or has failed)."""
        wait_s = min(INTERRUPTED_DRAIN_S, self.config.timeout_s) if self.interrupted else None
        deadline = time.monotonic() + (wait_s or self.config.timeout_s)
        while not self.forced and time.monotonic() < deadline:
            if all(conn.settled() for conn in self._live()):
                return
            await asyncio.sleep(SETTLE_POLL_S)

    def _settle_stragglers(self, result: LoadResult) -> None:
        """Connections whose echoes did not all come back in time: an error, unless the
        user stopped the run (then they are only reported as unfinished)."""
        for connection in self._live():
            outstanding = connection.outstanding()
            if outstanding <= 0:
                continue
            if self.interrupted:
                result.unfinished += math.ceil(outstanding / self.config.size_bytes)
                connection.close()
            else:
                connection.give_up()

    async def _close_all(self) -> None:
        for connection in self.connections:
            if connection is not None:
                connection.close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            if all(conn is None or conn.lost for conn in self.connections):
                return
            await asyncio.sleep(SETTLE_POLL_S)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        previous_at, previous_completed = self._last_tick
        elapsed = max(now - previous_at, 1e-9)
        now_ns = perf_counter_ns()
        share = self._ticks % self.watch_every_ticks
        self._ticks += 1
        for connection in self.connections[share :: self.watch_every_ticks]:
            if connection is not None and connection.alive:
                connection.watch(elapsed, now_ns)
        recent_counts = self.tally.take_latency_counts()
        self.histogram.record_counts(recent_counts)
        if self.progress is None:
            self._last_tick = (now, 0)
        else:
            size = self.config.size_bytes
            # Every verified message, measured or not (counted here, off the hot path).
            completed = sum(
                conn.verified() // size for conn in self.connections if conn is not None
            )
            self._last_tick = (now, completed)
            recent = (completed - previous_completed) / elapsed
            self.progress(
                Progress(
                    phase=self.phase,
                    elapsed_s=now - self._started,
                    completed=completed,
                    recent_per_s=recent,
                    recent_mb_per_s=recent * self.config.size_bytes / 1e6,
                    p99_us=_percentile(recent_counts, 99.0),
                    errors=sum(self.tally.errors_by_kind.values()),
                    mismatches=self.tally.mismatches,
                    alive=len(self._live()),
                    connections=self.config.connections,
                )
            )


async def _now_ns() -> int:
    """The start of a run that is the whole load: at once."""
    return perf_counter_ns()


def _percentile(counts: dict[int, int], percent: float) -> int:
    """The value at `percent` of `{value: count}`: exact, and cheap for the few hundred
    distinct microsecond values one tick holds (the whole histogram's scan is not)."""
    total = sum(counts.values())
    if not total:
        return 0
    rank = math.ceil(total * percent / 100)
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    return max(counts)


class _RateSchedule:
    """Sends message k (of all connections) at start + k / rate, on connection k mod c.

    A periodic timer wakes the loop at each due time, or every MIN_TICK_NS when
    messages are due more often than that, and each wakeup sends every message due
    by then. The floor bounds the wakeups (each costs a few syscalls; at 20,000
    messages/s one wakeup per message took most of a core), at the price of up to
    MIN_TICK_NS of lateness. How late each message went out (`lag_counts`, µs) is
    kept: it is part of every latency measured from the intended time, and says
    whether the client kept up.
    """

    def __init__(self, run: LoadRun, start_ns: int) -> None:
        config = run.config
        assert config.rate_per_s is not None
        self.run = run
        self.start_ns = start_ns
        self.ns_per_message = 1e9 / config.rate_per_s
        count = config.connections
        # Due times of messages past the end of the window are never reached.
        self.last_due = math.ceil((run.tally.window_end_ns - start_ns) / self.ns_per_message)
        self.next_message = 0
        self.lag_counts: defaultdict[int, int] = defaultdict(int)
        # The pattern is `scheduled`: every connection is one that sends on schedule.
        self.connections = cast(list[Scheduled | None], run.connections)
        for index, connection in enumerate(self.connections):
            if connection is not None:
                connection.schedule(
                    start_ns + index * self.ns_per_message, count * self.ns_per_message
                )
        period_ns = max(int(self.ns_per_message), MIN_TICK_NS)
        self.timer = PeriodicTimer(asyncio.get_running_loop(), self.tick, start_ns, period_ns)

    def tick(self) -> None:
        run = self.run
        if not run.tally.sending or self.next_message >= self.last_due:
            return
        now_ns = perf_counter_ns()
        due = min(int((now_ns - self.start_ns) / self.ns_per_message) + 1, self.last_due)
        connections = self.connections
        count = len(connections)
        window_start_ns = run.tally.window_start_ns
        lag_counts = self.lag_counts
        message = self.next_message
        while message < due:
            connection = connections[message % count]
            if connection is not None and connection.alive:
                connection.send_due()
                due_ns = self.start_ns + message * self.ns_per_message
                if due_ns >= window_start_ns:
                    lag_counts[int(now_ns - due_ns) // 1000] += 1
            message += 1
        self.next_message = message

    def close(self) -> None:
        self.timer.close()


__all__ = ["NEVER_NS", "LoadError", "LoadRun", "Progress", "run"]
