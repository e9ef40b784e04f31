"""What a load run found: counts, latency, errors, mismatches, and its own CPU cost; for
UDP losses, whether they look like the server's default rate limits; and, for a run
without TLS that no server answered, whether the server seems to speak TLS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ServerConfig
from ..payload import Mismatch
from ..stats import LatencySummary
from ..tls import plaintext_answer
from ..udp_guard import burst_for
from .config import LoadConfig

MAX_SAMPLES = 20  # errors and mismatches kept in detail; all of them are counted
# UDP losses above this share of the datagrams are worth a hint about the server's
# reflection guard, which drops what exceeds its rates.
HIGH_LOSS_SHARE = 0.01
# Answers that fit a default limit: at most a little over what it lets through (the
# client's clock and the server's differ by a few milliseconds), and not far under it
# (a `pingpong` connection waits --timeout after each loss, and a bucket that fills to
# its burst while every connection waits loses what it would have gained).
LIMIT_FIT_ABOVE = 1.1
LIMIT_FIT_BELOW = 0.7
# How a connection the server ended is counted: a FIN while echoes were owed or more
# were to be sent, or a reset (RST; a broken pipe or an abort, too).
CLOSED_EARLY = "closed early"
RESET = "reset"


@dataclass(frozen=True)
class UdpLimit:
    """One of `echoplex serve`'s UDP rate limits, at its default: a token bucket that
    answers a burst of `burst_for(rate)` datagrams, then `rate_per_s` a second."""

    option: str
    what: str
    rate_per_s: float

    @property
    def burst(self) -> float:
        return burst_for(self.rate_per_s)

    def lets_through(self, seconds: float) -> float:
        """Datagrams it answers over `seconds` of a load above its rate, from a full bucket."""
        return self.burst + self.rate_per_s * seconds


# `echoplex serve`'s defaults; a load comes from one address, so it meets the
# per-source limit first.
UDP_DEFAULT_LIMITS = (
    UdpLimit("--udp-rate", "per-source", ServerConfig.udp_rate_per_source),
    UdpLimit("--udp-rate-total", "total", ServerConfig.udp_rate_total),
)


@dataclass(frozen=True)
class ConnectionFailure:
    connection: int
    kind: str
    offset: int
    """Bytes of this connection's echo verified before it failed."""

    detail: str = ""

    def __str__(self) -> str:
        text = f"connection {self.connection} offset {self.offset}: {self.kind}"
        return f"{text} ({self.detail})" if self.detail else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "kind": self.kind,
            "offset": self.offset,
            "detail": self.detail,
        }


