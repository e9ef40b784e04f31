"""What a server reports as it runs, and the two ways of reporting it.

Models call these hooks; they never print or log directly. `LogEvents` is the
`echoplex serve` default (stderr, one line per connection); the tutorial's front
door prints its own lines (`echoplex.tutorial`). `data_received` is only called
when `ServerConfig.log_data` is set, so the echo hot path pays nothing for it.

`run()` also reports the start (version, model, event loop) and, once everything has
drained, the stop, to events that have the `RunEvents` hooks (`announced`).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._net import format_address
from ._throttle import Throttle
from .outcomes import Outcome, label

# Numbers connections in the order this process accepts them (workers count each for
# themselves). next() on a count is atomic under the GIL: no lock for the threads.
_connection_ids = itertools.count(1)


@dataclass(slots=True, eq=False)  # compared by identity: records key tables
class ConnectionRecord:
    """Running totals for one connection, filled in by the model that serves it."""

    peer: Any
    opened_at: float = field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0
    via: Any = None
    """The proxy the connection came through, when a PROXY header named `peer`."""
    zero_copy: bool = False
    """The stream was echoed kernel to kernel (splice), not through Python."""
    opened_reported: bool = False
    """Set by reporters that count open connections, so a connection that ended before
    it was reported open (a failed TLS handshake) is not counted closed twice."""
    outcome: Outcome | None = None
    """How it ended (`echoplex.outcomes`); the first cause recorded wins."""
    detail: str | None = None
    """What the outcome needs said besides (an errno's name, a PROXY error, a limit)."""
    client_cert: str | None = None
    """Under mutual TLS, the subject of the client's certificate (`CN=alice`)."""
    conditions: str = ""
    """The conditions on purpose this connection got, as `latency=0.2s close-after=100`
    (empty: none): its close log line names them, and metrics count them."""
    conditions_version: int = 0
    """Which set of conditions it took them from (`LiveConditions.version`): when the
    control API changes them, an open connection takes the new ones from its next chunk."""
    conn_id: int = field(default_factory=_connection_ids.__next__)
    """This connection's number in its process (1, 2, ...): its open and close log lines
    carry it, so they can be matched where the peer does not tell connections apart
    (every Unix socket client is `unix`)."""

    @property
    def condition_names(self) -> list[str]:
        """The conditions it got, each once, in order (`latency`, `close-after`), from
        `conditions` (which may say `latency=0.2s then none` after a live change)."""
        names = (word.partition("=")[0] for word in self.conditions.split() if "=" in word)
        return list(dict.fromkeys(names))

    def finish(self, outcome: Outcome, detail: str | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail

    @property
    def outcome_label(self) -> str:
        """The outcome as logs and metrics show it: `closed`, `error:EPIPE`, ..."""
        return label(self.outcome or Outcome.CLOSED, self.detail)

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.opened_at


class ServerEvents(Protocol):
    def listening(self, addresses: list[Any]) -> None:
        """The server accepts connections on these socket addresses (the readiness signal)."""

    def connection_opened(self, record: ConnectionRecord) -> None: ...

    def data_received(self, record: ConnectionRecord, data: bytes) -> None: ...

    def connection_closed(self, record: ConnectionRecord) -> None: ...

    def connection_rejected(self, peer: Any, reason: str) -> None:
        """Accepted and closed at once: over a limit (`max-connections`, `max-per-ip`)."""

    def stopping(self) -> None:
        """A stop was requested: the listener is closed, open connections drain."""


@runtime_checkable
class DatagramEvents(Protocol):
    """What the UDP echo (`echoplex.udp`) reports besides `ServerEvents`; `LogEvents` has
    both. Events without these hooks are told of UDP addresses through `listening`."""

    def udp_listening(self, addresses: list[Any]) -> None:
        """The server answers UDP datagrams on these socket addresses."""

    def udp_dropped(self, counts: dict[str, int], last_source: Any) -> None:
        """Datagrams left unanswered since the last report, by reason; at most once a second."""

    def udp_stopped(self, answered: int, dropped: dict[str, int]) -> None:
        """UDP stopped: datagrams answered and dropped (by reason) in all."""


@dataclass(frozen=True)
class BuildInfo:
    """What is running: logged at the start, exported as `echoplex_build_info`."""

    version: str
    model: str
    loop: str
    """`uvloop` or `asyncio`; `none` when nothing runs an event loop (the blocking models
    without UDP)."""


class RunEvents(Protocol):
    """What `run()` reports besides `ServerEvents`, to events that have these hooks
    (`LogEvents` has both; the metrics export the first)."""

    def starting(self, build: BuildInfo) -> None:
        """The server is configured and bound, about to serve."""

    def stopped(self) -> None:
        """The server has stopped: drained, every connection and the UDP echo closed."""


class QuietEvents:
    """Reports nothing: subclass it and override only the events you want to hear of."""

    def listening(self, addresses: list[Any]) -> None:
        pass

    def connection_opened(self, record: ConnectionRecord) -> None:
        pass

    def data_received(self, record: ConnectionRecord, data: bytes) -> None:
        pass

    def connection_closed(self, record: ConnectionRecord) -> None:
        pass

    def connection_rejected(self, peer: Any, reason: str) -> None:
        pass

    def stopping(self) -> None:
        pass


class LogEvents:
    """Reports through the `echoplex.server` logger: one line per connection opened and closed."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("echoplex.server")
        self._rejections_throttle = Throttle()

    # Each line also carries its fields in `extra`, for `--log-format json`.

    def starting(self, build: BuildInfo) -> None:
        # Not "listening on ...": the start line must not match what tools wait for.
        self.log.info(
            "starting echoplex %s (model %s, loop %s)",
            build.version,
            build.model,
            build.loop,
            extra={
                "event": "starting",
                "version": build.version,
                "model": build.model,
                "loop": build.loop,
            },
        )

    def stopped(self) -> None:
        self.log.info("stopped", extra={"event": "stopped"})

    def listening(self, addresses: list[Any]) -> None:
        for address in addresses:
            where = format_address(address)
            self.log.info("listening on %s", where, extra={"event": "listening", "address": where})

    def connection_opened(self, record: ConnectionRecord) -> None:
        peer = _peer(record)
        fields: dict[str, Any] = {"event": "open", "peer": peer, "conn_id": record.conn_id}
        words = ""
        if record.via is not None:
            fields["via"] = format_address(record.via)
            words += f" via {fields['via']}"
        if record.client_cert is not None:
            fields["client_cert"] = record.client_cert
            words += f" client-cert={record.client_cert!r}"  # quoted: a subject has spaces
        self.log.info("open %s%s", peer, words, extra=fields)

    def data_received(self, record: ConnectionRecord, data: bytes) -> None:
        peer = _peer(record)
        fields = {"event": "data", "peer": peer, "conn_id": record.conn_id}
        self.log.info("%s Received: %r", peer, data, extra=fields)

    def connection_closed(self, record: ConnectionRecord) -> None:
        peer = _peer(record)
        outcome = record.outcome_label
        duration_s = record.duration_s
        self.log.info(
            "close %s in=%d out=%d duration=%.3fs outcome=%s%s%s",
            peer,
            record.bytes_in,
            record.bytes_out,
            duration_s,
            outcome,
            " zero-copy" if record.zero_copy else "",
            f" conditions: {record.conditions}" if record.conditions else "",
            extra={
                "event": "close",
                "peer": peer,
                "conn_id": record.conn_id,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "duration_s": round(duration_s, 6),
                "outcome": outcome,
                "zero_copy": record.zero_copy,
                "conditions": record.conditions,
            },
        )

    def connection_rejected(self, peer: Any, reason: str) -> None:
        # A flood of rejections must not become a flood of log lines: one per second.
        suppressed = self._rejections_throttle.allow(reason)
        if suppressed is not None:
            where = format_address(peer)
            self.log.warning(
                "rejected %s: over %s (%d more rejected since the last such message)",
                where,
                reason,
                suppressed,
                extra={
                    "event": "rejected",
                    "peer": where,
                    "reason": reason,
                    "suppressed": suppressed,
                },
            )

    def stopping(self) -> None:
        # The rejections the throttle held back since its last line: every one is told.
        for reason, suppressed in sorted(self._rejections_throttle.suppressed.items()):
            self.log.warning(
                "rejected %d more over %s since the last such message",
                suppressed,
                reason,
                extra={"event": "rejected", "reason": reason, "suppressed": suppressed},
            )
        self._rejections_throttle.suppressed.clear()
        self.log.info(
            "stopping: no new connections; draining open ones", extra={"event": "stopping"}
        )

    def udp_listening(self, addresses: list[Any]) -> None:
        # Not "listening on HOST:PORT", which names the TCP listeners to those who parse it.
        for address in addresses:
            where = format_address(address)
            self.log.info(
                "listening on udp %s", where, extra={"event": "udp_listening", "address": where}
            )

    def udp_dropped(self, counts: dict[str, int], last_source: Any) -> None:
        source = format_address(last_source) if last_source is not None else "unknown"
        self.log.warning(
            "udp: dropped %s (%s), the last from %s",
            _datagrams(sum(counts.values())),
            _by_reason(counts),
            source,
            extra={"event": "udp_dropped", "dropped": dict(counts), "peer": source},
        )

    def udp_stopped(self, answered: int, dropped: dict[str, int]) -> None:
        self.log.info(
            "udp: stopped; answered %s, dropped %d%s",
            _datagrams(answered),
            sum(dropped.values()),
            f" ({_by_reason(dropped)})" if dropped else "",
            extra={"event": "udp_stopped", "answered": answered, "dropped": dict(dropped)},
        )


def _peer(record: ConnectionRecord) -> str:
    """The peer as the connection's log lines name it. A Unix socket client has no
    address of its own (they are all `unix`): its number is added (`unix#7`), so that
    its open line can be matched to its close line."""
    peer = format_address(record.peer)
    return peer if isinstance(record.peer, tuple) else f"{peer}#{record.conn_id}"


def _datagrams(count: int) -> str:
    return f"{count} datagram" if count == 1 else f"{count} datagrams"


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
