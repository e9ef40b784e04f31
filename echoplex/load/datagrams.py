"""UDP load connections: each a connected datagram socket whose every echo is verified.

Datagram `k` of connection `c` carries the payload bytes of `c`'s stream at offset
`k * size` (`echoplex.payload`), so a datagram's bytes name its connection and its
sequence number, and nothing has to be added to it. Each echo that arrives is one of:

- **a datagram in flight on this socket**, byte for byte: echoed; its latency counts.
  Order is not required (`rate` may have several in flight): UDP does not promise it,
  and a server answering from several threads may reorder without lying.
- **an earlier datagram of this connection no longer in flight** (one of the last
  LATE_LOOKBACK sent, or one of the last LATE_MEMORY counted lost): `late`. Either a
  duplicate of an echo already verified, or an echo that came after its datagram was
  given up on. Neither an error nor a mismatch: the bytes are right, UDP may duplicate
  and delay, and the loss was already counted. The number is reported, so a server that
  answers everything twice shows.
- **anything else**: a mismatch, located against the datagram in flight (the oldest,
  with several), as on TCP: a corrupted byte, a datagram meant for another socket, one
  never sent. A clean prefix of it is the error `truncated`, one with bytes past its end
  `extra bytes`. Either ends the connection, as a mismatch ends a TCP one.
- **nothing within `timeout_s`** of the send: `lost`, an error counted per datagram
  (UDP may drop, and a run that lost datagrams did not see every echo come back). The
  connection carries on: `pingpong` sends its next datagram. The run's watchdog looks
  four times per `timeout_s` (at most every TICK_S), so a loss is noticed up to a
  quarter of `timeout_s` after it.

A foreign datagram could pass for a late one only if its bytes were exactly those of one
of this connection's recent datagrams: the two streams would have to sit at the same
position of the payload block at those sequence numbers (a chance of about
LATE_LOOKBACK in a million per pair of connections, and then only at that moment).

Hot path (a `pingpong` echo): one bytes comparison against the datagram sent, as TCP's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, cast

from ..payload import Mismatch, PayloadPattern
from .connections import CLOSED, CLOSING, FAILED, OPEN, Lifecycle, Tally, error_kind
from .result import ConnectionFailure

LATE_LOOKBACK = 64  # datagrams before the newest one sent that an echo may repeat
LATE_MEMORY = 64  # datagrams counted lost, per connection, whose echo may still come


def _not_connected(data: bytes) -> None:
    raise RuntimeError("not connected yet")


class DatagramConnection(Lifecycle, asyncio.DatagramProtocol):
    """Connection `index`'s datagrams, sent and verified; a subclass per pattern.

    It answers the run the way a TCP `LoadConnection` does (`verified`, `outstanding`,
    `watch`, `give_up`, `close`...), in datagrams' bytes.
    """

    __slots__ = ("answered", "lost_seqs", "payload", "sendto", "transport")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)  # here `owed` counts datagrams
        self.payload = payload
        self.transport: asyncio.DatagramTransport | None = None
        self.sendto: Callable[[bytes], object] = _not_connected
        self.answered = 0  # datagrams whose echo came back verified
        self.lost_seqs: deque[int] = deque(maxlen=LATE_MEMORY)

    def in_flight(self) -> int:
        """Datagrams sent whose echo has not come back and is still awaited."""
        raise NotImplementedError

    def verified(self) -> int:
        return self.answered * self.size

    def outstanding(self) -> int:
        return (self.in_flight() + self.owed) * self.size

    def watch(self, elapsed_s: float, now_ns: int) -> None:
        """The run's watchdog, every tick: count datagrams in flight too long as lost."""
        raise NotImplementedError

    def give_up(self) -> None:
        """The end of the run waited `timeout_s`: what is still in flight is lost."""
        self.watch(0.0, 1 << 62)

    # asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.DatagramTransport subclasses, but have its
        # methods; the socket is connected, so sendto needs no address.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.sendto = self.transport.sendto

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for this socket, e.g. port unreachable: no server there any more.
        self.fail(error_kind(exc), getattr(exc, "strerror", None) or str(exc))

    def resume_writing(self) -> None:
        self.write_paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state == OPEN and exc is not None:
            self._record_failure(error_kind(exc), getattr(exc, "strerror", None) or str(exc))
            self.state = FAILED
        elif self.state in (OPEN, CLOSING):
            self.state = CLOSED

    # for the run and the subclasses

    def _record_failure(self, kind: str, detail: str, offset: int | None = None) -> None:
        at = self.verified() if offset is None else offset
        self.tally.failed(ConnectionFailure(self.index, kind, at, detail))

    def _lost(self, seq: int) -> None:
        self.lost_seqs.append(seq)
        self._record_failure(
            "lost",
            f"datagram {seq} not echoed within {self.tally.timeout_s:g}s",
            seq * self.size,
        )

    def _next_seq(self) -> int:
        return self.sender.offset // self.size

    def _newest_seq(self) -> int:
        """The datagram sent last (0 before any)."""
        return max(self._next_seq() - 1, 0)

    def _unexpected(self, data: bytes, reference_seq: int) -> None:
        """An echo that is no datagram in flight: late, or wrong (against `reference_seq`)."""
        if self.state != OPEN:
            return
        if self._is_late(data):
            self.tally.late_datagrams += 1
            return
        size = self.size
        expected = self.payload.slice(self.index, reference_seq * size, size)
        at = next((i for i, (e, r) in enumerate(zip(expected, data, strict=False)) if e != r), None)
        if at is not None:
            offset = reference_seq * size + at
            self.tally.mismatched(Mismatch(self.index, offset, expected[at], data[at]))
            self._end(FAILED)
            return
        kind = "truncated" if len(data) < size else "extra bytes"
        self._record_failure(
            kind,
            f"datagram {reference_seq}: {len(data)} bytes echoed for {size} sent",
            reference_seq * size,
        )
        self._end(FAILED)

    def _is_late(self, data: bytes) -> bool:
        """Whether `data` is an earlier datagram of this connection, byte for byte."""
        size = self.size
        if len(data) != size:
            return False
        matches, index = self.payload.matches, self.index
        newest = self._next_seq() - 1
        for seq in range(newest, max(newest - LATE_LOOKBACK, -1), -1):
            if matches(index, seq * size, data):
                return True
        return any(matches(index, seq * size, data) for seq in self.lost_seqs)