@dataclass
class LoadResult:
    config: LoadConfig
    loop: str
    """The event loop that ran the load: uvloop or asyncio."""

    requests: int = 0
    """Messages sent in the measured time whose echo came back whole and verified."""

    measured_s: float = 0.0
    latency: LatencySummary = field(default_factory=LatencySummary)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    error_samples: list[ConnectionFailure] = field(default_factory=list)
    send_lag: LatencySummary | None = None
    """`rate` only: how late messages went out after their intended time, in µs."""

    mismatches: int = 0
    mismatch_samples: list[Mismatch] = field(default_factory=list)
    late_datagrams: int | None = None
    """UDP only: echoes of datagrams already echoed (duplicates) or already counted lost
    (late); neither errors nor mismatches (see `echoplex.load.datagrams`)."""

    connections_opened: int = 0
    connections_alive: int = 0
    connect_start_ns: int = 0
    connect_end_ns: int = 0
    """When the connect phase began and ended (perf_counter_ns, CLOCK_MONOTONIC on
    Linux: one clock for every process of a spread run)."""
    client_cpu_s: float = 0.0
    """CPU time (user + system) of this process over the measured time."""

    interrupted: bool = False
    unfinished: int = 0
    """Messages still in flight when an interrupted run stopped waiting for them."""

    echoed_total: int = 0
    """Messages echoed and verified over the whole run, measured or not (warmup, drain)."""

    sending_s: float = 0.0
    """How long messages were sent for (warmup and measured time; not for `hold`)."""

    shares: list[LoadResult] = field(default_factory=list)
    """The results of the processes the run was spread over (`echoplex.load.merge`);
    empty when it ran in one."""

    @property
    def connect_s(self) -> float:
        """How long the whole set of connections took to open, each within `timeout_s`
        and at most MAX_CONNECTS_IN_FLIGHT at once (`echoplex.load.engine`); for a
        spread run, from the first process's first connect to the last one's last."""
        return max(0, self.connect_end_ns - self.connect_start_ns) / 1e9

    @property
    def processes(self) -> int:
        return len(self.shares) or 1

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches

    @property
    def lost_datagrams(self) -> int:
        """UDP: datagrams whose echo never came back within `timeout_s` (errors)."""
        return self.errors_by_kind.get("lost", 0)

    @property
    def high_udp_loss(self) -> bool:
        """UDP datagrams lost worth a hint: at least HIGH_LOSS_SHARE of them, or any
        number that fits a default rate limit (`udp_limit_met`). A few connections meet
        the per-source limit with few losses but long waits: each `pingpong` connection
        waits --timeout after a loss, and the bucket refills meanwhile (`-c 2 -d 3s`
        answers its bursts of 200 and loses 4 datagrams, under 1%)."""
        lost = self.lost_datagrams
        if not (self.config.udp and lost > 0):
            return False
        return lost >= HIGH_LOSS_SHARE * (lost + self.requests) or self.udp_limit_met() is not None

    @property
    def datagrams_answered(self) -> int:
        """UDP: datagrams the server answered (echoes verified, and echoes too late)."""
        return self.echoed_total + (self.late_datagrams or 0)

    @property
    def tls_suspected(self) -> str | None:
        """Why the server seems to speak TLS (in `echoplex client`'s words), when a run
        without --tls had every connection that failed ended by the server (closed or
        reset) before a byte of echo came back, and none echoed anything; else None.
        As for the client, a "seems": an echo server that ends every connection at
        once (`--close-after 0`) looks the same."""
        if self.config.tls or self.config.udp or self.echoed_total or self.mismatches:
            return None
        ended = bool(self.errors_by_kind) and set(self.errors_by_kind) <= {CLOSED_EARLY, RESET}
        if not ended or any(failure.offset for failure in self.error_samples):
            return None
        return plaintext_answer(b"", ended=True)

    def udp_limit_met(self) -> UdpLimit | None:
        """The server's default rate limit that the UDP losses look like, if one does.

        Against a limit at its default, a load faster than the limit has the bucket's
        burst answered, then the limit's rate, and loses the rest: the server answers
        about `lets_through(sending_s)` datagrams. That many answers, with losses,
        point to that limit. A likelihood, not proof: a bucket drained by another run
        less than two seconds before, or a limit set by hand, fits no default, and then
        the hint stays general.
        """
        if not (self.config.udp and self.lost_datagrams > 0):
            return None
        answered = self.datagrams_answered
        for limit in UDP_DEFAULT_LIMITS:
            expected = limit.lets_through(self.sending_s)
            if LIMIT_FIT_BELOW * expected <= answered <= LIMIT_FIT_ABOVE * expected:
                return limit
        return None

    @property
    def bytes(self) -> int:
        """Payload bytes echoed and verified (each counted once, not once per direction)."""
        return self.requests * self.config.size_bytes

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def client_cpu_us_per_request(self) -> float | None:
        return self.client_cpu_s * 1e6 / self.requests if self.requests else None

    def to_json(self) -> dict[str, Any]:
        """The run: what was asked (`config_json`), then every figure; `per_process` has
        the figures of each process (the run itself when it ran in one)."""
        return {
            "ok": self.ok,
            **config_json(self.config),
            "loop": self.loop,
            **self._figures(),
            "udp_limit_suspected": self._udp_limit_json(),
            "tls_suspected": self.tls_suspected,
            "processes": self.processes,
            "per_process": [
                {
                    "first_connection": share.config.first_connection,
                    "connections": share.config.connections,
                    "rate": share.config.rate_per_s,
                    **share._figures(),
                }
                for share in self.shares or [self]
            ],
        }

    def _udp_limit_json(self) -> dict[str, Any] | None:
        limit = self.udp_limit_met()
        if limit is None:
            return None
        return {
            "option": limit.option,
            "rate_per_s": limit.rate_per_s,
            "burst": limit.burst,
            "datagrams_answered": self.datagrams_answered,
            "sending_s": round(self.sending_s, 6),
        }

    def _figures(self) -> dict[str, Any]:
        cpu_per_request = self.client_cpu_us_per_request
        return {
            "measured_s": round(self.measured_s, 6),
            "requests": self.requests,
            "requests_per_s": round(self.requests_per_s, 3),
            "bytes": self.bytes,
            "mb_per_s": round(self.mb_per_s, 6),
            "latency_us": self.latency.to_dict(),
            "send_lag_us": self.send_lag.to_dict() if self.send_lag is not None else None,
            "errors": self.errors,
            "errors_by_kind": dict(sorted(self.errors_by_kind.items())),
            "error_samples": [failure.to_dict() for failure in self.error_samples],
            "mismatches": self.mismatches,
            "mismatch_samples": [
                {
                    "connection": m.connection,
                    "offset": m.offset,
                    "expected": m.expected,
                    "received": m.received,
                }
                for m in self.mismatch_samples
            ],
            "late_datagrams": self.late_datagrams,
            "connections_opened": self.connections_opened,
            "connections_alive": self.connections_alive,
            "connect_s": round(self.connect_s, 6),
            "client_cpu_s": round(self.client_cpu_s, 6),
            "client_cpu_us_per_request": (
                round(cpu_per_request, 3) if cpu_per_request is not None else None
            ),
            "interrupted": self.interrupted,
            "unfinished": self.unfinished,
        }


def config_json(config: LoadConfig) -> dict[str, Any]:
    """What a run was asked to do, as its JSON object opens (a failed run's too)."""
    return {
        "pattern": config.pattern,
        "transport": config.transport,
        "host": config.host,
        "port": config.port,
        "unix_path": config.unix_path,
        "proxy_header": config.send_proxy,
        "connections": config.connections,
        "size": config.size_bytes,
        "duration_s": config.duration_s,
        "warmup_s": config.warmup_s,
        "rate": config.rate_per_s,
        "window": config.window_bytes if config.pattern_class.uses("window_bytes") else None,
        "connect_rate": config.connect_rate_per_s,
        "source": list(config.sources) if config.source is not None else None,
        "timeout_s": config.timeout_s,
        "seed": config.seed,
    }
