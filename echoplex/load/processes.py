"""A load spread over several processes, so that it can use more than one core.

One Python process drives as much traffic as one core allows. `run` splits the run's
connections into contiguous shares, one per process (`--processes`, at most one per
connection), each a fresh interpreter (`spawn`: nothing inherited from a parent that
may have threads) running the ordinary engine on its own event loop:

- connection numbers stay the run's: share k numbers its connections from
  `first_connection`, so its payloads, and the connection named in any error or
  mismatch, are those of a one-process run;
- a `scheduled` pattern's rate (and `--connect-rate`) is split in proportion to the
  connections, so each connection keeps the interval it has in one process, and share
  k's schedule is shifted by k messages of the whole rate, so the shares interleave
  rather than send together;
- traffic starts together: each share reports when its connections are open, and the
  parent then gives every share one start time on the monotonic clock they all read
  (CLOCK_MONOTONIC), a little ahead, so their measured windows coincide;
- each share sends back its result with its HDR histograms whole, merged exactly
  (`echoplex.load.merge`); `--json` has the merged figures and each share's.

Stopping: the shares ignore SIGINT and SIGTERM (Ctrl-C reaches the whole process
group), and the parent forwards each one it receives as a message: the first stops the
run early, the second cuts the drain short, as in one process. A share whose parent
has gone (its pipe closed) stops at once. A share that fails to start (the server is
not there: only the share holding connection 0 decides that, as one process does) or
dies stops the run with that one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from time import perf_counter_ns
from typing import Any

from ..errors import StartupError
from ..loops import loop_factory
from ..shutdown import Shutdown, stop_on_signals
from ..stats import require_hdrh
from . import engine
from .config import LoadConfig
from .engine import LoadError, LoadRun, Progress, ProgressCallback
from .merge import ShareResult, merged
from .result import LoadResult

# From the last share's "connected" to the common start: time for every share to read
# the start and be waiting for it (a message through a pipe takes microseconds).
START_AHEAD_S = 0.05
STOP_WAIT_S = 5.0  # how long stopped shares get to exit before they are killed


def check_dependencies(config: LoadConfig) -> None:
    """A StartupError naming the extra to install if the run needs what is not there:
    hdrhistogram always (`echoplex[load]`), uvloop if asked for by name."""
    require_hdrh()
    loop_factory(config.loop)


def run(config: LoadConfig, progress: ProgressCallback | None = None) -> LoadResult:
    """Run the load `config` describes, over `config.processes` processes (fewer if there
    are fewer connections), and return what it found (blocking)."""
    check_dependencies(config)  # before any process starts
    count = min(config.processes, config.connections)
    if count == 1:
        return engine.run(config, progress)
    return Spread(config, count, progress).run()


def shares(config: LoadConfig, count: int) -> list[LoadConfig]:
    """`config` split into `count` contiguous shares of its connections (and rates)."""
    base, extra = divmod(config.connections, count)
    parts = []
    first = 0
    for index in range(count):
        connections = base + (index < extra)
        part = connections / config.connections
        parts.append(
            replace(
                config,
                connections=connections,
                first_connection=config.first_connection + first,
                rate_per_s=_scaled(config.rate_per_s, part),
                connect_rate_per_s=_scaled(config.connect_rate_per_s, part),
                processes=1,
            )
        )
        first += connections
    return parts


def _scaled(rate: float | None, part: float) -> float | None:
    return None if rate is None else rate * part


class Spread:
    """The parent of a spread run: starts the shares, relays stops, merges the results."""

    def __init__(self, config: LoadConfig, count: int, progress: ProgressCallback | None) -> None:
        self.config = config
        self.shares = shares(config, count)
        self.progress = progress
        self.shutdown = Shutdown()
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.connected = 0
        self.latest: dict[int, Progress] = {}
        self.results: dict[int, ShareResult] = {}
        self.stops_sent = 0
        self.started = time.monotonic()

    def run(self) -> LoadResult:
        context = multiprocessing.get_context("spawn")
        try:
            with stop_on_signals(self.shutdown):
                for share in self.shares:
                    ours, theirs = context.Pipe()
                    process = context.Process(
                        target=share_main,
                        args=(share, theirs, self.progress is not None),
                        name=f"echoplex load {share.first_connection}",
                        daemon=True,
                    )
                    process.start()
                    theirs.close()  # so that a share's death closes the pipe
                    self.pipes.append(ours)
                    self.processes.append(process)
                self._supervise()
        except BaseException:
            self._stop_all("force")
            raise
        finally:
            self._reap()
            self.shutdown.close()
        return merged(self.config, [self.results[index] for index in range(len(self.shares))])

    def _supervise(self) -> None:
        """Relay messages until every share has sent its result."""
        open_pipes = dict(enumerate(self.pipes))
        wakeup = self.shutdown.fileno()
        while len(self.results) < len(self.shares):
            for ready in wait([*open_pipes.values(), wakeup]):
                if ready == wakeup:
                    self.shutdown.clear_wakeup()
                    self._relay_stops()
                    continue
                index = next(i for i, pipe in open_pipes.items() if pipe is ready)
                try:
                    message = self.pipes[index].recv()
                except (EOFError, OSError):  # closed; a reset if it closed unread
                    del open_pipes[index]
                    if index not in self.results:
                        raise LoadError(self._ended(index)) from None
                    continue
                self._heard(index, *message)

    def _ended(self, index: int) -> str:
        """Why share `index` ended without a result (its pipe closed)."""
        process = self.processes[index]
        process.join(STOP_WAIT_S)
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"status {code}"
        return f"load process {index} ended without a result ({how})"

    def _heard(self, index: int, kind: str, value: Any) -> None:
        if kind == "connected":
            self.connected += 1
            if self.connected == len(self.shares) and not self.shutdown.requested:
                self._start_all()
        elif kind == "progress":
            self.latest[index] = value
            if self.progress is not None and len(self.latest) == len(self.shares):
                self.progress(self._merged_progress())  # once every share has a figure
        elif kind == "result":
            self.results[index] = value
        elif kind == "failed":
            raise LoadError(value)

    def _start_all(self) -> None:
        start_ns = perf_counter_ns() + int(START_AHEAD_S * 1e9)
        rate = self.config.rate_per_s
        # Share k's schedule k messages later: the shares' messages interleave.
        step_ns = 1e9 / rate if self.config.pattern_class.scheduled and rate else 0.0
        for index, pipe in enumerate(self.pipes):
            with contextlib.suppress(OSError):
                pipe.send(("start", start_ns + int(index * step_ns)))

    def _relay_stops(self) -> None:
        """Each stop the parent was asked for, once to every share."""
        wanted = 2 if self.shutdown.forced else 1
        while self.stops_sent < wanted:
            self.stops_sent += 1
            self._stop_all("stop")

    def _stop_all(self, kind: str) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send((kind, None))

    def _reap(self) -> None:
        """Wait for every share to exit, reading (and dropping) what they still send so
        that none blocks on a full pipe; kill those still there after STOP_WAIT_S."""
        deadline = time.monotonic() + STOP_WAIT_S
        unread = list(self.pipes)
        running = [process for process in self.processes if process.is_alive()]
        while running and (remaining := deadline - time.monotonic()) > 0:
            for ready in wait([*unread, *(process.sentinel for process in running)], remaining):
                if isinstance(ready, Connection):
                    try:
                        ready.recv()
                    except (EOFError, OSError):  # closed; a reset if it closed unread
                        unread.remove(ready)
            running = [process for process in running if process.is_alive()]
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()
            process.close()
        for pipe in self.pipes:
            pipe.close()

    def _merged_progress(self) -> Progress:
        """The shares' latest progress as one line; its p99 is the highest share's, an
        upper bound of the whole run's (at most 1% of each share lies above it)."""
        latest = list(self.latest.values())
        return Progress(
            phase=latest[0].phase,
            elapsed_s=time.monotonic() - self.started,
            completed=sum(each.completed for each in latest),
            recent_per_s=sum(each.recent_per_s for each in latest),
            recent_mb_per_s=sum(each.recent_mb_per_s for each in latest),
            p99_us=max(each.p99_us for each in latest),
            errors=sum(each.errors for each in latest),
            mismatches=sum(each.mismatches for each in latest),
            alive=sum(each.alive for each in latest),
            connections=self.config.connections,
        )


