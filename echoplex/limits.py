"""Who may connect, and for how long: the server's limits as plain logic, without I/O.

Every model asks `Admission` before serving a connection, and every connection's time
limits are `TimeLimits`, kept by `echoplex.deadlines`: the rules are the same whichever
model runs them, and are tested without sockets.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from .config import ServerConfig

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
