"""One load connection: a verifying `asyncio.Protocol`, and one subclass per pattern.

Every echoed chunk goes through the connection's `Verifier` before anything else, so
a wrong byte ends the connection with a mismatch at its exact offset. Counting
and timing go into the run's shared `Tally`. The hot path (`data_received` of a
ping-pong) allocates nothing of its own: payloads are views of the shared block,
timestamps are integers, and latencies are only counted, not stored.

Asyncio Protocols, not streams: a stream reader adds a buffer copy and a task
switch per message, which is the load generator's whole budget.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import cast

from ..payload import Mismatch, PayloadPattern, Sender, Verifier
from .config import LoadConfig
from .result import CLOSED_EARLY, MAX_SAMPLES, RESET, ConnectionFailure

NEVER_NS = 1 << 62
# Larger sends go to the transport in pieces, each a view of the payload block.
WRITE_CHUNK_BYTES = 256 * 1024
# Ping-pong messages up to this size are kept to compare their echo against whole.
FAST_PATH_BYTES = 64 * 1024

OPEN, CLOSING, CLOSED, FAILED = "open", "closing", "closed", "failed"


class Tally:
    """What every connection of one run reports into: counts, latencies, failures.

    A message counts (in the latency counts: their sum is the run's request count,
    so the hot path keeps no separate counter) when it was sent, or was
    due to be sent, inside [window_start_ns, window_end_ns), and its echo came back
    whole and verified, even if that was after the window closed.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.size = config.size_bytes
        self.timeout_s = config.timeout_s
        self.timeout_ns = int(config.timeout_s * 1e9)
        self.sending = False
        self.window_start_ns = NEVER_NS
        self.window_end_ns = NEVER_NS
        # {latency_us: messages}; a defaultdict so counting is one `+= 1`.
        self.latency_counts: defaultdict[int, int] = defaultdict(int)
        self.errors_by_kind: Counter[str] = Counter()
        self.error_samples: list[ConnectionFailure] = []
        self.mismatches = 0
        self.mismatch_samples: list[Mismatch] = []
        # UDP only: echoes of datagrams already echoed or already counted lost.
        self.late_datagrams = 0

    def record(self, sent_ns: int, now_ns: int, messages: int) -> None:
        if self.window_start_ns <= sent_ns < self.window_end_ns:
            self.latency_counts[(now_ns - sent_ns) // 1000] += messages

    def take_latency_counts(self) -> dict[int, int]:
        counts, self.latency_counts = self.latency_counts, defaultdict(int)
        return counts

    def failed(self, failure: ConnectionFailure) -> None:
        self.errors_by_kind[failure.kind] += 1
        if len(self.error_samples) < MAX_SAMPLES:
            self.error_samples.append(failure)

    def mismatched(self, mismatch: Mismatch) -> None:
        self.mismatches += 1
        if len(self.mismatch_samples) < MAX_SAMPLES:
            self.mismatch_samples.append(mismatch)


def error_kind(exc: BaseException) -> str:
    """A short, countable name for why a connection failed."""
    if isinstance(exc, ssl.SSLError):  # an OSError whose errno is OpenSSL's, not the system's
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    if isinstance(exc, TimeoutError):
        return "timeout"
    code = getattr(exc, "errno", None)
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if code:
        return errno.errorcode.get(code, str(code)).lower()
    return type(exc).__name__


def _not_connected(data: bytes | memoryview) -> None:
    raise RuntimeError("not connected yet")


class Lifecycle:
    """What every load connection, stream or datagram, has: its place in the run (the
    tally it reports to, its index, its outgoing payload) and how it ends: `fail`
    (counted, aborted), `close` (healthy: flushed, then closed), and the state each
    leaves it in. Subclasses say what `outstanding` counts."""

    __slots__ = ("index", "lost", "owed", "sender", "size", "state", "tally", "write_paused")
    transport: asyncio.BaseTransport | None

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        self.tally = tally
        self.index = index
        self.size = tally.size
        self.sender = Sender(payload, index)
        self.state = OPEN
        self.lost = False  # connection_lost has run: the socket is closed
        self.write_paused = False
        self.owed = 0  # held back while the transport's buffer is full (see subclasses)

    @property
    def alive(self) -> bool:
        return self.state == OPEN

    def outstanding(self) -> int:
        """Bytes sent or due whose echo has not come back yet."""
        raise NotImplementedError

    def settled(self) -> bool:
        return self.state != OPEN or self.outstanding() == 0

    def begin(self) -> None:
        """Start this connection's traffic (the run calls it once sending starts)."""

    def pause_writing(self) -> None:
        self.write_paused = True

    def _record_failure(self, kind: str, detail: str) -> None:
        raise NotImplementedError

    def fail(self, kind: str, detail: str = "") -> None:
        """Count a failure of this connection and abort it."""
        if self.state == OPEN:
            self._record_failure(kind, detail)
            self._end(FAILED)

    def close(self) -> None:
        """End a healthy connection: queued bytes are flushed, then it closes."""
        if self.state == OPEN:
            self.state = CLOSING
            if self.transport is not None:
                self.transport.close()

    def _end(self, state: str) -> None:
        self.state = state
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()


class LoadConnection(Lifecycle, asyncio.Protocol):
    """Sends connection `index`'s payload stream and verifies its echo as it arrives."""

    __slots__ = ("transport", "verifier", "watched_ns", "watched_offset", "write")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)  # here `owed` counts bytes
        self.verifier = Verifier(payload, index)
        self.transport: asyncio.Transport | None = None
        self.write: Callable[[bytes | memoryview], object] = _not_connected
        # For the run's watchdog: the echo's progress at its last look, and since when
        # it has been waiting at that offset (0: not waiting).
        self.watched_offset = 0
        self.watched_ns = 0

    def verified(self) -> int:
        """Bytes of the echo verified so far."""
        return self.verifier.offset

    def outstanding(self) -> int:
        return self.sender.offset + self.owed - self.verified()

    def echoed(self) -> None:
        """Called after each verified chunk: pattern-specific bookkeeping."""

    def watch(self, elapsed_s: float, now_ns: int) -> None:
        """The run's watchdog: fail a connection whose echo has made no progress for
        `timeout_s` while bytes are outstanding. Timed from the first look that saw it
        waiting with no progress since the look before, so that it never fails early
        however seldom the run looks (with many connections, each only every few
        ticks: `engine.LoadRun.watch_every_ticks`)."""
        offset = self.verified()
        if self.outstanding() <= 0:
            self.watched_offset, self.watched_ns = offset, 0  # nothing to wait for
        elif offset != self.watched_offset or not self.watched_ns:
            self.watched_offset, self.watched_ns = offset, now_ns
        elif now_ns - self.watched_ns >= self.tally.timeout_ns:
            self.fail("timeout", f"no echo for {self.tally.timeout_s:g}s")

    def give_up(self) -> None:
        """The end of the run waited `timeout_s` and bytes are still outstanding."""
        self.fail(
            "timeout", f"{self.outstanding()} bytes not echoed {self.tally.timeout_s:g}s later"
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write

    def data_received(self, data: bytes) -> None:
        if self.state != OPEN:
            return
        excess = len(data) - (self.sender.offset - self.verifier.offset)
        checked = data if excess <= 0 else memoryview(data)[: len(data) - excess]
        if self.verifier.feed(checked) is not None:
            self._mismatched()
            return
        if excess > 0:
            self.fail("extra bytes", f"{excess} bytes more than were sent")
            return
        self.echoed()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost says whether that was early

    def resume_writing(self) -> None:
        self.write_paused = False
        while self.owed and not self.write_paused and self.state == OPEN:
            length = min(self.owed, WRITE_CHUNK_BYTES)
            self.owed -= length
            self._write(length)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state == OPEN:
            if exc is not None:
                self._record_failure(error_kind(exc), getattr(exc, "strerror", None) or str(exc))
                self.state = FAILED
            elif self.tally.sending or self.outstanding():
                self._record_failure(CLOSED_EARLY, "the server closed the connection")
                self.state = FAILED
            elif self.tally.window_start_ns == NEVER_NS:
                # Before the traffic began (while the others were still connecting): a
                # connection the run was to use, gone, as a server over its
                # --max-connections does with those it accepts and closes at once.
                self._record_failure(
                    CLOSED_EARLY, "the server closed the connection before the traffic began"
                )
                self.state = FAILED
            else:
                self.state = CLOSED  # closed once everything came back and nothing more was due
        elif self.state == CLOSING:
            self.state = CLOSED

    # for the run and the subclasses

    def _mismatched(self) -> None:
        assert self.verifier.mismatch is not None
        self.tally.mismatched(self.verifier.mismatch)
        self._end(FAILED)

    def _record_failure(self, kind: str, detail: str) -> None:
        self.tally.failed(ConnectionFailure(self.index, kind, self.verified(), detail))

    def _write(self, length: int) -> None:
        while length > 0:
            piece = min(length, WRITE_CHUNK_BYTES)
            self.write(self.sender.take(piece))
            length -= piece


class PingPong(LoadConnection):
    """Closed loop: one message in flight; the next goes as soon as its echo is whole.

    This is the load generator's hottest path, and it must cost less CPU than the
    server's echo of the same message. So for messages up to FAST_PATH_BYTES the
    connection keeps `expected`, the bytes of the current message not yet echoed,
    and an echo chunk that is exactly those bytes (the usual case: the whole message
    in one read) is checked with one bytes comparison, no further call. That is the
    same check the Verifier makes, since `expected` is what was sent; anything else
    (a partial chunk, a wrong byte, too many bytes) goes through the Verifier, moved
    up to where the comparisons left off.
    """

    __slots__ = ("expected", "fast", "message_end", "sent_ns")
    repeat = True  # send the next message as soon as an echo is complete

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)
        self.fast = self.size <= FAST_PATH_BYTES
        self.expected = b""  # never equal to a chunk: there is no message in flight
        self.message_end = 0
        self.sent_ns = 0

    def begin(self) -> None:
        self._send(perf_counter_ns())

    def verified(self) -> int:
        if not self.fast:
            return self.verifier.offset
        # Whole-message comparisons do not move the Verifier, and the Verifier runs
        # ahead of `expected` until echoed() trims it: each is a lower bound.
        return max(self.message_end - len(self.expected), self.verifier.offset)

    def data_received(self, data: bytes) -> None:
        if data != self.expected:
            if self.fast and self.verifier.offset < self.verified():
                self.verifier.seek(self.verified())
            super().data_received(data)  # verifies, then calls echoed()
            return
        # The rest of the message, byte for byte: Tally.record and _send, inlined.
        now_ns = perf_counter_ns()
        tally = self.tally
        sent_ns = self.sent_ns
        if tally.window_start_ns <= sent_ns < tally.window_end_ns:
            tally.latency_counts[(now_ns - sent_ns) // 1000] += 1
        if tally.sending and self.repeat:
            self.sent_ns = now_ns
            self.expected = expected = self.sender.next(self.size)
            self.write(expected)
            self.message_end += self.size
        else:
            self.expected = b""

    def echoed(self) -> None:
        remaining = self.message_end - self.verifier.offset
        if self.fast:
            self.expected = self.expected[len(self.expected) - remaining :] if remaining else b""
        if remaining == 0:
            now_ns = perf_counter_ns()
            self.tally.record(self.sent_ns, now_ns, 1)
            if self.tally.sending and self.repeat:
                self._send(now_ns)

    def _send(self, now_ns: int) -> None:
        self.sent_ns = now_ns
        if self.fast:
            self.expected = self.sender.next(self.size)
            self.write(self.expected)
        else:
            self._write(self.size)
        self.message_end = self.sender.offset


class Hold(PingPong):
    """One round trip each time the run calls `begin`, then idle."""

    __slots__ = ()
    repeat = False


class Counted(LoadConnection):
    """A connection with many messages in flight: `done` counts those whose echo is
    complete, and `completed` hears of each batch of newly completed ones."""

    __slots__ = ("done",)

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)
        self.done = 0

    def echoed(self) -> None:
        completed = self.verifier.offset // self.size
        if completed > self.done:
            self.completed(completed, perf_counter_ns())

    def completed(self, completed: int, now_ns: int) -> None:
        """Messages `done` up to `completed` came back whole at `now_ns`: record them."""
        raise NotImplementedError