# ------------------------------------------------------------------- in each share


def share_main(config: LoadConfig, pipe: Connection, report_progress: bool) -> None:
    """A share's process: run its part of the load and send back what it found."""
    # The parent relays stops: Ctrl-C reaches every process of the group at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    share = _Share(pipe)
    try:
        progress = share.send_progress if report_progress else None
        load = LoadRun(config, progress, start_time=share.start_time, handle_signals=False)
        share.load = load
        result = engine.run_on_loop(config, share.wrap(load.run))
        lag = load.send_lag.encode() if load.send_lag is not None else None
        share.send("result", ShareResult(result, load.histogram.encode(), lag))
    except StartupError as exc:
        share.send("failed", str(exc))
    finally:
        pipe.close()


class _Share:
    """A share's side of the pipe: hears the start and the stops, sends what it has."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.load: LoadRun | None = None
        self.start: asyncio.Future[int] | None = None

    def send(self, kind: str, value: Any) -> None:
        with contextlib.suppress(OSError):  # the parent has gone: nobody to tell
            self.pipe.send((kind, value))

    def send_progress(self, progress: Progress) -> None:
        self.send("progress", progress)

    def wrap(self, main: Callable[[], Any]) -> Callable[[], Any]:
        """`main`, listening to the parent while it runs."""

        async def listening() -> Any:
            loop = asyncio.get_running_loop()
            self.start = loop.create_future()
            loop.add_reader(self.pipe.fileno(), self._readable)
            try:
                return await main()
            finally:
                loop.remove_reader(self.pipe.fileno())

        return listening

    async def start_time(self) -> int:
        """Once connected: the start the parent gives every share (at once if stopped)."""
        assert self.start is not None and self.load is not None
        if self.load.interrupted:
            return perf_counter_ns()
        self.send("connected", None)
        return await self.start

    def _readable(self) -> None:
        assert self.load is not None and self.start is not None
        for kind, value in self._messages():
            if kind == "start" and not self.start.done():
                self.start.set_result(value)
            elif kind in ("stop", "force"):
                self._stop(2 if kind == "force" else 1)

    def _messages(self) -> Iterator[tuple[str, Any]]:
        try:
            while self.pipe.poll():
                yield self.pipe.recv()
        except (EOFError, OSError):  # the parent has gone: stop, without draining
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self._stop(2)

    def _stop(self, times: int) -> None:
        assert self.load is not None and self.start is not None
        for _ in range(times):
            self.load.request_stop()
        if not self.start.done():
            self.start.set_result(perf_counter_ns())


__all__ = ["Spread", "check_dependencies", "run", "share_main", "shares"]
