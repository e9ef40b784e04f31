"""UDP echo (RFC 862): every datagram answered with one datagram of the same bytes.

`echoplex serve --udp` serves UDP alone, in the main thread; `--udp --tcp` serves it
beside the TCP model on the same port number, in a thread of its own with its own event
loop, both stopped by the same `Shutdown`. In `workers` mode the supervisor process
serves UDP alone: the workers are TCP only (a UDP socket per worker would split each
source's rate limit between them).

- One event loop (uvloop when installed) and one socket per `--host`, all on the same
  port; each datagram reaches an `EchoDatagramProtocol` that asks the reflection guard
  (`echoplex.udp_guard`) first and answers with `sendto`, or drops the datagram and
  counts why. Drops are reported at most once a second, with counts by reason.
- Never more bytes out than in: the answer is the datagram itself. An empty datagram is
  answered with an empty one (RFC 862 sends back "the data" of every datagram, none
  included, and it reflects nothing). asyncio's and uvloop's transports skip empty
  sends, so that one goes out on the socket directly.
- The transports read up to 256 KiB at once, so no datagram is cut short; one too big
  to answer on its family is dropped (`oversize`).
- Memory stays bounded: while the transport's send buffer is over its high-water mark
  (`pause_writing`), datagrams are dropped (`send-buffer-full`) rather than queued.
- Conditions on purpose (`--latency`, `--jitter`, `--drop`, drawn per datagram by
  `--toxicity`): after the guard allows a datagram, the socket's `DatagramConditions`
  (`echoplex.conditions`) says when to answer it, or not at all (dropped, `drop`). A
  delayed answer waits on a loop timer, never blocking the loop, and is sent once. The
  guard decides first, so a datagram it refuses is neither delayed nor held. What waits
  is bounded over all the sockets (`HeldAnswers`: `MAX_HELD_ANSWERS` answers and
  `MAX_HELD_BYTES` of payload); past that, a datagram is dropped (`held`), so a flood
  under `--latency` cannot grow memory. A live change (the control API replacing
  `plan.conditions`) reaches each socket at its next datagram.
- On stop, answers still waiting are dropped (`stopped`), not sent early: sending them
  at once would break the delay they were promised, and the client of a stopping
  server sees a lost datagram either way.
- No `SO_REUSEADDR` on UDP sockets: on Linux it lets a second server bind the same UDP
  port and silently take its datagrams, and UDP has no TIME_WAIT for it to help with.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

from ._throttle import Throttle
from .conditions import DatagramConditions, LiveConditions
from .errors import StartupError
from .events import DatagramEvents, LogEvents, ServerEvents
from .plan import ServerPlan
from .shutdown import Shutdown
from .udp_guard import Clock, ReflectionGuard

log = logging.getLogger("echoplex.udp")

# Reasons a datagram the guard allowed still goes unanswered.
SEND_BUFFER_FULL = "send-buffer-full"
SEND_ERROR = "send-error"
DROP = "drop"  # --drop: left unanswered on purpose
HELD = "held"  # its delayed answer found no room among those waiting
STOPPED = "stopped"  # its delayed answer was still waiting when the server stopped

# What delayed answers may hold at once, over all of a server's sockets. At the default
# total rate (10,000 a second) a second of --latency fits; a longer one, or a flood
# without a total rate, is dropped past this instead of held. The bytes bound is what
# matters for big datagrams (10,000 of 64 KiB would be 640 MiB).
MAX_HELD_ANSWERS = 10_000
MAX_HELD_BYTES = 32 * 1024 * 1024

DROP_REPORT_INTERVAL_S = 1.0
# Beside TCP, both loops watch the Shutdown's wakeup socket, and the TCP model may read
# the wakeup byte before this loop sees it; so the stop flag is also checked this often.
STOP_POLL_S = 0.25
# How long closing transports may take to flush what they hold before they are aborted.
CLOSE_TIMEOUT_S = 1.0
STARTUP_TIMEOUT_S = 30.0


class Tally:
    """Datagrams answered and dropped; drops reported at most once per interval."""

    def __init__(self, events: DatagramEvents, interval_s: float = DROP_REPORT_INTERVAL_S) -> None:
        self.events = events
        self.answered = 0
        self.dropped: Counter[str] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last_source: Any = None
        self._throttle = Throttle(interval_s)

    def drop(self, reason: str, source: Any = None, count: int = 1) -> None:
        self.dropped[reason] += count
        self._unreported[reason] += count
        if source is not None:
            self._last_source = source
        if self._throttle.allow("dropped") is not None:
            self.report()

    def report(self) -> None:
        """Report the drops not reported yet, if any."""
        if self._unreported:
            self.events.udp_dropped(dict(self._unreported), self._last_source)
            self._unreported.clear()


class HeldAnswers:
    """Answers waiting for their time on the loop's timers, bounded in count and in
    payload bytes. One per server, shared by its sockets (they share one loop)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_answers: int = MAX_HELD_ANSWERS,
        max_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        self._loop = loop
        self.max_answers = max_answers
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._waiting: dict[int, tuple[asyncio.TimerHandle, int]] = {}
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def hold(self, delay_s: float, size: int, answer: Callable[..., None], *args: Any) -> bool:
        """Call `answer(*args)` in `delay_s`, if there is room for `size` more bytes."""
        if len(self._waiting) >= self.max_answers or self.held_bytes + size > self.max_bytes:
            return False
        key = next(self._keys)
        handle = self._loop.call_later(delay_s, self._due, key, answer, args)
        self._waiting[key] = (handle, size)
        self.held_bytes += size
        return True

    def _due(self, key: int, answer: Callable[..., None], args: tuple[Any, ...]) -> None:
        _, size = self._waiting.pop(key)
        self.held_bytes -= size
        answer(*args)

    def cancel_all(self) -> int:
        """Forget every waiting answer; how many there were."""
        for handle, _ in self._waiting.values():
            handle.cancel()
        count = len(self._waiting)
        self._waiting.clear()
        self.held_bytes = 0
        return count


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    """Answers each datagram the guard allows with the same bytes, on one socket, when
    the conditions say (at once without any)."""

    def __init__(
        self,
        sock: socket.socket,
        guard: ReflectionGuard,
        tally: Tally,
        live: LiveConditions,
        held: HeldAnswers,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sock = sock
        self.guard = guard
        self.tally = tally
        self.live = live
        self.held = held
        self.clock = clock
        self._conditions: DatagramConditions | None = None
        self._conditions_version = -1  # none taken yet
        self.paused = False
        self.send_failed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.DatagramTransport subclasses, but have its methods.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = self.clock()
        reason = self.guard.verdict(addr, now, len(data))
        if reason is None:
            reason = self._answer_in_time(data, addr, now)
        if reason is not None:
            self.tally.drop(reason, addr)

    def _answer_in_time(self, data: bytes, addr: Any, now: float) -> str | None:
        """Answer now, or hold the answer until the conditions say; else why not."""
        conditions = self._current_conditions()
        due_at = now if conditions is None else conditions.datagram(now)
        if due_at is None:
            return DROP
        if due_at <= now:
            return self._answer(data, addr)
        if not self.held.hold(due_at - now, len(data), self._answer_held, data, addr):
            return HELD
        return None

    def _current_conditions(self) -> DatagramConditions | None:
        # `set` replaces the conditions before it counts the change, so a version read
        # first never pairs a new count with old conditions.
        version = self.live.version
        if version != self._conditions_version:
            self._conditions = self.live.for_datagrams()
            self._conditions_version = version
        return self._conditions

    def _answer_held(self, data: bytes, addr: Any) -> None:
        reason = self._answer(data, addr)
        if reason is not None:
            self.tally.drop(reason, addr)

    def _answer(self, data: bytes, addr: Any) -> str | None:
        """Send the answer (counted if it went, or by its error); SEND_BUFFER_FULL if the
        send buffer is over its mark."""
        if self.paused:
            return SEND_BUFFER_FULL
        self.send_failed = False
        if data:
            # A send that fails at once comes back through error_received, before this returns.
            self.transport.sendto(data, addr)
        else:
            try:
                self.sock.sendto(b"", addr)
            except OSError as exc:
                self.error_received(exc)
        if not self.send_failed:
            self.tally.answered += 1
        return None

    def error_received(self, exc: Exception) -> None:
        # A send that failed (on Linux an unconnected UDP socket hears of no ICMP errors).
        code = getattr(exc, "errno", None) or 0
        reason = errno.errorcode.get(code, str(exc))
        log.debug("udp send failed: %s", reason, extra={"event": "udp_send_failed"})
        self.send_failed = True
        self.tally.drop(SEND_ERROR)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class _ListeningOnly:
    """UDP reporting for events without the UDP hooks: the address through their
    `listening`, drops and totals to the log."""

    def __init__(self, events: ServerEvents) -> None:
        self._events = events
        self._log = LogEvents(log)

    def udp_listening(self, addresses: list[Any]) -> None:
        self._events.listening(addresses)

    def udp_dropped(self, counts: dict[str, int], last_source: Any) -> None:
        self._log.udp_dropped(counts, last_source)

    def udp_stopped(self, answered: int, dropped: dict[str, int]) -> None:
        self._log.udp_stopped(answered, dropped)


def datagram_events(events: ServerEvents) -> DatagramEvents:
    return events if isinstance(events, DatagramEvents) else _ListeningOnly(events)


class UdpEchoServer:
    """UDP echo on bound sockets, on an event loop of its own, until `shutdown` is
    requested or `stop()` is called. `serve()` runs the loop in the calling thread."""

    def __init__(
        self,
        plan: ServerPlan,
        events: ServerEvents,
        shutdown: Shutdown,
        *,
        max_held_answers: int = MAX_HELD_ANSWERS,
        max_held_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        config = plan.config
        assert plan.loop is not None, "the plan resolves a loop when UDP is asked for"
        self.sockets = plan.udp_sockets
        self.conditions = plan.conditions
        self._held_bounds = (max_held_answers, max_held_bytes)
        self.held: HeldAnswers | None = None
        """The answers waiting for their time, once serving."""
        self.events = datagram_events(events)
        self.shutdown = shutdown
        self.factory = plan.loop
        self.guard = ReflectionGuard(
            config.udp_rate_per_source, config.udp_rate_total, config.udp_max_sources
        )
        self.tally = Tally(self.events)
        self.ready = threading.Event()
        """Set once it answers, or once it has failed to start (then `error` is set)."""
        self.started = False
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._stop_requested = False

    def serve(self) -> None:
        """Answer datagrams until stopped; the sockets are closed when it returns."""
        try:
            with asyncio.Runner(loop_factory=self.factory) as runner:
                runner.run(self._serve())
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            for sock in self.sockets:
                sock.close()
            self.ready.set()

    def serve_in_thread(self) -> None:
        """`serve()` as a thread's target: the error is kept in `error` for the thread that
        started it; one after startup also stops the whole server, loudly."""
        try:
            self.serve()
        except BaseException:
            if self.started:
                log.exception("udp echo failed; stopping the server", extra={"event": "udp_failed"})
                self.shutdown.request()

    def stop(self) -> None:
        """Stop serving; from any thread, at any time."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _stopping(self) -> bool:
        return self._stop_requested or self.shutdown.requested

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._loop = loop  # after the event exists: stop() may use it from now on
        # Not drained here: beside TCP the wakeup byte is the TCP model's to read; a
        # reader left on it would fire for ever, so it goes after the first wakeup.
        loop.add_reader(self.shutdown.fileno(), self._on_stop_fd)
        protocols: list[EchoDatagramProtocol] = []
        transports: list[asyncio.BaseTransport] = []
        held = self.held = HeldAnswers(loop, *self._held_bounds)
        try:
            for sock in self.sockets:
                factory = functools.partial(
                    EchoDatagramProtocol, sock, self.guard, self.tally, self.conditions, held
                )
                transport, protocol = await loop.create_datagram_endpoint(factory, sock=sock)
                transports.append(transport)
                protocols.append(protocol)
            self.events.udp_listening([sock.getsockname() for sock in self.sockets])
            # Metrics read the live tally when scraped (see echoplex.metrics).
            watch_tally = getattr(self.events, "udp_watch", None)
            if watch_tally is not None:
                watch_tally(self.tally)
            self.started = True
            self.ready.set()
            while not self._stopping():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_POLL_S):
                        await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.shutdown.fileno())
            unsent = held.cancel_all()
            if unsent:
                self.tally.drop(STOPPED, count=unsent)
            await _close(transports, protocols)
            self.tally.report()
            self.events.udp_stopped(self.tally.answered, dict(self.tally.dropped))

    def _on_stop_fd(self) -> None:
        assert self._loop is not None and self._wakeup is not None
        self._loop.remove_reader(self.shutdown.fileno())
        self._wakeup.set()


async def _close(
    transports: list[asyncio.BaseTransport], protocols: list[EchoDatagramProtocol]
) -> None:
    """Close the transports, letting them send what they hold for a moment, then abort."""
    for transport in transports:
        transport.close()
    if not protocols:
        return
    waiting = [protocol.lost for protocol in protocols]
    _, pending = await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT_S)
    if pending:
        for transport in transports:
            cast(asyncio.DatagramTransport, transport).abort()
        await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)


def serve_udp(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    """Serve UDP echo on the plan's sockets in this thread until `shutdown` is requested
    (`server.run` routes SIGINT/SIGTERM to it)."""
    UdpEchoServer(plan, events, shutdown).serve()


@contextlib.contextmanager
def serving_beside_tcp(
    plan: ServerPlan, events: ServerEvents, shutdown: Shutdown
) -> Iterator[None]:
    """Serve UDP echo in a thread of its own while the block serves TCP. The thread has
    ended when the block exits."""
    server = UdpEchoServer(plan, events, shutdown)
    thread = threading.Thread(target=server.serve_in_thread, name="udp-echo", daemon=True)
    thread.start()
    try:
        server.ready.wait(STARTUP_TIMEOUT_S)
        if server.error is not None:
            raise server.error
        if not server.ready.is_set():
            raise StartupError("udp echo did not start in time")
        yield
    finally:
        server.stop()
        thread.join()
    if server.error is not None:
        raise server.error