class Stream(Counted):
    """Keeps `window` bytes in flight, refilled in one write as messages come back.

    Each message's latency runs from the write that carried it to its last echoed
    byte; writes are remembered as (end offset, time) batches, so the bookkeeping is
    per refill, not per message.
    """

    __slots__ = ("batches", "window")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int, window: int) -> None:
        super().__init__(tally, payload, index)
        self.window = max(window, self.size)
        self.batches: deque[tuple[int, int]] = deque()

    def begin(self) -> None:
        self._top_up(perf_counter_ns())

    def _top_up(self, now_ns: int) -> None:
        messages = (self.window - self.outstanding()) // self.size
        if messages > 0 and self.tally.sending:
            self._write(messages * self.size)
            self.batches.append((self.sender.offset, now_ns))

    def completed(self, completed: int, now_ns: int) -> None:
        while self.done < completed:
            batch_end, sent_ns = self.batches[0]
            batch_last = batch_end // self.size
            upto = min(completed, batch_last)
            self.tally.record(sent_ns, now_ns, upto - self.done)
            self.done = upto
            if upto == batch_last:
                self.batches.popleft()
        self._top_up(now_ns)


class Rate(Counted):
    """Open loop: sends when the run's schedule says, whatever has come back.

    Message `m` of this connection was due at `first_ns + m * interval_ns`; its
    latency is measured from then, not from when it could actually be written, so
    a stalled server (or a late client) shows up in the latency instead of
    silently slowing the schedule down (no coordinated omission). While the
    transport's buffer is full the bytes due are only counted (`owed`), which is
    enough since the payload at any offset can be regenerated.
    """

    __slots__ = ("first_ns", "interval_ns")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)
        self.first_ns = 0.0
        self.interval_ns = 0.0

    def schedule(self, first_ns: float, interval_ns: float) -> None:
        self.first_ns = first_ns
        self.interval_ns = interval_ns

    def send_due(self) -> None:
        if self.write_paused or self.owed:
            self.owed += self.size
        else:
            self._write(self.size)

    def completed(self, completed: int, now_ns: int) -> None:
        while self.done < completed:
            intended_ns = int(self.first_ns + self.done * self.interval_ns)
            self.tally.record(intended_ns, now_ns, 1)
            self.done += 1