class DatagramPingPong(DatagramConnection):
    """Closed loop: one datagram in flight; the next goes when its echo is back, or once
    it is counted lost."""

    __slots__ = ("expected", "sent_ns")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)
        self.expected: bytes | None = None  # the datagram in flight, if any
        self.sent_ns = 0

    def in_flight(self) -> int:
        return 0 if self.expected is None else 1

    def begin(self) -> None:
        self._send(perf_counter_ns())

    def _send(self, now_ns: int) -> None:
        self.sent_ns = now_ns
        self.expected = expected = self.sender.next(self.size)
        self.sendto(expected)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data != self.expected:
            self._unexpected(data, self._newest_seq())
            return
        # Tally.record and _send, inlined: this is the UDP hot path.
        now_ns = perf_counter_ns()
        tally = self.tally
        sent_ns = self.sent_ns
        if tally.window_start_ns <= sent_ns < tally.window_end_ns:
            tally.latency_counts[(now_ns - sent_ns) // 1000] += 1
        self.answered += 1
        if tally.sending:
            self.sent_ns = now_ns
            self.expected = expected = self.sender.next(self.size)
            self.sendto(expected)
        else:
            self.expected = None

    def watch(self, elapsed_s: float, now_ns: int) -> None:
        if self.expected is None or now_ns - self.sent_ns < self.tally.timeout_ns:
            return
        self.expected = None
        self._lost(self._newest_seq())
        if self.tally.sending and self.state == OPEN:
            self._send(perf_counter_ns())

    def _end(self, state: str) -> None:
        self.expected = None
        super()._end(state)


class DatagramRate(DatagramConnection):
    """Open loop: a datagram each time the run's schedule says, whatever has come back.

    Latency is measured from each datagram's intended time (`first_ns + seq *
    interval_ns`), as TCP's `Rate` does; a loss from when it was actually sent.
    """

    __slots__ = ("first_ns", "flying", "interval_ns")

    def __init__(self, tally: Tally, payload: PayloadPattern, index: int) -> None:
        super().__init__(tally, payload, index)
        self.first_ns = 0.0
        self.interval_ns = 0.0
        self.flying: deque[tuple[int, int]] = deque()  # (seq, sent_ns), oldest first

    def in_flight(self) -> int:
        return len(self.flying)

    def schedule(self, first_ns: float, interval_ns: float) -> None:
        self.first_ns = first_ns
        self.interval_ns = interval_ns

    def send_due(self) -> None:
        if self.write_paused or self.owed:
            self.owed += 1
        else:
            self._send(perf_counter_ns())

    def resume_writing(self) -> None:
        super().resume_writing()
        now_ns = perf_counter_ns()
        while self.owed and not self.write_paused and self.state == OPEN:
            self.owed -= 1
            self._send(now_ns)

    def _send(self, now_ns: int) -> None:
        self.flying.append((self._next_seq(), now_ns))
        self.sendto(self.sender.next(self.size))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flying, size = self.flying, self.size
        if len(data) == size:
            matches, index = self.payload.matches, self.index
            for at, (seq, _sent_ns) in enumerate(flying):  # the oldest, almost always
                if matches(index, seq * size, data):
                    del flying[at]
                    self._echoed(seq)
                    return
        self._unexpected(data, flying[0][0] if flying else self._newest_seq())

    def _echoed(self, seq: int) -> None:
        self.answered += 1
        self.tally.record(int(self.first_ns + seq * self.interval_ns), perf_counter_ns(), 1)

    def watch(self, elapsed_s: float, now_ns: int) -> None:
        flying, timeout_ns = self.flying, self.tally.timeout_ns
        while flying and now_ns - flying[0][1] >= timeout_ns:
            self._lost(flying.popleft()[0])

    def _end(self, state: str) -> None:
        self.flying.clear()
        self.owed = 0
        super()._end(state)


__all__ = ["LATE_LOOKBACK", "LATE_MEMORY", "DatagramConnection", "DatagramPingPong", "DatagramRate"]
