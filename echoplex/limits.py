"""Who may connect, and for how long: the server's limits as plain logic, without I/O.

Every model asks `Admission` before serving a connection and takes its time limits
from `TimeLimits` (through `Deadlines` or `ProgressWatch`), so the rules are the same
whichever model runs them and can be tested with a fake clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from .config import ServerConfig
from .outcomes import Outcome

Clock = Callable[[], float]

# Reasons a connection is turned away at the door (also metric label values).
OVER_MAX_CONNECTIONS = "max-connections"
OVER_MAX_PER_IP = "max-per-ip"


class Counts(Protocol):
    """Where `Admission` keeps its numbers: in this process (`LocalCounts`), or in memory
    the worker processes of the `workers` model share (`echoplex._shared_admission`).
    `Admission` holds `locked()` around each decision, so the numbers it reads cannot
    change before it counts the connection in."""

    def locked(self) -> AbstractContextManager[object]: ...

    def total(self) -> int:
        """Connections open."""
        ...

    def of(self, ip: str) -> int:
        """Connections open from `ip`."""
        ...

    def add(self, ip: str, connections: int, *, opened: int = 0) -> bool:
        """Count `connections` more (or fewer) under `ip` and `opened` more (or fewer)
        in the total; False, changing nothing, if there is no room to count a new address."""
        ...


class LocalCounts:
    """The counts of one process: a thread lock and a Counter."""

    def __init__(self) -> None:
        self.open = 0
        self._per_ip: Counter[str] = Counter()
        self._lock = threading.Lock()

    def locked(self) -> AbstractContextManager[object]:
        return self._lock

    def total(self) -> int:
        return self.open

    def of(self, ip: str) -> int:
        return self._per_ip[ip]

    def add(self, ip: str, connections: int, *, opened: int = 0) -> bool:
        self.open += opened
        self._per_ip[ip] += connections
        if not self._per_ip[ip]:
            del self._per_ip[ip]
        return True


class Admission:
    """Counts open connections, overall and per client address, against the limits.

    Thread-safe: blocking models admit in the accept loop and release in handler threads.
    The counts are this process's unless `counts` says otherwise (the `workers` model
    shares them between its processes, so the limits bound the whole server).
    """

    def __init__(self, max_connections: int, max_per_ip: int, counts: Counts | None = None) -> None:
        self.max_connections = max_connections or math.inf
        self.max_per_ip = max_per_ip or math.inf
        self.counts: Counts = LocalCounts() if counts is None else counts

    @classmethod
    def from_config(cls, config: ServerConfig) -> Admission:
        return cls(config.max_connections, config.max_per_ip)

    @property
    def open(self) -> int:
        return self.counts.total()

    def admit(self, ip: str, *, per_ip: bool = True) -> str | None:
        """Count the connection in and return None, or return why it is turned away.
        `per_ip=False` skips the per-address limit (a trusted proxy carries many clients;
        each is checked when its PROXY header names it). An address that cannot be
        counted (a full shared table) is turned away as over the per-address limit."""
        counts = self.counts
        with counts.locked():
            if counts.total() >= self.max_connections:
                return OVER_MAX_CONNECTIONS
            if per_ip and counts.of(ip) >= self.max_per_ip:
                return OVER_MAX_PER_IP
            if not counts.add(ip, 1, opened=1):
                return OVER_MAX_PER_IP
            return None

    def transfer(self, from_ip: str, to_ip: str) -> str | None:
        """Count a connection under another address (the real client a PROXY header
        names); None, or why that address may not have another connection."""
        counts = self.counts
        with counts.locked():
            if from_ip == to_ip:
                return None
            if counts.of(to_ip) >= self.max_per_ip or not counts.add(to_ip, 1):
                return OVER_MAX_PER_IP
            counts.add(from_ip, -1)
            return None

    def release(self, ip: str) -> None:
        counts = self.counts
        with counts.locked():
            counts.add(ip, -1, opened=-1)


@dataclass(frozen=True, slots=True)
class Wait:
    """How long the next read or write may block, and what it means if it runs out."""

    timeout_s: float | None
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """A server's time limits, in seconds, None for none (0 in the config): one object
    for all its connections.

    - idle: no byte received for this long (while nothing is waiting to be sent);
    - send: the client accepts no byte of its echo for this long;
    - lifetime: the connection is this old, however busy.
    """

    idle_s: float | None
    send_s: float | None
    lifetime_s: float | None

    @classmethod
    def from_config(cls, config: ServerConfig) -> TimeLimits:
        return cls(
            config.idle_timeout_s or None,
            config.send_timeout_s or None,
            config.max_lifetime_s or None,
        )

    def sweep_interval_s(self, *other_limits_s: float) -> float | None:
        """How often a sweep over every connection must look, for these limits and the
        others given (handshake deadlines): a limit is enforced at most a quarter of
        itself late, and within a second. None when there is nothing to enforce."""
        limits = (self.idle_s, self.send_s, self.lifetime_s, *other_limits_s)
        shortest_s = min((limit_s for limit_s in limits if limit_s), default=None)
        return None if shortest_s is None else min(1.0, max(0.01, shortest_s / 4))


class Deadlines:
    """How long one connection's next read or send may block (blocking models)."""

    __slots__ = ("clock", "idle_s", "lifetime_ends", "send_s")

    def __init__(self, limits: TimeLimits, opened_at: float, clock: Clock = time.monotonic):
        self.idle_s = limits.idle_s
        self.send_s = limits.send_s
        self.lifetime_ends = opened_at + limits.lifetime_s if limits.lifetime_s else None
        self.clock = clock

    def for_read(self) -> Wait:
        return self._bounded(self.idle_s, Outcome.IDLE_TIMEOUT)

    def for_send(self) -> Wait:
        return self._bounded(self.send_s, Outcome.SEND_TIMEOUT)

    def _bounded(self, limit_s: float | None, outcome: Outcome) -> Wait:
        if self.lifetime_ends is None:
            return Wait(limit_s, outcome)
        left = max(0.0, self.lifetime_ends - self.clock())
        if limit_s is None or left < limit_s:
            return Wait(left, Outcome.LIFETIME)
        return Wait(limit_s, outcome)


class ProgressWatch:
    """Idle, send and lifetime limits for event-loop models, which sweep all connections
    periodically instead of arming a timer per connection per chunk.

    Each sweep passes the server's `TimeLimits`, the connection's byte count received
    and its bytes still waiting to be sent; the watch says whether a limit has run out.
    A watch is the only per-connection state of the limits (four numbers and when the
    connection opened), since an idle event-loop server is mostly these objects.
    """

    __slots__ = ("_last_in", "_last_pending", "_received_at", "_sent_at", "opened_at")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self._last_in = 0
        self._last_pending = 0
        self._received_at = opened_at
        self._sent_at = opened_at

    def check(
        self, limits: TimeLimits, bytes_in: int, pending_bytes: int, now: float
    ) -> Outcome | None:
        if bytes_in != self._last_in:
            self._last_in = bytes_in
            self._received_at = now
        if pending_bytes < self._last_pending or not pending_bytes:
            self._sent_at = now  # the client took some of its echo (or had none waiting)
        self._last_pending = pending_bytes
        if limits.lifetime_s is not None and now - self.opened_at >= limits.lifetime_s:
            return Outcome.LIFETIME
        if limits.send_s is not None and pending_bytes and now - self._sent_at >= limits.send_s:
            return Outcome.SEND_TIMEOUT
        if (
            limits.idle_s is not None
            and not pending_bytes
            and now - self._received_at >= limits.idle_s
        ):
            return Outcome.IDLE_TIMEOUT
        return None
