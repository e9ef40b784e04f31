"""Every deadline of an open connection, as plain logic: no I/O, and no clock of its own.

A connection can run out of time five ways: its PROXY header (`--proxy-header-timeout`)
or its TLS handshake (`--tls-handshake-timeout`) takes too long, or, once it echoes, it
is silent too long (`--idle-timeout`), takes none of its echo too long
(`--send-timeout`) or is too old (`--max-lifetime`). `Timeouts` is those five numbers
for a server; a `Watch` is what one connection's deadlines need to know: the step it is
in, since when, and the progress it made when last looked at.

Deadlines are data and the time is given (as trio's cancel scopes carry a deadline and
its run loop sleeps until the earliest one): `Watch.check(timeouts, ..., now)` says
whether a deadline has passed at `now`, and `Watch.next_deadline` when the next one
could. `echoplex.lifecycle.Connections.sweep` asks every open connection's watch, cuts
off those that ran out, and tells its driver how long to wait before looking again; no
driver reads the clock for a connection's deadline. Progress is only seen when looked
at, so a look comes at least every `Timeouts.look_every_s`: a limit is enforced at
most a quarter of itself late, and within a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .limits import TimeLimits
from .outcomes import Outcome


class Step(Enum):
    """The steps of a connection's life that have a deadline of their own, in order."""

    PROXY_HEADER = "a trusted proxy's PROXY header"
    TLS_HANDSHAKE = "the TLS handshake"
    ECHO = "echo until the connection ends"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A server's deadlines, in seconds; None for none."""

    proxy_header_s: float | None
    tls_handshake_s: float | None
    limits: TimeLimits

    @property
    def look_every_s(self) -> float | None:
        """How often the connections must be looked at: a quarter of the shortest
        deadline, between 10 ms and a second; None when there is none to keep."""
        limits = self.limits
        deadlines = (
            self.proxy_header_s,
            self.tls_handshake_s,
            limits.idle_s,
            limits.send_s,
            limits.lifetime_s,
        )
        shortest_s = min((seconds for seconds in deadlines if seconds), default=None)
        return None if shortest_s is None else min(1.0, max(0.01, shortest_s / 4))

    def of_step(self, step: Step) -> tuple[float | None, Outcome]:
        """How long `step` (PROXY header or TLS handshake) may take, and its outcome."""
        if step is Step.PROXY_HEADER:
            return self.proxy_header_s, Outcome.PROXY_HEADER_TIMEOUT
        return self.tls_handshake_s, Outcome.TLS_HANDSHAKE_TIMEOUT


class Watch:
    """One open connection's deadlines: which step it is in and since when, and (while it
    echoes) the progress it had made when last looked at. Its driver's `handle` rides
    along, so the open-connection table needs one object per connection, not two."""

    __slots__ = (
        "_last_in",
        "_last_pending",
        "_sent_at",
        "_since",
        "conditions",
        "handle",
        "opened_at",
        "step",
        "wake_at",
    )

    def __init__(self, handle: Any, opened_at: float) -> None:
        self.handle = handle
        self.opened_at = opened_at
        self.step = Step.ECHO
        # Since when the current deadline counts: the start of the step, moved on while
        # echoing each time a look finds new bytes received.
        self._since = opened_at
        self._sent_at = opened_at  # echoing: when the client last took some of its echo
        self._last_in = 0
        self._last_pending = 0
        self.conditions: Any = None
        """Its `ConnectionConditions`, if it has any: the bytes they hold on purpose are
        not owed to a slow client."""
        self.wake_at = math.inf
        """When its driver asked to be woken for it (its conditions' next action)."""

    def enter(self, step: Step, now: float) -> None:
        """The connection begins `step`: that step's deadline counts from `now`."""
        self.step = step
        self._since = self._sent_at = now

    def check(
        self, timeouts: Timeouts, bytes_in: int, pending_bytes: int, now: float
    ) -> Outcome | None:
        """Which deadline has passed at `now`, if any, given the bytes received so far and
        those still waiting to be sent (both only read while the connection echoes)."""
        limits = timeouts.limits
        if limits.lifetime_s is not None and now - self.opened_at >= limits.lifetime_s:
            return Outcome.LIFETIME
        if self.step is not Step.ECHO:
            step_s, outcome = timeouts.of_step(self.step)
            return outcome if step_s is not None and now - self._since >= step_s else None
        if bytes_in != self._last_in:
            self._last_in = bytes_in
            self._since = now
        if pending_bytes < self._last_pending or not pending_bytes:
            self._sent_at = now  # the client took some of its echo (or had none waiting)
        self._last_pending = pending_bytes
        if limits.send_s is not None and pending_bytes and now - self._sent_at >= limits.send_s:
            return Outcome.SEND_TIMEOUT
        if limits.idle_s is not None and not pending_bytes and now - self._since >= limits.idle_s:
            return Outcome.IDLE_TIMEOUT
        return None

    def next_deadline(self, timeouts: Timeouts) -> float:
        """The earliest time a deadline could pass, as far as the last look knows (inf:
        none). Progress seen by a later look may move it on, never earlier."""
        limits = timeouts.limits
        deadlines = [math.inf]
        if limits.lifetime_s is not None:
            deadlines.append(self.opened_at + limits.lifetime_s)
        if self.step is not Step.ECHO:
            step_s, _ = timeouts.of_step(self.step)
            if step_s is not None:
                deadlines.append(self._since + step_s)
        elif self._last_pending:
            if limits.send_s is not None:
                deadlines.append(self._sent_at + limits.send_s)
        elif limits.idle_s is not None:
            deadlines.append(self._since + limits.idle_s)
        return min(deadlines)
